"""`run.py train`: one fold or the whole cross-validation, its summary, and the planning before it
(auto pixel spacing).
"""
from __future__ import annotations

import copy
import logging
import statistics
from pathlib import Path

import numpy as np

from pipeline.core import runs
from pipeline.core.config import Config
from pipeline.core.console import format_table
from pipeline.core.files import safe_name, write_csv
from pipeline.datasets.datalist import read_datalist
from pipeline.train.distributed import distributed
from pipeline.train.fold import FoldResult, train_fold

log = logging.getLogger(__name__)


def write_cv_summary(run_dir: Path, results: list[FoldResult]) -> None:
    """cv_summary.csv: fold, patient, Dice at the best checkpoint and at the last validation."""
    rows = [{"fold": r.fold, "patient": p, "dice": d, "dice_last": r.dice_last.get(p, float("nan"))}
            for r in results for p, d in sorted(r.dice_best.items())]
    write_csv(run_dir / runs.CV_SUMMARY, rows, ["fold", "patient", "dice", "dice_last"])


def format_cv_summary(results: list[FoldResult]) -> str:
    """The cross-validation table: one line per fold, then the means over every patient. The best
    checkpoint is chosen on the validation patients, which flatters it: the last one is beside it."""
    rows, best_all, last_all = [], [], []
    for r in results:
        best, last = list(r.dice_best.values()), list(r.dice_last.values())
        best_all, last_all = best_all + best, last_all + last
        rows.append([r.fold, len(best), f"{np.mean(best):.4f}", f"{min(best):.4f}", r.best_epoch, f"{np.mean(last):.4f}",
                     f"{r.minutes:.1f}"])
    lines = [format_table(["fold", "patients", "best Dice", "min", "best epoch", "last Dice", "minutes"], rows)]
    for name, values in (("best checkpoint", best_all), ("last checkpoint", last_all)):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"all folds, {name}: Dice {np.mean(values):.4f} ± {std:.4f} "
                     f"(mean ± std over {len(values)} patients)")
    return "\n".join(lines)


def auto_pixel_spacing(cfg: Config, entries: list[dict], announce: bool = True) -> Config:
    """`train.pixel_spacing: auto` -> the spacing (mm, 2 decimals) that fits the median field of view of
    the data set's volumes into roi_size (nnU-Net's choice of the median), on a copy of `cfg`.

    Every fold of a run shares it (infer preprocesses a case once for its fold ensemble), so it comes
    from all the volumes, not from one fold's. A model then sees a liver at one size in pixels
    whatever field of view a scanner chose: resizing every slice to roi_size instead shrank livers on
    wider fields of view (docs/decisions.md#pixel-spacing).
    Headers only (nibabel reads no voxels); the axes as RAS orientation will put them. `announce`:
    log the choice (one process of several does).
    """
    three_d = cfg.model.dims == 3 and cfg.train.slice_spacing == "auto"
    if (cfg.train.pixel_spacing != "auto" and not three_d) or not entries:
        return cfg
    import nibabel as nib

    from pipeline.model.transforms import in_plane_fov_mm

    cfg = copy.deepcopy(cfg)
    if cfg.train.pixel_spacing == "auto":
        per_volume = []
        for e in entries:
            img = nib.load(str(e["image"]))
            fov = in_plane_fov_mm(img.shape, img.affine)
            per_volume.append(max(fov[0] / cfg.train.roi_size[0], fov[1] / cfg.train.roi_size[1]))
        cfg.train.pixel_spacing = round(float(np.median(per_volume)), 2)
        if announce:
            log.info("train.pixel_spacing=auto: %.2f mm (the median field of view of %d volumes fits roi %s; volumes "
                     "need %.2f-%.2f mm)", cfg.train.pixel_spacing, len(per_volume), cfg.train.roi_size,
                     min(per_volume), max(per_volume))
    if three_d:  # model.dims 3: the through-plane voxel size too (pipeline.model.volumetric)
        from pipeline.model.volumetric import auto_slice_spacing

        cfg.train.slice_spacing = auto_slice_spacing(cfg, entries)
        if announce:
            log.info("train.slice_spacing=auto: %.2f mm (the median slice spacing of %d volumes)",
                     cfg.train.slice_spacing, len(entries))
    return cfg


def run_training(data_dir: str | Path, run_dir: str | Path, fold: str | int, cfg: Config,
                 resume: bool = False) -> list[FoldResult]:
    """Train fold `fold` ("0".."k-1") or every fold ("all") of DATA_DIR's datalist into RUN_DIR.

    Returns one FoldResult per fold trained; with "all", RUN_DIR/cv_summary.csv is written too
    (`format_cv_summary` gives the table `run.py` prints).
    """
    run_dir = Path(run_dir)
    datalist = read_datalist(data_dir)
    folds = datalist.parse_folds(fold)
    for e in datalist.entries:
        safe_name(e["patient"], "patient id")  # patients become CSV columns and log lines
    if resume and (run_dir / runs.CONFIG).is_file():
        # a resumed run keeps the spacing its models were trained at (runs from before "auto" saved 0)
        cfg, saved = copy.deepcopy(cfg), runs.read_config(run_dir).train
        for key in ("pixel_spacing", "slice_spacing"):
            if getattr(cfg.train, key) == "auto":
                setattr(cfg.train, key, getattr(saved, key))
    with distributed(cfg.train.device) as (dd, device):
        cfg = auto_pixel_spacing(cfg, datalist.entries, announce=dd.main)
        if dd.main:
            runs.write_run_config(run_dir, cfg)
        results = [train_fold(datalist, run_dir, k, cfg, dd, device, resume) for k in folds]
        if dd.main and str(fold) == "all":
            write_cv_summary(run_dir, results)
    return results
