"""Inference: masks on the exact grid of the source series, fold ensemble, post-processing, errors."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import load_config, save_config
from pipeline.core.errors import PipelineError
from pipeline.dicom.series import read_series
from pipeline.infer.inference import run_inference
from pipeline.infer.inputs import collect_cases
from pipeline.infer.loaded import load_run
from pipeline.infer.segment import predict_case
from pipeline.model.networks import build_model
from pipeline.model.postprocess import postprocess

from helpers import (OBLIQUE_COL, OBLIQUE_ROW, TINY, assert_one_line_error, ellipsoid_volume, infer_in_process,
                     make_run, two_fold_case, write_tiny)

ROOT = Path(__file__).resolve().parent.parent


ORIENTATIONS = {
    "axial": dict(),
    "reversed_step": dict(spacing=(0.8, 0.7, -2.5)),
    "oblique": dict(row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL),
    "flipped_rows": dict(row_dir=(-1, 0, 0), col_dir=(0, -1, 0), patient_position="FFS"),
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_mask_has_the_shape_and_affine_of_the_series(tmp_path, name):
    series = tmp_path / "My Series!"
    write_tiny(series, ellipsoid_volume(), **ORIENTATIONS[name])
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "out"
    rows = run_inference(run_dir=run_dir, input_path=series, out_dir=out)
    volume, geom = read_series(series)
    assert [r["case"] for r in rows] == ["My_Series"]  # sanitised folder name
    img = nib.load(str(out / "My_Series_liver.nii.gz"))
    assert img.shape == volume.shape
    np.testing.assert_allclose(img.affine, geom.affine, atol=1e-4)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    np.testing.assert_allclose(img.header.get_qform(), geom.affine, atol=1e-3)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
    assert (out / "labels.itksnap.txt").exists() and (out / "labels.ctbl").exists()
    assert not list(out.glob(".partial-*"))


def test_fold_ensemble_averages_probabilities(tmp_path):
    run_dir, volume, geom = two_fold_case(tmp_path)
    network_only = ["infer.crf_weight=0"]  # the CRF after the average is not linear in it
    both = load_run(run_dir, None, network_only)
    singles = [load_run(run_dir, str(k), network_only) for k in (0, 1)]
    assert both.folds == ["fold_0", "fold_1"] and len(both.models) == 2
    with torch.inference_mode():
        p_both = predict_case(both, volume, geom.affine, "MR")
        p_each = [predict_case(r, volume, geom.affine, "MR") for r in singles]
    assert not np.allclose(p_each[0], p_each[1], atol=1e-3)  # two different models
    np.testing.assert_allclose(p_both, (p_each[0] + p_each[1]) / 2, atol=1e-5)


def test_checkpoint_setting_chooses_best_or_last(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    run_dir = make_run(tmp_path / "run")
    cfg = load_config(None, TINY)
    torch.manual_seed(99)
    last = build_model(cfg.model)
    torch.save({"model": last.state_dict(), "epoch": 2}, run_dir / "fold_0" / "last.pt")
    volume, geom = read_series(series)
    with torch.inference_mode():
        p = {name: predict_case(load_run(run_dir, None, [f"infer.checkpoint={name}"]), volume, geom.affine, "MR")
             for name in ("best", "last")}
    assert not np.allclose(p["best"], p["last"], atol=1e-3)
    with pytest.raises(PipelineError, match="infer.checkpoint"):
        load_run(run_dir, None, ["infer.checkpoint=final"])
    (run_dir / "fold_0" / "last.pt").unlink()
    with pytest.raises(PipelineError, match="no last.pt"):
        load_run(run_dir, None, ["infer.checkpoint=last"])


def test_predict_volume_is_the_mean_softmax_of_the_models():
    from pipeline.model.predict import predict_volume

    cfg = load_config(None, TINY)
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model).eval())
    image = torch.rand(1, 16, 16, 7)
    with torch.inference_mode():
        probs = predict_volume(models, image, batch_size=3, device=torch.device("cpu"))
        slices = image.permute(3, 0, 1, 2)
        expected = torch.stack([torch.softmax(m(slices), dim=1) for m in models]).mean(0).permute(1, 2, 3, 0)[1:2]
    assert probs.shape == (1, 16, 16, 7)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


def test_zoom_slices_magnifies_about_the_centre_and_its_inverse_lands_on_the_same_grid():
    from pipeline.model.predict import zoom_slices

    square = torch.zeros(1, 1, 40, 40)
    square[..., 15:25, 15:25] = 1.0  # 10 x 10 about the centre
    twice = zoom_slices(square, 2.0)
    assert (twice[0, 0] > 0.5).sum() == 400 and twice[0, 0, 11, 11] == 1 and twice[0, 0, 8, 8] == 0
    assert abs(float(twice.sum()) - 400) < 10 and abs(float(zoom_slices(square, 0.5).sum()) - 25) < 2  # area x s^2
    smooth = torch.sin(torch.linspace(0, 3, 40))[:, None] * torch.cos(torch.linspace(0, 2, 40))[None]
    back = zoom_slices(zoom_slices(smooth[None, None], 1.1), 1 / 1.1)[0, 0]
    # the margin that a zoom by 1.1 pushes out of the frame comes back as zeros; inside it, the same values
    torch.testing.assert_close(back[4:-4, 4:-4], smooth[4:-4, 4:-4], rtol=0, atol=0.01)
    assert zoom_slices(square, 1.0) is square


def test_test_time_zooms_average_each_models_zoomed_back_probabilities():
    from pipeline.model.predict import predict_volume, zoom_slices

    cfg = load_config(None, TINY)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model).eval())
    image = torch.rand(1, 16, 16, 5)
    scales = (0.9, 1.0, 1.25)
    masks, confidences = [], []
    with torch.inference_mode():
        probs = predict_volume(models, image, batch_size=2, device=torch.device("cpu"), scales=scales,
                               model_masks=masks, model_confidences=confidences)
        slices = image.permute(3, 0, 1, 2)
        own = [torch.stack([zoom_slices(torch.softmax(m(zoom_slices(slices, s)), 1)[:, 1:2], 1 / s)[:, 0]
                            for s in scales]).mean(0) for m in models]  # (D, H, W) per model
        plain_probs = predict_volume(models, image, batch_size=2, device=torch.device("cpu"))
    torch.testing.assert_close(probs, torch.stack(own).mean(0)[None].permute(0, 2, 3, 1), rtol=0, atol=1e-6)
    assert not torch.allclose(probs, plain_probs, atol=1e-3)  # the zooms change the answer
    assert all(torch.equal(m, o >= 0.5) for m, o in zip(masks, own)) and len(confidences) == 2
    with pytest.raises(PipelineError, match="infer.tta_scales"):
        load_config(None, [*TINY, "infer.tta_scales=[3.0]"])
    with pytest.raises(PipelineError, match="infer.tta_scales"):
        load_config(None, [*TINY, "infer.tta_scales=[]"])


def test_slice_smoothing_averages_each_slice_with_its_neighbours():
    from pipeline.model.predict import smooth_through_slices

    probs = torch.rand(1, 5, 4, 9)
    padded = np.concatenate([probs[..., :1], probs, probs[..., -1:]], axis=-1)  # end slices repeated
    expected = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3
    np.testing.assert_allclose(smooth_through_slices(probs, 1), expected, atol=1e-6)
    assert smooth_through_slices(probs, 0) is probs
    from monai.transforms import SavitzkyGolaySmooth

    for neighbours, depth in ((1, 9), (3, 9), (4, 7), (5, 2)):  # windows wider than the volume too
        column = torch.rand(2, 3, 4, depth)
        monai_moving_average = SavitzkyGolaySmooth(window_length=2 * neighbours + 1, order=0, axis=3, mode="replicate")
        torch.testing.assert_close(smooth_through_slices(column, neighbours), monai_moving_average(column),
                                   rtol=0, atol=1e-6)
    # what it is for: a lone slice called liver is dropped, a slice missed between two is filled
    column = torch.tensor([0.0, 0.0, 0.9, 0.0, 0.0, 0.9, 0.9, 0.2, 0.9, 0.9]).reshape(1, 1, 1, 10)
    assert (smooth_through_slices(column, 1) >= 0.5).flatten().tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_infer_smooths_the_ensemble_probability_through_the_slices(tmp_path):
    from pipeline.infer.segment import Stages, network_probs, preprocess_case
    from pipeline.model.inversion import liver_on_source_grid
    from pipeline.model.predict import smooth_through_slices

    run_dir, volume, geom = two_fold_case(tmp_path)
    with torch.inference_mode():
        plain_run = load_run(run_dir, None, ["infer.slice_smoothing=0", "infer.crf_weight=0"])
        pre, image = preprocess_case(plain_run, volume, geom.affine, "MR")
        unsmoothed = network_probs(plain_run, image, Stages())
        expected = liver_on_source_grid(smooth_through_slices(unsmoothed, 2), image, pre, volume.shape)
        got = predict_case(load_run(run_dir, None, ["infer.slice_smoothing=2", "infer.crf_weight=0"]), volume,
                           geom.affine, "MR")
    assert not np.allclose(got, predict_case(plain_run, volume, geom.affine, "MR"), atol=1e-3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_largest_component_removes_islands_and_fill_holes_fills():
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[2:12, 2:12, 2:8] = 1
    mask[6:8, 6:8, 4:6] = 0  # an enclosed hole
    mask[16:18, 16:18, 1:3] = 1  # an island
    kept = postprocess(mask, largest_component=True, fill_holes=False)
    assert kept[16:18, 16:18, 1:3].sum() == 0 and kept[2:12, 2:12, 2:8].sum() == 10 * 10 * 6 - 8
    filled = postprocess(mask, largest_component=True, fill_holes=True)
    assert filled[6:8, 6:8, 4:6].all() and filled[16:18, 16:18, 1:3].sum() == 0
    untouched = postprocess(mask, largest_component=False, fill_holes=False)
    np.testing.assert_array_equal(untouched, mask)


def test_chaos_png_output_has_one_png_per_dicom_file_with_liver_63(tmp_path):
    series = tmp_path / "s"
    files = write_tiny(series, ellipsoid_volume(), spacing=(0.8, 0.7, -2.5))
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "out"
    run_inference(run_dir=run_dir, input_path=series, out_dir=out, fmt="chaos-png")
    pngs = sorted((out / "s_png").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(Path(f).stem for f in files)
    mask = np.asarray(nib.load(str(out / "s_liver.nii.gz")).dataobj)
    _, geom = read_series(series)
    planes = {f: np.asarray(Image.open(out / "s_png" / f"{Path(f).stem}.png")) for f in geom.files}
    assert set(np.unique(np.concatenate([p.ravel() for p in planes.values()]))) <= {0, 63}
    np.testing.assert_array_equal(geom.stack(planes) > 0, mask > 0)


def test_empty_input_folder_fails_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    res = infer_in_process("--run", str(make_run(tmp_path / "run")), "--input", str(tmp_path / "empty"), "--out",
               str(tmp_path / "out"))
    assert_one_line_error(res, "empty")
    assert not (tmp_path / "out").exists()


def test_folder_of_non_dicom_files_fails(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "scan.dcm").write_bytes(b"not really dicom" * 20)
    with pytest.raises(PipelineError, match="junk"):
        collect_cases(junk)[0].load()


def test_run_without_checkpoints_fails(tmp_path):
    series = tmp_path / "s"
    write_tiny(series)
    run_dir = make_run(tmp_path / "run")
    (run_dir / "fold_0" / "best.pt").unlink()
    res = infer_in_process("--run", str(run_dir), "--input", str(series), "--out", str(tmp_path / "out"))
    assert_one_line_error(res, "best.pt", str(run_dir))
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_fails_naming_the_file(tmp_path):
    series = tmp_path / "s"
    write_tiny(series)
    run_dir = make_run(tmp_path / "run")
    (run_dir / "fold_0" / "best.pt").write_bytes(b"\x80\x02garbage" * 100)
    res = infer_in_process("--run", str(run_dir), "--input", str(series), "--out", str(tmp_path / "out"))
    assert_one_line_error(res, "fold_0/best.pt", "cannot load")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_mask_overlays_the_prepared_label(tmp_path, real_chaos):
    REAL = real_chaos / "Train_Sets"
    from pipeline.datasets.prepare import prepare_dataset

    prepared = tmp_path / "prep"
    prepare_dataset(REAL.parent, prepared, load_config(None, ["prepare.sequences=[CT]"]))
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "out"
    rows = run_inference(run_dir=run_dir, input_path=REAL.parent, out_dir=out, sequences="CT",
                         overrides=["infer.montage=true"])
    assert [r["case"] for r in rows] == ["CT_3"]
    mask = nib.load(str(out / "CT_3_liver.nii.gz"))
    label = nib.load(str(prepared / "labelsTr" / "CT_3.nii.gz"))
    assert mask.shape == label.shape
    np.testing.assert_array_equal(mask.affine, label.affine)
    assert (out / "CT_3_montage.png").stat().st_size > 1000
    assert "dice" in rows[0]  # ground truth found through the CHAOS layout


def test_postprocess_on_the_bounding_box_equals_monai_on_the_whole_volume():
    from monai.transforms import FillHoles, KeepLargestConnectedComponent
    from scipy.ndimage import binary_dilation

    for seed in range(4):
        rng = np.random.default_rng(seed)
        mask = binary_dilation(rng.random((30, 28, 12)) > 0.93, iterations=1)  # blobs, holes, islands, edge contact
        def fresh():  # MONAI's label transforms may write into their input
            return torch.as_tensor(mask[None].astype(np.uint8))

        largest = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)(fresh())
        for layout in (mask, np.asfortranarray(mask)):  # C order, and NIfTI's (as infer passes it)
            np.testing.assert_array_equal(postprocess(layout, True, False), np.asarray(largest[0]))
            np.testing.assert_array_equal(postprocess(layout, True, True),
                                          np.asarray(FillHoles(applied_labels=[1])(largest)[0]))
            np.testing.assert_array_equal(postprocess(layout, False, True),
                                          np.asarray(FillHoles(applied_labels=[1])(fresh())[0]))
    shell = np.zeros((12, 12, 12), bool)
    shell[2:10, 2:10, 2:10] = True
    shell[4:8, 4:8, 4:8] = False  # an enclosed cavity
    assert postprocess(shell, False, True).sum() == 8 ** 3
    assert postprocess(np.zeros((4, 4, 4), bool), True, True).sum() == 0


AFFINES = {
    "flipped_in_plane": np.array([[-0.8, 0, 0, 20], [0, -0.7, 0, 15], [0, 0, 3.0, -40], [0, 0, 0, 1]]),
    "flipped_in_z": np.array([[0.8, 0, 0, 20], [0, 0.7, 0, 15], [0, 0, -3.0, -40], [0, 0, 0, 1]]),
    "sagittal_permuted": np.array([[0, 0, -3.0, 20], [0.8, 0, 0, 15], [0, 0.7, 0, -40], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("source", [(40, 36, 9), (64, 57, 5), (14, 11, 4)])  # (14, 11): smaller than the roi
def test_boxed_mask_inversion_equals_thresholding_the_full_inversion(tmp_path, name, source):
    """infer's mask comes from an inversion that interpolates only the liver's box (axial series) or
    from the full inversion (others); both must give the voxels of `full inversion >= 0.5`."""
    from scipy.ndimage import gaussian_filter

    from pipeline.infer.segment import preprocess_case
    from pipeline.model.inversion import liver_mask_on_source_grid, liver_on_source_grid
    from pipeline.model.transforms import flips_only

    run = load_run(make_run(tmp_path / "run"), None, ["train.roi_size=[20,16]"])
    rng = np.random.default_rng(len(name) + source[0])
    volume = rng.normal(100, 20, size=source).astype(np.float32)
    pre, image = preprocess_case(run, volume, AFFINES[name], "MR")
    ops = [op["class"] for op in image.applied_operations]
    assert ops[0] == ("InPlaneResize" if flips_only(AFFINES[name]) else "Orientation")  # boxed path or not
    boxed = flips_only(AFFINES[name])
    for kind in ("blob", "islands", "points")[:3 if boxed else 2]:  # a liver-like blob, islands, lone pixels
        field = gaussian_filter(rng.random(image.shape[1:]), 1.5)
        field = (field - field.min()) / np.ptp(field)
        liver = np.clip(1.6 * field - (0.6 if kind == "blob" else 0.2), 0, 1)
        if kind == "points":  # 0.45 everywhere: a source pixel at 1 lifts every output it weighs on, however little
            liver = np.full(image.shape[1:], 0.45)
            liver[0, 3, 1] = liver[-1, -1, -1] = liver[7, 5, 2] = 1.0
        probs = torch.as_tensor(liver, dtype=torch.float32)[None]
        expected = liver_on_source_grid(probs, image, pre, volume.shape) >= 0.5
        assert 0 < expected.sum() < expected.size
        mask = liver_mask_on_source_grid(probs, image, pre, volume.shape)
        assert mask.shape == volume.shape and mask.dtype == bool
        np.testing.assert_array_equal(mask, expected)
    empty = liver_mask_on_source_grid(torch.zeros_like(probs), image, pre, volume.shape)
    assert not empty.any()


def test_a_2p5d_model_gets_its_neighbour_slices_and_keeps_the_series_grid(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume(), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*TINY, "model.context_slices=1"])
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "fold_0").mkdir(parents=True)
    torch.save({"model": build_model(cfg.model).state_dict()}, run_dir / "fold_0" / "best.pt")
    run_inference(run_dir=run_dir, input_path=series, out_dir=tmp_path / "out")
    volume, geom = read_series(series)
    img = nib.load(str(tmp_path / "out" / "s_liver.nii.gz"))
    assert img.shape == volume.shape
    np.testing.assert_allclose(img.affine, geom.affine, atol=1e-4)


def test_slice_logits_equal_monai_slice_inferer():
    from monai.inferers import SliceInferer
    from monai.networks.nets import UNet

    from pipeline.model.predict import slice_logits

    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)).eval()
    image = torch.rand(1, 24, 20, 7)
    ours = slice_logits(model, image, batch_size=3, device=torch.device("cpu"))
    with torch.inference_mode():
        ref = SliceInferer(roi_size=(24, 20), sw_batch_size=3, spatial_dim=2)(image[None], model)[0]
    assert ours.shape == (2, 24, 20, 7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_a_bad_case_stops_the_run_naming_its_file(tmp_path):
    from helpers import make_prepared_dataset

    data = make_prepared_dataset(tmp_path / "prep", n_mr=1, n_ct=2)
    bad = data / "imagesTr" / "CT_1.nii.gz"
    bad.write_bytes(b"not a nifti")
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=r"CT_1\.nii\.gz: cannot read NIfTI"):
        run_inference(run_dir=run_dir, input_path=data, out_dir=out)
    # the case before it was finished and renamed, nothing after it was written, no temporary left
    assert (out / "MR_1_T2SPIR_liver.nii.gz").exists()
    assert not (out / "CT_2_liver.nii.gz").exists()
    assert not list(out.glob(".partial-*"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch, native):
    import pipeline.core.device

    monkeypatch.setattr(pipeline.core.device, "cpu_has_native_bf16", lambda: native)
    run = load_run(make_run(tmp_path / "run"), None, ["infer.amp=auto"])
    assert run.device.type == "cpu"
    assert run.cfg.infer.amp == ("bf16" if native else "auto")
    assert pipeline.core.device.amp_dtype(run.device, run.cfg.infer.amp) == (torch.bfloat16 if native else None)


def test_quality_flags_name_what_is_wrong_with_a_mask():
    from pipeline.infer.qc import quality_flags

    cfg = load_config(None, ["infer.qc_liver_ml=[500,3000]", "infer.qc_min_agreement=0.85"]).infer
    assert quality_flags(1500.0, 0.95, cfg) == []
    assert quality_flags(1500.0, None, cfg) == []  # one model: nothing to agree with
    assert quality_flags(0.0, None, cfg) == ["empty: no liver found"]
    assert quality_flags(120.0, 0.9, cfg) == ["liver volume 120 ml outside 500-3000 ml"]
    assert quality_flags(3500.0, 0.5, cfg) == ["liver volume 3500 ml outside 500-3000 ml",
                                               "fold models disagree (lowest Dice with the ensemble 0.50 < 0.85)"]
    cfg.qc_min_confidence = 0.9
    assert quality_flags(1500.0, None, cfg, 0.95) == []
    assert quality_flags(1500.0, None, cfg, 0.62) == ["low confidence (0.620 < 0.900)"]
    assert quality_flags(0.0, None, cfg, None) == ["empty: no liver found"]  # said once, not twice
    assert quality_flags(1500.0, None, cfg, 0.92, min_confidence=0.93) == ["low confidence (0.920 < 0.930)"]


def test_a_liver_reaching_the_edge_of_a_cropped_view_is_flagged(tmp_path):
    """At a fixed pixel spacing a wide scan is cropped about its centre; a liver found at the cut edge
    may go on outside it: flagged (in inference.json's qc too), where an uncropped scan is not."""
    from types import SimpleNamespace

    from pipeline.core import runs
    from pipeline.infer.qc import cropped_liver

    run = SimpleNamespace(cfg=load_config(None, ["train.roi_size=[32,32]", "train.pixel_spacing=2.0"]))
    wide, narrow = np.diag([-1.5, -1.5, 4.0, 1.0]), np.diag([-1.0, -1.0, 4.0, 1.0])  # 96 / 64 mm across 64 voxels
    at_edge, inside = torch.zeros(1, 32, 32, 5), torch.zeros(1, 32, 32, 5)
    at_edge[0, 0:6, 10:20, 2] = 0.9  # the liver runs into the first row of the model's view
    inside[0, 8:20, 10:20, 2] = 0.9
    flag = cropped_liver(run, at_edge, (64, 64, 5), wide)
    assert flag is not None and "96 x 96 mm cropped to 64 x 64 mm" in flag
    assert cropped_liver(run, inside, (64, 64, 5), wide) is None  # cropped, but the liver is well inside
    assert cropped_liver(run, at_edge, (64, 64, 5), narrow) is None  # 64 mm at 2 mm: nothing was cut
    resized = SimpleNamespace(cfg=load_config(None, ["train.roi_size=[32,32]", "train.pixel_spacing=0"]))
    assert cropped_liver(resized, at_edge, (64, 64, 5), wide) is None  # resized: nothing is cut

    # end to end: a run at 0.5 mm pixels sees 8 x 8 mm of a 19 x 14 mm series, and a model that
    # calls everything liver reaches the cut edge
    run_dir = make_run(tmp_path / "run")
    config = runs.read_config(run_dir)
    config.train.pixel_spacing = 0.5
    save_config(config, run_dir / "config.yaml")
    for ckpt in run_dir.glob("fold_*/best.pt"):
        state = torch.load(ckpt, weights_only=True)
        bias = next(k for k in reversed(list(state["model"])) if k.endswith("bias"))
        state["model"][bias] = torch.tensor([-50.0, 50.0])  # the liver channel wins everywhere
        torch.save(state, ckpt)
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    rows = run_inference(run_dir=run_dir, input_path=series, out_dir=tmp_path / "out", overrides=["infer.montage=false"])
    assert any("edge of the network's view" in flag for flag in rows[0]["qc"])


def test_the_confidence_threshold_rises_to_the_runs_own_validation_level():
    """A run whose models were sure of their validation patients (lowest confidence 0.95 there) flags
    a mask at 0.93 that infer.qc_min_confidence (0.85) alone would pass; runs without the record
    keep the fixed threshold."""
    from pipeline.infer.loaded import qc_confidence_threshold, validation_confidence

    cfg = load_config(None, ["infer.qc_min_confidence=0.85", "infer.qc_confidence_margin=0.01"]).infer
    sure = [{"history": [{"val_confidence_min": 0.97}, {"val_confidence_min": 0.96}]},
            {"history": [{"val_confidence_min": 0.95}]}]
    assert validation_confidence(sure) == 0.95  # each checkpoint's own (last) validation, lowest of them
    assert abs(qc_confidence_threshold(cfg, validation_confidence(sure)) - 0.94) < 1e-9
    assert validation_confidence([*sure, {"history": [{"val_loss": 0.2}]}]) is None  # an older checkpoint
    assert qc_confidence_threshold(cfg, None) == 0.85
    assert qc_confidence_threshold(cfg, 0.80) == 0.85  # never below the fixed floor


@pytest.mark.slow
def test_training_records_the_validation_confidence_that_infer_holds_masks_to(tmp_path):
    from pipeline.train.cv import run_training

    from helpers import make_prepared_dataset

    data = make_prepared_dataset(tmp_path / "prepared", n_mr=2, n_ct=2, folds=2)
    run_training(data, tmp_path / "run", "all", load_config(None, [*TINY, "train.epochs=2", "train.val_every=1",
                                                                    "train.slices_per_volume=4", "train.batch_size=4"]))
    recorded = [torch.load(tmp_path / "run" / f"fold_{k}" / "last.pt", weights_only=True)["history"][-1]
                ["val_confidence_min"] for k in (0, 1)]
    assert all(0.0 < c <= 1.0 for c in recorded) and recorded[0] != recorded[1]
    surer = str(int(np.argmax(recorded)))  # the fold whose own level is the higher one
    one = load_run(tmp_path / "run", surer, ["infer.qc_min_confidence=0.0", "infer.qc_confidence_margin=0.0",
                                             "infer.checkpoint=last"])
    assert one.min_confidence == min(recorded)  # one fold predicts; every fold's validation sets the level


def test_mask_confidence_is_the_soft_dice_of_the_probabilities_with_their_own_mask():
    from pipeline.model.predict import mask_confidence

    sure = torch.zeros(1, 8, 8, 4)
    sure[:, 2:6, 2:6] = 1.0
    assert mask_confidence(sure) == pytest.approx(1.0)
    unsure = sure * 0.6  # the same mask, every voxel of it at 0.6
    assert mask_confidence(unsure) == pytest.approx(2 * 0.6 * 64 / (0.6 * 64 + 64))
    haze = sure.clone()
    haze[:, 6:8] = 0.4  # probability outside the mask lowers it too
    assert mask_confidence(haze) == pytest.approx(2 * 64 / (64 + 0.4 * 64 + 64))
    assert mask_confidence(np.zeros((4, 4, 2), np.float32)) is None


def test_fold_agreement_is_the_lowest_dice_of_a_model_with_the_ensemble():
    from pipeline.model.predict import fold_agreement

    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[:, :2] = True  # 16 voxels
    b = a.clone()
    b[:, :1] = False  # 8 of them
    probs = a.permute(1, 2, 0)[None].float()  # the ensemble says a
    assert fold_agreement([a], probs) is None
    assert fold_agreement([a, a], probs) == 1.0
    assert fold_agreement([a, b], probs) == pytest.approx(2 * 8 / (16 + 8))


def test_each_model_s_confidence_is_that_of_its_own_probabilities_summed_over_batches():
    from torch import nn

    from pipeline.model.predict import ensemble_confidence, mask_confidence, predict_volume

    torch.manual_seed(0)
    image = torch.randn(1, 6, 5, 7)  # (C, H, W, D): 7 slices, predicted 3 at a time
    models = [nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)]
    confidences: list = []
    mean = predict_volume(models, image, batch_size=3, device=torch.device("cpu"), model_confidences=confidences)
    own = [predict_volume([m], image, batch_size=7, device=torch.device("cpu")) for m in models]
    assert confidences == [pytest.approx(mask_confidence(p), abs=1e-6) for p in own]
    assert torch.allclose(mean, (own[0] + own[1]) / 2, atol=1e-6)
    assert ensemble_confidence(confidences) == pytest.approx(sum(confidences) / 2)
    assert ensemble_confidence([0.8, None, 0.9]) == pytest.approx(0.85)  # a model with no mass has no say
    assert ensemble_confidence([None]) is None


def test_every_case_gets_its_fold_agreement_and_qc_in_inference_json(tmp_path, caplog):
    import json

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    run_dir = make_run(tmp_path / "run", folds=(0, 1))  # random weights: the folds disagree
    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        rows = run_inference(run_dir=run_dir, input_path=series, out_dir=tmp_path / "out",
                             overrides=["infer.qc_min_agreement=1.0", "infer.qc_liver_ml=[1000,2000]"])
    saved = json.loads((tmp_path / "out" / "inference.json").read_text())["cases"][0]
    assert saved["qc"] == rows[0]["qc"] and 0.0 <= saved["fold_agreement"] < 1.0
    assert 0.0 < saved["confidence"] <= 1.0  # random weights: probabilities about 0.5, far from sure
    assert any(flag.startswith("fold models disagree") for flag in saved["qc"])
    assert any(flag.startswith("liver volume") or flag.startswith("empty") for flag in saved["qc"])
    assert "check this mask before using it" in caplog.text and "s:" in caplog.text


def test_the_printed_table_shows_the_confidence_and_reads_older_results():
    from pipeline.infer.inference import format_inference_table

    table = format_inference_table({"cases": [
        {"case": "MR_1_T2SPIR", "slices": 37, "liver_ml": 1849.7, "dice": 0.91, "confidence": 0.9123, "seconds": 0.4,
         "qc": []},
        {"case": "MR_2_T2SPIR", "slices": 31, "liver_ml": 40.0, "confidence": 0.61, "seconds": 0.4,
         "qc": ["liver volume 40 ml outside 200-5000 ml", "low confidence (0.61 < 0.85)"]},
        {"case": "CT_1", "slices": 90, "liver_ml": 1500.0, "seconds": 1.0}]})  # written before confidence existed
    lines = [line for line in table.splitlines() if not set(line) <= {"-", " "}]  # without the rules
    assert lines[0].split() == ["case", "slices", "liver", "ml", "Dice", "confidence", "seconds", "qc"]
    assert lines[1].split()[4:] == ["0.912", "0.40", "ok"]
    assert lines[2].split()[3:6] == ["-", "0.610", "0.40"] and lines[2].endswith("low confidence (0.61 < 0.85)")
    assert lines[3].split()[3:5] == ["-", "-"]
