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


# ---------------------------------------------------------------------------------------------
# A tiny CHAOS Train_Sets tree: CT_1 (FFS, files head -> feet) and MR_2 (T1DUAL in/out + T2SPIR)
# ---------------------------------------------------------------------------------------------
MR_GREY = {1: 63, 2: 126, 3: 189, 4: 252}


def organ_masks(n, rows, cols, seed) -> np.ndarray:
    """(n, rows, cols) labels 0..4: a liver blob on most slices, kidneys and spleen on some."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, rows, cols), np.uint8)
    for k in range(1, n):  # slice 0 has no organ
        r0, c0 = rng.integers(1, 4, 2)
        labels[k, r0:r0 + rows // 2, c0:c0 + cols // 2] = 1
        labels[k, -3:-1, 1:3] = 2 + (k % 3)  # kidney/spleen patches
    return labels


def _save_png(path: Path, arr: np.ndarray, one_bit: bool) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((arr > 0) if one_bit else arr.astype(np.uint8))
    img.save(path)


def make_chaos_tree(root: Path, rows=16, cols=14) -> dict:
    """Write a CHAOS Train_Sets tree under root; return {case: {dicom file: labels rows x cols}}."""
    train = root / "Train_Sets"
    truth: dict[str, dict[Path, np.ndarray]] = {}

    # CT_1: like the real CT: FFS, z descending in file order, 1-bit liver PNGs by file order.
    n = 6
    labels = organ_masks(n, rows, cols, seed=1)
    liver = (labels == 1).astype(np.uint8)
    hu = np.where(liver, 140.0, -50.0) + ramp_volume(n, rows, cols) % 7
    names = [f"i{k:04d},0000b.dcm" for k in range(n)]
    paths = write_series(train / "CT/1/DICOM_anon", hu, spacing=(0.7, 0.7, -2.0), origin=(-90, -80, 1690.5),
                         row_dir=(1, 0, 0), col_dir=(0, 1, 0), modality="CT", file_names=names,
                         rescale_intercept=-1000.0, patient_position="FFS", patient_id="ct1")
    for k in range(n):
        _save_png(train / f"CT/1/Ground/liver_GT_{k:03d}.png", liver[k], one_bit=True)
    truth["CT_1"] = dict(zip(paths, liver))

    # MR_2 T1DUAL: OutPhase odd file numbers, InPhase even ones, shared Ground with InPhase stems.
    n = 5
    labels = organ_masks(n, rows, cols, seed=2)
    base = ramp_volume(n, rows, cols, seed=3)
    geo = dict(spacing=(1.5, 1.4, 6.0), origin=(-100, -110, -40), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL,
               modality="MR", patient_id="mr2")
    t1 = train / "MR/2/T1DUAL"
    in_names = [f"IMG-0004-{2 * k + 2:05d}.dcm" for k in range(n)]
    out_names = [f"IMG-0004-{2 * k + 1:05d}.dcm" for k in range(n)]
    in_paths = write_series(t1 / "DICOM_anon/InPhase", base, file_names=in_names, series_description="in",
                            extra_tags={"EchoTime": 4.6}, **geo)
    out_paths = write_series(t1 / "DICOM_anon/OutPhase", base * 0.5, file_names=out_names,
                             series_description="out", extra_tags={"EchoTime": 2.3}, **geo)
    for k in range(n):
        grey = np.vectorize(lambda v: MR_GREY.get(int(v), 0))(labels[k])
        _save_png(t1 / f"Ground/{Path(in_names[k]).stem}.png", grey, one_bit=False)
    truth["MR_2_T1DUAL_InPhase"] = dict(zip(in_paths, labels))
    truth["MR_2_T1DUAL_OutPhase"] = dict(zip(out_paths, labels))

    # MR_2 T2SPIR: positions descending in file order, file names shuffled against slice order.
    n = 4
    labels = organ_masks(n, rows, cols, seed=4)
    names = shuffled_names(n, pattern="IMG-0002-{:05d}.dcm")
    paths = write_series(train / "MR/2/T2SPIR/DICOM_anon", ramp_volume(n, rows, cols, seed=5),
                         spacing=(1.2, 1.2, -7.0), origin=(-100, -110, 30), row_dir=(1, 0, 0), col_dir=(0, 1, 0),
                         modality="MR", file_names=names, patient_id="mr2", series_description="t2")
    for k in range(n):
        grey = np.vectorize(lambda v: MR_GREY.get(int(v), 0))(labels[k])
        _save_png(train / f"MR/2/T2SPIR/Ground/{Path(names[k]).stem}.png", grey, one_bit=False)
    truth["MR_2_T2SPIR"] = dict(zip(paths, labels))
    return truth
