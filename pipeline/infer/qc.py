"""The quality check of a mask: the reasons to look at it before trusting it."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pipeline.core.config import pixel_spacing_mm
from pipeline.infer.loaded import LoadedRun

log = logging.getLogger(__name__)


def flag_mask(run: LoadedRun, name: str, liver_ml: float, agreement: float | None, confidence: float | None,
              probs, shape: Sequence[int], affine: np.ndarray, min_confidence: float | None = None,
              members: float | None = None) -> list[str]:
    """quality_flags of the mask of `name`, and cropped_liver's flag (`probs` on the model grid, the
    source's `shape` and `affine`), with a warning line naming it when there is any. `min_confidence`:
    the confidence level (default: the run's own, run.min_confidence); `members`: member_agreement of
    the views or fused runs, flagged below infer.qc_min_agreement as the folds' agreement is."""
    level = run.min_confidence if min_confidence is None else min_confidence
    flags = quality_flags(liver_ml, agreement, run.cfg.infer, confidence, level)
    if members is not None and members < run.cfg.infer.qc_min_agreement:
        flags.append(f"views or fused runs disagree (lowest Dice of one with the fused mask {members:.2f} < "
                     f"{run.cfg.infer.qc_min_agreement:g})")
    cropped = cropped_liver(run, probs, shape, affine)
    if cropped:
        flags.append(cropped)
    if flags:
        log.warning("%s: check this mask before using it: %s", name, "; ".join(flags))
    return flags


def quality_flags(liver_ml: float, agreement: float | None, cfg, confidence: float | None = None,
                  min_confidence: float | None = None) -> list[str]:
    """Why a mask should not be trusted without a look (empty when nothing is wrong): no liver, a
    liver volume outside infer.qc_liver_ml, fold models that disagree (infer.qc_min_agreement), or a
    network unsure of its own mask (predict.mask_confidence below `min_confidence`, the run's
    qc_confidence_threshold; infer.qc_min_confidence when not given)."""
    if min_confidence is None:
        min_confidence = cfg.qc_min_confidence
    flags = []
    low, high = cfg.qc_liver_ml
    if liver_ml == 0:
        flags.append("empty: no liver found")
    elif not low <= liver_ml <= high:
        flags.append(f"liver volume {liver_ml:.0f} ml outside {low:g}-{high:g} ml")
    if agreement is not None and agreement < cfg.qc_min_agreement:
        flags.append(f"fold models disagree (lowest Dice with the ensemble {agreement:.2f} < {cfg.qc_min_agreement:g})")
    if liver_ml > 0 and confidence is not None and confidence < min_confidence:
        flags.append(f"low confidence ({confidence:.3f} < {min_confidence:.3f})")
    return flags


def member_agreement(own: Sequence[tuple], fused: np.ndarray) -> float | None:
    """The lowest Dice between one member's own mask (a view of a multi-planar run, or one of fused
    runs) and the fused mask, each over the voxels that member saw: (mask, seen or None for all) pairs
    from inversion.views_on_source_grid. None with fewer than two members. Low where the planes or
    runs see different livers: a mask to look at before trusting it."""
    if len(own) < 2:
        return None
    from pipeline.evaluate.metrics import dice

    return min(dice(mask, fused) if seen is None else dice(mask & seen, fused & seen) for mask, seen in own)


def cropped_liver(run: LoadedRun, probs, shape: Sequence[int], affine: np.ndarray) -> str | None:
    """A QC flag when the network saw a crop of the scan (its field of view wider than roi_size at the
    run's train.pixel_spacing, cropped about the centre) and the liver it found (`probs`, the model
    grid's (1, H, W, D)) reaches the cut edge: part of the liver may lie outside what it saw."""
    from pipeline.model.transforms import in_plane_fov_mm

    spacing = pixel_spacing_mm(run.cfg.train)
    if spacing <= 0 or probs is None or run.cfg.model.dims == 3:
        return None  # resized to the roi, or 3D sliding windows over the whole volume: nothing is cut (or no axial view)
    fov, roi = in_plane_fov_mm(shape, affine), run.cfg.train.roi_size
    liver = probs[0] >= 0.5
    liver = liver.cpu().numpy() if hasattr(liver, "cpu") else np.asarray(liver)
    cut_and_reached = [axis for axis in (0, 1) if fov[axis] / spacing > roi[axis] + 0.5
                       and np.take(liver, [0, liver.shape[axis] - 1], axis=axis).any()]
    if not cut_and_reached:
        return None
    return (f"the liver reaches the edge of the network's view ({fov[0]:.0f} x {fov[1]:.0f} mm cropped to "
            f"{roi[0] * spacing:.0f} x {roi[1] * spacing:.0f} mm at train.pixel_spacing {spacing:g} mm): "
            f"part of it may be missing")
