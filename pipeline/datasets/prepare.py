"""CHAOS DICOM + Ground PNG (or an MSD / nnU-Net NIfTI data set, pipeline.datasets.msd) -> imagesTr/labelsTr
NIfTI, datalist.json with folds, summary.csv.

Outputs under DIR:
    imagesTr/<case>.nii.gz   image, int16 when lossless (CT HU, integer MR), else float32
    labelsTr/<case>.nii.gz   uint8 labels 0..4, same shape and affine as the image
    datalist.json            MONAI decathlon-style datalist; `training` entries carry the fold
    summary.csv, config.yaml the per-case table and the resolved config
NIfTI voxel order and affine are dcm2niix's for the same series (see pipeline.dicom.series).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.core.config import Config, save_config
from pipeline.core.console import format_table, progress
from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name, write_csv, write_json
from pipeline.core.labels import LIVER, ORGANS
from pipeline.datasets.chaos import CaseSource, find_cases, read_ground
from pipeline.datasets.datalist import FILE_NAME as DATALIST
from pipeline.datasets.splits import assign_folds
from pipeline.dicom.volume import read_dicom_series, write_nifti

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


def prepare_case(case: CaseSource, out_dir: Path, cfg: Config, fold: int, name: str | None = None,
                 patient: str | None = None) -> tuple[dict, dict]:
    """Read, check and write one CHAOS case (as case `name` of `patient`, by default its own);
    return (datalist entry, summary row)."""
    series = read_dicom_series(case.dicom_dir, orientation_tolerance=cfg.prepare.orientation_tolerance,
                               spacing_tolerance=cfg.prepare.spacing_tolerance)
    volume, geometry = series.array, series.geometry
    labels = read_ground(case, geometry)
    if not np.all(np.isfinite(volume)):
        raise PipelineError(f"{case.dicom_dir}: image holds NaN or infinite values")
    return _write_case(out_dir, name or case.case, patient or case.patient, case.modality, case.sequence, fold,
                       volume, geometry.affine, labels, geometry.spacing)


def _write_case(out_dir: Path, case: str, patient: str, modality: str, sequence: str, fold: int,
                volume: np.ndarray, affine: np.ndarray, labels: np.ndarray, spacing) -> tuple[dict, dict]:
    """Write one checked case (image, labels on its grid); return (datalist entry, summary row)."""
    image_rel = f"imagesTr/{case}.nii.gz"
    label_rel = f"labelsTr/{case}.nii.gz"
    write_nifti(out_dir / image_rel, volume, affine, image_dtype(volume))
    write_nifti(out_dir / label_rel, labels, affine, np.uint8)
    liver = labels == LIVER
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    entry = {"image": image_rel, "label": label_rel, "case": case, "patient": patient, "modality": modality,
             "sequence": sequence, "fold": fold}
    row = {
        "case": case, "patient": patient, "sequence": sequence, "fold": fold,
        "shape": "x".join(str(s) for s in volume.shape), "slices": volume.shape[2],
        "spacing_mm": "x".join(f"{s:.3g}" for s in spacing),
        "liver_ml": round(float(liver.sum()) * voxel_ml, 1),
        "liver_slices": int(liver.any(axis=(0, 1)).sum()),
    }
    return entry, row


def _chaos_cases(data_root: Path, cfg: Config):
    """(cases, name, labels, description) of a CHAOS root; each case (case, patient, write) where
    write(out_dir, fold, case, patient) writes it under those names."""
    chaos = find_cases(data_root, sequences=cfg.prepare.sequences)

    def writer(c: CaseSource):
        return lambda out_dir, fold, case, patient: prepare_case(c, out_dir, cfg, fold, case, patient)

    return ([(c.case, c.patient, writer(c)) for c in chaos], "CHAOS", {str(k): v for k, v in ORGANS.items()},
            "CHAOS CT and MR abdominal organs")


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _msd_cases(data_root: Path, cfg: Config):
    """The same for a Medical Segmentation Decathlon / nnU-Net NIfTI data set (pipeline.datasets.msd)."""
    from pipeline.datasets.msd import DATASET_JSON, declared_labels, find_msd_cases, liver_values, read_pair

    cases, meta = find_msd_cases(data_root)
    declared = declared_labels(meta, data_root / DATASET_JSON)
    liver = liver_values(declared, cfg.prepare.liver_labels, data_root / DATASET_JSON)
    log.info("%s: liver = label value(s) %s of %s", data_root / DATASET_JSON, liver, declared)

    def writer(c):
        def write(out_dir: Path, fold: int, case: str, patient: str) -> tuple[dict, dict]:
            image, labels = read_pair(c, liver, declared)
            return _write_case(out_dir, case, patient, c.modality, c.modality, fold, image.array, image.affine,
                               labels, _spacing(image.affine))
        return write

    name = str(meta.get("name") or data_root.name)
    return ([(c.case, c.patient, writer(c)) for c in cases], name, {"0": "background", "1": "liver"},
            f"{name}, a Medical Segmentation Decathlon style data set")


def _paired_cases(source: Path, cfg: Config):
    """The same for images paired with their masks by a CSV or by name (pipeline.datasets.pairs)."""
    from pipeline.datasets.pairs import find_pairs, read_pair

    def writer(c):
        def write(out_dir: Path, fold: int, case: str, patient: str) -> tuple[dict, dict]:
            image, liver, modality = read_pair(c, cfg.prepare.liver_labels)
            return _write_case(out_dir, case, patient, modality, modality, fold, image.array, image.affine,
                               liver, _spacing(image.affine))
        return write

    name = source.stem if source.is_file() else source.name
    return ([(c.case, c.patient, writer(c)) for c in find_pairs(source)], name, {"0": "background", "1": "liver"},
            f"{name}, images paired with liver masks")


def _source_cases(root: Path, cfg: Config):
    from pipeline.datasets.msd import is_msd_root
    from pipeline.datasets.pairs import is_pairs_source

    if not root.exists():
        raise PipelineError(f"{root}: data not found")
    if is_msd_root(root):
        return _msd_cases(root, cfg)
    if is_pairs_source(root):
        return _paired_cases(root, cfg)
    return _chaos_cases(root, cfg)


def prepare_dataset(data_root: str | Path | list, out_dir: str | Path, cfg: Config) -> dict:
    """Prepare every case of `data_root` into `out_dir`; return the datalist (as written to
    datalist.json) with "table", the per-case summary as text.

    `data_root`: a CHAOS root, an MSD / nnU-Net data set (pipeline.datasets.msd), a pairs CSV or a folder of
    images/ and labels/ (pipeline.datasets.pairs), or a list of several of them prepared into one folder:
    then every case and patient id gets its source's name in front (`<source>_<id>`, the names made
    unique), so that ids never collide, and the folds are drawn over all patients together.
    Every output is rewritten atomically on each run (same inputs -> byte-identical files), so
    an interrupted run leaves only complete files and a rerun needs no resume logic.
    Raises PipelineError naming the file at the first case that fails its checks.
    """
    out_dir = Path(out_dir)
    roots = [Path(r) for r in data_root] if isinstance(data_root, (list, tuple)) else [Path(data_root)]
    if not roots:
        raise PipelineError("no data to prepare")
    sources = [_source_cases(r, cfg) for r in roots]
    if len(sources) == 1:
        cases, name, labels, description = sources[0]
        sources_meta = None
    else:
        tags: list[str] = []
        for root, (_, name, _, _) in zip(roots, sources):
            tag = safe_name(name, "data set name")
            while tag in tags:
                tag += "x"
            tags.append(tag)
        cases = [(f"{tag}_{case}", f"{tag}_{patient}", write)
                 for tag, (source_cases, *_rest) in zip(tags, sources) for case, patient, write in source_cases]
        name = "+".join(tags)
        labels = {}
        for _, _, source_labels, _ in sources:
            labels.update(source_labels)
        labels = dict(sorted(labels.items(), key=lambda kv: int(kv[0])))
        description = "; ".join(s[3] for s in sources)
        sources_meta = [{"prefix": f"{tag}_", "data": str(root), "cases": len(s[0])}
                        for tag, root, s in zip(tags, roots, sources)]
    folds = assign_folds([patient for _, patient, _ in cases], cfg.prepare.folds, cfg.prepare.fold_seed)
    log.info("preparing %d cases of %d patients into %s", len(cases), len(folds), out_dir)
    entries, rows = [], []
    for case, patient, write in progress(cases, desc="prepare", unit="case"):
        entry, row = write(out_dir, folds[patient], case, patient)
        entries.append(entry)
        rows.append(row)
        log.debug("%s: %s, liver %.1f ml", case, row["shape"], row["liver_ml"])

    _warn_stale(out_dir, entries)
    datalist = {
        "name": name,
        "description": f"{description}, prepared by pipeline.datasets.prepare",
        "labels": labels,
        "numFolds": cfg.prepare.folds,
        "numTraining": len(entries),
        **({"sources": sources_meta} if sources_meta else {}),
        "training": entries,
    }
    write_json(out_dir / DATALIST, datalist)
    write_csv(out_dir / "summary.csv", rows, SUMMARY_FIELDS)
    save_config(cfg, out_dir / "config.yaml")
    return datalist | {"table": format_summary_table(rows)}


def _warn_stale(out_dir: Path, entries: list[dict]) -> None:
    """Files left by an earlier run with other sequences stay on disk but not in the datalist."""
    current = {e[key] for e in entries for key in ("image", "label")}
    stale = [p for sub in ("imagesTr", "labelsTr") for p in sorted((out_dir / sub).glob("*.nii.gz"))
             if f"{sub}/{p.name}" not in current]
    if stale:
        log.warning("%s: %d NIfTI files from an earlier run are not in this datalist (e.g. %s)",
                    out_dir, len(stale), stale[0].name)


def format_summary_table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table, with a total line."""
    patients = len({r["patient"] for r in rows})
    total = ["total", f"{patients} patients", f"{len(rows)} cases", "", "", str(sum(r["slices"] for r in rows)),
             "", "", ""]
    return format_table(SUMMARY_FIELDS, [[r[h] for h in SUMMARY_FIELDS] for r in rows], [total])
