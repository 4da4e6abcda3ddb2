"""What to segment: a prepared folder or datalist, a CHAOS root, a study folder tree, one DICOM series.

Each input becomes an `InferCase`: a name, a modality, how to load its volume and (when known) its truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name
from pipeline.core.labels import LIVER
from pipeline.dicom.volume import Volume, read_dicom_series, read_nifti


@dataclass
class InferCase:
    """One volume to segment.

    load() -> the Volume (float32, NIfTI voxel order, with its affine; DICOM geometry when read from DICOM);
    truth(volume) -> boolean liver mask on the same grid, when ground truth is known.
    """

    case: str
    modality: str  # "CT" | "MR" | "" (read from the DICOM header)
    load: Callable[[], Volume]
    truth: Callable[[Volume], np.ndarray] | None = None
    skip_on_error: bool = False  # one series of a study folder: a bad one is skipped with a warning


def chaos_case(source) -> InferCase:
    from pipeline.datasets.chaos import read_ground

    def truth(volume: Volume) -> np.ndarray:
        return read_ground(source, volume.geometry) == LIVER

    return InferCase(case=source.case, modality=source.modality, load=lambda: read_dicom_series(source.dicom_dir),
                     truth=truth if source.ground_dir is not None else None)


def _prepared_cases(datalist: Path, patients: set[str] | None, sequences: set[str] | None) -> list[InferCase]:
    from pipeline.datasets.datalist import read_datalist

    cases = []
    for e in read_datalist(datalist).select(patients, sequences):
        def truth(_volume: Volume, label=e["label"]) -> np.ndarray:
            return read_nifti(label, dtype=None).array == LIVER

        cases.append(InferCase(case=e["case"], modality=e["modality"], load=lambda image=e["image"]: read_nifti(image),
                               truth=truth))
    return cases


def collect_cases(input_path: Path, patients: Iterable[str] | None = None, sequences: Iterable[str] | None = None,
                  series_uid: str | None = None) -> list[InferCase]:
    """Find what to segment: a prepared folder/datalist, a CHAOS root, a study folder tree or one
    DICOM series folder."""
    return collect_inputs(input_path, patients, sequences, series_uid)[0]


def _study_cases(root: Path, series_uid: str | None) -> tuple[list[InferCase], list[tuple[str, str]]]:
    from pipeline.dicom.study import scan_study

    scan = scan_study(root)
    found = scan.series
    if series_uid is not None:  # a SeriesInstanceUID (all its stacks) or the name of one found series
        found = [s for s in found if series_uid in (s.series_uid, s.name)]
        if not found:
            listing = "; ".join(f"{s.name} {s.series_uid}" for s in scan.series) or "none"
            raise PipelineError(f"{root}: no image series with SeriesInstanceUID or name {series_uid} "
                                f"(found: {listing})")
    if not found:
        why = "; ".join(f"{what}: {reason}" for what, reason in scan.skipped[:3])
        raise PipelineError(f"{root}: no CT or MR image series found in this folder tree"
                            + (f" (skipped {len(scan.skipped)} file(s), e.g. {why})" if why else " (it is empty)"))
    cases = [InferCase(case=s.name, modality=s.modality, skip_on_error=True,
                       load=lambda files=tuple(s.files), stack=s.stack: read_dicom_series(list(files), stack=stack))
             for s in found]
    return cases, scan.skipped


def collect_inputs(input_path: Path, patients: Iterable[str] | None = None, sequences: Iterable[str] | None = None,
                   series_uid: str | None = None) -> tuple[list[InferCase], list[tuple[str, str]]]:
    """collect_cases, and what a study folder holds that is not segmented: [(file or series, why)]."""
    from pipeline.datasets.chaos import find_cases, is_chaos_root
    from pipeline.datasets.datalist import FILE_NAME as DATALIST
    from pipeline.dicom.study import is_study_tree

    input_path = Path(input_path)
    pset = set(patients) if patients else None
    sset = set(sequences) if sequences else None
    if not input_path.exists():
        raise PipelineError(f"{input_path}: input not found")
    if input_path.is_file() and input_path.suffix == ".json":
        return _prepared_cases(input_path, pset, sset), []
    if not input_path.is_dir():
        raise PipelineError(f"{input_path}: expected a folder or a datalist.json")
    if (input_path / DATALIST).exists():
        return _prepared_cases(input_path / DATALIST, pset, sset), []
    if is_chaos_root(input_path):
        sources = find_cases(input_path, sequences=sorted(sset) if sset else None,
                             patients=sorted(pset) if pset else None)
        return [chaos_case(s) for s in sources], []
    # A PACS export or study folder: every image series (every stack of a multi-frame file) under it.
    cases, skipped = _study_cases(input_path, series_uid)
    if len(cases) == 1 and not is_study_tree(input_path):
        # a plain series folder: the case keeps the folder's name, and its errors stop the run
        cases[0].case, cases[0].skip_on_error = safe_name(input_path.name, "folder name"), False
    return cases, skipped
