"""Pictures people look at: overlay montages of image, prediction and ground truth.

Arrays are in NIfTI voxel order (X, Y, Z) with Z the slice axis. For display, each axial slice is
shown in the radiological convention (patient's right on the screen's left, anterior up) by
reorienting to RAS first, so a montage looks the same whatever the scanner's storage order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.figures import display_window, new_figure, save_png

LIVER_RGB = (221, 130, 101)  # the colour 3D Slicer's GenericAnatomyColors gives the liver


def to_display(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient (X, Y, Z) to RAS and return slices as (Z, rows, cols) for imshow."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    # In RAS the index grows towards the patient's right, anterior and superior. The radiological
    # view puts the patient's right on the screen's left and anterior at the top, so both in-plane
    # axes are flipped after moving (x, y) to (cols, rows).
    return np.transpose(ras, (2, 1, 0))[:, ::-1, ::-1]


def montage(
    path: str | Path,
    image: np.ndarray,
    affine: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
    n_slices: int = 4,
) -> Path:
    """Save a PNG: rows = slices through the liver, columns = image | prediction | truth.

    `image` float (X, Y, Z); `pred` and `truth` binary liver masks on the same grid.
    """
    img = to_display(np.asarray(image, dtype=np.float32), affine)
    prd = to_display(np.asarray(pred) > 0, affine)
    tru = to_display(np.asarray(truth) > 0, affine) if truth is not None else None
    ref = tru if tru is not None and tru.any() else prd
    zs = np.flatnonzero(ref.reshape(ref.shape[0], -1).any(1))
    if zs.size == 0:
        zs = np.arange(img.shape[0])
    picks = np.unique(np.linspace(zs[0], zs[-1], n_slices + 2).round().astype(int)[1:-1]) if zs.size > 2 else zs
    lo, hi = display_window(img)
    cols = 3 if tru is not None else 2
    fig = new_figure(figsize=(3.0 * cols, 3.0 * len(picks)))
    axes = fig.subplots(len(picks), cols, squeeze=False)
    colour = np.array(LIVER_RGB) / 255.0
    for row, z in enumerate(picks):
        panels = [("image", None), ("prediction", prd[z])] + ([("ground truth", tru[z])] if tru is not None else [])
        for col, (name, mask) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if mask is not None and mask.any():
                rgba = np.zeros(mask.shape + (4,))
                rgba[mask] = (*colour, 0.45)
                ax.imshow(rgba, interpolation="nearest")
                ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"slice {z}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path, dpi=80)
