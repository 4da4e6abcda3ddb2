"""Training-curve PNG of one fold (pipeline/plots.py)."""

import numpy as np
import pytest
from PIL import Image

from pipeline.train.curves import plot_curves

PATIENTS = ["CT_1", "MR_2"]
# matplotlib's named colours used by plot_curves for the train loss, validation loss and lr curves
TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def history(epochs: int = 20, val_every: int = 4) -> list[dict]:
    """Rows as train.py keeps them: validation keys only on validated epochs (val_every=0: none)."""
    rows = []
    for e in range(epochs):
        row = {"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 1e-3 * (1 - e / epochs)}
        if val_every and e % val_every == val_every - 1:
            row |= {"val_loss": 1.2 / (e + 1), "val_dice_mean": 0.5 + e / 50}
            row |= {f"val_dice_{p}": 0.45 + e / 50 + 0.1 * i for i, p in enumerate(PATIENTS)}
        rows.append(row)
    return rows


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def count_colour(rgb: np.ndarray, colour, tol: int = 10) -> int:
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= tol).sum())


def n_colours(rgb: np.ndarray) -> int:
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return len(np.unique(packed))


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".partial-")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("curves")


@pytest.fixture(scope="module")
def validated(folder):
    """curves.png of a run validated every 4 epochs (drawn once for the tests below)."""
    return plot_curves(history(val_every=4), PATIENTS, folder / "with_val.png", title="fold 0")


@pytest.fixture(scope="module")
def never_validated(folder):
    """curves.png of a run that has not reached its first validation yet."""
    return plot_curves(history(val_every=0), PATIENTS, folder / "without_val.png", title="fold 1")


def test_plot_curves_writes_a_readable_png_of_real_content(folder, validated):
    path = validated
    assert path == folder / "with_val.png"
    rgb = read_rgb(path)
    height, width, _ = rgb.shape
    assert width >= 1000 and height >= 300
    assert width > 2 * height  # three panels side by side
    assert n_colours(rgb) > 50, "the image is (nearly) a single flat colour"


def test_plot_curves_draws_train_loss_and_learning_rate_curves(validated):
    rgb = read_rgb(validated)
    assert count_colour(rgb, TAB_BLUE) > 300  # train loss
    assert count_colour(rgb, TAB_GREEN) > 300  # learning rate


def test_plot_curves_works_when_no_epoch_was_validated(never_validated):
    rgb = read_rgb(never_validated)
    assert n_colours(rgb) > 50
    assert count_colour(rgb, TAB_BLUE) > 300
    assert count_colour(rgb, TAB_GREEN) > 300


def test_plot_curves_draws_validation_curves_only_when_there_are_validated_epochs(validated, never_validated):
    orange_with = count_colour(read_rgb(validated), TAB_ORANGE)
    orange_without = count_colour(read_rgb(never_validated), TAB_ORANGE)  # only the legend's handle
    assert orange_with > 3 * orange_without


def test_plot_curves_leaves_no_partial_files(folder, validated, never_validated):
    assert leftovers(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["with_val.png", "without_val.png"]


def test_plot_curves_replaces_an_existing_file(tmp_path):
    path = tmp_path / "fold_0" / "curves.png"
    path.parent.mkdir()
    path.write_bytes(b"stale")
    assert plot_curves(history(epochs=3, val_every=1), PATIENTS, path) == path
    assert read_rgb(path).shape[1] >= 1000
    assert leftovers(path.parent) == []
