"""Overlay montages and display orientation (pipeline/visualize.py)."""

import numpy as np
import pytest
from PIL import Image

from pipeline.infer.montage import LIVER_RGB, montage, to_display

SHAPE = (32, 32, 16)  # (X, Y, Z)
ALPHA = 0.45  # opacity of the liver overlay in montage


def scan():
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    liver = np.zeros(SHAPE, dtype=bool)
    liver[8:20, 10:24, 3:13] = True  # liver in slices 3..12 of 16
    return image, liver


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def liver_tint(rgb: np.ndarray) -> np.ndarray:
    """Pixels where LIVER_RGB at ALPHA lies over a grey (R = G = B) pixel of the scan.

    Over grey g the blend is ALPHA * liver + (1 - ALPHA) * g, so R - G and G - B are fixed
    whatever the grey level; grey pixels, white margins and black text give 0 for both."""
    r, g, b = (rgb[..., i] for i in range(3))
    want_rg = ALPHA * (LIVER_RGB[0] - LIVER_RGB[1])
    want_gb = ALPHA * (LIVER_RGB[1] - LIVER_RGB[2])
    return (np.abs(r - g - want_rg) <= 3) & (np.abs(g - b - want_gb) <= 3)


def tint_per_column(rgb: np.ndarray, n_cols: int) -> list[int]:
    tint = liver_tint(rgb)
    width = rgb.shape[1]
    return [int(tint[:, c * width // n_cols:(c + 1) * width // n_cols].sum()) for c in range(n_cols)]


def n_colours(rgb: np.ndarray) -> int:
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return len(np.unique(packed))


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".partial-")]


# ---------------------------------------------------------------- montage


def test_montage_has_three_columns_with_truth_and_two_without(tmp_path):
    image, liver = scan()
    with_truth = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), liver, liver))
    without_truth = read_rgb(montage(tmp_path / "b.png", image, np.eye(4), liver))
    (h3, w3, _), (h2, w2, _) = with_truth.shape, without_truth.shape
    assert h3 == h2  # same slices picked, so the same number of rows
    assert (w3 / h3) / (w2 / h2) == pytest.approx(3 / 2, rel=0.02)
    assert leftovers(tmp_path) == []


def test_montage_has_one_row_per_picked_slice(tmp_path):
    image, liver = scan()
    four = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), liver, n_slices=4))
    two = read_rgb(montage(tmp_path / "b.png", image, np.eye(4), liver, n_slices=2))
    assert four.shape[1] == two.shape[1]
    assert four.shape[0] / two.shape[0] == pytest.approx(2, rel=0.02)


def test_montage_columns_are_image_then_prediction_then_truth(tmp_path):
    image, liver = scan()
    empty = np.zeros_like(liver)
    pred_only = read_rgb(montage(tmp_path / "pred.png", image, np.eye(4), liver, empty))
    truth_only = read_rgb(montage(tmp_path / "truth.png", image, np.eye(4), empty, liver))
    image_col, pred_col, truth_col = tint_per_column(pred_only, 3)
    assert image_col == 0 and truth_col == 0 and pred_col > 1000
    image_col, pred_col, truth_col = tint_per_column(truth_only, 3)
    assert image_col == 0 and pred_col == 0 and truth_col > 1000


def test_montage_shows_the_liver_colour_only_when_the_prediction_has_liver(tmp_path):
    image, liver = scan()
    with_liver = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), liver))
    without_liver = read_rgb(montage(tmp_path / "b.png", image, np.eye(4), np.zeros_like(liver)))
    assert liver_tint(with_liver).sum() > 1000
    assert liver_tint(without_liver).sum() == 0
    assert n_colours(without_liver) > 20  # the scan itself is drawn


def liver_in_slices_10_to_17_of_24():
    rng = np.random.default_rng(1)
    image = rng.random((32, 32, 24)).astype(np.float32)
    liver = np.zeros(image.shape, dtype=bool)
    liver[8:20, 10:24, 10:18] = True
    return image, liver


def tint_per_row(rgb: np.ndarray, n_rows: int) -> list[int]:
    tint = liver_tint(rgb)
    height = rgb.shape[0]
    return [int(tint[r * height // n_rows:(r + 1) * height // n_rows].sum()) for r in range(n_rows)]


def test_montage_picks_slices_through_the_liver(tmp_path):
    # the liver fills only a third of the slices: every row's prediction panel must show some
    image, liver = liver_in_slices_10_to_17_of_24()
    rgb = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), liver, n_slices=4))
    assert all(n > 100 for n in tint_per_row(rgb, 4)), tint_per_row(rgb, 4)


def test_montage_picks_slices_through_the_true_liver_when_the_prediction_missed_it(tmp_path):
    image, liver = liver_in_slices_10_to_17_of_24()
    rgb = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), np.zeros_like(liver), liver, n_slices=4))
    assert all(n > 100 for n in tint_per_row(rgb, 4)), tint_per_row(rgb, 4)


def test_montage_looks_the_same_whatever_the_storage_order(tmp_path):
    image, liver = scan()
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    plain = read_rgb(montage(tmp_path / "a.png", image, np.eye(4), liver, liver))
    flipped = read_rgb(montage(tmp_path / "b.png", image[::-1], flip_x, liver[::-1], liver[::-1]))
    assert np.array_equal(plain, flipped)


# ---------------------------------------------------------------- to_display


def ramp(shape=(5, 7, 3)) -> np.ndarray:
    """Every voxel a different value, X != Y so a transpose cannot go unnoticed."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_display_is_slices_by_rows_by_columns():
    assert to_display(ramp((5, 7, 3)), np.eye(4)).shape == (3, 7, 5)


def test_display_follows_the_radiological_convention():
    # RAS voxel axes: x grows towards the patient's right, y towards anterior. Radiological view:
    # patient's right on the screen's left, anterior at the top.
    vol = np.zeros((5, 7, 3), dtype=np.float32)
    vol[4, 6, 1] = 1  # right, anterior
    vol[0, 6, 1] = 2  # left, anterior
    vol[4, 0, 1] = 3  # right, posterior
    disp = to_display(vol, np.eye(4))
    assert disp[1, 0, 0] == 1
    assert disp[1, 0, -1] == 2
    assert disp[1, -1, 0] == 3


@pytest.mark.parametrize("flip", [(0,), (1,), (2,), (0, 1)])
def test_display_honours_an_affine_that_flips_axes(flip):
    vol = ramp()
    signs = np.ones(4)
    signs[list(flip)] = -1
    affine = np.diag(signs * [0.7, 0.7, 2.5, 1.0])  # anisotropic voxels, as in a real series
    affine[:3, 3] = [10.0, -20.0, 30.0]  # an origin does not change the orientation
    stored = np.flip(vol, axis=flip)  # the same voxels in the opposite storage order
    assert np.array_equal(to_display(stored, affine), to_display(vol, np.eye(4)))


def test_display_honours_an_affine_that_swaps_the_in_plane_axes():
    vol = ramp()
    affine = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    stored = vol.transpose(1, 0, 2)  # stored[i, j, k] sits at world (j, i, k)
    assert np.array_equal(to_display(stored, affine), to_display(vol, np.eye(4)))
