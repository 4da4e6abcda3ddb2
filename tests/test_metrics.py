"""CHAOS metrics against hand-computed values on small volumes with anisotropic spacing."""
import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.metrics import (border_voxels, chaos_metrics, chaos_points, dice, ravd_percent,
                                       spacing_from_affine, surface_distances, surface_metrics)

SPACING = (1.0, 1.0, 3.0)  # (i, j, k) mm: k is the coarse slice axis


def cube(shape=(10, 10, 10), lo=(2, 2, 2), size=4):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


# A 4^3 cube and the same cube shifted by one voxel along k (3 mm). Worked out by hand:
# overlap 4*4*3 = 48 of 64 + 64 voxels -> Dice 0.75. Each cube has 56 border voxels. From the
# shifted cube to the reference: its 16 voxels of the far k face are 3 mm from the reference's
# k face, the 4 inner voxels of its near k face are 1 mm (in-plane) from the reference's side
# faces, the other 36 lie on the reference's border (0 mm). Symmetric the other way. So
# ASSD = 2 * (16*3 + 4*1) / 112 mm, MSSD = 3 mm, and HD95 = 3 mm (16 of 56 distances are 3 mm).
SHIFT_ASSD = 2 * (16 * 3 + 4 * 1) / 112


def test_cube_shifted_one_slice_along_the_coarse_axis_gives_hand_computed_metrics():
    ref, pred = cube(), cube(lo=(2, 2, 3))
    m = chaos_metrics(pred, ref, SPACING)
    assert m["dice"] == pytest.approx(0.75)
    assert m["ravd_pct"] == 0.0
    assert m["assd_mm"] == pytest.approx(SHIFT_ASSD)
    assert m["mssd_mm"] == pytest.approx(3.0)
    assert m["hd95_mm"] == pytest.approx(3.0)
    assert m["pred_ml"] == m["ref_ml"] == pytest.approx(64 * 3.0 / 1000)


def test_shift_along_a_fine_axis_is_measured_in_that_axis_spacing():
    m = chaos_metrics(cube(lo=(3, 2, 2)), cube(), SPACING)
    assert m["mssd_mm"] == pytest.approx(1.0)
    # Along i the in-plane step is 1 mm and the nearest other border voxels are also 1 mm away.
    assert m["assd_mm"] == pytest.approx(2 * (16 * 1 + 4 * 1) / 112)


def test_directed_distances_are_returned_in_mm_for_each_direction():
    d_pr, d_rp = surface_distances(cube(lo=(2, 2, 3)), cube(), SPACING)
    assert len(d_pr) == len(d_rp) == 56
    assert sorted(np.unique(d_pr).tolist()) == [0.0, 1.0, 3.0]
    assert np.count_nonzero(d_pr == 3.0) == 16 and np.count_nonzero(d_pr == 1.0) == 4


def test_ravd_is_absolute_and_in_percent_of_the_reference_volume():
    ref = cube(size=4)  # 64 voxels
    bigger = ref.copy()
    bigger[6, 2:6, 2:6] = True  # +16 voxels
    assert ravd_percent(bigger, ref) == pytest.approx(25.0)
    assert ravd_percent(ref, bigger) == pytest.approx(20.0)


def test_identical_masks_score_perfectly():
    ref = cube()
    m = chaos_metrics(ref.astype(np.uint8), ref, SPACING)
    assert (m["dice"], m["ravd_pct"], m["assd_mm"], m["mssd_mm"], m["hd95_mm"]) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert m["score"] == 100.0


@pytest.mark.parametrize("metric,value,points", [
    ("dice", 0.799, 0.0), ("dice", 0.8, 80.0), ("dice", 0.95, 95.0),
    ("ravd", 5.01, 0.0), ("ravd", 4.99, 0.2), ("ravd", 1.0, 80.0),
    ("assd", 15.01, 0.0), ("assd", 14.99, 100 - 20 / 3 * 14.99), ("assd", 1.5, 90.0),
    ("mssd", 60.01, 0.0), ("mssd", 59.99, 100 - 5 / 3 * 59.99), ("mssd", 6.0, 90.0),
])
def test_points_follow_the_chaos_thresholds(metric, value, points):
    args = {"dice": 1.0, "ravd": 0.0, "assd": 0.0, "mssd": 0.0, metric: value}
    p = chaos_points(args["dice"], args["ravd"], args["assd"], args["mssd"])
    assert p[f"{metric}_points"] == pytest.approx(points)
    others = [v for k, v in p.items() if k not in (f"{metric}_points", "score")]
    assert p["score"] == pytest.approx((points + sum(others)) / 4)


def test_both_masks_empty_is_a_perfect_answer():
    z = np.zeros((6, 6, 6), dtype=bool)
    m = chaos_metrics(z, z, SPACING)
    assert (m["dice"], m["ravd_pct"], m["assd_mm"], m["mssd_mm"], m["score"]) == (1.0, 0.0, 0.0, 0.0, 100.0)


def test_empty_prediction_scores_zero_with_worst_distances():
    ref = cube()
    m = chaos_metrics(np.zeros_like(ref), ref, SPACING)
    assert m["dice"] == 0.0 and m["ravd_pct"] == 100.0
    assert m["assd_mm"] == m["mssd_mm"] == m["hd95_mm"] == math.inf
    assert m["score"] == 0.0


def test_empty_reference_with_a_prediction_gives_infinite_ravd():
    assert ravd_percent(cube(), np.zeros((10, 10, 10), bool)) == math.inf


def test_volume_faces_are_not_border_as_in_the_chaos_code():
    m = cube(shape=(6, 6, 6), lo=(0, 0, 0), size=4)  # touches three faces of the volume
    assert np.count_nonzero(border_voxels(m)) == 64 - 27  # only the three inner faces
    assert np.count_nonzero(border_voxels(m, outside=0)) == 64 - 8


def test_masks_filling_the_whole_volume_still_get_finite_distances():
    full = np.ones((5, 5, 5), dtype=bool)
    part = full.copy()
    part[:, :, 4] = False
    s = surface_metrics(part, full, SPACING)
    assert s["mssd_mm"] == pytest.approx(3.0)
    assert surface_metrics(full, full, SPACING)["assd_mm"] == 0.0


def _blob(shape, center, radii):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def test_surface_metrics_equal_monai_when_masks_do_not_touch_the_volume_edge():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    shape, spacing = (40, 36, 14), (0.8, 0.8, 2.5)
    ref = _blob(shape, (20, 18, 7), (12, 9, 4))
    pred = _blob(shape, (22, 17, 6.5), (11, 10, 3.5))
    ours = surface_metrics(pred, ref, spacing, hd_percentile=95.0)
    p, r = torch.as_tensor(pred)[None, None], torch.as_tensor(ref)[None, None]
    kw = dict(include_background=True, spacing=spacing)
    assert ours["assd_mm"] == pytest.approx(float(compute_average_surface_distance(p, r, symmetric=True, **kw)), rel=1e-5)
    assert ours["mssd_mm"] == pytest.approx(float(compute_hausdorff_distance(p, r, **kw)), rel=1e-5)
    assert ours["hd_mm"] == pytest.approx(float(compute_hausdorff_distance(p, r, percentile=95, **kw)), rel=1e-5)


def test_dice_is_the_same_for_numpy_arrays_torch_tensors_and_monai():
    from monai.metrics import compute_dice

    ref, pred = cube(), cube(lo=(2, 2, 3))
    assert dice(pred, ref) == pytest.approx(0.75)
    as_tensors = dice(torch.as_tensor(pred, dtype=torch.uint8), torch.as_tensor(ref))
    mixed = dice(pred, torch.as_tensor(ref, dtype=torch.float32))
    monai = float(compute_dice(torch.as_tensor(pred[None, None] != 0, dtype=torch.float32),
                               torch.as_tensor(ref[None, None] != 0, dtype=torch.float32), include_background=True,
                               ignore_empty=False))
    assert as_tensors == mixed == dice(pred, ref)
    assert dice(pred, ref) == pytest.approx(monai, rel=1e-6)
    z = np.zeros((4, 4, 4))
    assert dice(z, z) == 1.0 and dice(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4)) == 1.0
    with pytest.raises(ValueError):
        dice(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5))


def test_spacing_comes_from_the_affine_columns_of_an_oblique_flipped_grid():
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-1.0, 1.0, -1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [10, -20, 30]
    assert spacing_from_affine(affine) == pytest.approx((0.7, 0.9, 2.5))


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
