"""Volumes with their geometry: one reader interface for every input kind, one NIfTI writer.

A `Volume` is an array in NIfTI voxel order (i, j, k; k = the slice axis) with the 4x4 affine that
maps voxel indices to RAS millimetres, the way nnU-Net's reader-writers and TorchIO's images carry
their geometry. A DICOM series also keeps its `SeriesGeometry` (which file is which slice, the
stored 2D shape), which the CHAOS Ground pairing, PNG output and evaluation need.

    read_volume(path)          a NIfTI file or a DICOM series folder, whichever `path` is
    read_nifti(path)           NIfTI (nibabel)
    read_dicom_series(folder)  single-frame DICOM series (pipeline.dicom.series: dcm2niix's voxel order and affine)
    write_nifti(path, ...)     NIfTI with sform and qform, atomically

A new input kind (multi-frame DICOM, DICOM SEG, another data set's NIfTI) is one more reader here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path
from pipeline.dicom.geometry import SeriesGeometry
from pipeline.dicom.series import read_series

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    """array (X, Y, Z) in NIfTI voxel order; affine 4x4 float64 voxel -> RAS mm; geometry: the
    DICOM series it was read from (None for NIfTI); source: the file or folder read."""

    array: np.ndarray | None
    affine: np.ndarray
    source: Path
    geometry: SeriesGeometry | None = None

    @property
    def modality(self) -> str:
        """"CT" / "MR" from the DICOM header; "" when the source does not say (NIfTI)."""
        return self.geometry.modality if self.geometry is not None else ""

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def is_nifti(path: Path) -> bool:
    """A visible file named *.nii or *.nii.gz."""
    path = Path(path)
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def nifti_stem(path: Path) -> str:
    """The file name without .nii / .nii.gz."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_nifti(path: str | Path, dtype: Any = np.float32) -> Volume:
    """A NIfTI file as `dtype` (None: as stored), with its affine; trailing singleton axes dropped."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise PipelineError(f"{path}: cannot read NIfTI ({exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return Volume(data, np.asarray(img.affine, dtype=np.float64), path)


def read_dicom_series(folder: str | Path | Sequence[Path], series_uid: str | None = None, *, pixels: bool = True,
                      orientation_tolerance: float = 1e-4, spacing_tolerance: float = 0.01,
                      stack: int | None = None) -> Volume:
    """One DICOM series folder, or the list of its files (see pipeline.dicom.series.read_series; `stack`
    picks one stack of multi-frame files); pixels=False reads the geometry only (array None)."""
    array, geometry = read_series(folder, series_uid, pixels=pixels, orientation_tolerance=orientation_tolerance,
                                  spacing_tolerance=spacing_tolerance, stack=stack)
    source = Path(folder) if isinstance(folder, (str, Path)) else Path(geometry.files[0]).parent
    return Volume(array, geometry.affine, source, geometry)


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """A NIfTI file or a DICOM series folder, float32 (CT in HU)."""
    path = Path(path)
    if is_nifti(path):
        return read_nifti(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if not path.exists():
        raise PipelineError(f"{path}: not found")
    raise PipelineError(f"{path}: neither a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype: Any) -> Path:
    """Write `array` (NIfTI voxel order) with `affine` (RAS mm) atomically; sform and qform code 1.

    nibabel's gzip writer stores mtime 0, so the same inputs give byte-identical files.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or np.allclose(affine, np.eye(4)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise PipelineError(f"{path}: refusing to write a NIfTI with an identity or singular affine")
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


AFFINE_TOLERANCE_MM = 1e-3  # a label's affine may differ this much from its image's (float32 storage)


def on_image_grid(label: Volume, image: Volume) -> np.ndarray:
    """`label`'s array on `image`'s voxel grid, or a PipelineError naming both files.

    Two grids are the same when their affines agree within AFFINE_TOLERANCE_MM; a label stored with
    its axes in another order or direction (a mask saved by a viewer that keeps the DICOM row order,
    for instance) is the same grid and is reordered exactly, voxel for voxel. Anything else would
    need resampling, which labels never get here.
    """
    arr = np.asarray(label.array)
    if arr.ndim != 3 or image.array is None or np.asarray(image.array).ndim != 3:
        raise PipelineError(f"{label.source}: a 3-D label expected, got shape {arr.shape}")
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(label.affine),
                                           nib.orientations.io_orientation(image.affine))
    moved = nib.orientations.apply_orientation(arr, ornt)
    affine = label.affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)
    shape = tuple(np.asarray(image.array).shape)
    if moved.shape != shape or np.max(np.abs(affine - image.affine)) > AFFINE_TOLERANCE_MM:
        why = (f"shape {arr.shape} vs {shape}" if moved.shape != shape
               else f"affines differ by up to {np.max(np.abs(affine - image.affine)):.3g} mm")
        raise PipelineError(f"{label.source}: label is not on the grid of its image {image.source} ({why}; "
                            f"labels are never resampled)")
    return moved
