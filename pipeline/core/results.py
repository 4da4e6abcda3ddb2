"""An inference output folder: its layout in one place. `infer` writes through it; evaluate, report
and the viewer read through it.

    OUT/<case>_liver.nii.gz            the mask (uint8, 1 = liver) on the source image's grid
    OUT/<case>_liver.seg.dcm           --format dicom-seg;  <case>_liver.rtstruct.dcm  --format rtstruct
    OUT/<case>_png/                    --format chaos-png: one PNG per DICOM file
    OUT/<case>_image.nii.gz            infer.save_image;    <case>_montage.png  infer.montage
    OUT/config.yaml, labels.itksnap.txt, labels.ctbl
    OUT/inference.json                 {"run", "input", "folds", "cases": [row, ...], "skipped": [...], "shards"?}
    OUT/shards/inference.<K>-of-<N>.json   a shard's part until the parts are merged

A row of "cases": case, mask (file name), slices, liver_ml, dice (when the truth is known),
fold_agreement, confidence, qc (the reasons to look before trusting), seconds, total_seconds, stage_seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json

SUMMARY = "inference.json"
SHARDS = "shards"
MASK_SUFFIX = "_liver.nii.gz"
MONTAGE_SUFFIX = "_montage.png"
PNG_SUFFIX = "_png"
DICOM_ENDINGS = {"dicom-seg": "seg.dcm", "rtstruct": "rtstruct.dcm"}  # <case>_liver.<ending>


def liver_file(case: str, ending: str) -> str:
    """<case>_liver.<ending>: the mask ("nii.gz") and the DICOM objects (DICOM_ENDINGS)."""
    return f"{case}_liver.{ending}"


def mask_name(case: str) -> str:
    return liver_file(case, "nii.gz")


def image_name(case: str) -> str:
    return f"{case}_image.nii.gz"


def montage_name(case: str) -> str:
    return f"{case}{MONTAGE_SUFFIX}"


def png_folder_name(case: str) -> str:
    return f"{case}{PNG_SUFFIX}"


def dicom_name(case: str, fmt: str) -> str:
    """<case>_liver.seg.dcm (fmt "dicom-seg") or <case>_liver.rtstruct.dcm ("rtstruct")."""
    return liver_file(case, DICOM_ENDINGS[fmt])


def case_of(name: str, suffix: str) -> str | None:
    """The case a file or folder name of infer's belongs to (the name less `suffix`), None if it is not one."""
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def shard_part(out_dir: str | Path, k: int, n: int) -> Path:
    return Path(out_dir) / SHARDS / f"inference.{k}-of-{n}.json"


def write_summary(path: str | Path, head: dict, rows: list[dict], skipped: list[dict], shards: int | None = None) -> Path:
    """inference.json (or a shard's part): `head` ("run", "input", "folds"), the cases' rows, the skipped inputs."""
    return write_json(path, {**head, "cases": rows, "skipped": skipped, **({"shards": shards} if shards else {})})


def read_summary(path: str | Path) -> dict:
    """An inference.json (a folder: its inference.json) as written by write_summary; a one-line error when
    it is missing or not one."""
    path = Path(path)
    path = path / SUMMARY if path.is_dir() else path
    if not path.is_file():
        raise PipelineError(f"{path.parent}: no {SUMMARY} (a `run.py infer` output folder expected)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("cases", []), list):
        raise PipelineError(f"{path}: not an inference summary (no list of cases)")
    return summary
