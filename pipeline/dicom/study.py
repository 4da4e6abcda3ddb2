"""Every segmentable image series under a folder tree: a PACS export, a study folder, a CD copy.

Series are grouped by SeriesInstanceUID and, within one, by image orientation (a stack), never by
folder: exports spread a series over folders or put several series in one. What cannot be
segmented is listed with the reason (one warning line each in `infer`): DICOMDIR, non-DICOM and
unreadable files, non-image objects (SEG, RTSTRUCT, SR, presentation states...), modalities other
than CT and MR, localisers and single-slice stacks. Multi-frame files give one series per stack
(`pipeline.dicom.multiframe`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name
from pipeline.dicom.geometry import natural_key
from pipeline.dicom.headers import DIRECTORY_SOP as _DIRECTORY_SOP
from pipeline.dicom.headers import NOT_IMAGES as _SKIP_NAMES
from pipeline.dicom.headers import NotDicomError, lenient_values, read_header
from pipeline.dicom.multiframe import frames_of, group_stacks

log = logging.getLogger(__name__)

# What the scan needs from each header (reading only these is several times faster than whole headers)
_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ImageType",
         "Rows", "Columns", "NumberOfFrames", "ImageOrientationPatient", "ImagePositionPatient"]
MODALITIES = ("CT", "MR")


@dataclass
class FoundSeries:
    """One stack of a series: the files of one SeriesInstanceUID sharing one orientation."""

    name: str  # unique and file-name safe: <SeriesNumber>_<SeriesDescription>
    series_uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)
    stack: int | None = None  # multi-frame files: which of their stacks (pipeline.dicom.multiframe)


@dataclass
class StudyScan:
    series: list[FoundSeries]
    skipped: list[tuple[str, str]]  # (file or series, why it is not segmented)


def _walk(root: Path) -> list[Path]:
    """Every file under `root`, folders and files in natural order (IMG-2 before IMG-10)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort(key=natural_key)
        out += [Path(folder) / f for f in sorted(files, key=natural_key)]
    return out


def _orientation_key(ds) -> tuple:
    try:
        return tuple(np.round([float(v) for v in ds.ImageOrientationPatient], 3))
    except (AttributeError, TypeError, ValueError):
        return ()


def scan_study(root: Path) -> StudyScan:
    """All CT and MR image stacks under `root` (see the module docstring), named and in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: folder not found")
    skipped: list[tuple[str, str]] = []
    groups: dict[tuple, list[tuple[Path, pydicom.Dataset]]] = {}
    multiframe: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    stack_of: dict[tuple, tuple[int, list[Path]]] = {}  # multi-frame groups: (stack index, files)
    for path in _walk(root):
        rel = str(path.relative_to(root))
        if path.name in _SKIP_NAMES or path.name.startswith("."):
            skipped.append((rel, "DICOMDIR" if path.name == "DICOMDIR" else "not a DICOM image file"))
            continue
        try:
            ds = read_header(path, specific_tags=_TAGS)
        except NotDicomError:
            skipped.append((rel, "not a DICOM file"))
            continue
        except PipelineError as exc:  # damage in one file does not stop the scan; it is named
            skipped.append((rel, str(exc).removeprefix(f"{path}: ")))
            continue
        sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", "") or "")
        if sop == _DIRECTORY_SOP:
            skipped.append((rel, "DICOMDIR"))
            continue
        if not modality:
            skipped.append((rel, "DICOM file without Modality: damaged (truncated?) or not an image"))
            continue
        if modality not in MODALITIES or "Rows" not in ds:
            skipped.append((rel, f"{modality} object: only CT and MR images are segmented"))
            continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            skipped.append((rel, "localizer"))
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:  # stacks from the frames, once all files are known
            multiframe.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
            continue
        key = (str(ds.get("SeriesInstanceUID", "")), _orientation_key(ds))
        groups.setdefault(key, []).append((path, ds))
    for uid, members in multiframe.items():
        try:
            with lenient_values():
                headers = {p: read_header(p) for p, _ in members}
                stacks = group_stacks([f for p, ds in headers.items() for f in frames_of(p, ds)])
        except PipelineError as exc:
            skipped.append((str(members[0][0].relative_to(root)), str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - damage in one file must not stop the scan; it is named
            skipped.append((str(members[0][0].relative_to(root)), f"unreadable multi-frame file ({exc})"[:200]))
            continue
        for index, frames in enumerate(stacks):
            # the key keeps stacks apart; the loader finds the stack again by its index
            groups[(uid, ("stack", index))] = [(members[0][0], members[0][1])] * len(frames)
            stack_of[(uid, ("stack", index))] = (index, [p for p, _ in members])

    series: list[FoundSeries] = []
    used: set[str] = set()
    stacks_per_uid: dict[str, int] = {}
    for (uid, _), members in groups.items():
        stacks_per_uid[uid] = stacks_per_uid.get(uid, 0) + 1
    seen_per_uid: dict[str, int] = {}
    for key, members in groups.items():
        uid = key[0]
        ds0 = members[0][1]
        number = str(ds0.get("SeriesNumber", "") or "").strip()
        description = str(ds0.get("SeriesDescription", "") or "").strip()
        seen_per_uid[uid] = seen_per_uid.get(uid, 0) + 1
        label = "_".join(p for p in (number, description) if p) or "series"
        if stacks_per_uid[uid] > 1:
            label += f"_stack{seen_per_uid[uid]}"
        try:
            name = safe_name(label, "series name")
        except PipelineError:
            name = "series"
        base, k = name, 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        if len(members) < 2:
            skipped.append((f"{name} ({members[0][0].relative_to(root)})", "single-slice series"))
            continue
        used.add(name.lower())
        stack, files = stack_of.get(key, (None, [p for p, _ in members]))
        series.append(FoundSeries(name=name, series_uid=uid, modality=str(ds0.Modality), description=description,
                                  files=files, stack=stack))
    series.sort(key=lambda s: natural_key(s.name))
    return StudyScan(series=series, skipped=skipped)


def is_study_tree(folder: Path) -> bool:
    """A folder to scan as a study (it holds sub-folders) rather than read as one series folder."""
    return Path(folder).is_dir() and any(p.is_dir() for p in Path(folder).iterdir())
