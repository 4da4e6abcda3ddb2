"""Where the voxels of a DICOM stack lie: dcm2niix's voxel order and affine, slice steps.

Coordinates: DICOM patient space is LPS (mm); NIfTI affines are RAS (mm). A leaf: single-frame
series, multi-frame files and the Ground-PNG pairing all build on it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.core.errors import PipelineError

# ---------------------------------------------------------------------------------------------
# Why hand-written geometry: SimpleITK's ImageSeriesReader sorts slices but returns LPS, does not
# check that the steps are even (a missing slice goes unnoticed) or that there is no gantry tilt,
# and hides which file became which slice, which the Ground-PNG pairing needs. dcm2niix is the
# reference viewers agree with; we reproduce its voxel order and affine (tested against it):
#   NIfTI i = DICOM column, j = rows-1-row (rows stored bottom-up), k = slices ascending along
#   normal = cross(IOP[:3], IOP[3:]) whatever the file names, InstanceNumbers or PatientPosition.

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


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
    # multi-frame sources (pipeline.dicom.multiframe): the 1-based frame of files[k] that holds slice k
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


def check_steps(files, positions, normal, tolerance, ds0) -> float:
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
