"""Single-frame DICOM series -> (volume, geometry) in dcm2niix's voxel order and affine.

Multi-frame files go to pipeline.dicom.multiframe; the geometry is pipeline.dicom.geometry's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.dicom.geometry import SeriesGeometry, check_steps, nifti_affine
from pipeline.dicom.headers import float_list, lenient_values, list_headers, select_series, without_pixels
from pipeline.dicom.multiframe import is_multiframe, read_multiframe
from pipeline.dicom.pixels import read_pixels_in_order


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
    Enhanced / Legacy Converted Enhanced multi-frame files go to `pipeline.dicom.multiframe` (`stack`
    picks one of several stacks, e.g. magnitude and phase).
    Raises PipelineError naming the file on: missing/empty folder, several series, inconsistent
    orientation or matrix size, uneven spacing (missing slices), gantry tilt, undecodable pixels.
    """
    headers = list_headers(folder, with_pixels=pixels)
    folder = Path(folder) if isinstance(folder, (str, Path)) else headers[0][0].parent
    headers = select_series(folder, headers, series_uid)
    if any(is_multiframe(ds) for _, ds in headers):
        return read_multiframe([p for p, _ in headers], stack, pixels=pixels,
                               orientation_tolerance=orientation_tolerance, spacing_tolerance=spacing_tolerance)
    path0, ds0 = headers[0]
    iop0 = float_list(ds0, "ImageOrientationPatient", path0, 6)
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise PipelineError(f"{path0}: ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    positions = []
    for path, ds in headers:
        iop = float_list(ds, "ImageOrientationPatient", path, 6)
        if np.max(np.abs(iop - iop0)) > orientation_tolerance:
            raise PipelineError(
                f"{path}: ImageOrientationPatient {iop.tolist()} differs from {path0.name} {iop0.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise PipelineError(f"{path}: image is {ds.Rows}x{ds.Columns}, {path0.name} is {rows}x{cols}")
        positions.append(float_list(ds, "ImagePositionPatient", path, 3))
    positions = np.array(positions)
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]
    files = [p for p, _ in headers]
    step = check_steps(files, positions, normal, spacing_tolerance, headers[0][1])

    pixel_spacing = float_list(ds0, "PixelSpacing", path0, 2)  # [between rows, between columns]
    volume = read_pixels_in_order(files, rows, cols, [ds for _, ds in headers]) if pixels else None

    dr, dc = pixel_spacing
    affine = nifti_affine(row_dir, col_dir, normal, step, positions[0], rows, dr, dc)
    geometry = SeriesGeometry(
        affine=affine, shape=(cols, rows, len(files)), spacing=(float(dc), float(dr), float(step)), files=files,
        modality=str(ds0.get("Modality", "")), series_uid=str(ds0.get("SeriesInstanceUID", "")),
        rows=rows, cols=cols, headers=[without_pixels(ds) for _, ds in headers],
    )
    return volume, geometry
