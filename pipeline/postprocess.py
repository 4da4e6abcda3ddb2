"""Post-processing of binary liver masks: what infer writes and what validation scores."""
from __future__ import annotations

import numpy as np


def postprocess(mask: np.ndarray, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Binary liver mask (X, Y, Z) -> cleaned uint8 mask (liver 1, `pipeline.labels.LIVER`): MONAI's
    KeepLargestConnectedComponent and FillHoles, computed as below (equal results, tested).

    Both run on the mask's bounding box plus a one-voxel background margin: components and
    enclosed holes are the same there as in the whole volume, and a liver fills a few percent of
    a CT volume.
    """
    out = np.zeros_like(mask, dtype=np.uint8)  # the mask's memory layout (NIfTI's, from infer): no copy when written
    if not mask.any():
        return out
    box = []
    for axis in range(mask.ndim):  # from the projections: cheaper than np.nonzero on a whole CT volume
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    box = tuple(box)
    crop = np.pad(mask[box].astype(np.uint8), 1)  # the margin also where the box meets the volume's edge
    full = np.ones((3,) * crop.ndim, bool)  # 26-connectivity in 3-D, MONAI's connectivity=3
    if largest_component:
        # What MONAI's KeepLargestConnectedComponent(applied_labels=[1], connectivity=3) does
        # (get_largest_connected_component_mask: label, nothing to do for one component, else keep
        # the first of the argsort of the sizes, reversed), written out so that the labelling runs
        # on the C-ordered view (`_label`); MONAI labels the NIfTI-ordered box as it is, which is
        # slower. The result equals MONAI's (tests/test_infer.py).
        labels, count = _label(crop, full)
        if count > 1:
            sizes = np.bincount(labels.ravel(order="K"))  # memory order: no copy of a transposed view
            sizes[0] = 0
            crop = (labels == np.argsort(sizes)[::-1][0]).astype(np.uint8)
    if fill_holes:
        # MONAI's FillHoles (full connectivity) marks the background reachable from outside by
        # iterated binary dilation; one labelling of the background does the same faster: with the
        # one-voxel margin, the outside is the component at the corner.
        # The result equals MONAI's (tests/test_infer.py compares them).
        background, _ = _label(crop == 0, full)
        crop = np.where((background > 0) & (background != background[(0,) * crop.ndim]), 1, crop).astype(np.uint8)
    out[box] = crop[1:-1, 1:-1, 1:-1]  # 0 / 1, and 1 is LIVER
    return out


def _label(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy.ndimage.label, run on the C-ordered view of a Fortran-ordered (NIfTI-layout) mask.

    scipy walks the array in C order, which is faster on its transpose (a view of the same
    memory). The components are the same, the neighbourhood being symmetric under the transpose,
    so the labels are transposed back as a view.
    """
    from scipy import ndimage

    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        labels, count = ndimage.label(mask.T, structure=structure.T)
        return labels.T, count
    return ndimage.label(mask, structure=structure)
