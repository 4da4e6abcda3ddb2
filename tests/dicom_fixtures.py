"""Tiny DICOM series for tests, written through pipeline.dicom.write_series."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.dicom import write_series

# An oblique orientation (rotated ~20 degrees about two axes): catches any code that assumes axial.
_a, _b = np.deg2rad(20.0), np.deg2rad(10.0)
OBLIQUE_ROW = np.array([np.cos(_a), np.sin(_a), 0.0])
_c = np.array([-np.sin(_a) * np.cos(_b), np.cos(_a) * np.cos(_b), np.sin(_b)])
OBLIQUE_COL = _c / np.linalg.norm(_c)


def ramp_volume(n=5, rows=12, cols=10, seed=0) -> np.ndarray:
    """(n, rows, cols) int-valued volume in which every voxel value is unique (shows any flip)."""
    rng = np.random.default_rng(seed)
    return (np.arange(n * rows * cols).reshape(n, rows, cols) * 3 + rng.integers(0, 3, (n, rows, cols))).astype(np.float64)


def shuffled_names(n, seed=0, pattern="IMG-0001-{:05d}.dcm") -> list[str]:
    """File names whose natural order does NOT follow the slice order."""
    order = np.random.default_rng(seed).permutation(n)
    while n > 1 and np.array_equal(order, np.arange(n)):
        order = np.random.default_rng(seed := seed + 1).permutation(n)
    return [pattern.format(int(i) + 1) for i in order]


def write_tiny(folder: Path, volume=None, **kw) -> list[Path]:
    """write_series with axial HFS defaults; keywords override any of them."""
    volume = ramp_volume() if volume is None else volume
    args = dict(spacing=(0.8, 0.7, 2.5), origin=(-10.0, -20.0, 30.0), row_dir=(1, 0, 0),
                col_dir=(0, 1, 0), modality="MR")
    args.update(kw)
    return write_series(folder, volume, **args)
