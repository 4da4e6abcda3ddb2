"""CHAOS segmentation metrics on whole volumes: Dice, RAVD, ASSD, MSSD, HD95 and the challenge points.

Conventions at this module's border:
- Masks are numpy arrays (bool or integer; any non-zero voxel is foreground) of one volume,
  pred and ref on the same grid, in NIfTI voxel order (i, j, k) as nibabel returns them.
- `spacing` is the voxel size in mm per array axis, in the same (i, j, k) order. For a NIfTI
  affine use `spacing_from_affine` (column norms of affine[:3, :3]): with orthonormal direction
  cosines, distances between voxel centres in world mm equal spacing-weighted voxel distances.
- Distances are in mm, RAVD in percent, volumes in ml.

Definitions follow the official CHAOS evaluation code (github.com/emrekavur/CHAOS-evaluation,
`CHAOSmetrics.py` / `CHAOSMetrics.m`):
- Dice = 2|P & R| / (|P| + |R|).
- RAVD = |V_pred - V_ref| / V_ref * 100 (percent, not a fraction; the 5 % threshold is 5.0).
- Border voxels = mask XOR erosion(mask) with the 6-connected structure and voxels outside the
  volume counted as foreground (scipy `border_value=1`; MATLAB `imerode` pads the same way), so a
  mask touching the edge of the volume has no border there.
- For every border voxel of one mask, the Euclidean distance in mm to the nearest border voxel
  of the other (CHAOS: a KD-tree over world coordinates). ASSD pools the distances of both
  directions and takes their mean (not the mean of the two directed means); MSSD is their max
  (the symmetric Hausdorff distance).
- Points: Dice < 0.8 -> 0 else 100 * Dice; RAVD > 5 % -> 0 else 100 - 20 * RAVD;
  ASSD > 15 mm -> 0 else 100 - 20/3 * ASSD; MSSD > 60 mm -> 0 else 100 - 5/3 * MSSD;
  score = mean of the four points. (Scoring as stated by the challenge; the public evaluation
  code computes only the four metrics, not the points.)

Where we differ from the CHAOS code:
- CHAOS builds world coordinates from the first and last DICOM file in *file-name order*; we use
  the NIfTI affine (slice order from ImagePositionPatient). For the CHAOS data both give the same
  distances; for series whose file names do not follow position ours is the correct geometry.
- Empty masks (undefined in CHAOS, which divides by zero): both empty -> Dice 1, RAVD 0 and all
  distances 0 (a perfect answer for a case without liver); exactly one empty -> Dice 0, RAVD inf
  if the reference is empty, and every distance inf (as MONAI's `get_surface_distance` gives;
  the CHAOS MATLAB code uses the volume diagonal in voxels), which scores 0 points.
- HD95 is not a CHAOS metric. It follows MONAI `compute_hausdorff_distance(percentile=95)`: the
  larger of the two directed 95th percentiles (linear interpolation).

MONAI is used for the distances themselves (`monai.metrics.utils.get_surface_distance`, a KD-tree
with spacing on CPU). MONAI's own `get_mask_edges` is not used for the border because it pads the
cropped volume with background, so a mask touching the edge of the volume gets border voxels
there that CHAOS does not count; apart from that case our ASSD / MSSD / HD95 equal MONAI's
`compute_average_surface_distance(symmetric=True)` and `compute_hausdorff_distance` (tested).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

# CHAOS thresholds: beyond them a metric scores 0 points.
DICE_MIN = 0.8
RAVD_MAX_PCT = 5.0
ASSD_MAX_MM = 15.0
MSSD_MAX_MM = 60.0


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm per array axis (i, j, k) from a 4x4 NIfTI affine: column norms of affine[:3, :3].

    Logs a warning when the columns are not orthogonal (sheared grid, e.g. gantry tilt): then
    spacing-weighted distances only approximate world distances.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: {affine!r}")
    unit = m / spacing
    off_diag = np.abs(unit.T @ unit - np.eye(3)).max()
    if off_diag > 1e-3:
        log.warning("affine axes are not orthogonal (max |cos| %.4f): surface distances are approximate", off_diag)
    return tuple(float(s) for s in spacing)


def _binary(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr != 0


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")


def dice(pred: Any, ref: Any) -> float:
    """Dice overlap of two masks (non-zero = foreground); 1.0 when both are empty (nothing to find,
    nothing found). The one Dice of the pipeline: evaluation, validation, infer's scores, the fold
    agreement and the benches all call it. numpy arrays, or torch tensors counted on their own device
    (a CUDA volume is not copied to the host); the counts are exact integers."""
    if _is_tensor(pred) or _is_tensor(ref):
        import torch

        p = torch.as_tensor(pred)
        p, r = p != 0, torch.as_tensor(ref, device=p.device) != 0
        if p.shape != r.shape:
            raise ValueError(f"pred and ref must have the same shape, got {tuple(p.shape)} and {tuple(r.shape)}")
        inter, total = int((p & r).sum()), int(p.sum()) + int(r.sum())
    else:
        p, r = _binary(pred), _binary(ref)
        _check_pair(p, r)
        inter, total = int(np.count_nonzero(p & r)), int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return 1.0 if total == 0 else 2.0 * inter / total


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] in ("torch", "monai")


def ravd_percent(pred: Any, ref: Any) -> float:
    """Relative absolute volume difference |V_pred - V_ref| / V_ref * 100 (percent).

    Both empty -> 0.0; empty reference with a non-empty prediction -> inf.
    """
    p, r = _binary(pred), _binary(ref)
    _check_pair(p, r)
    vp, vr = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    if vr == 0:
        return 0.0 if vp == 0 else float("inf")
    return abs(vp - vr) / vr * 100.0


def _union_crop(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of pred | ref plus a 1-voxel margin, clipped to the volume; None if both are empty.

    Cropping keeps the erosion and the KD-tree small on 512x512xN volumes. The margin is clipped
    (not padded) so that a mask touching the volume edge still meets the erosion's
    border_value=1 there, exactly as on the full volume.
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


def border_voxels(mask: np.ndarray, outside: int = 1) -> np.ndarray:
    """CHAOS border (bool): mask voxels with a 6-connected background neighbour.

    outside=1 (CHAOS) treats voxels beyond the volume as foreground, so the volume's faces are
    not border; outside=0 (MONAI `get_mask_edges`) treats them as background.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=outside)


def surface_distances(pred: Any, ref: Any, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each border voxel of pred to the nearest border voxel of ref, and back.

    Returns (pred_to_ref, ref_to_pred), float32 1-D arrays. If either mask is empty the arrays
    are empty (callers decide what that means; see `surface_metrics`).
    """
    from monai.metrics.utils import get_surface_distance

    p, r = _binary(pred), _binary(ref)
    _check_pair(p, r)
    spacing = [float(s) for s in spacing]
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {spacing} does not match a {p.ndim}-D mask")
    box = _union_crop(p, r)
    empty = np.zeros(0, dtype=np.float32)
    if box is None or not p.any() or not r.any():
        return empty, empty
    edge_p, edge_r = border_voxels(p[box]), border_voxels(r[box])
    if not edge_p.any() or not edge_r.any():
        # A mask that fills the whole volume has no CHAOS border at all (the CHAOS code then
        # fails on an empty KD-tree); count the volume's outer faces as border instead.
        edge_p, edge_r = border_voxels(p[box], outside=0), border_voxels(r[box], outside=0)
    d_pr = get_surface_distance(edge_p, edge_r, distance_metric="euclidean", spacing=spacing)
    d_rp = get_surface_distance(edge_r, edge_p, distance_metric="euclidean", spacing=spacing)
    return np.asarray(d_pr, dtype=np.float32), np.asarray(d_rp, dtype=np.float32)


def surface_metrics(
    pred: Any, ref: Any, spacing: Sequence[float], hd_percentile: float = 95.0
) -> dict[str, float]:
    """ASSD, MSSD and the `hd_percentile` Hausdorff distance in mm: {'assd_mm', 'mssd_mm', 'hd_mm'}.

    Both empty -> all 0. Exactly one empty -> all inf (no surface to measure against).
    """
    if not 0.0 <= hd_percentile <= 100.0:
        raise ValueError(f"hd_percentile must be in [0, 100], got {hd_percentile}")
    p, r = _binary(pred), _binary(ref)
    _check_pair(p, r)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return {"assd_mm": 0.0, "mssd_mm": 0.0, "hd_mm": 0.0}
    if has_p != has_r:
        inf = float("inf")
        return {"assd_mm": inf, "mssd_mm": inf, "hd_mm": inf}
    d_pr, d_rp = surface_distances(p, r, spacing)
    pooled = np.concatenate([d_pr, d_rp]).astype(np.float64)
    hd = max(float(np.percentile(d_pr, hd_percentile)), float(np.percentile(d_rp, hd_percentile)))
    return {"assd_mm": float(pooled.mean()), "mssd_mm": float(pooled.max()), "hd_mm": hd}


def chaos_points(dice_value: float, ravd_pct: float, assd_mm: float, mssd_mm: float) -> dict[str, float]:
    """The challenge's points per metric (0..100) and their mean `score`."""
    points = {
        "dice_points": 0.0 if dice_value < DICE_MIN else 100.0 * dice_value,
        "ravd_points": 0.0 if ravd_pct > RAVD_MAX_PCT else 100.0 - 20.0 * ravd_pct,
        "assd_points": 0.0 if assd_mm > ASSD_MAX_MM else 100.0 - 20.0 / 3.0 * assd_mm,
        "mssd_points": 0.0 if mssd_mm > MSSD_MAX_MM else 100.0 - 5.0 / 3.0 * mssd_mm,
    }
    points["score"] = float(np.mean(list(points.values())))
    return points


def hd_key(hd_percentile: float) -> str:
    """Column name of the percentile Hausdorff distance, e.g. 'hd95_mm'."""
    return f"hd{hd_percentile:g}_mm"


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def chaos_metrics(pred: Any, ref: Any, spacing: Sequence[float], hd_percentile: float = 95.0) -> dict[str, float]:
    """Every metric of one case, as a flat dict of floats.

    Keys: dice, ravd_pct, assd_mm, mssd_mm, hd<P>_mm (e.g. hd95_mm), dice_points, ravd_points,
    assd_points, mssd_points, score, pred_ml, ref_ml.
    """
    p, r = _binary(pred), _binary(ref)
    _check_pair(p, r)
    out = {"dice": dice(p, r), "ravd_pct": ravd_percent(p, r)}
    surf = surface_metrics(p, r, spacing, hd_percentile)
    out.update(assd_mm=surf["assd_mm"], mssd_mm=surf["mssd_mm"])
    out[hd_key(hd_percentile)] = surf["hd_mm"]
    out.update(chaos_points(out["dice"], out["ravd_pct"], out["assd_mm"], out["mssd_mm"]))
    voxel_ml = voxel_volume_ml(spacing)
    out["pred_ml"] = int(np.count_nonzero(p)) * voxel_ml
    out["ref_ml"] = int(np.count_nonzero(r)) * voxel_ml
    return out
