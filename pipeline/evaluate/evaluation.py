"""Score predicted liver masks against references with the CHAOS metrics: `run.py evaluate`.

Either side may be
- a NIfTI file, or a folder of NIfTI files matched by case name. References: `<case>.nii.gz`
  (e.g. prepare's labelsTr/), liver = label 1. Predictions: `<case>_liver.nii.gz` (infer's
  output) or `<case>.nii.gz`, liver = any non-zero voxel.
- a folder of PNG slices (CHAOS Ground or submission style), with the series' DICOM folder
  (`dicom`) giving the geometry: PNG i in natural file-name order belongs to DICOM file i in
  natural file-name order. A stack in MR Ground grey levels (liver 55..70 plus other organs)
  counts only the liver band; any other stack (CT Ground 0/1, submissions at 63 or 255):
  any non-zero pixel is liver. The same rule holds for predictions and references.
- a folder of such PNG folders, one per case, named `<case>` or `<case>_png` (infer's
  `--format chaos-png`), with `dicom` (or a CHAOS-root `ref`) giving each case's geometry.
- a CHAOS root (Train_Sets layout): every case with a Ground folder, Ground paired with its
  DICOM files by `pipeline.datasets.chaos.pair_ground` (MR by stem, CT by index; verified).
`dicom` may be one DICOM series folder (for a single PNG case) or a CHAOS root.

Every reference case needs a prediction: a missing one is an error naming the case, unless
`cfg.evaluate.missing == "skip"` (then it is listed under "missing" in metrics.json and left
out of the means). Predictions without a reference are ignored with a log line.
Prediction and reference must have the same shape and affine (within 1e-3), else an error
naming both files. Metrics are computed in world mm from the reference's affine
(`pipeline.evaluate.metrics`).

Outputs in out_dir (written atomically): metrics.csv (one row per case), metrics.json (the same
rows plus mean and std per metric; non-finite values written as null) and config.yaml; a
summary table is printed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core import results
from pipeline.core.config import Config, save_config
from pipeline.core.console import format_table, progress
from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name, write_csv, write_json
from pipeline.core.labels import LIVER
from pipeline.datasets.chaos import is_chaos_root, list_pngs, png_stack_liver
from pipeline.dicom.volume import is_nifti, nifti_stem, read_dicom_series, read_nifti

log = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-3


@dataclass
class MaskSource:
    """One case's mask on disk; `load()` -> (bool mask in NIfTI order (i, j, k), 4x4 affine in mm)."""

    case: str
    path: Path  # named in error messages: the NIfTI file or the PNG folder
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def read_nifti_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mask NIfTI -> (bool liver array (i, j, k), affine)."""
    volume = read_nifti(path, dtype=None)
    data = volume.array
    if data.ndim != 3:
        raise PipelineError(f"{path}: expected a 3-D mask, got shape {data.shape}")
    # A binary mask (one non-zero value, e.g. 1 or 255) is liver wherever non-zero; a label map
    # with several organs (prepared labelsTr: 1 liver, 2-4 kidneys and spleen) is liver at 1.
    # The same rule on both sides, so a label map scored against itself gives Dice 1.
    values = np.unique(data)
    values = values[values != 0]
    mask = data == LIVER if values.size > 1 else data != 0
    if values.size > 1 and not mask.any():
        log.warning("%s: several labels but none is %d (liver)", path, LIVER)
    return mask, volume.affine


@lru_cache(maxsize=8)
def _geometry(dicom_dir: Path):
    """SeriesGeometry of a DICOM series folder (cached: pred and ref PNGs often share a series)."""
    return read_dicom_series(dicom_dir, pixels=False).geometry


def read_png_folder(folder: Path, dicom_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A folder of PNG slices + its DICOM series -> (bool liver mask (i, j, k), affine).

    PNG i (natural order) belongs to DICOM file i (natural order), as for CHAOS CT Ground and
    challenge submissions (and for MR Ground, whose PNGs carry the DICOM stems).
    """
    from pipeline.dicom.geometry import natural_key

    geometry = _geometry(Path(dicom_dir))
    pngs = list_pngs(folder)
    files = sorted(geometry.files, key=lambda p: natural_key(Path(p).name))
    if len(pngs) != len(files):
        raise PipelineError(f"{folder}: {len(pngs)} PNG files for {len(files)} DICOM files in {dicom_dir}")
    return png_stack_liver(dict(zip(files, pngs)), geometry), np.asarray(geometry.affine, dtype=np.float64)


def _chaos_ground_source(case) -> MaskSource:
    """A CHAOS case's Ground, paired with its DICOM files by pipeline.datasets.chaos (verified pairing)."""
    def load():
        from pipeline.datasets.chaos import pair_ground

        geometry = _geometry(case.dicom_dir)
        pairs = pair_ground(case, list(geometry.files))
        return png_stack_liver(pairs, geometry), np.asarray(geometry.affine, dtype=np.float64)

    return MaskSource(case.case, case.ground_dir, load)


# ---------------------------------------------------------------------------------------------
# Finding cases
# ---------------------------------------------------------------------------------------------
def _chaos_dicom_dirs(root: Path) -> dict[str, Path]:
    from pipeline.datasets.chaos import find_cases

    return {c.case: c.dicom_dir for c in find_cases(root)}


def _nifti_sources(files: list[Path], reference: bool) -> dict[str, MaskSource]:
    sources: dict[str, MaskSource] = {}
    for f in files:
        stem = nifti_stem(f)
        case = (results.case_of(f"{stem}.nii.gz", results.MASK_SUFFIX) if not reference else None) or stem
        if case in sources:
            raise PipelineError(f"{f}: a second mask for case {case} (also {sources[case].path.name})")
        sources[case] = MaskSource(case, f, lambda f=f: read_nifti_mask(f))
    return sources


def _png_case_name(folder: Path, dicom_dir: Path | None = None) -> str:
    """Case id of a PNG folder: `<case>` / `<case>_png`, or for a CHAOS Ground folder the CHAOS case id."""
    parts = folder.resolve().parts
    if folder.name == "Ground" and len(parts) >= 4:
        if parts[-3] == "CT" and parts[-2].isdigit():
            return f"CT_{int(parts[-2])}"
        if parts[-4] == "MR" and parts[-3].isdigit():
            phase = f"_{dicom_dir.name}" if dicom_dir is not None and dicom_dir.name in ("InPhase", "OutPhase") else ""
            return safe_name(f"MR_{int(parts[-3])}_{parts[-2]}{phase}", "PNG folder name")
    name = results.case_of(folder.name, results.PNG_SUFFIX) or folder.name
    return safe_name(name, "PNG folder name")


def find_masks(path: Path, reference: bool, dicom: Path | None, dicom_dirs: dict[str, Path]) -> dict[str, MaskSource]:
    """{case: MaskSource} for a NIfTI file/folder, PNG folder(s) or CHAOS root (see module doc).

    dicom_dirs: known DICOM series per case (from a CHAOS root) for PNG cases.
    """
    path = Path(path)
    side = "reference" if reference else "prediction"
    if not path.exists():
        raise PipelineError(f"{path}: {side} not found")
    if path.is_file():
        if not is_nifti(path):
            raise PipelineError(f"{path}: {side} file is not a NIfTI (.nii or .nii.gz)")
        return _nifti_sources([path], reference)
    if is_chaos_root(path):
        from pipeline.datasets.chaos import find_cases

        cases = [c for c in find_cases(path) if c.ground_dir is not None]
        if not cases:
            raise PipelineError(f"{path}: CHAOS root without any Ground folder")
        return {c.case: _chaos_ground_source(c) for c in cases}
    niftis = sorted(p for p in path.iterdir() if is_nifti(p))
    if niftis:
        return _nifti_sources(niftis, reference)
    if list_pngs(path):
        if dicom is None or is_chaos_root(dicom):
            raise PipelineError(f"{path}: a folder of PNG slices needs --dicom with its DICOM series folder")
        case = _png_case_name(path, dicom)
        return {case: _png_source(case, path, dicom)}
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and list_pngs(p))
    if subfolders:
        sources = {}
        for folder in subfolders:
            case = _png_case_name(folder)
            if case not in dicom_dirs:
                raise PipelineError(f"{folder}: no DICOM series known for case {case} (give --dicom CHAOS_ROOT)")
            sources[case] = _png_source(case, folder, dicom_dirs[case])
        return sources
    raise PipelineError(f"{path}: no NIfTI masks, PNG slices or CHAOS layout found in this {side} folder")


def _png_source(case: str, folder: Path, dicom_dir: Path) -> MaskSource:
    return MaskSource(case, folder, lambda: read_png_folder(folder, dicom_dir))


def match_cases(preds: dict[str, MaskSource], refs: dict[str, MaskSource], missing: str) -> tuple[list, list[str]]:
    """[(case, pred, ref)] in reference order and the list of reference cases without a prediction."""
    if len(preds) == 1 and len(refs) == 1:
        # One mask on each side (e.g. two files): pair them whatever their names.
        (case, ref), pred = next(iter(refs.items())), next(iter(preds.values()))
        return [(case, pred, ref)], []
    absent = [c for c in refs if c not in preds]
    if absent and missing != "skip":
        raise PipelineError(
            f"no prediction for case(s) {', '.join(absent)} in {next(iter(preds.values())).path.parent}"
            " (set evaluate.missing=skip to score only the cases predicted)"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.info("predictions without a reference, ignored: %s", ", ".join(extra))
    pairs = [(c, preds[c], refs[c]) for c in refs if c in preds]
    if not pairs:
        raise PipelineError("no prediction matches any reference case by name")
    return pairs, absent


# ---------------------------------------------------------------------------------------------
# Scoring and tables
# ---------------------------------------------------------------------------------------------
def score_case(case: str, pred: MaskSource, ref: MaskSource, hd_percentile: float) -> dict:
    from pipeline.evaluate.metrics import chaos_metrics, spacing_from_affine

    p, p_affine = pred.load()
    r, r_affine = ref.load()
    if p.shape != r.shape:
        raise PipelineError(f"{pred.path}: shape {p.shape} differs from the reference {ref.path} {r.shape}")
    if not np.allclose(p_affine, r_affine, atol=AFFINE_TOLERANCE):
        diff = float(np.abs(p_affine - r_affine).max())
        raise PipelineError(f"{pred.path}: affine differs from the reference {ref.path} (max difference {diff:.4g})")
    row = {"case": case}
    row.update(chaos_metrics(p, r, spacing_from_affine(r_affine), hd_percentile))
    row.update(pred_file=str(pred.path), ref_file=str(ref.path))
    return row


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def summarise(rows: list[dict], columns: list[str]) -> dict[str, dict[str, float | None]]:
    """{column: {'mean', 'std'}} over cases (population std); inf/nan propagate, written as null."""
    out = {}
    for col in columns:
        values = np.array([row[col] for row in rows], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            mean, std = float(values.mean()), float(values.std())
        out[col] = {"mean": _finite_or_none(mean), "std": _finite_or_none(std)}
    return out


def format_metrics_table(rows: list[dict], summary: dict, columns: list[str]) -> str:
    """Plain-text table: one line per case, then mean +- std."""
    def cell(stat):
        mean, std = stat["mean"], stat["std"]
        return "n/a" if mean is None or std is None else f"{mean:.4g} ± {std:.2g}"

    body = [[row["case"], *(f"{row[c]:.4g}" for c in columns)] for row in rows]
    return format_table(["case", *columns], body, [["mean ± std", *(cell(summary[c]) for c in columns)]])


def run_evaluation(pred: str | Path, ref: str | Path, out_dir: str | Path, dicom: str | Path | None = None,
                   cfg: Config | None = None) -> dict:
    """Score `pred` against `ref` (see module doc); write metrics.csv, metrics.json, config.yaml.

    Returns the metrics.json content: {'cases': [row per case], 'summary': {metric: {mean, std}},
    'missing': [...], 'hd_percentile': P, 'pred': ..., 'ref': ..., 'dicom': ...}. Row keys: case,
    dice, ravd_pct, assd_mm, mssd_mm, hd<P>_mm, dice_points, ravd_points, assd_points,
    mssd_points, score, pred_ml, ref_ml, pred_file, ref_file; plus 'table', the printed summary.
    """
    from pipeline.evaluate.metrics import hd_key

    cfg = cfg or Config()
    pred, ref, out_dir = Path(pred), Path(ref), Path(out_dir)
    _geometry.cache_clear()  # the cache only spares re-reading a series within one evaluation
    dicom = Path(dicom) if dicom is not None else None
    dicom_dirs: dict[str, Path] = {}
    if dicom is not None and is_chaos_root(dicom):
        dicom_dirs.update(_chaos_dicom_dirs(dicom))
    if ref.is_dir() and is_chaos_root(ref):
        dicom_dirs.update(_chaos_dicom_dirs(ref))
    refs = find_masks(ref, True, dicom, dicom_dirs)
    preds = find_masks(pred, False, dicom, dicom_dirs)
    pairs, absent = match_cases(preds, refs, cfg.evaluate.missing)
    if absent:  # evaluate.missing=skip asked for this: said, not warned about
        log.info("no prediction for %d case(s), skipped: %s", len(absent), ", ".join(absent))

    hd = hd_key(cfg.evaluate.hd_percentile)
    rows = []
    for case, p, r in progress(pairs, desc="evaluate", unit="case"):
        row = score_case(case, p, r, cfg.evaluate.hd_percentile)
        log.info("%s: Dice %.4f RAVD %.2f %% ASSD %.2f mm MSSD %.2f mm score %.1f",
                 case, row["dice"], row["ravd_pct"], row["assd_mm"], row["mssd_mm"], row["score"])
        rows.append(row)

    metric_cols = ["dice", "ravd_pct", "assd_mm", "mssd_mm", hd, "dice_points", "ravd_points",
                   "assd_points", "mssd_points", "score", "pred_ml", "ref_ml"]
    summary = summarise(rows, metric_cols)
    write_csv(out_dir / "metrics.csv", rows, ["case", *metric_cols, "pred_file", "ref_file"])
    result = {
        "cases": [{k: _finite_or_none(v) for k, v in row.items()} for row in rows],
        "summary": summary, "missing": absent, "hd_percentile": cfg.evaluate.hd_percentile,
        "pred": str(pred), "ref": str(ref), "dicom": str(dicom) if dicom else None,
    }
    write_json(out_dir / "metrics.json", result)
    save_config(cfg, out_dir / "config.yaml")
    table = format_metrics_table(rows, summary, ["dice", "ravd_pct", "assd_mm", "mssd_mm", hd, "score"])
    return result | {"table": f"{table}\nmetrics written to {out_dir / 'metrics.csv'} and {out_dir / 'metrics.json'}"}
