"""The network's liver probability back on the source grid: the one way from the model's grid to a
mask, for infer (pipeline.infer.segment) and for validation during training (pipeline.train.epochs).

`transform` is the Compose that made `image` (MONAI's Invertd matches the image's recorded operations
to those very transform objects); `probs` the liver probability (1, H, W, Z) on the model's grid.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from pipeline.model.postprocess import postprocess


def liver_on_source_grid(probs, image, transform, shape: tuple[int, ...]) -> np.ndarray:
    """Liver probability (X, Y, Z float32) on the source grid: MONAI Invertd through `transform`,
    the Compose that made `image`."""
    from pipeline.model.predict import source_grid_inverter, to_source_grid

    inv = to_source_grid(probs, image, source_grid_inverter(transform))
    liver = np.asarray(inv[0], dtype=np.float32)
    if liver.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {liver.shape} != image {tuple(shape)}")
    return liver


def liver_mask_on_source_grid(probs, image, transform, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean liver mask (X, Y, Z), liver probability >= 0.5 on the source grid.

    When the first spatial step was the in-plane resize (train.pixel_spacing 0) or the in-plane
    resampling to the run's pixel spacing (`InPlaneResampled`, axial series), the steps after it are
    undone with MONAI's Invertd on the model's grid and that step by its `inverse_mask`, which
    interpolates only the liver's box (equal to thresholding the full inversion up to float32 rounding
    at 0.5; tests/test_infer.py, tests/test_resample.py). Otherwise: the full inversion, then the
    threshold.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.model.predict import source_grid_inverter
    from pipeline.model.resample import InPlaneResampled
    from pipeline.model.transforms import InPlaneResized

    steps = list(transform.transforms)
    first = [i for i, t in enumerate(steps) if isinstance(t, (InPlaneResized, InPlaneResampled))]
    ops = [op["class"] for op in image.applied_operations]
    if not first or not ops or ops[0] not in ("InPlaneResize", "InPlaneResampled"):
        return liver_on_source_grid(probs, image, transform, shape) >= 0.5
    pred = MetaTensor(probs, meta=image.meta, applied_operations=list(image.applied_operations))
    later = steps[first[0] + 1:]
    if len(ops) > 1:
        pred = source_grid_inverter(Compose(later))({"pred": pred, "image": image})["pred"]
    mask = steps[first[0]].inverse_mask(pred, 0.5)
    if mask.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {mask.shape} != image {tuple(shape)}")
    return mask


class ViewProbs(NamedTuple):
    """One view's liver probability (1, H, W, Z) on its model grid, the image it was predicted from,
    and the Compose that made that image (model.views: one per plane)."""

    probs: object
    image: object
    transform: object


def views_on_source_grid(parts: Sequence[ViewProbs], shape: tuple[int, ...], own: list | None = None) -> np.ndarray:
    """The views' liver probability averaged on the source grid (X, Y, Z float32), each voxel over the
    views that saw it: each view's probability goes back with a channel of ones beside it (Invertd
    moves both alike), so the ones give how much of each source voxel the view covered (0 where its
    crop left the voxel out, fractions at the crop's edge) and the mean is weighted by it. Voxels no
    view saw get 0. With a list `own`, each view's own (mask, the voxels it saw) is appended to it
    (bool arrays), for the quality check's agreement of the views."""
    import torch

    from pipeline.model.predict import plain, source_grid_inverter, to_source_grid

    total = seen = None
    for probs, image, transform in parts:
        probs = plain(probs)
        both = to_source_grid(torch.cat([probs, torch.ones_like(probs)]), image, source_grid_inverter(transform))
        both = np.asarray(both, dtype=np.float32)
        if own is not None:
            covered = both[1] > 0.5
            own.append((covered & (both[0] >= 0.5 * both[1]), covered))
        total = both[0] if total is None else total + both[0]
        seen = both[1] if seen is None else seen + both[1]
    if total is None:
        raise ValueError("views_on_source_grid: no view")
    if total.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {total.shape} != image {tuple(shape)}")
    return np.divide(total, seen, out=np.zeros_like(total), where=seen > 1e-6)


def probability_on_source_grid(parts: Sequence[ViewProbs], shape: tuple[int, ...]) -> np.ndarray:
    """Liver probability (X, Y, Z float32) on the source grid of one view (liver_on_source_grid) or of
    several, averaged where each saw (views_on_source_grid)."""
    if len(parts) == 1:
        return liver_on_source_grid(*parts[0], shape)
    return views_on_source_grid(parts, shape)


def views_mask_on_source_grid(parts: Sequence[ViewProbs], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean liver mask (X, Y, Z) of one or more views: one view's by liver_mask_on_source_grid
    (the boxed inverse where it applies), several views' mean probability (views_on_source_grid) >= 0.5."""
    if len(parts) == 1:
        return liver_mask_on_source_grid(*parts[0], shape)
    return views_on_source_grid(parts, shape) >= 0.5


def source_masks(parts: Sequence[ViewProbs], shape: tuple[int, ...], infer_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(the thresholded mask, the mask infer writes) on the source grid: views_mask_on_source_grid,
    then infer's post-processing (infer.largest_component, infer.fill_holes)."""
    raw = views_mask_on_source_grid(parts, shape)
    return raw, postprocess(raw, infer_cfg.largest_component, infer_cfg.fill_holes)
