"""DICOM series I/O: write a series from a volume, read a series into (volume, geometry), write NIfTI.

Coordinates: DICOM patient space is LPS (mm); NIfTI affines are RAS (mm). A DICOM volume
passed to `write_series` is indexed (slice, row, column) = (k, r, c).
"""
from __future__ import annotations

import hashlib
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, UncompressedTransferSyntaxes,
    generate_uid,
)


from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
# Why hand-written geometry: SimpleITK's ImageSeriesReader sorts slices but returns LPS, does not
# check that the steps are even (a missing slice goes unnoticed) or that there is no gantry tilt,
# and hides which file became which slice, which the Ground-PNG pairing needs. dcm2niix is the
# reference viewers agree with; we reproduce its voxel order and affine (tested against it):
#   NIfTI i = DICOM column, j = rows-1-row (rows stored bottom-up), k = slices ascending along
#   normal = cross(IOP[:3], IOP[3:]) whatever the file names, InstanceNumbers or PatientPosition.

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_NOT_IMAGES = {"DICOMDIR", "Thumbs.db", "desktop.ini", ".DS_Store"}  # also pipeline.study
_DIRECTORY_SOP = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR)


def natural_key(text: str) -> list:
    """Sort key that orders 'IMG-2' before 'IMG-10' (the order people and the CHAOS README use)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


@dataclass
class SeriesGeometry:
    """Where the voxels of a volume in NIfTI order (i=column, j=flipped row, k=slice) lie.

    affine: 4x4 float64, voxel index -> RAS mm (equal to dcm2niix's for the same series).
    shape: (columns, rows, slices); spacing: mm along (i, j, k).
    files: the source file of NIfTI slice k, i.e. the slice order.
    rows, cols: the shape of each file's 2D pixel array as stored (rows x cols).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    files: list[Path]
    modality: str
    series_uid: str
    rows: int
    cols: int
    # the source files' headers in slice order, pixel data dropped (what DICOM outputs reference and
    # copy); empty where the geometry came from elsewhere
    headers: list = field(default_factory=list, repr=False, compare=False)
    # multi-frame sources (pipeline.multiframe): the 1-based frame of files[k] that holds slice k
    frame_numbers: list = field(default_factory=list, repr=False, compare=False)

    def stack(self, slices_by_file: Mapping[Path, np.ndarray]) -> np.ndarray:
        """Per-file 2D arrays (rows x cols, as stored, e.g. Ground PNGs) -> volume in NIfTI order."""
        missing = [str(f) for f in self.files if Path(f) not in slices_by_file]
        if missing:
            raise PipelineError(f"{missing[0]}: no 2D slice given for this file ({len(missing)} missing)")
        first = np.asarray(slices_by_file[Path(self.files[0])])
        out = np.empty(self.shape, dtype=first.dtype)
        for k, f in enumerate(self.files):
            arr = np.asarray(slices_by_file[Path(f)])
            if arr.shape != (self.rows, self.cols):
                raise PipelineError(f"{f}: 2D slice has shape {arr.shape}, expected {(self.rows, self.cols)}")
            out[:, :, k] = to_nifti_slice(arr)
        return out

    def unstack(self, volume: np.ndarray) -> dict[Path, np.ndarray]:
        """Inverse of `stack`: volume in NIfTI order -> {source file: 2D array rows x cols}."""
        volume = np.asarray(volume)
        if volume.shape != tuple(self.shape):
            raise PipelineError(f"volume shape {volume.shape} does not match series shape {tuple(self.shape)}")
        return {Path(f): from_nifti_slice(volume[:, :, k]) for k, f in enumerate(self.files)}


def to_nifti_slice(arr: np.ndarray) -> np.ndarray:
    """2D (rows x cols, as stored) -> (i=column, j=flipped row), dcm2niix's in-plane order."""
    return np.asarray(arr)[::-1, :].T


def from_nifti_slice(arr: np.ndarray) -> np.ndarray:
    """Inverse of `to_nifti_slice`: (i, j) -> rows x cols, as stored in DICOM/PNG."""
    return np.ascontiguousarray(np.asarray(arr).T[::-1, :])


def _list_headers(folder: Path | Sequence[Path], with_pixels: bool = False) -> list[tuple[Path, pydicom.Dataset]]:
    """Headers of the image files in `folder` (or of the files listed); harmless non-image files
    are skipped with a warning.

    with_pixels: read whole files (pixel data included), so that the pixels need no second pass.
    """
    if not isinstance(folder, (str, Path)):  # the files of one series, found by pipeline.study
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
        if path.name.startswith(".") or path.name in _NOT_IMAGES:
            log.warning("%s: not a DICOM image, skipped", path)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels)
        except InvalidDicomError:
            log.warning("%s: not a DICOM file, skipped", path)
            continue
        except (OSError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: unreadable DICOM file ({exc})") from None
        sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        # An image without ImagePositionPatient is an error later (named); only non-images skip.
        if sop == _DIRECTORY_SOP or "Rows" not in ds:
            log.warning("%s: DICOM file without an image (e.g. DICOMDIR), skipped", path)
            continue
        out.append((path, ds))
    if not out:
        subdirs = [p.name for p in entries if p.is_dir()]
        hint = f" (it holds folders {', '.join(subdirs)}: pass one of them)" if subdirs else ""
        raise PipelineError(f"{folder}: no DICOM image files found{hint}")
    return out


def _float_list(ds: pydicom.Dataset, keyword: str, path: Path, n: int) -> np.ndarray:
    try:
        values = np.array([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: missing or invalid {keyword}") from None
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise PipelineError(f"{path}: {keyword} must hold {n} numbers, got {ds[keyword].value}")
    return values


def _select_series(folder: Path, headers, series_uid: str | None):
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
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = before


def read_series(*args, **kwargs) -> tuple[np.ndarray | None, SeriesGeometry]:
    """`_read_series` (below) with pydicom's value checks off (`lenient_values`)."""
    with lenient_values():
        return _read_series(*args, **kwargs)


def _read_series(
    folder: str | Path | Sequence[Path],
    series_uid: str | None = None,
    *,
    orientation_tolerance: float = 1e-4,
    spacing_tolerance: float = 0.01,
    pixels: bool = True,
    stack: int | None = None,
) -> tuple[np.ndarray | None, SeriesGeometry]:
    """Read one single-frame DICOM series folder (or the list of its files) into (volume, geometry).

    Returns volume float32 (columns, rows, slices) in dcm2niix's voxel order with the modality
    rescale applied (HU for CT), and its SeriesGeometry (RAS affine in mm). Slices are ordered by
    ImagePositionPatient along the slice normal; spacing comes from the positions.
    Enhanced / Legacy Converted Enhanced multi-frame files go to `pipeline.multiframe` (`stack`
    picks one of several stacks, e.g. magnitude and phase).
    Raises PipelineError naming the file on: missing/empty folder, several series, inconsistent
    orientation or matrix size, uneven spacing (missing slices), gantry tilt, undecodable pixels.
    """
    headers = _list_headers(folder, with_pixels=pixels)
    folder = Path(folder) if isinstance(folder, (str, Path)) else headers[0][0].parent
    headers = _select_series(folder, headers, series_uid)
    from pipeline.multiframe import is_multiframe, read_multiframe

    if any(is_multiframe(ds) for _, ds in headers):
        return read_multiframe([p for p, _ in headers], stack, pixels=pixels,
                               orientation_tolerance=orientation_tolerance, spacing_tolerance=spacing_tolerance)
    path0, ds0 = headers[0]
    iop0 = _float_list(ds0, "ImageOrientationPatient", path0, 6)
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise PipelineError(f"{path0}: ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    positions = []
    for path, ds in headers:
        iop = _float_list(ds, "ImageOrientationPatient", path, 6)
        if np.max(np.abs(iop - iop0)) > orientation_tolerance:
            raise PipelineError(
                f"{path}: ImageOrientationPatient {iop.tolist()} differs from {path0.name} {iop0.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise PipelineError(f"{path}: image is {ds.Rows}x{ds.Columns}, {path0.name} is {rows}x{cols}")
        positions.append(_float_list(ds, "ImagePositionPatient", path, 3))
    positions = np.array(positions)
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]
    files = [p for p, _ in headers]
    step = _check_steps(files, positions, normal, spacing_tolerance, headers[0][1])

    pixel_spacing = _float_list(ds0, "PixelSpacing", path0, 2)  # [between rows, between columns]
    volume = _read_pixels_in_order(files, rows, cols, [ds for _, ds in headers]) if pixels else None

    dr, dc = pixel_spacing
    affine = nifti_affine(row_dir, col_dir, normal, step, positions[0], rows, dr, dc)
    geometry = SeriesGeometry(
        affine=affine, shape=(cols, rows, len(files)), spacing=(float(dc), float(dr), float(step)), files=files,
        modality=str(ds0.get("Modality", "")), series_uid=str(ds0.get("SeriesInstanceUID", "")),
        rows=rows, cols=cols, headers=[_without_pixels(ds) for _, ds in headers],
    )
    return volume, geometry


def _without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The header alone: the pixels are in the volume already, and a CT series' would double its memory."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def nifti_affine(row_dir, col_dir, normal, step: float, first_position, rows: int, dr: float, dc: float) -> np.ndarray:
    """RAS affine of dcm2niix's voxel order for a stack: voxel (i, j, k) lies at
    P_first + i*dc*row_dir + (rows-1-j)*dr*col_dir + k*step*normal (LPS), P_first the first slice's
    ImagePositionPatient, dr / dc the spacing between rows / columns."""
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir) * dc
    lps[:3, 1] = -np.asarray(col_dir) * dr
    lps[:3, 2] = np.asarray(normal) * step
    lps[:3, 3] = np.asarray(first_position) + (rows - 1) * dr * np.asarray(col_dir)
    affine = np.eye(4)
    affine[:3] = _LPS_TO_RAS @ lps[:3]
    return affine


def _check_steps(files, positions, normal, tolerance, ds0) -> float:
    """Median slice step along the normal (mm); PipelineError on duplicates, gaps or gantry tilt."""
    if len(files) == 1:
        # One slice has no step; the header's thickness is the only information there is.
        return float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
    deltas = np.diff(positions, axis=0)
    steps = deltas @ normal
    step = float(np.median(steps))
    for k, s in enumerate(steps):
        if s < 1e-6 * max(step, 1.0):
            raise PipelineError(f"{files[k + 1]}: same slice position as {files[k].name} (duplicate slice)")
    for k, s in enumerate(steps):
        if abs(s - step) > tolerance * step:
            raise PipelineError(
                f"{files[k + 1]}: uneven slice spacing, {s:.4g} mm after {files[k].name} vs median "
                f"{step:.4g} mm (missing slice?)"
            )
        # Positions must move along the normal; a sideways drift is gantry tilt, which a plain
        # affine cannot describe (dcm2niix would need to resample).
        drift = np.linalg.norm(deltas[k] - s * normal)
        if drift > tolerance * step:
            raise PipelineError(
                f"{files[k + 1]}: slice position drifts {drift:.4g} mm off the slice normal (gantry tilt)"
            )
    return step


def _read_pixels_in_order(files: list[Path], rows: int, cols: int,
                          datasets: list[pydicom.Dataset] | None = None) -> np.ndarray:
    """Pixels of `files` (already in slice order), modality rescale applied, float32 (cols, rows, slices).

    Uncompressed files already read whole (`datasets`, from the header pass) are stacked from
    memory: one pass over the files instead of two. Compressed transfer syntaxes go to SimpleITK (GDCM,
    C++), which decodes them several times faster than pydicom file by file; it is handed our
    slice order, and the geometry stays ours (from the pydicom headers). Where it fails, pydicom
    reads file by file, so the error names the file.
    """
    if datasets is not None and all(_is_plain_image(ds) for ds in datasets):
        stack = np.empty((len(files), rows, cols), dtype=np.float32)
        for k, (path, ds) in enumerate(zip(files, datasets)):
            _read_pixels(path, rows, cols, ds, out=stack[k, ::-1, :])  # to_nifti_slice's row flip, in place
        return stack.transpose(2, 1, 0)  # (X, Y, Z), Fortran-ordered like NIfTI on disk
    import SimpleITK as sitk

    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own spacing checks: ours come first
    try:
        image = sitk.ReadImage([str(f) for f in files], sitk.sitkFloat32)
        stack = sitk.GetArrayViewFromImage(image)  # (slices, rows, cols) as stored
        if stack.shape == (len(files), rows, cols):
            # to_nifti_slice per slice; the (X, Y, Z) result is a view of the C-ordered (Z, Y, X) copy,
            # i.e. Fortran-ordered like NIfTI on disk: no transposing copy here or in nibabel's writer
            return np.ascontiguousarray(stack[:, ::-1, :]).transpose(2, 1, 0)
    except RuntimeError:
        pass
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    volume = np.empty((cols, rows, len(files)), dtype=np.float32, order="F")
    for k, path in enumerate(files):
        volume[:, :, k] = to_nifti_slice(_read_pixels(path, rows, cols))
    return volume


def _is_plain_image(ds: pydicom.Dataset) -> bool:
    """Pixel data in memory, uncompressed, one sample per pixel, rescale by slope/intercept only."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return ("PixelData" in ds and syntax in UncompressedTransferSyntaxes
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and "ModalityLUTSequence" not in ds)


# Little-endian uncompressed transfer syntaxes: the pixel data is the array's bytes as they are.
_NATIVE_LITTLE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _stored_pixels(ds: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    """`ds.pixel_array` of a single-frame, single-sample image.

    Little-endian uncompressed data is viewed as the array directly, with what pydicom does to it
    (bits above BitsStored masked off, or sign-extended when signed). pydicom 3's pixel_array
    resolves and validates its decoder options on every call, a noticeable part of reading a CT
    series, for what is a view of the bytes here. Anything else goes to pydicom.
    tests/test_dicom.py compares both on the bit patterns that matter.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (syntax not in _NATIVE_LITTLE or allocated not in (8, 16, 32) or not 0 < stored <= allocated
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or "PixelData" not in ds or len(ds.PixelData) < rows * cols * allocated // 8):
        return ds.pixel_array
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < allocated:
        unused = allocated - stored
        arr = (arr << unused) >> unused if signed else arr & ((1 << stored) - 1)
    return arr


def _read_pixels(path: Path, rows: int, cols: int, ds: pydicom.Dataset | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels with the modality rescale applied, float32 rows x cols (pydicom).

    `ds`: the file already read whole. Slope and intercept are applied here as pydicom's
    apply_modality_lut does (float64, then float32) at half its cost; LUTs go to pydicom.
    `out`: a float32 rows x cols array (a view into the volume being stacked) to write into.
    """
    out = np.empty((rows, cols), dtype=np.float32) if out is None else out
    try:
        if ds is None or "PixelData" not in ds:
            ds = pydicom.dcmread(path)
        arr = _stored_pixels(ds, rows, cols)
        if arr.shape != (rows, cols):
            raise PipelineError(f"{path}: pixel data has shape {arr.shape}, expected {(rows, cols)}")
        if "ModalityLUTSequence" in ds:
            out[...] = apply_modality_lut(arr, ds)
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            if slope == 1.0 and intercept.is_integer() and arr.dtype.itemsize <= 2 and abs(intercept) < 2**23:
                # integers below 2**24 throughout (CT's usual case): float32 is exact, so the values
                # are cast into `out` and shifted there, no float64 copy and no temporary
                out[...] = arr
                out += np.float32(intercept)
            else:
                out[...] = arr * slope + intercept
        else:
            out[...] = arr
    except (AttributeError, ValueError, RuntimeError, NotImplementedError, OSError, EOFError, TypeError) as exc:
        raise PipelineError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from None
    return out
