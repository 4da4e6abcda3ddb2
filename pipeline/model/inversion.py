"""The network's liver probability back on the source grid: the one way from the model's grid to a
mask, for infer (pipeline.infer.segment) and for validation during training (pipeline.train.epochs).

`transform` is the Compose that made `image` (MONAI's Invertd matches the image's recorded operations
to those very transform objects); `probs` the liver probability (1, H, W, Z) on the model's grid.
"""
from __future__ import annotations

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


def source_masks(probs, image, transform, shape: tuple[int, ...], infer_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(the thresholded mask, the mask infer writes) on the source grid: liver_mask_on_source_grid,
    then infer's post-processing (infer.largest_component, infer.fill_holes)."""
    raw = liver_mask_on_source_grid(probs, image, transform, shape)
    return raw, postprocess(raw, infer_cfg.largest_component, infer_cfg.fill_holes)
