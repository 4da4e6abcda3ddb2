"""Transforms: liver extraction, per-modality scaling, slice sampling, image/label alignment, inversion."""
import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd

from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import PipelineError
from pipeline.model.transforms import deterministic_transforms, image_transforms, random_transforms, without_metadata

from helpers import make_prepared_dataset

SHAPE = (40, 36, 10)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = make_prepared_dataset(tmp_path_factory.mktemp("prep"), n_mr=1, n_ct=1, shape=SHAPE, folds=2)
    mr = {"image": str(root / "imagesTr/MR_1_T2SPIR.nii.gz"), "label": str(root / "labelsTr/MR_1_T2SPIR.nii.gz"),
          "modality": "MR"}
    ct = {"image": str(root / "imagesTr/CT_1.nii.gz"), "label": str(root / "labelsTr/CT_1.nii.gz"), "modality": "CT"}
    return mr, ct


def cfg_with(*overrides):
    return load_config(None, ["train.roi_size=[40,36]", *overrides]).train


def test_liver_extraction_keeps_only_mr_liver_grey_level(prepared):
    mr, _ = prepared
    source = np.asarray(nib.load(mr["label"]).dataobj)
    assert set(np.unique(source)) == {0, 1, 2, 3, 4}
    out = Compose(deterministic_transforms(cfg_with()))(dict(mr))
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    # roi == source size, so the resize is the identity and voxel counts must match exactly
    assert int(out["label"].sum()) == int((source == 1).sum())


def test_liver_extraction_keeps_ct_liver(prepared):
    _, ct = prepared
    source = np.asarray(nib.load(ct["label"]).dataobj)
    out = Compose(deterministic_transforms(cfg_with()))(dict(ct))
    assert int(out["label"].sum()) == int((source == 1).sum()) > 0


def test_ct_is_windowed_in_hu_and_mr_scaled_by_percentiles(prepared):
    mr, ct = prepared
    cfg = cfg_with("train.ct_window=[-100.0,100.0]")
    ct_out = Compose(deterministic_transforms(cfg))(dict(ct))
    hu = np.asarray(nib.load(ct["image"]).dataobj)
    assert float(ct_out["image"].min()) == 0.0 and float(ct_out["image"].max()) == 1.0
    # the mean of the un-clipped voxels maps linearly from the HU window
    inside = (hu > -100) & (hu < 100)
    assert float(ct_out["image"].sum()) == pytest.approx(
        ((hu[inside] + 100) / 200).sum() + (hu >= 100).sum(), rel=1e-4)
    mr_out = Compose(deterministic_transforms(cfg))(dict(mr))
    raw = np.asarray(nib.load(mr["image"]).dataobj)
    lo, hi = np.percentile(raw, cfg.mr_percentiles)
    assert float(mr_out["image"].max()) == 1.0
    assert float((mr_out["image"] == 1.0).float().mean()) == pytest.approx(float((raw >= hi).mean()), abs=0.01)


def test_unknown_modality_is_an_error_naming_the_file(prepared):
    mr, _ = prepared
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps what a transform raises
        Compose(deterministic_transforms(cfg_with()))(dict(mr, modality="PET"))
    cause = info.value
    while cause is not None and not isinstance(cause, PipelineError):
        cause = cause.__cause__
    assert cause is not None and "MR_1_T2SPIR.nii.gz" in str(cause) and "'PET'" in str(cause)


def test_volumes_are_reoriented_to_ras_and_resized_in_plane_only(prepared):
    mr, _ = prepared
    out = Compose(deterministic_transforms(cfg_with("train.roi_size=[24,20]")))(dict(mr))
    assert tuple(out["image"].shape) == (1, 24, 20, SHAPE[2]) == tuple(out["label"].shape)
    # the fixture's affine is LPS-like (negative x, y): RAS flips both, so the affine diagonal turns positive
    assert (np.diag(np.asarray(out["image"].affine))[:3] > 0).all()


@pytest.mark.parametrize("ratio,expect_liver", [(1.0, True), (0.0, False)])
def test_slices_are_drawn_with_or_without_liver_by_ratio(prepared, ratio, expect_liver):
    mr, _ = prepared
    cfg = cfg_with(f"train.liver_slice_ratio={ratio}", "train.slices_per_volume=6", "train.batch_size=12", "train.flip_prob=0.0",
                   "train.affine_prob=0.0")
    chain = Compose(deterministic_transforms(cfg, with_indices=True) + random_transforms(cfg))
    chain.set_random_state(seed=1)
    samples = chain(dict(mr))
    assert len(samples) == 6
    for s in samples:
        assert tuple(s["image"].shape) == (1, 40, 36)
        assert bool(s["label"].any()) is expect_liver


def test_every_random_transform_moves_image_and_label_together(prepared):
    """An asymmetric marker present in both image and label stays co-located after each draw."""
    mr, _ = prepared
    cfg = cfg_with("train.roi_size=[36,36]", "train.flip_prob=1.0", "train.rotate90_prob=1.0",
                   "train.affine_prob=1.0", "train.slices_per_volume=4", "train.liver_slice_ratio=1.0",
                   "train.organ_intensity_prob=0.0")  # intensity changes inside the liver would blur the marker
    det = Compose(deterministic_transforms(cfg, with_indices=True))(dict(mr))
    # replace the image by the liver mask itself: any misalignment shows as a mismatch
    det["image"] = det["label"].clone()
    random_chain = Compose(random_transforms(cfg))
    moved = 0
    for seed in range(6):
        random_chain.set_random_state(seed=seed)
        for s in random_chain(copy.deepcopy(det)):
            image_mask, label = s["image"][0] > 0.5, s["label"][0] > 0.5
            iou = (image_mask & label).sum() / (image_mask | label).sum()
            # bilinear (image) vs nearest (label) resampling differs at the rim of a ~17-pixel blob;
            # a transform applied to one key only moves the off-centre liver by many pixels.
            shift = (torch.nonzero(image_mask).float().mean(0) - torch.nonzero(label).float().mean(0)).norm()
            assert iou > 0.8 and shift < 1.0, f"seed {seed}: image and label disagree (IoU {iou:.3f}, shift {shift:.2f})"
            moved += 1
    assert moved == 24


def test_random_chain_without_metadata_gives_the_same_plain_tensors(prepared):
    """The training loop runs the random chain with MONAI's metadata tracking off (half the cost):
    same draws, same values, plain tensors, and the flag is restored afterwards."""
    from monai.data import MetaTensor, get_track_meta

    mr, _ = prepared
    cfg = cfg_with("train.affine_prob=1.0", "train.bias_field_prob=1.0", "train.histogram_shift_prob=1.0",
                   "train.slices_per_volume=4")
    det = Compose(deterministic_transforms(cfg, with_indices=True))(dict(mr))
    random_chain = Compose(random_transforms(cfg))
    random_chain.set_random_state(seed=3)
    tracked = random_chain(copy.deepcopy(det))
    random_chain.set_random_state(seed=3)
    with without_metadata():
        assert get_track_meta() is False
        untracked = random_chain(copy.deepcopy(det))
    assert get_track_meta() is True
    assert isinstance(tracked[0]["image"], MetaTensor)
    for a, b in zip(tracked, untracked):
        for key in ("image", "label"):
            assert type(b[key]) is torch.Tensor
            torch.testing.assert_close(a[key].as_tensor(), b[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("roi", [[40, 36], [32, 32]])
def test_deterministic_chain_inverts_back_to_the_source_grid(prepared, roi):
    """What infer does: predict on the model grid, Invertd back, compare on the source voxels."""
    mr, _ = prepared
    cfg = cfg_with(f"train.roi_size=[{roi[0]},{roi[1]}]")
    chain = Compose(image_transforms(cfg))
    data = chain({"image": mr["image"], "modality": "MR"})
    source_label = np.asarray(nib.load(mr["label"]).dataobj) == 1
    resized_label = Compose(deterministic_transforms(cfg))(dict(mr))["label"]
    data["pred"] = resized_label.clone()
    data["pred"].applied_operations = copy.deepcopy(data["image"].applied_operations)
    # probabilities go back with the image's (bilinear) interpolation, as in validation and infer
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert tuple(back.shape[1:]) == SHAPE
    mask = back[0].numpy() > 0.5
    if roi == [40, 36]:  # no resize: undoing the reorientation must give the source voxels exactly
        assert np.array_equal(mask, source_label)
    else:  # nearest down- and up-sampling loses the rim only; the blob stays where it was
        dice = 2 * (mask & source_label).sum() / (mask.sum() + source_label.sum())
        shift = np.linalg.norm(np.argwhere(mask).mean(0) - np.argwhere(source_label).mean(0))
        assert dice > 0.85 and shift < 0.5


def test_in_memory_volumes_get_the_same_preprocessing_as_files(prepared):
    """infer passes a MetaTensor read from DICOM (load=False); it must match the file path."""
    from monai.data import MetaTensor

    mr, _ = prepared
    cfg = cfg_with("train.roi_size=[32,32]")
    nii = nib.load(mr["image"])
    volume = MetaTensor(torch.as_tensor(np.asarray(nii.dataobj, dtype=np.float32)[None]),
                        affine=torch.as_tensor(nii.affine))
    from_memory = Compose(image_transforms(cfg, load=False))({"image": volume, "modality": "MR"})["image"]
    from_file = Compose(image_transforms(cfg))({"image": mr["image"], "modality": "MR"})["image"]
    assert torch.allclose(from_memory.as_tensor(), from_file.as_tensor(), atol=1e-5)
    assert np.allclose(np.asarray(from_memory.affine), np.asarray(from_file.affine))


@pytest.mark.parametrize("flips", [(-1, -1, 1), (1, -1, -1), (-1, 1, 1)])
def test_orienting_after_the_resize_gives_the_same_image_and_inverse(flips):
    """infer reorients on the model's grid when the reorientation only flips axes: same image,
    same affine, and Invertd brings a prediction back to the same source voxels."""
    from monai.data import MetaTensor

    from pipeline.model.transforms import flips_only

    cfg = cfg_with("train.roi_size=[24,20]")
    rng = np.random.default_rng(0)
    affine = np.diag([0.8 * flips[0], 0.7 * flips[1], 3.0 * flips[2], 1.0])
    affine[:3, 3] = [12.0, -30.0, 40.0]
    assert flips_only(affine)
    volume = rng.normal(100, 30, size=(50, 44, 7)).astype(np.float32)
    results = []
    for late in (False, True):
        chain = Compose(image_transforms(cfg, load=False, orient_last=late))
        image = chain({"image": MetaTensor(torch.as_tensor(volume[None]), affine=torch.as_tensor(affine)),
                       "modality": "MR"})["image"]
        probs = torch.as_tensor(rng.random(image.shape, dtype=np.float32)) if not results else results[0][1]
        pred = MetaTensor(probs, meta=image.meta, applied_operations=copy.deepcopy(image.applied_operations))
        back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(
            {"pred": pred, "image": image})["pred"]
        results.append((image, probs, back))
    (a, _, back_a), (b, _, back_b) = results
    assert [op["class"] for op in b.applied_operations] == ["InPlaneResize", "Orientation"]
    torch.testing.assert_close(b.as_tensor(), a.as_tensor(), rtol=0, atol=1e-5)
    assert np.allclose(np.asarray(b.affine), np.asarray(a.affine), atol=1e-6)
    assert tuple(back_b.shape[1:]) == volume.shape
    torch.testing.assert_close(back_b.as_tensor(), back_a.as_tensor(), rtol=0, atol=1e-5)
    assert np.allclose(np.asarray(back_b.affine), affine, atol=1e-6)


def test_flips_only_is_false_when_the_axes_must_be_permuted():
    from pipeline.model.transforms import flips_only

    sagittal = np.array([[0, 0, -2.0, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]])
    assert not flips_only(sagittal)
    with pytest.raises(ValueError, match="image-only"):
        deterministic_transforms(cfg_with(), orient_last=True)


def test_in_plane_resize_matches_monai_anti_aliased_resize_away_from_the_border():
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Resize

    from pipeline.model.fast_transforms import InPlaneResize

    img = MetaTensor(torch.rand(1, 64, 48, 5), affine=torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0])))
    ours = InPlaneResize((16, 16))(img)
    ref = Resize(spatial_size=(16, 16, -1), mode="bilinear", anti_aliasing=True)(img)
    assert ours.shape == ref.shape == (1, 16, 16, 5)
    # MONAI pads its Gaussian with zeros, ours repeats the edge: equal away from the border
    np.testing.assert_allclose(np.asarray(ours)[0, 3:-3, 3:-3], np.asarray(ref)[0, 3:-3, 3:-3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    plain = Resize(spatial_size=(16, 16, -1), mode="bilinear")(img)
    assert float((ours - plain).abs().max()) > 0.05  # it did smooth before sampling
    fortran = MetaTensor(torch.as_tensor(np.asfortranarray(np.asarray(img[0]))[None]), affine=img.affine)
    np.testing.assert_allclose(np.asarray(InPlaneResize((16, 16))(fortran)), np.asarray(ours), atol=1e-6)  # layout
    up = InPlaneResize((96, 80))(img)  # enlarging: plain bilinear, nothing to smooth
    np.testing.assert_allclose(np.asarray(up), np.asarray(Resize((96, 80, -1), mode="bilinear")(img)), atol=1e-5)


@pytest.mark.slow
def test_in_plane_resize_band_by_band_equals_the_dense_matrix_product():
    """Several bands of 32 output rows per axis, both memory layouts, shrinking and enlarging."""
    import torch
    from monai.data import MetaTensor

    from pipeline.model.fast_transforms import InPlaneResize

    x = torch.rand(1, 200, 150, 3)
    for roi in [(70, 40), (230, 96)]:
        m0, m1 = InPlaneResize.axis_matrix(200, roi[0]), InPlaneResize.axis_matrix(150, roi[1])
        dense = torch.einsum("ah,bw,chwz->cabz", m0, m1, x)
        assert len(InPlaneResize.axis_operator(200, roi[0])[1]) == -(-roi[0] // 32) > 1
        for data in (x, torch.as_tensor(np.asfortranarray(x[0].numpy()))[None]):
            out = InPlaneResize(roi)(MetaTensor(data, affine=torch.eye(4)))
            torch.testing.assert_close(out.as_tensor(), dense, rtol=0, atol=2e-6)


def test_in_plane_resize_is_undone_by_invertd_to_the_source_grid():
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd, Orientationd

    from pipeline.model.transforms import InPlaneResized

    affine = torch.tensor([[-0.7, 0, 0, 10.0], [0, 0.8, 0, -5.0], [0, 0, -2.5, 30.0], [0, 0, 0, 1.0]])
    img = MetaTensor(torch.rand(1, 64, 48, 5), affine=affine)
    pre = Compose([Orientationd("image", axcodes="RAS", labels=None), InPlaneResized("image", (16, 24))])
    out = pre({"image": img})["image"]
    assert out.shape == (1, 16, 24, 5)
    pred = MetaTensor(out.as_tensor().clone(), meta=out.meta, applied_operations=out.applied_operations)
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)({"pred": pred, "image": out})["pred"]
    assert back.shape == img.shape
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(affine), atol=1e-5)
    # a smooth image survives the round trip closely (down then up again)
    x = torch.linspace(0, 1, 64)[:, None, None] * torch.linspace(0, 1, 48)[None, :, None] * torch.ones(1, 1, 5)
    out = pre({"image": MetaTensor(x[None], affine=affine)})["image"]
    pred = MetaTensor(out.as_tensor().clone(), meta=out.meta, applied_operations=out.applied_operations)
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)({"pred": pred, "image": out})["pred"]
    assert float((back[0, 4:-4, 4:-4] - x[4:-4, 4:-4]).abs().max()) < 0.03


def test_in_plane_resize_inverse_equals_monai_resize_inverse():
    import torch
    from monai.data import MetaTensor

    from pipeline.model.fast_transforms import InPlaneResize

    affine = torch.tensor([[0.7, 0, 0, 10.0], [0, 0.8, 0, -5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1.0]])
    resize = InPlaneResize((16, 24))
    small = resize(MetaTensor(torch.rand(1, 64, 48, 5), affine=affine))
    ours_in = MetaTensor(torch.rand(2, 16, 24, 5), meta=small.meta, applied_operations=list(small.applied_operations))
    ref_in = MetaTensor(ours_in.as_tensor().clone(), meta=small.meta, applied_operations=list(small.applied_operations))
    ours = resize.inverse(ours_in)
    ref = resize.inverse_transform(ref_in, resize.pop_transform(ref_in))  # MONAI's Resize.inverse
    assert ours.shape == ref.shape == (2, 64, 48, 5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(affine), atol=1e-5)
    assert not ours.applied_operations and not ref.applied_operations  # both popped their record
    assert np.asarray(ours[0]).flags["F_CONTIGUOUS"]  # laid out as nibabel writes it


def test_one_buffer_intensity_window_equals_monai_and_keeps_metadata(monkeypatch):
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRange

    from pipeline.model.fast_transforms import ScaleIntensityRangeOneBuffer

    hu = MetaTensor(torch.linspace(-1200, 1500, 2 * 30 * 20 * 4).reshape(1, 30, 20, 8), affine=torch.eye(4) * 2)
    for kwargs in ({"a_min": -150.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                   {"a_min": -100.0, "a_max": 200.0, "b_min": -1.0, "b_max": 2.0, "clip": False}):
        ref = ScaleIntensityRange(**kwargs)(hu)
        with monkeypatch.context() as m:  # float32 volumes must take the one-buffer path, not MONAI's
            m.setattr(ScaleIntensityRange, "__call__", lambda self, img: pytest.fail("MONAI's path taken"))
            ours = ScaleIntensityRangeOneBuffer(**kwargs)(hu)
        assert torch.equal(ours.as_tensor(), ref.as_tensor())  # the same operations, bit for bit
        assert isinstance(ours, MetaTensor) and torch.equal(ours.affine, hu.affine)
    assert float(hu.min()) == -1200.0  # the input is not modified
    ints = torch.arange(-200, 300, 50, dtype=torch.int16)  # non-float input: MONAI's own code path
    assert torch.equal(ScaleIntensityRangeOneBuffer(-150.0, 250.0, 0.0, 1.0, clip=True)(ints),
                       ScaleIntensityRange(-150.0, 250.0, 0.0, 1.0, clip=True)(ints))


@pytest.mark.parametrize("shape,fortran", [((1, 40, 30, 6), False), ((1, 128, 128, 70), False),
                                           ((1, 128, 128, 70), True)])  # MONAI: torch.quantile / np.percentile
def test_one_pass_percentile_scaling_equals_monai(shape, fortran):
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentiles

    from pipeline.model.fast_transforms import ScaleIntensityRangePercentilesOnePass

    gen = torch.Generator().manual_seed(0)
    values = torch.rand(shape, generator=gen) ** 3 * 900.0
    if fortran:  # NIfTI's layout, as volumes read from DICOM lie in memory (our own percentile path)
        values = values.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
        assert not values.is_contiguous()
    mr = MetaTensor(values, affine=torch.eye(4) * 1.5)
    kwargs = {"lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
    ours, ref = ScaleIntensityRangePercentilesOnePass(**kwargs)(mr), ScaleIntensityRangePercentiles(**kwargs)(mr)
    assert torch.equal(ours.as_tensor(), ref.as_tensor())
    assert isinstance(ours, MetaTensor) and torch.equal(ours.affine, mr.affine)
    assert 0.0 == float(ours.min()) < float(ours.max()) == 1.0


def test_modality_channel_is_added_after_augmentation_and_stays_exact(prepared):
    mr, ct = prepared
    cfg = cfg_with("train.roi_size=[36,36]", "train.affine_prob=1.0", "train.bias_field_prob=1.0",
                   "train.histogram_shift_prob=1.0", "train.intensity_scale=0.5", "train.slices_per_volume=3",
                   "train.batch_size=12")
    for data, flag in ((mr, 0.0), (ct, 1.0)):
        det = Compose(deterministic_transforms(cfg, with_indices=True))(dict(data))
        assert det["image"].shape[0] == 1  # the cached volumes do not carry it
        with without_metadata():
            slices = Compose(random_transforms(cfg, modality_channel=True))(copy.deepcopy(det))
        for s in slices:
            assert s["image"].shape == (2, 36, 36) and s["label"].shape == (1, 36, 36)
            assert torch.all(s["image"][1] == flag)  # exactly 0 (MR) or 1 (CT), untouched by the intensity draws
        vol = Compose(image_transforms(cfg, modality_channel=True))({"image": data["image"], "modality": data["modality"]})
        assert vol["image"].shape[0] == 2 and torch.all(vol["image"][1] == flag)
        assert torch.equal(vol["image"][:1].as_tensor(), Compose(image_transforms(cfg))(
            {"image": data["image"], "modality": data["modality"]})["image"].as_tensor())  # channel 0 unchanged


def test_neighbour_slices_stack_the_slices_above_and_below_as_channels():
    import torch
    from monai.data import MetaTensor

    from pipeline.model.transforms import NeighbourSlicesd

    vol = MetaTensor(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 2, 3, 4).clone(), affine=torch.eye(4))
    out = NeighbourSlicesd("image", context=1)({"image": vol})["image"]
    assert tuple(out.shape) == (3, 2, 3, 4)
    # channel 0 = slice below (edge repeated), 1 = the slice itself, 2 = slice above
    assert out[:, 0, 0, :].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    assert torch.equal(out.affine, vol.affine)
    assert NeighbourSlicesd("image", context=0)({"image": vol})["image"] is vol


def test_nnunet_augmentations_join_the_chain_only_when_asked_and_leave_the_others_draws_alone(prepared):
    plain_cfg = cfg_with()
    names = [type(t).__name__ for t in random_transforms(plain_cfg)]
    assert not {"RandGaussianSmoothd", "RandSimulateLowResolutiond", "Rand2DElasticd"} & set(names)
    extra_cfg = cfg_with("train.blur_prob=1.0", "train.lowres_prob=1.0", "train.elastic_prob=1.0")
    extra = random_transforms(extra_cfg)
    assert [type(t).__name__ for t in extra][:len(names)] == names  # appended after the others
    assert [type(t).__name__ for t in extra][len(names):] == ["RandGaussianSmoothd", "RandSimulateLowResolutiond",
                                                             "Rand2DElasticd"]
    # the new transforms act: the same draws without them differ from the draws with them
    volume = Compose(deterministic_transforms(plain_cfg, with_indices=True))(dict(prepared[0]))
    outs = []
    for chain in (random_transforms(plain_cfg), extra):
        composed = Compose(chain)
        composed.set_random_state(seed=3)
        with without_metadata():
            outs.append(composed(dict(volume)))
    assert outs[0][0]["image"].shape == outs[1][0]["image"].shape
    assert not np.allclose(np.asarray(outs[0][0]["image"]), np.asarray(outs[1][0]["image"]))


def test_grey_curve_joins_the_chain_last_and_only_when_asked():
    names = [type(t).__name__ for t in random_transforms(cfg_with())]
    assert "RandGreyCurved" not in names
    curved = [type(t).__name__ for t in random_transforms(cfg_with("train.grey_curve_prob=0.5"))]
    assert curved == names + ["RandGreyCurved"]
    with_modality = [type(t).__name__ for t in random_transforms(cfg_with("train.grey_curve_prob=0.5"),
                                                                 modality_channel=True)]
    assert with_modality[-2:] == ["RandGreyCurved", "ModalityChanneld"]  # the flag channel stays 0 / 1


def test_grey_curve_is_a_seeded_piecewise_linear_curve_spanning_zero_to_one_on_every_channel():
    from pipeline.model.intensity import RandGreyCurved, grey_curve

    # the curve itself: control values at 0, 1/2, 1; linear between them; clamped outside [0, 1]
    x = torch.tensor([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0])
    assert torch.allclose(grey_curve(x, np.array([1.0, 0.0, 0.5], np.float32)),
                          torch.tensor([1.0, 1.0, 0.5, 0.0, 0.25, 0.5, 0.5]))
    image = torch.rand(3, 16, 16)  # three context slices of one scan
    image[:, 0, 0], image[:, 0, 1] = 0.0, 1.0
    outs, values = [], []
    for _ in range(2):
        t = RandGreyCurved("image", prob=1.0)
        t.set_random_state(seed=7)
        outs.append(t({"image": image.clone(), "label": torch.ones(1, 16, 16)}))
        values.append(t.values.copy())
    assert np.array_equal(values[0], values[1]) and torch.equal(outs[0]["image"], outs[1]["image"])  # seeded
    assert 3 <= len(values[0]) <= 7 and values[0].min() == 0.0 and values[0].max() == 1.0
    for c in range(3):  # one curve for all channels
        assert torch.allclose(outs[0]["image"][c], grey_curve(image[c], values[0]))
    assert torch.equal(outs[0]["label"], torch.ones(1, 16, 16))  # the label untouched
    # across seeds the curves differ, and some are not monotone (the point of the transform)
    curves = []
    for seed in range(20):
        t = RandGreyCurved("image", prob=1.0)
        t.set_random_state(seed=seed)
        t({"image": image})
        curves.append(t.values)
    assert any(np.any(np.diff(v) < 0) and np.any(np.diff(v) > 0) for v in curves)
    never = RandGreyCurved("image", prob=0.0)
    assert never({"image": image})["image"] is image
    with pytest.raises(ValueError):
        RandGreyCurved("image", prob=1.0, points=(1, 3))


def test_organ_intensity_moves_each_organ_to_its_own_level_and_training_labels_stay_liver_only(prepared):
    from pipeline.model.intensity import RandOrganIntensityd

    image = torch.rand(1, 12, 12) * 0.1 + 0.5
    label = torch.zeros(1, 12, 12, dtype=torch.uint8)
    label[0, 1:5, 1:5], label[0, 6:9, 6:9] = 1, 4  # liver, spleen
    t = RandOrganIntensityd("image", "label", prob=1.0)
    t.set_random_state(seed=5)
    out = t({"image": image.clone(), "label": label})
    levels, contrasts = t.draws[:, 0], t.draws[:, 1]
    for value in (1, 4):
        inside = label[0] == value
        assert torch.isclose(out["image"][0][inside].mean(), torch.tensor(float(levels[value])), atol=1e-5)
        centred_in, centred_out = image[0][inside] - image[0][inside].mean(), out["image"][0][inside] - levels[value]
        assert torch.allclose(centred_out, centred_in * float(contrasts[value]), atol=1e-5)  # texture kept
    assert torch.equal(out["image"][0][label[0] == 0], image[0][label[0] == 0])  # the rest untouched
    again = RandOrganIntensityd("image", "label", prob=1.0)
    again.set_random_state(seed=5)
    assert torch.equal(again({"image": image.clone(), "label": label})["image"], out["image"])  # seeded

    # in the training chain: organ maps cached, the liver extracted after the augmentation
    cfg = cfg_with("train.organ_intensity_prob=1.0")
    det = deterministic_transforms(cfg, with_indices=True, keep_organs=True)
    assert "LabelFilterd" not in [type(x).__name__ for x in det]
    names = [type(x).__name__ for x in random_transforms(cfg)]
    assert names[-2:] == ["RandOrganIntensityd", "LabelFilterd"]
    volume = Compose(det)(dict(prepared[0]))
    assert set(np.unique(np.asarray(volume["label"]))) > {0, 1}  # the organs are there
    chain = Compose(random_transforms(cfg))
    chain.set_random_state(seed=1)
    with without_metadata():
        slices = chain(dict(volume))
    assert all(set(np.unique(np.asarray(s["label"]))) <= {0, 1} for s in slices)


def test_organ_intensity_shared_gives_every_organ_one_level_and_off_keeps_the_random_stream():
    """train.organ_intensity_shared: on the slices it picks, liver and spleen get the same level (each its
    own texture factor); at 0 the draws are those of the transform without the option, so runs keep
    their augmentation."""
    from pipeline.model.intensity import RandOrganIntensityd

    image = torch.rand(1, 12, 12) * 0.1 + 0.5
    label = torch.zeros(1, 12, 12, dtype=torch.uint8)
    label[0, 1:5, 1:5], label[0, 6:9, 6:9] = 1, 4  # liver, spleen
    liver, spleen = label[0] == 1, label[0] == 4
    t = RandOrganIntensityd("image", "label", prob=1.0, shared=1.0)
    for seed in range(5):
        t.set_random_state(seed=seed)
        out = t({"image": image.clone(), "label": label})["image"][0]
        assert torch.isclose(out[liver].mean(), out[spleen].mean(), atol=1e-5)
    # half of the slices: some shared, some not, over 40 draws
    half = RandOrganIntensityd("image", "label", prob=1.0, shared=0.5)
    half.set_random_state(seed=0)
    same = []
    for _ in range(40):
        out = half({"image": image.clone(), "label": label})["image"][0]
        same.append(bool(torch.isclose(out[liver].mean(), out[spleen].mean(), atol=1e-5)))
    assert 5 < sum(same) < 35
    # shared=0 draws nothing more than the transform did before the option: the apply draw, 8 levels,
    # 8 texture factors, and the next draw of the stream is the same
    zero = RandOrganIntensityd("image", "label", prob=1.0, shared=0.0, texture=(0.5, 1.5))
    zero.set_random_state(seed=7)
    zero({"image": image.clone(), "label": label})
    before = np.random.RandomState(7)
    before.rand()  # RandomizableTransform.randomize: whether to apply
    levels, factors = before.uniform(0.0, 1.0, 8), before.uniform(0.5, 1.5, 8)
    assert np.array_equal(zero.draws, np.stack([levels, factors], axis=1).astype(np.float32))
    assert zero.R.uniform() == before.uniform()
    # from the config: the chain's transform carries it, and the gamma range reaches RandAdjustContrastd
    cfg = cfg_with("train.organ_intensity_shared=0.5", "train.gamma_range=[0.5,2.0]", "train.organ_intensity_texture=[0.2,1.5]")
    steps = random_transforms(cfg)
    organ = next(x for x in steps if isinstance(x, RandOrganIntensityd))
    assert organ.shared == 0.5 and organ.texture == (0.2, 1.5)
    organ.set_random_state(seed=3)
    factors = np.concatenate([(organ.randomize(), organ.draws[:, 1])[1] for _ in range(50)])
    assert factors.min() >= 0.2 and factors.max() <= 1.5 and factors.min() < 0.5  # below the default's range
    contrast = next(x for x in steps if type(x).__name__ == "RandAdjustContrastd")
    assert tuple(contrast.adjuster.gamma) == (0.5, 2.0)


def test_organ_intensity_of_a_2p5d_slice_moves_each_channel_by_its_own_slice_outline(prepared):
    """With context slices, a neighbour channel's organs move by the neighbour's own organ map: the
    centre slice's outline must not appear in the other channels (a label cue no real scan has)."""
    from pipeline.model.intensity import RandOrganIntensityd

    image = torch.rand(3, 12, 12) * 0.1 + 0.5  # slices z - 1, z, z + 1
    maps = torch.zeros(3, 12, 12, dtype=torch.uint8)
    maps[0, 1:3, 1:3], maps[1, 1:5, 1:5], maps[2, 2:8, 2:8] = 1, 1, 1  # the liver grows through the slices
    t = RandOrganIntensityd("image", "label", prob=1.0, context_key="label_context")
    t.set_random_state(seed=5)
    out = t({"image": image.clone(), "label": maps[1:2], "label_context": maps})["image"]
    level = float(t.draws[1, 0])
    for c in range(3):
        inside = maps[c] == 1
        assert torch.isclose(out[c][inside].mean(), torch.tensor(level), atol=1e-5)
        assert torch.equal(out[c][~inside], image[c][~inside])  # outside its own outline: untouched

    # in a 2.5D model's training chain the neighbour maps move with the slice through the affine,
    # reach the augmentation aligned with the label, and leave the chain after it
    cfg = cfg_with("train.organ_intensity_prob=1.0", "train.affine_prob=1.0")
    volume = Compose(deterministic_transforms(cfg, with_indices=True, context=1, keep_organs=True))(dict(prepared[0]))
    assert volume["image"].shape[0] == 3 and volume["label_context"].shape[0] == 3
    assert torch.equal(torch.as_tensor(volume["label_context"])[1], torch.as_tensor(volume["label"])[0])
    steps = random_transforms(cfg, context=1)
    organ = next(x for x in steps if isinstance(x, RandOrganIntensityd))
    assert organ.context_key == "label_context"
    seen = []  # what the augmentation receives, recorded by a wrapper in its place
    steps[steps.index(organ)] = lambda d: (seen.append((d["label"].clone(), d["label_context"].clone())), organ(d))[1]
    chain = Compose(steps)
    chain.set_random_state(seed=3)
    with without_metadata():
        slices = chain(dict(volume))
    assert len(seen) == len(slices) and any(lab.any() for lab, _ in seen)
    assert all(torch.equal(ctx[1], lab[0]) for lab, ctx in seen)
    assert all("label_context" not in s and s["image"].shape[0] == 3 for s in slices)
    assert all(set(np.unique(np.asarray(s["label"]))) <= {0, 1} for s in slices)
    # organ maps kept for another reason (model.organs) without the augmentation: no maps that the
    # random chain would neither move nor drop
    off = cfg_with("train.organ_intensity_prob=0.0")
    kept = Compose(deterministic_transforms(off, with_indices=True, context=1, keep_organs=True))(dict(prepared[0]))
    assert "label_context" not in kept


def test_slice_indices_count_liver_slices_only_in_organ_maps():
    from pipeline.model.transforms import SliceIndicesd

    label = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    label[0, 1, 1, 0] = 1  # liver on slice 0
    label[0, 2, 2, 1] = 2  # a kidney alone on slice 1
    d = SliceIndicesd("label")({"label": label})
    fg = sorted(np.unravel_index(d["label_fg_indices"], (4, 4, 3))[2].tolist())
    bg = sorted(np.unravel_index(d["label_bg_indices"], (4, 4, 3))[2].tolist())
    assert fg == [0] and bg == [1, 2]


def test_pixel_spacing_resamples_slices_then_pads_or_crops_and_inverts_back(prepared):
    """train.pixel_spacing: every slice at that spacing (the liver keeps its size in mm), padded or
    cropped to the roi; Invertd brings an image-shaped result back onto the source grid."""
    from monai.transforms import Invertd

    mr, _ = prepared
    cfg = cfg_with("train.pixel_spacing=2.0")  # the data's pixels are 1.5 mm: 40 x 36 -> 30 x 27, padded to 40 x 36
    chain = Compose(deterministic_transforms(cfg))
    out = chain(dict(mr))
    image, label = out["image"], out["label"]
    assert tuple(image.shape) == (1, 40, 36, SHAPE[2]) and tuple(label.shape) == tuple(image.shape)
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [2.0, 2.0, 4.0], atol=1e-5)
    source = np.asarray(nib.load(mr["label"]).dataobj) == 1
    # the liver's area in mm² per volume is kept (nearest resampling: within a few pixels' worth)
    assert float(label.sum()) * 4.0 == pytest.approx(float(source.sum()) * 1.5 * 1.5, rel=0.1)
    assert float(image[0, 0, 0].max()) == 0.0  # the padding (outside the 30 x 27 resampled slice)
    back = Invertd("pred", transform=chain, orig_keys="label", nearest_interp=True)(
        {"pred": label.clone(), "label": label})["pred"]
    assert tuple(back.shape[1:]) == source.shape
    inter = float(((np.asarray(back[0]) > 0.5) & source).sum())
    assert 2 * inter / (float((np.asarray(back[0]) > 0.5).sum()) + float(source.sum())) > 0.9


def test_pixel_spacing_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.pixel_spacing"):
        load_config(None, ["train.pixel_spacing=-1"])


def test_patches_are_random_crops_of_image_and_label_together_before_the_intensity_steps(prepared):
    whole_cfg = cfg_with("train.roi_size=[32,32]", "train.liver_slice_ratio=1.0", "train.organ_intensity_prob=0.0")
    patch_cfg = cfg_with("train.roi_size=[32,32]", "train.liver_slice_ratio=1.0", "train.organ_intensity_prob=0.0",
                         "train.patch_size=[16,24]", "train.affine_prob=0.0",
                         "model.channels=[4,8]", "model.strides=[2]")  # a network that halves once
    whole, patched = random_transforms(whole_cfg), random_transforms(patch_cfg)
    names = [type(t).__name__ for t in patched]
    assert "RandSpatialCropd" not in [type(t).__name__ for t in whole]
    crop = names.index("RandSpatialCropd")
    assert names[crop - 1] == "RandAffined" and names[crop + 1] == "RandBiasFieldd"
    volume = Compose(deterministic_transforms(patch_cfg, with_indices=True))(dict(prepared[0]))
    # the image: the label plus 10 x each pixel's place in the slice, so a crop shows where it was taken
    # and any misalignment of image and label shows as a mismatch
    h, w = volume["label"].shape[1:3]
    place = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w, 1)
    volume["image"] = volume["label"] + 10 * place
    chain = Compose(patched[:crop + 1])  # sampling, flips, affine (off), the crop
    corners = set()
    for seed in range(4):
        chain.set_random_state(seed=seed)
        with without_metadata():
            for s in chain(dict(volume)):
                assert tuple(s["image"].shape) == (1, 16, 24) and tuple(s["label"].shape) == (1, 16, 24)
                assert torch.equal(s["image"] % 10, s["label"])
                row, col = divmod(int(s["image"][0, 0, 0]) // 10, w)
                assert torch.equal(s["image"] // 10, place[:, row:row + 16, col:col + 24, 0])  # one whole block
                corners.add((row, col))
    assert len(corners) > 1  # the crops fall in different places


def test_patches_must_fit_the_roi_and_the_networks_down_sampling():
    assert load_config(None, ["train.patch_size=[128,96]"]).train.patch_size == [128, 96]
    for bad in ("[100,128]", "[176,128]", "[128]"):
        with pytest.raises(ConfigError, match=r"train.patch_size.*multiples of \[16, 16\]"):
            load_config(None, [f"train.patch_size={bad}"])
