"""The run folder: its layout in one place. `train` writes through it; `infer` and `report` read
through it.

    RUN_DIR/config.yaml            resolved config of the run
    RUN_DIR/cv_summary.csv         --fold all: fold, patient, Dice (best and last checkpoint)
    RUN_DIR/report.html            `run.py report`
    RUN_DIR/fold_<k>/config.yaml   the fold's resolved config: the model, and the normalisation recipe
                                   (train.ct_window, train.mr_percentiles, roi_size, pixel_spacing)
                     split.json    patients and cases of training and validation, the modalities trained on
                     best.pt, last.pt, train.log, metrics.csv (one row per epoch), curves.png

Runs trained before hold labels.json and normalisation.json beside them; nothing reads those (the
config states both), and such runs still load.

Checkpoints hold tensors and plain Python types only and load with `torch.load(weights_only=True)`;
"model" is the state dict to predict with.
"""
from __future__ import annotations

import csv
import json
import math
import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from pipeline.core.config import Config, ConfigError, config_from_dict, save_config
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, is_zip_link, write_csv, write_json

CONFIG = "config.yaml"
CV_SUMMARY = "cv_summary.csv"
REPORT = "report.html"
SPLIT = "split.json"
METRICS = "metrics.csv"
CURVES = "curves.png"
TRAIN_LOG = "train.log"
CHECKPOINTS = ("best", "last")
_FOLD = re.compile(r"^fold_(\d+)$")


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{int(fold)}"


def fold_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(fold number, folder) of every fold_<k> folder, in numeric order (fold_10 after fold_9)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _FOLD.match(p.name))]
    return sorted(found)


def checkpoint_path(fold_folder: str | Path, which: str) -> Path:
    """fold_<k>/best.pt or fold_<k>/last.pt."""
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint {which!r} is not one of {CHECKPOINTS}")
    return Path(fold_folder) / f"{which}.pt"


def select_checkpoints(run_dir: str | Path, folds: str, which: str) -> list[Path]:
    """The `which` checkpoint of every fold ("all") or of fold `folds`; an error naming the run
    when there is none."""
    run_dir = Path(run_dir)
    chosen = [checkpoint_path(d, which) for k, d in fold_dirs(run_dir) if folds == "all" or str(k) == str(folds)]
    paths = [p for p in chosen if p.is_file()]
    if not paths:
        where = "any fold_*" if folds == "all" else f"fold_{folds}"
        raise PipelineError(f"{run_dir}: no {which}.pt checkpoint in {where}")
    return paths


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """torch.save, written under a temporary name and renamed when complete."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict (weights_only), with a one-line error naming the file when it cannot be
    read or holds no "model" weights."""
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise PipelineError(f"{path}: cannot load checkpoint ({_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (no 'model' weights)")
    return ckpt


def load_weights(model, path: str | Path, state: dict):
    """model.load_state_dict(state), with a one-line error naming the checkpoint on a mismatch."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise PipelineError(f"{path}: checkpoint does not fit the run's model ({_first_line(exc)})") from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config(folder: str | Path) -> Config:
    """The resolved config saved in a run or fold folder."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise PipelineError(f"{folder}: not a run folder ({CONFIG} missing)")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(run_dir) / CONFIG)


def write_fold_metadata(folder: Path, cfg: Config, fold: int, train: list[dict], val: list[dict]) -> None:
    """What infer needs besides the weights: the fold's config and its split."""
    save_config(cfg, folder / CONFIG)
    write_json(folder / SPLIT, {
        "fold": fold,
        "train": {"patients": sorted({e["patient"] for e in train}), "cases": sorted(e["case"] for e in train)},
        "val": {"patients": sorted({e["patient"] for e in val}), "cases": sorted(e["case"] for e in val)},
        "modalities": sorted({e["modality"] for e in train}),  # what the model was trained on (export reads it)
    })


def read_split(fold_folder: str | Path) -> dict | None:
    """A fold's split.json ({"fold", "train": {"patients", "cases"}, "val": {...}, "modalities"}); None
    when the fold has none, a one-line error when it cannot be read."""
    path = Path(fold_folder) / SPLIT
    if not path.is_file():
        return None
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None
    if not isinstance(split, dict):
        raise PipelineError(f"{path}: expected a mapping")
    return split


# --------------------------------------------------------------------------- metrics.csv
def metrics_columns(patients: list[str]) -> list[str]:
    """metrics.csv's columns: one row per epoch; the validation columns are empty on epochs without one.
    val_dice_* are the Dice of the mask infer would write (post-processed), val_raw_dice_mean before it."""
    return ["epoch", "train_loss", "val_loss", "val_dice_mean", *[f"val_dice_{p}" for p in patients],
            "val_raw_dice_mean", "val_confidence_min", "lr", "epoch_time_s"]


def write_metrics(fold_folder: str | Path, rows: list[dict], patients: list[str]) -> Path:
    return write_csv(Path(fold_folder) / METRICS, rows, metrics_columns(patients))


def read_metrics(fold_folder: str | Path) -> list[dict]:
    """metrics.csv's rows with numbers as floats (epoch as int) and empty cells as None; a one-line
    error when the file is missing or not a metrics.csv."""
    path = Path(fold_folder) / METRICS
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if rows and "epoch" not in rows[0]:
        raise PipelineError(f"{path}: not a metrics.csv (no epoch column)")
    return [{k: _cell(k, v) for k, v in r.items() if k is not None} for r in rows]


def _cell(column: str, text: str | None):
    if text is None or not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if column == "epoch" else value


def improves(row: Mapping, best_dice: float) -> bool:
    """The best-epoch rule: an epoch is the new best when its val_dice_mean (a number or its text) is
    finite and higher than the best so far (the first of equal epochs stays). Training saves best.pt by it."""
    try:
        dice = float(row.get("val_dice_mean"))
    except (TypeError, ValueError):
        return False
    return math.isfinite(dice) and dice > best_dice


def best_row(rows: Iterable[Mapping]) -> Mapping | None:
    """The best epoch of a fold by `improves`; None when no epoch was validated (report and curves)."""
    best, best_dice = None, -math.inf
    for row in rows:
        if improves(row, best_dice):
            best, best_dice = row, float(row["val_dice_mean"])
    return best


# --------------------------------------------------------------------------- a run as one file
ZIP_FILES = (CONFIG, SPLIT)  # per fold, beside the checkpoints; the run's config.yaml too
# labels.json and normalisation.json: written by runs trained before, accepted so that their zips still load
_ZIP_MEMBER = re.compile(r"^(config\.yaml|fold_\d+/(config\.yaml|labels\.json|normalisation\.json|split\.json|"
                         r"best\.pt|last\.pt))$")
_OPENED: dict[tuple, Path] = {}  # (zip path, its signature) -> folder it was unpacked into (for this process)


def export_zip(run_dir: str | Path, out: str | Path, folds: str = "all", which: str = "best") -> Path:
    """The run as one zip holding only what inference needs: the run's config.yaml and, per chosen
    fold, its config, split and `which` checkpoint reduced to what inference reads (inference_checkpoint)."""
    import zipfile

    run_dir, out = Path(run_dir), Path(out)
    read_config(run_dir)  # a run folder, or a one-line error
    checkpoints = select_checkpoints(run_dir, folds, which)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(run_dir / CONFIG, CONFIG)
        for ck in checkpoints:
            for name in ZIP_FILES:
                if (ck.parent / name).is_file():
                    z.write(ck.parent / name, f"{ck.parent.name}/{name}")
            z.writestr(f"{ck.parent.name}/{ck.name}", inference_checkpoint(load_checkpoint(ck)))
    return out


# What inference reads of a checkpoint: the weights, and the last validation's confidence (history's last
# row) for the quality check; the epoch counters for the record. Not the optimizer, scheduler, random
# streams or raw weights of a weight average: training's resume state, most of a checkpoint's size.
INFERENCE_KEYS = ("model", "epoch", "best_dice", "best_epoch", "config")


def inference_checkpoint(ckpt: dict) -> bytes:
    """A checkpoint reduced to what inference reads (INFERENCE_KEYS and the last history row), serialised."""
    import io

    import torch

    slim = {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}
    slim["history"] = list(ckpt.get("history") or [])[-1:]
    buf = io.BytesIO()
    torch.save(slim, buf)
    return buf.getvalue()


def signature(path: str | Path) -> tuple:
    """What a cache of a loaded run is keyed by, beside its path: the size and modification time of the
    zip, or of the run folder's config and checkpoints, so that a run trained or exported again is
    loaded again."""
    path = Path(path)
    files = [path] if path.is_file() else [path / CONFIG, *sorted(path.glob("fold_*/*.pt")), *sorted(path.glob("fold_*/" + CONFIG))]
    return tuple((f.name, s.st_size, s.st_mtime_ns) for f in files if f.exists() for s in [f.stat()])


def open_run(path: str | Path) -> Path:
    """A run folder as it is, or a zip of one (export_zip) unpacked once per process into a temporary
    folder. Members are checked before anything is written: only the run layout's own file names
    (no absolute paths, no '..', no links), so a crafted zip cannot write elsewhere."""
    import atexit
    import shutil
    import tempfile
    import zipfile

    path = Path(path)
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return path
    key = (str(path.resolve()), signature(path))  # a zip written again is unpacked again
    if key in _OPENED:
        return _OPENED[key]
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            bad = [m.filename for m in members if not _ZIP_MEMBER.match(m.filename) or m.is_dir()
                   or is_zip_link(m)]
            if bad:
                raise PipelineError(f"{path}: not a run zip (unexpected member {bad[0]!r})")
            folder = Path(tempfile.mkdtemp(prefix="run-zip-"))
            atexit.register(shutil.rmtree, folder, True)
            for m in members:
                target = folder / m.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PipelineError(f"{path}: unreadable run zip ({exc})") from None
    _OPENED[key] = folder
    return folder
