"""The CRF clean-up (pipeline.model.crf, infer.crf_weight): what it changes, where, and that infer runs it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.infer.loaded import load_run
from pipeline.model import crf
from pipeline.model.crf import crf_refine

from helpers import TINY, two_fold_case


def _organ_scene():
    """A bright organ (x < 12) beside a darker neighbour (x >= 12) on a (24, 20, 6) grid; the network's
    probability is unsure on both sides of the edge: 0.45 in a strip of the organ two voxels wide, 0.6 in
    a strip of the neighbour as wide."""
    image = np.full((24, 20, 6), 0.3, np.float32)
    image[:12] = 0.7
    probs = np.full(image.shape, 0.02, np.float32)
    probs[:12] = 0.95
    probs[10:12] = 0.45  # organ voxels the network doubts
    probs[12:14] = 0.6  # neighbour voxels it takes in
    return torch.from_numpy(probs), torch.from_numpy(image)


def test_crf_moves_doubtful_voxels_to_the_side_of_the_edge_they_lie_on():
    probs, image = _organ_scene()
    before = probs >= 0.5
    after = crf_refine(probs, image, [2.0, 2.0, 5.0], weight=4.0) >= 0.5
    truth = torch.zeros_like(before)
    truth[:12] = True
    assert not torch.equal(before, truth)
    assert torch.equal(after, truth)
    # the image's edge does it: on one grey level everywhere the same field is only smoothed, and the
    # edge of the mask lands inside the neighbour
    smoothed = crf_refine(probs, torch.full_like(image, 0.5), [2.0, 2.0, 5.0], weight=4.0) >= 0.5
    assert smoothed[12].all() and not torch.equal(smoothed, truth)
    assert torch.equal(crf_refine(probs, image, [2.0, 2.0, 5.0], weight=0.0), probs)


def test_crf_leaves_what_lies_beyond_the_liver_box_alone_and_stored_kernels_change_nothing():
    probs, image = _organ_scene()
    big_p = torch.full((40, 36, 12), 0.01)
    big_i = torch.rand(40, 36, 12)
    big_p[8:32, 8:28, 4:10] = probs
    big_i[8:32, 8:28, 4:10] = image
    refined = crf_refine(big_p, big_i, [2.0, 2.0, 5.0], weight=4.0)
    # the voxels at crf.BOX_LEVEL or above span x 8-23, z 4-9; the window reaches 6 voxels in-plane and 2
    # slices: x < 2 and z < 2 are untouched, the background within reach is changed
    assert torch.equal(refined[:, :, :2], big_p[:, :, :2]) and torch.equal(refined[:2], big_p[:2])
    assert not torch.equal(refined[2:8], big_p[2:8])
    # kernels kept between iterations or recomputed: the same numbers
    keep = crf._STORE_LIMIT
    try:
        crf._STORE_LIMIT = 0
        again = crf_refine(big_p, big_i, [2.0, 2.0, 5.0], weight=4.0)
    finally:
        crf._STORE_LIMIT = keep
    torch.testing.assert_close(again, refined, rtol=0, atol=1e-6)
    # nothing near the threshold: returned as it came
    empty = torch.zeros(8, 8, 3)
    assert crf_refine(empty, torch.rand(8, 8, 3), [1.0, 1.0, 1.0], 4.0) is empty


def test_crf_weight_is_checked():
    assert load_config(None, TINY).infer.crf_weight == 4.0  # on by default (docs/decisions.md#crf)
    with pytest.raises(PipelineError, match="infer.crf_weight"):
        load_config(None, [*TINY, "infer.crf_weight=-1"])


def test_infer_refines_the_ensemble_probability_with_the_image(tmp_path):
    from pipeline.infer.segment import Stages, network_probs, preprocess_case

    run_dir, volume, geom = two_fold_case(tmp_path)
    with torch.inference_mode():
        plain_run = load_run(run_dir, None, ["infer.crf_weight=0"])
        crf_run = load_run(run_dir, None, ["infer.crf_weight=4"])
        _, image = preprocess_case(plain_run, volume, geom.affine, "MR")
        plain = network_probs(plain_run, image, Stages())
        stages = Stages()
        refined = network_probs(crf_run, image, stages)
    spacing = crf.grid_spacing(image)
    assert len(spacing) == 3 and all(s > 0 for s in spacing)
    expected = crf_refine(plain[0], image[0], spacing, 4.0)
    torch.testing.assert_close(refined[0], expected, rtol=0, atol=1e-6)
    assert "crf" in stages.seconds
