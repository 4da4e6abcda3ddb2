"""Multi-planar 2D (model.views): the coronal and sagittal views' transforms, their fusion on the source
grid, and a run trained on three views that infer rebuilds and scores as validation did."""
import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

from helpers import TINY, make_prepared_dataset


def _image(volume: np.ndarray, spacing=(2.0, 2.0, 2.0)):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(volume[None], dtype=torch.float32),
                      affine=torch.as_tensor(np.diag([*spacing, 1.0])))


@pytest.mark.parametrize("views, spacing, match", [
    ("[axial,axial]", "auto", "each once"), ("[axial,oblique]", "auto", "one or more of"), ("[]", "auto", "one or more"),
    ("[axial,coronal]", "0", "resample the volume"),
])
def test_views_are_checked_when_the_config_is_loaded(views, spacing, match):
    with pytest.raises(PipelineError, match=match):
        load_config(None, [f"model.views={views}", f"train.pixel_spacing={spacing}"])
    assert load_config(None, []).model.views == ["axial"]  # the default: today's axial model


@pytest.mark.parametrize("view, slice_axis", [("coronal", 1), ("sagittal", 0)])
def test_a_view_s_slices_are_the_volume_s_planes_along_its_axis_and_invert_back(view, slice_axis):
    """On a volume already at the pixel spacing and inside the roi, a view is a transpose and a pad:
    its slice k is plane k of the volume along the view's axis, and Invertd gives the volume back."""
    from monai.transforms import Compose, Invertd

    from pipeline.model.transforms import view_transforms

    rng = np.random.default_rng(0)
    volume = rng.random((10, 12, 8)).astype(np.float32)  # RAS axes R, A, S at 2 mm
    chain = Compose(view_transforms(["image"], view, 2.0, (16, 16)))
    out = chain({"image": _image(volume)})["image"]
    in_plane = [a for a in range(3) if a != slice_axis]  # (R, S) coronal, (A, S) sagittal
    assert tuple(out.shape) == (1, 16, 16, volume.shape[slice_axis])
    for k in (0, volume.shape[slice_axis] // 2):
        plane = np.take(volume, k, axis=slice_axis)  # axes in_plane, in order
        padded = np.asarray(out[0, :, :, k])
        r0, c0 = (16 - volume.shape[in_plane[0]]) // 2, (16 - volume.shape[in_plane[1]]) // 2
        np.testing.assert_allclose(padded[r0:r0 + plane.shape[0], c0:c0 + plane.shape[1]], plane, atol=1e-6)
    from monai.data import MetaTensor

    pred = MetaTensor(out.clone(), meta=out.meta, applied_operations=out.applied_operations)
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)({"pred": pred, "image": out})
    np.testing.assert_allclose(np.asarray(back["pred"][0]), volume, atol=1e-5)


def test_a_thick_slice_series_is_resampled_through_the_plane_to_the_pixel_spacing():
    from pipeline.model.transforms import view_transforms

    volume = np.ones((20, 20, 6), np.float32)  # 1 x 1 mm pixels, 8 mm slices
    out = view_transforms(["image"], "coronal", 2.0, (16, 32))[0]({"image": _image(volume, (1.0, 1.0, 8.0))})["image"]
    # MONAI's extent runs from the first voxel centre to the last: 19 mm in-plane (10 planes at 2 mm), and
    # 5 x 8 = 40 mm between the first and last slice: 21 planes at 2 mm
    assert tuple(out.shape[1:]) == (10, 10, 21)


def test_views_are_averaged_where_each_saw_the_voxel():
    """Two views of a volume: one sure everywhere it saw (1.0), one sure of nothing (0.0). Where both saw,
    the mean is 0.5; where the second view's crop left voxels out, the first alone decides (1.0)."""
    from monai.transforms import Compose

    from pipeline.model.inversion import ViewProbs, views_mask_on_source_grid, views_on_source_grid
    from pipeline.model.transforms import view_transforms

    volume = np.zeros((8, 10, 30), np.float32)  # S 60 mm at 2 mm: the coronal view's roi of 16 x 20 crops S
    parts = []
    for view, value in (("sagittal", 1.0), ("coronal", 0.0)):
        roi = (16, 64) if view == "sagittal" else (16, 20)  # sagittal sees all of S, coronal 20 of 30 planes
        chain = Compose(view_transforms(["image"], view, 2.0, roi))
        image = chain({"image": _image(volume)})["image"]
        parts.append(ViewProbs(torch.full((1, *image.shape[1:]), value), image, chain))
    fused = views_on_source_grid(parts, volume.shape)
    np.testing.assert_allclose(fused[:, :, 5:25], 0.5, atol=1e-6)  # both views
    np.testing.assert_allclose(fused[:, :, :5], 1.0, atol=1e-6)  # the sagittal view alone
    np.testing.assert_allclose(fused[:, :, 25:], 1.0, atol=1e-6)
    assert views_mask_on_source_grid(parts, volume.shape).sum() == fused.size  # 0.5 and up is liver
    assert not views_mask_on_source_grid(parts[1:], volume.shape).any()  # one view: that view's mask


@pytest.mark.slow
def test_a_three_view_run_trains_validates_and_infer_scores_it_as_validation_did(tmp_path):
    import json

    from pipeline.core import runs
    from pipeline.infer.inference import run_inference
    from pipeline.train.cv import run_training

    data = make_prepared_dataset(tmp_path / "prepared", n_mr=2, n_ct=2, folds=2)
    cfg = load_config(None, [*TINY, "train.slices_per_volume=4", "train.batch_size=4", "train.epochs=2",
                             "train.warmup_epochs=0", "train.val_every=1", "train.tensorboard=false", "train.compile=off",
                             "model.views=[axial,coronal,sagittal]"])
    results = run_training(data, tmp_path / "run", "0", cfg)
    saved = runs.read_config(tmp_path / "run")
    assert saved.model.views == ["axial", "coronal", "sagittal"] and saved.train.pixel_spacing > 0
    val_patients = set(results[0].dice_best)
    rows = run_inference(tmp_path / "run", data, tmp_path / "out", patients=",".join(sorted(val_patients)), fold="0",
                         overrides=["infer.amp=off", "infer.crf_weight=0"])  # validation skips the CRF
    assert len(rows) == len(val_patients)
    for row in rows:  # infer's mask is the one validation scored (a patient here has one case)
        patient = row["case"].removesuffix("_T2SPIR")
        assert row["dice"] == pytest.approx(results[0].dice_best[patient], abs=1e-6)
    assert json.loads((tmp_path / "out" / "inference.json").read_text())["cases"]


def test_a_bundle_of_a_multi_view_run_is_refused_in_one_line(tmp_path, monkeypatch):
    from pipeline.outputs import bundle

    cfg = load_config(None, ["model.views=[axial,sagittal]"])
    monkeypatch.setattr(bundle, "fold_model", lambda checkpoint: (cfg, None, {}))
    with pytest.raises(PipelineError, match="axial 2D slices only"):
        bundle.export_bundle(tmp_path, tmp_path / "fold_0" / "best.pt", tmp_path / "bundle", "MR")


@pytest.mark.slow
def test_runs_given_together_are_fused_by_their_mean_probability_on_the_source_grid(tmp_path):
    """infer --run-dir A --run-dir B: the mask is the mean of each run's own probability on the source
    grid, thresholded and post-processed; inference.json names both runs; a run given twice is an error."""
    import json
    from pathlib import Path

    from pipeline.infer.loaded import load_run, load_runs
    from pipeline.infer.segment import predict_case, segment_volume
    from pipeline.dicom.volume import Volume
    from pipeline.model.postprocess import postprocess

    from conftest import run_main
    from helpers import ellipsoid_volume, make_run, write_tiny

    first, second = make_run(tmp_path / "a", folds=(0,)), make_run(tmp_path / "b", folds=(1,))
    volume = ellipsoid_volume()
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    with torch.inference_mode():
        mean = (predict_case(load_run(first, None), volume, affine, "MR")
                + predict_case(load_run(second, None), volume, affine, "MR")) / 2
        fused = load_runs([first, second], None)
        seg = segment_volume(fused, Volume(volume.astype(np.float32), affine, Path("v")), "MR", "v")
    assert 0 < (mean >= 0.5).sum() < mean.size  # a mask that is neither empty nor everything
    np.testing.assert_array_equal(seg.mask, postprocess(mean >= 0.5, True, False))
    assert seg.agreement is None  # one fold per run: no fold agreement

    write_tiny(tmp_path / "series", volume)
    res = run_main("infer", "--run-dir", str(first), "--run-dir", str(second), "--input", str(tmp_path / "series"),
                   "--out", str(tmp_path / "out"), "--set", "infer.amp=off")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "inference.json").read_text())["run"] == [str(first), str(second)]
    res = run_main("infer", "--run-dir", str(first), "--run-dir", str(first), "--input", str(tmp_path / "series"),
                   "--out", str(tmp_path / "out2"))
    assert res.returncode != 0 and "the same run given twice" in res.stderr


def test_views_or_runs_that_see_different_livers_are_flagged():
    from types import SimpleNamespace

    from pipeline.infer.qc import flag_mask, member_agreement

    fused = np.zeros((4, 4, 4), bool)
    fused[:2] = True  # 32 voxels
    half = fused.copy()
    half[1] = False  # 16 of them
    everywhere = np.ones_like(fused)
    assert member_agreement([(fused, None)], fused) is None  # one member: nothing to compare
    assert member_agreement([(fused, None), (half, None)], fused) == pytest.approx(2 * 16 / (32 + 16))
    # a view is compared over the voxels it saw: one that saw only the first plane agrees fully there
    first_plane = np.broadcast_to((np.arange(4) == 0)[:, None, None], fused.shape)
    assert member_agreement([(fused, everywhere), (half, first_plane)], fused) == 1.0
    run = SimpleNamespace(cfg=load_config(None, []), min_confidence=0.0)
    flags = flag_mask(run, "case", 1500.0, None, 0.95, None, (4, 4, 4), np.eye(4), members=0.67)
    assert flags == ["views or fused runs disagree (lowest Dice of one with the fused mask 0.67 < 0.8)"]
    assert flag_mask(run, "case", 1500.0, None, 0.95, None, (4, 4, 4), np.eye(4), members=0.9) == []


@pytest.mark.parametrize("view", ["coronal", "sagittal"])
def test_a_view_read_through_the_fast_axial_pass_equals_monai_s_own_steps(view):
    """At inference a view starts from InPlaneResampled (the axial chain's separable pass); with
    reference=True it starts from MONAI's Orientationd + Spacingd + ResizeWithPadOrCropd, as training's
    chain with the label does: the same image to float32 rounding, and Invertd takes both back."""
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.model.transforms import image_transforms

    cfg = load_config(None, ["train.pixel_spacing=2.5", "train.roi_size=[32,32]"])
    rng = np.random.default_rng(1)
    volume = rng.random((40, 36, 9)).astype(np.float32) * 800  # 1.6 x 1.4 mm pixels, 6 mm slices, x flipped
    affine = np.array([[-1.6, 0, 0, 30.0], [0, 1.4, 0, -20.0], [0, 0, 6.0, 5.0], [0, 0, 0, 1]])
    images = []
    for reference in (False, True):
        chain = Compose(image_transforms(cfg.train, load=False, reference=reference, view=view))
        image = MetaTensor(torch.as_tensor(volume[None]), affine=torch.as_tensor(affine))
        images.append(chain({"image": image, "modality": "MR"})["image"])
    assert images[0].shape == images[1].shape and images[0].shape[-1] > 9
    np.testing.assert_allclose(np.asarray(images[0]), np.asarray(images[1]), atol=1e-5)
