"""DICOM headers of a folder or a list of files: which files are images, which series, read leniently.

`lenient_values` turns pydicom's per-value VR checks off while headers are read. pydicom keeps that
mode in one process-wide setting, so the switch is made under a lock: two threads reading at once
(the viewer serves requests in threads) can neither see each other's mode nor leave it flipped.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.core.errors import PipelineError
from pipeline.dicom.geometry import natural_key

log = logging.getLogger(__name__)

# The elements the pipeline reads from every image header (geometry, pixels, identity): converted from
# their bytes when the file is read, so that damage in them is named there, not met later.
USED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
        "Modality", "SeriesNumber", "SeriesDescription", "ImageType", "Rows", "Columns", "NumberOfFrames",
        "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
        "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
        "ModalityLUTSequence")
SINGLE_NUMBERS = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                  "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "SeriesNumber", "SliceThickness",
                  "SpacingBetweenSlices")
NOT_IMAGES = {"DICOMDIR", "Thumbs.db", "desktop.ini", ".DS_Store"}


class NotDicomError(PipelineError):
    """The file is not DICOM at all (no preamble and no recognisable elements): callers skip it."""


def read_header(path: Path, with_pixels: bool = False, specific_tags: list[str] | None = None) -> pydicom.Dataset:
    """The one place a DICOM file's header is read: pydicom with lenient value checks, the elements the
    pipeline uses (USED) converted at once. Whatever pydicom raises for damaged bytes (a truncated or
    garbled element, a value length that does not fit its VR, an undecodable character set) becomes one
    PipelineError naming the file; NotDicomError for a file that is not DICOM. `specific_tags`: read
    only those elements (a quick scan)."""
    with lenient_values():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels, specific_tags=specific_tags)
            for keyword in USED:
                ds.get(keyword)
            getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
            getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        except InvalidDicomError:
            raise NotDicomError(f"{path}: not a DICOM file") from None
        except Exception as exc:  # noqa: BLE001 - pydicom's errors for damaged bytes have no common base
            raise PipelineError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {_one_line(exc)})") from None
    for keyword in SINGLE_NUMBERS:  # a damaged VR or length turns one number into several, or into text
        value = ds.get(keyword)
        if value is not None and value != "":
            try:
                float(value)
            except (TypeError, ValueError):
                raise PipelineError(f"{path}: damaged DICOM header ({keyword} is {str(value)[:40]!r}, "
                                    f"not one number)") from None
    return ds


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
DIRECTORY_SOP = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR)
_VALIDATION_LOCK = threading.RLock()


def list_headers(folder: Path | Sequence[Path], with_pixels: bool = False) -> list[tuple[Path, pydicom.Dataset]]:
    """Headers of the image files in `folder` (or of the files listed); harmless non-image files
    are skipped with a warning.

    with_pixels: read whole files (pixel data included), so that the pixels need no second pass.
    """
    if not isinstance(folder, (str, Path)):  # the files of one series, found by pipeline.dicom.study
        entries = [Path(f) for f in folder]
        folder = entries[0].parent if entries else Path(".")
    elif not Path(folder).is_dir():
        raise PipelineError(f"{folder}: DICOM folder not found")
    else:
        entries = sorted(Path(folder).iterdir(), key=lambda p: natural_key(p.name))
    out = []
    for path in entries:
        if not path.is_file():
            continue
        if path.name.startswith(".") or path.name in NOT_IMAGES:
            log.warning("%s: not a DICOM image, skipped", path)
            continue
        try:
            ds = read_header(path, with_pixels)
        except NotDicomError:
            log.warning("%s: not a DICOM file, skipped", path)
            continue
        sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        # An image without ImagePositionPatient is an error later (named); only non-images skip.
        if sop == DIRECTORY_SOP or "Rows" not in ds:
            log.warning("%s: DICOM file without an image (e.g. DICOMDIR), skipped", path)
            continue
        out.append((path, ds))
    if not out:
        subdirs = [p.name for p in entries if p.is_dir()]
        hint = f" (it holds folders {', '.join(subdirs)}: pass one of them)" if subdirs else ""
        raise PipelineError(f"{folder}: no DICOM image files found{hint}")
    return out


def float_list(ds: pydicom.Dataset, keyword: str, path: Path, n: int) -> np.ndarray:
    try:
        values = np.array([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: missing or invalid {keyword}") from None
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise PipelineError(f"{path}: {keyword} must hold {n} numbers, got {ds[keyword].value}")
    return values


def select_series(folder: Path, headers, series_uid: str | None):
    uids: dict[str, int] = {}
    for _, ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        uids[uid] = uids.get(uid, 0) + 1
    if series_uid is not None:
        if series_uid not in uids:
            raise PipelineError(f"{folder}: no series with SeriesInstanceUID {series_uid} (found {', '.join(uids)})")
        return [(p, ds) for p, ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    if len(uids) > 1:
        listing = "; ".join(f"{u or '<none>'} ({c} files)" for u, c in uids.items())
        raise PipelineError(f"{folder}: holds {len(uids)} series, pick one with series_uid: {listing}")
    return headers


@contextmanager
def lenient_values() -> Iterator[None]:
    """pydicom's per-value VR checks off while headers are read (its default warns for each value that
    breaks its VR's rules: damaged or non-conformant files, common in exports). What the pipeline
    relies on is checked by the reader itself and named in its errors (orientation, positions,
    spacing, pixel size), and a damaged identifier shows up as a gap in its series."""
    settings = pydicom.config.settings
    with _VALIDATION_LOCK:
        before = settings.reading_validation_mode
        settings.reading_validation_mode = pydicom.config.IGNORE
        try:
            yield
        finally:
            settings.reading_validation_mode = before


def without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The header alone: the pixels are in the volume already, and a CT series' would double its memory."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds
