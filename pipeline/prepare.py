"""CHAOS DICOM + Ground PNG -> imagesTr/labelsTr NIfTI, datalist.json with folds, summary.csv.

Outputs under DIR:
    imagesTr/<case>.nii.gz   image, int16 when lossless (CT HU, integer MR), else float32
    labelsTr/<case>.nii.gz   uint8 labels 0..4, same shape and affine as the image
    datalist.json            MONAI decathlon-style datalist; `training` entries carry the fold
    summary.csv, config.yaml the per-case table and the resolved config
NIfTI voxel order and affine are dcm2niix's for the same series (see pipeline.dicom).
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from pipeline.chaos import CaseSource, find_cases, read_ground
from pipeline.config import Config, save_config
from pipeline.console import progress
from pipeline.datalist import FILE_NAME as DATALIST
from pipeline.errors import PipelineError
from pipeline.io import write_json, write_text
from pipeline.labels import LIVER, ORGANS
from pipeline.splits import assign_folds
from pipeline.volume import read_dicom_series, write_nifti

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ["case", "patient", "sequence", "fold", "shape", "slices", "spacing_mm", "liver_ml", "liver_slices"]


def image_dtype(volume: np.ndarray) -> type:
    """int16 when it stores `volume` exactly (CT HU, integer MR): half the size of float32, no loss."""
    info = np.iinfo(np.int16)
    if volume.size and volume.min() >= info.min and volume.max() <= info.max:
        # a round trip through int16 is exact iff every value is an integer (cheaper than np.mod)
        if np.array_equal(volume.astype(np.int16), volume):
            return np.int16
    return np.float32


def prepare_case(case: CaseSource, out_dir: Path, cfg: Config, fold: int) -> tuple[dict, dict]:
    """Read, check and write one case; return (datalist entry, summary row)."""
    series = read_dicom_series(case.dicom_dir, orientation_tolerance=cfg.prepare.orientation_tolerance,
                               spacing_tolerance=cfg.prepare.spacing_tolerance)
    volume, geometry = series.array, series.geometry
    labels = read_ground(case, geometry)
    if not np.all(np.isfinite(volume)):
        raise PipelineError(f"{case.dicom_dir}: image holds NaN or infinite values")
    image_rel = f"imagesTr/{case.case}.nii.gz"
    label_rel = f"labelsTr/{case.case}.nii.gz"
    write_nifti(out_dir / image_rel, volume, geometry.affine, image_dtype(volume))
    write_nifti(out_dir / label_rel, labels, geometry.affine, np.uint8)

    liver = labels == LIVER
    voxel_ml = series.voxel_ml
    entry = {
        "image": image_rel, "label": label_rel, "case": case.case, "patient": case.patient,
        "modality": case.modality, "sequence": case.sequence, "fold": fold,
    }
    row = {
        "case": case.case, "patient": case.patient, "sequence": case.sequence, "fold": fold,
        "shape": "x".join(str(s) for s in volume.shape), "slices": volume.shape[2],
        "spacing_mm": "x".join(f"{s:.3g}" for s in geometry.spacing),
        "liver_ml": round(float(liver.sum()) * voxel_ml, 1),
        "liver_slices": int(liver.any(axis=(0, 1)).sum()),
    }
    return entry, row


def prepare_dataset(data_root: str | Path, out_dir: str | Path, cfg: Config) -> dict:
    """Prepare every case under the CHAOS root `data_root` into `out_dir`; return the datalist
    (as written to datalist.json) with "table", the per-case summary as text.

    Every output is rewritten atomically on each run (same inputs -> byte-identical files), so
    an interrupted run leaves only complete files and a rerun needs no resume logic.
    Raises PipelineError naming the file at the first case that fails its checks.
    """
    out_dir = Path(out_dir)
    cases = find_cases(data_root, sequences=cfg.prepare.sequences)
    folds = assign_folds([c.patient for c in cases], cfg.prepare.folds, cfg.prepare.fold_seed)
    log.info("preparing %d cases of %d patients into %s", len(cases), len(folds), out_dir)
    entries, rows = [], []
    for case in progress(cases, desc="prepare", unit="case"):
        entry, row = prepare_case(case, out_dir, cfg, folds[case.patient])
        entries.append(entry)
        rows.append(row)
        log.debug("%s: %s, liver %.1f ml", case.case, row["shape"], row["liver_ml"])

    _warn_stale(out_dir, entries)
    datalist = {
        "name": "CHAOS",
        "description": "CHAOS CT and MR abdominal organs, prepared by pipeline.prepare",
        "labels": {str(k): v for k, v in ORGANS.items()},
        "numFolds": cfg.prepare.folds,
        "numTraining": len(entries),
        "training": entries,
    }
    write_json(out_dir / DATALIST, datalist)
    write_text(out_dir / "summary.csv", _csv(rows))
    save_config(cfg, out_dir / "config.yaml")
    return datalist | {"table": format_table(rows)}


def _warn_stale(out_dir: Path, entries: list[dict]) -> None:
    """Files left by an earlier run with other sequences stay on disk but not in the datalist."""
    current = {e[key] for e in entries for key in ("image", "label")}
    stale = [p for sub in ("imagesTr", "labelsTr") for p in sorted((out_dir / sub).glob("*.nii.gz"))
             if f"{sub}/{p.name}" not in current]
    if stale:
        log.warning("%s: %d NIfTI files from an earlier run are not in this datalist (e.g. %s)",
                    out_dir, len(stale), stale[0].name)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table, with a total line."""
    header = SUMMARY_FIELDS
    lines = [[str(r[h]) for h in header] for r in rows]
    patients = len({r["patient"] for r in rows})
    total = ["total", f"{patients} patients", f"{len(rows)} cases", "", "", str(sum(r["slices"] for r in rows)),
             "", "", ""]
    widths = [max(len(h), *(len(line[i]) for line in [*lines, total])) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out.append(fmt.format(*total))
    return "\n".join(out)
