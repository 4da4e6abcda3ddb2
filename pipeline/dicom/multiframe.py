"""Enhanced and Legacy Converted Enhanced multi-frame images (CT and MR): frames -> stacks -> volumes.

A multi-frame file keeps each frame's geometry in its functional groups: Plane Position (where
the frame lies), Plane Orientation, Pixel Measures (pixel spacing) and Pixel Value Transformation
(rescale), each in the per-frame item or, when common to all frames, in the shared one. Frames
are grouped into stacks (one volume each) by series, Stack ID, orientation, frame type
(magnitude / phase...) and echo time, so a file holding magnitude and phase or several echoes
gives one volume per kind; the frames of one series may also be spread over several files.
Each stack then gets the same checks and the same dcm2niix voxel order as a single-frame series.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from pipeline.core.errors import PipelineError
from pipeline.dicom.geometry import SeriesGeometry, check_steps, nifti_affine, to_nifti_slice
from pipeline.dicom.headers import lenient_values, read_header


def is_multiframe(ds: pydicom.Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


@dataclass
class Frame:
    path: Path
    index: int  # 0-based frame number in its file
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient (6)
    spacing: np.ndarray  # PixelSpacing: between rows, between columns
    slope: float
    intercept: float
    stack: tuple  # what puts frames in the same volume

    @property
    def label(self) -> Path:  # names the frame in errors, as a file name would
        return Path(f"{self.path}[frame {self.index + 1}]")


def _group(ds: pydicom.Dataset, item, sequence: str, keyword: str):
    """`keyword` from functional group `sequence`: the frame's own item first, then the shared one."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for source in (item, shared[0] if shared else None):
        if source is not None and sequence in source and len(source[sequence].value):
            inner = source[sequence][0]
            if keyword in inner:
                return inner[keyword].value
    return None


def _numbers(value, n: int, what: str, where: Path) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: missing or invalid {what} in the functional groups") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise PipelineError(f"{where}: {what} must hold {n} numbers, got {value}")
    return out


def frames_of(path: Path, ds: pydicom.Dataset) -> list[Frame]:
    """Every frame of the multi-frame file `path` (header `ds`) with its geometry and stack key."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n:
        raise PipelineError(f"{path}: {len(per_frame)} per-frame functional groups for {n} frames")
    uid = str(ds.get("SeriesInstanceUID", ""))
    frames = []
    for i in range(n):
        item = per_frame[i] if per_frame else None
        label = Path(f"{path}[frame {i + 1}]")
        position = _numbers(_group(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3,
                            "ImagePositionPatient", label)
        orientation = _numbers(_group(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6,
                               "ImageOrientationPatient", label)
        spacing = _numbers(_group(ds, item, "PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", label)
        slope = _group(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
        stack_id = _group(ds, item, "FrameContentSequence", "StackID")
        frame_type = (_group(ds, item, "MRImageFrameTypeSequence", "FrameType")
                      or _group(ds, item, "CTImageFrameTypeSequence", "FrameType") or ())
        echo = _group(ds, item, "MREchoSequence", "EffectiveEchoTime")
        key = (uid, str(stack_id or ""), tuple(np.round(orientation, 3)),
               "\\".join(str(v) for v in (frame_type if not isinstance(frame_type, str) else [frame_type])),
               "" if echo is None else f"{float(echo):.3f}")
        frames.append(Frame(path, i, position, orientation, spacing,
                            1.0 if slope in (None, "") else float(slope),
                            0.0 if intercept in (None, "") else float(intercept), key))
    return frames


def group_stacks(frames: list[Frame]) -> list[list[Frame]]:
    """Frames grouped by stack key, stacks in the order of their first frame."""
    stacks: dict[tuple, list[Frame]] = {}
    for f in frames:
        stacks.setdefault(f.stack, []).append(f)
    return list(stacks.values())


def read_stack(frames: list[Frame], headers: dict[Path, pydicom.Dataset], *, pixels: bool = True,
               orientation_tolerance: float = 1e-4, spacing_tolerance: float = 0.01
               ) -> tuple[np.ndarray | None, SeriesGeometry]:
    """One stack -> (volume float32 (cols, rows, slices) with the rescale applied, geometry), the same
    voxel order and affine as `pipeline.dicom.series.read_series` gives for single-frame files."""
    first = frames[0]
    ds0 = headers[first.path]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    for f in frames:
        if np.max(np.abs(f.orientation - first.orientation)) > orientation_tolerance:
            raise PipelineError(f"{f.label}: ImageOrientationPatient differs from {first.label.name}")
        if np.max(np.abs(f.spacing - first.spacing)) > 1e-6 * max(1.0, float(first.spacing.max())):
            raise PipelineError(f"{f.label}: PixelSpacing {f.spacing.tolist()} differs from {first.label.name}")
        ds = headers[f.path]
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise PipelineError(f"{f.path}: image is {ds.Rows}x{ds.Columns}, {first.path.name} is {rows}x{cols}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise PipelineError(f"{first.label}: ImageOrientationPatient is not two orthogonal unit vectors")
    order = np.argsort([f.position @ normal for f in frames], kind="stable")
    frames = [frames[i] for i in order]
    positions = np.array([f.position for f in frames])
    step = check_steps([f.label for f in frames], positions, normal, spacing_tolerance, ds0)
    dr, dc = first.spacing
    affine = nifti_affine(row_dir, col_dir, normal, step, positions[0], rows, dr, dc)
    volume = _stack_pixels(frames, rows, cols) if pixels else None
    geometry = SeriesGeometry(
        affine=affine, shape=(cols, rows, len(frames)), spacing=(float(dc), float(dr), float(step)),
        files=[f.path for f in frames], modality=str(ds0.get("Modality", "")),
        series_uid=str(ds0.get("SeriesInstanceUID", "")), rows=rows, cols=cols,
        headers=[headers[f.path] for f in frames], frame_numbers=[f.index + 1 for f in frames])
    return volume, geometry


def _stack_pixels(frames: list[Frame], rows: int, cols: int) -> np.ndarray:
    volume = np.empty((cols, rows, len(frames)), dtype=np.float32, order="F")
    decoded: dict[Path, np.ndarray] = {}
    for k, f in enumerate(frames):
        if f.path not in decoded:
            try:
                with lenient_values():
                    arr = pydicom.dcmread(f.path).pixel_array
            except Exception as exc:  # noqa: BLE001 - a decoder's failure on a damaged file, named
                raise PipelineError(f"{f.path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from None
            arr = arr[None] if arr.ndim == 2 else arr
            if arr.ndim != 3 or arr.shape[1:] != (rows, cols):
                raise PipelineError(f"{f.path}: pixel data has shape {arr.shape}, expected (frames, {rows}, {cols})")
            decoded[f.path] = arr
        arr = decoded[f.path]
        if f.index >= len(arr):
            raise PipelineError(f"{f.label}: the pixel data holds only {len(arr)} frames")
        volume[:, :, k] = to_nifti_slice(arr[f.index] * np.float64(f.slope) + f.intercept)
    return volume


def read_multiframe(files: list[Path], stack: int | None = None, **kwargs) -> tuple[np.ndarray | None, SeriesGeometry]:
    """The frames of `files` (multi-frame files of one series) -> one stack's (volume, geometry).

    stack: which stack (0-based, in the order `list_stacks` gives) when the frames form several;
    None requires exactly one. pixels / orientation_tolerance / spacing_tolerance as read_series.
    """
    headers = {}
    for path in files:
        headers[Path(path)] = read_header(Path(path))
    with lenient_values():
        frames = [f for p, ds in headers.items() for f in frames_of(p, ds)]
    stacks = group_stacks(frames)
    if stack is None and len(stacks) > 1:
        raise PipelineError(f"{files[0]}: holds {len(stacks)} stacks (e.g. magnitude and phase, or echoes); "
                            f"pick one (read_series(..., stack=K); infer segments each, --series NAME picks one)")
    chosen = stacks[stack or 0] if (stack or 0) < len(stacks) else None
    if chosen is None:
        raise PipelineError(f"{files[0]}: no stack {stack} (it holds {len(stacks)})")
    return read_stack(chosen, headers, **kwargs)
