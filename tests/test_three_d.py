"""The 3D option (model.dims 3): nnU-Net's plan for the DynUNet, the config's checks, and a tiny 3D run
that infer rebuilds and scores as its validation did."""
import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.plans import plan_dynunet_3d

from helpers import make_prepared_dataset

TINY_3D = ["model.dims=3", "model.name=dynunet", "model.channels=[4,8,16]", "model.num_res_units=0",
           "train.roi_size=[16,16]", "train.patch_3d=[16,16,16]", "infer.amp=off", "infer.device=cpu",
           "infer.montage=false"]


def test_thick_slices_get_in_plane_kernels_and_strides_until_the_voxels_match():
    kernels, strides = plan_dynunet_3d([128, 128, 32], [2.0, 2.0, 7.7], 5)
    assert kernels[0] == [3, 3, 1] and strides[1] == [2, 2, 1]  # 7.7 mm > 2 x 2 mm: not yet through the plane
    assert kernels[1] == [3, 3, 3] and strides[2] == [2, 2, 2]  # 4 mm pixels: now it is
    for axis, size in enumerate([128, 128, 32]):  # every axis still divides evenly
        assert size % int(np.prod([s[axis] for s in strides])) == 0
    kernels, strides = plan_dynunet_3d([64, 64, 64], [1.0, 1.0, 1.0], 6)
    assert all(k == [3, 3, 3] for k in kernels) and all(s == [2, 2, 2] for s in strides[1:])
    assert len(strides) == 5  # 64 -> 4 voxels: MIN_FEATURE_MAP_3D stops a sixth level


@pytest.mark.parametrize("extra, match", [
    (["model.name=unet", "model.strides=[2,2]"], "3D is model.name dynunet"), (["model.views=[axial,coronal]"], "3D is model.name dynunet"),
    (["train.patch_3d=[16,16,12]"], "multiple of 4"), (["train.patch_3d=[16,16]"], "expected \\[R, A, S\\]"),
    (["train.slice_spacing=0"], "auto or mm > 0"), (["infer.sw_overlap=1.0"], "fraction"),
])
def test_a_3d_config_is_checked_when_it_is_loaded(extra, match):
    load_config(None, TINY_3D)  # the tiny 3D config itself is valid
    with pytest.raises(PipelineError, match=match):
        load_config(None, [*TINY_3D, *extra])


def test_the_3d_chain_resamples_to_the_run_s_spacing_pads_to_the_patch_and_inverts_back():
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    from pipeline.model.volumetric import deterministic_transforms_3d

    cfg = load_config(None, [*TINY_3D, "train.pixel_spacing=2.0", "train.slice_spacing=4.0"])
    volume = np.random.default_rng(0).random((12, 10, 6)).astype(np.float32) * 1000  # MR-like values
    image = MetaTensor(torch.as_tensor(volume[None]), affine=torch.as_tensor(np.diag([2.0, 2.0, 4.0, 1.0])))
    chain = Compose(deterministic_transforms_3d(cfg.train, keys=("image",), load=False))
    out = chain({"image": image, "modality": "MR"})["image"]
    assert tuple(out.shape) == (1, 16, 16, 16)  # already at the spacing: padded to the patch
    pred = MetaTensor(out.clone(), meta=out.meta, applied_operations=out.applied_operations)
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)({"pred": pred, "image": out})
    scaled = np.asarray(out[0, 2:14, 3:13, 5:11])  # the volume inside the padding, normalised
    np.testing.assert_allclose(np.asarray(back["pred"][0]), scaled, atol=1e-6)


@pytest.mark.slow
def test_a_3d_run_trains_validates_and_infer_scores_it_as_validation_did(tmp_path):
    from pipeline.core import runs
    from pipeline.infer.inference import run_inference
    from pipeline.train.cv import run_training

    data = make_prepared_dataset(tmp_path / "prepared", n_mr=2, n_ct=2, folds=2)
    cfg = load_config(None, [*TINY_3D, "train.epochs=12", "train.lr=0.01", "train.warmup_epochs=0", "train.val_every=1",
                             "train.tensorboard=false", "train.compile=off"])
    results = run_training(data, tmp_path / "run", "0", cfg)
    saved = runs.read_config(tmp_path / "run")
    assert saved.model.dims == 3 and saved.train.pixel_spacing > 0 and saved.train.slice_spacing == 4.0  # the data's
    weights = torch.load(tmp_path / "run" / "fold_0" / "best.pt", weights_only=True)["model"]
    assert any(v.ndim == 5 for v in weights.values())  # 3D convolutions
    dice = results[0].dice_best
    assert max(dice.values()) > 0.5  # it learnt something: the comparison below is not of two empty masks
    rows = run_inference(tmp_path / "run", data, tmp_path / "out", patients=",".join(sorted(dice)), fold="0",
                         overrides=["infer.amp=off", "infer.crf_weight=0"])  # validation skips the CRF
    for row in rows:
        assert row["dice"] == pytest.approx(dice[row["case"].removesuffix("_T2SPIR")], abs=1e-6)


@pytest.mark.slow
def test_compare_trains_and_scores_a_3d_configuration(tmp_path):
    """compare counts a 3D network's parameters from the fold's own config, where training has set the
    spacings its plan needs (the configuration file still says auto)."""
    import yaml

    from pipeline.app.compare import run_comparison

    data = make_prepared_dataset(tmp_path / "prepared", n_mr=2, n_ct=2, folds=2)
    config = tmp_path / "tiny3d.yaml"
    overrides = dict(item.split("=", 1) for item in [*TINY_3D, "train.epochs=2", "train.val_every=1",
                                                      "train.warmup_epochs=0", "train.compile=off"])
    nested: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(nested))
    rows = run_comparison(data, [config], tmp_path / "out", folds="0")
    assert rows[0]["config"] == "tiny3d" and rows[0]["model"] == "dynunet" and rows[0]["parameters"] > 0
    assert rows[0]["patients"] == 2 and rows[0]["epochs_per_fold"] == 2
