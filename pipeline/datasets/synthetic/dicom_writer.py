"""Write a DICOM series from a volume: the synthetic generator's and the tests' DICOM source.

Coordinates: DICOM patient space is LPS (mm). A volume passed to `write_series` is indexed
(slice, row, column) = (k, r, c). Its files are byte-identical for the same inputs (fixed dates,
UIDs derived from the inputs), so a synthetic data set can be regenerated exactly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipeline.core.files import atomic_path

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
# Fixed dates and times: a series written twice from the same inputs must be byte-identical.
_FIXED_DATE = "20000101"
_FIXED_TIME = "120000"


def _uid(*parts: Any) -> str:
    """A deterministic UID under pydicom's root, derived from `parts` (not from time or randomness)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _unit(v: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if v.shape != (3,) or not np.isfinite(n) or abs(n - 1.0) > 1e-4:
        raise ValueError(f"{what} must be a 3-vector of unit length, got {v.tolist()}")
    return v / n


def _ds(value: float) -> str:
    """Format a float for a DS element (max 16 characters) without losing more than needed."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float],
    row_dir: Sequence[float],
    col_dir: Sequence[float],
    modality: str,
    file_names: Sequence[str] | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    dtype: Any = np.uint16,
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "anon",
    series_description: str = "",
    patient_position: str = "HFS",
    instance_numbers: Sequence[int] | None = None,
    extra_tags: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write `volume` as a single-frame DICOM series (one file per slice) and return the file paths.

    volume: (n_slices, rows, cols) of real values (HU for CT); the stored value is
        round((value - intercept) / slope), clipped to `dtype`'s range.
    spacing: (row_spacing, col_spacing, slice_step) in mm. PixelSpacing = [row spacing (distance
        between rows, along col_dir), column spacing (along row_dir)]. slice_step may be negative.
    origin: ImagePositionPatient of volume[0] (LPS, mm); volume[k] lies at
        origin + k * slice_step * cross(row_dir, col_dir).
    row_dir / col_dir: ImageOrientationPatient[:3] (direction of increasing column index) and [3:].
    file_names[k]: the file name of slice k (default IMG-0001-%05d.dcm of k+1).
    extra_tags: keyword -> value for every slice, or callable(k) -> such a dict for per-slice tags.
    Output is byte-reproducible: UIDs derive from the inputs, dates are fixed.
    """
    folder = Path(folder)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {volume.shape}")
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    n, rows, cols = volume.shape
    row_dir, col_dir = _unit(row_dir, "row_dir"), _unit(col_dir, "col_dir")
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ValueError("row_dir and col_dir must be orthogonal")
    normal = np.cross(row_dir, col_dir)
    row_sp, col_sp, step = (float(s) for s in spacing)
    origin = np.asarray(origin, dtype=np.float64)

    file_names = list(file_names) if file_names is not None else [f"IMG-0001-{k + 1:05d}.dcm" for k in range(n)]
    instance_numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, n + 1))
    if len(file_names) != n or len(instance_numbers) != n:
        raise ValueError(f"need {n} file names and instance numbers, got {len(file_names)} and {len(instance_numbers)}")
    for name in file_names:
        # Names may hold commas (real CHAOS CT: 'i0000,0000b.dcm') but never a path part.
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"file name {name!r} must be a plain, non-hidden file name")
    if len(set(file_names)) != n:
        raise ValueError("file names must be unique")

    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    stored = np.rint((volume.astype(np.float64) - rescale_intercept) / rescale_slope)
    stored = np.clip(stored, info.min, info.max).astype(dtype.newbyteorder("<"))

    # Deterministic UIDs: the same inputs (including the pixel data) give the same UIDs.
    digest = hashlib.sha1(stored.tobytes()).hexdigest()
    key = (patient_id, modality, series_description, origin.tolist(), row_dir.tolist(),
           col_dir.tolist(), (row_sp, col_sp, step), volume.shape, digest)
    study_uid = study_uid or _uid("study", patient_id)
    series_uid = series_uid or _uid("series", *key)
    frame_uid = _uid("frame", study_uid, series_uid)

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        position = origin + k * step * normal
        sop_uid = _uid("sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = _SOP_CLASS[modality]
        ds.SOPInstanceUID = sop_uid
        for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, tag, _FIXED_DATE)
        for tag in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
            setattr(ds, tag, _FIXED_TIME)
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "chaos-liver synthetic"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.SliceThickness = _ds(abs(step))
        ds.SpacingBetweenSlices = _ds(abs(step))
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(row_sp), _ds(col_sp)]
        ds.BitsAllocated = dtype.itemsize * 8
        ds.BitsStored = dtype.itemsize * 8
        ds.HighBit = dtype.itemsize * 8 - 1
        ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
        ds.RescaleIntercept = _ds(rescale_intercept)
        ds.RescaleSlope = _ds(rescale_slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
        tags = extra_tags(k) if callable(extra_tags) else extra_tags
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        pixels = stored[k].tobytes()
        ds.PixelData = pixels + b"\0" * (len(pixels) % 2)  # DICOM values have even length
        path = folder / file_names[k]
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
