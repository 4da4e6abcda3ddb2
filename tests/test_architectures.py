"""Every architecture of `model.name` through the same code paths: train, resume, infer from the
run folder alone; deep supervision's loss over all scales; runs from before model.name still infer."""
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.core.config import ConfigError, load_config
from pipeline.infer.inference import run_inference
from pipeline.model.networks import DeepSupervised, build_loss, build_model
from pipeline.train.cv import run_training

from helpers import make_prepared_dataset

NAMES = ["unet", "dynunet", "segresnet", "attentionunet", "basicunet"]
SMALL = ["model.channels=[4,8,16,32,64]", "model.strides=[2,2,2,2]", "model.num_res_units=0", "model.dropout=0.0",
         "train.roi_size=[32,32]", "train.slices_per_volume=4", "train.batch_size=4", "train.warmup_epochs=1",
         "train.val_every=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), n_mr=2, n_ct=2, folds=2)


def _overrides(name, *extra):
    ds = ["model.deep_supervision=true", "model.deep_supervision_levels=1"] if name == "dynunet" else []
    return [f"model.name={name}", *SMALL, *ds, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_trains_resumes_and_infers_from_the_run_folder(name, prepared, tmp_path):
    run = tmp_path / "run"
    first = run_training(prepared, run, "0", load_config(None, _overrides(name, "train.epochs=1")))
    assert first[0].best_epoch == 1
    saved = yaml.safe_load((run / "fold_0" / "config.yaml").read_text())
    assert saved["model"]["name"] == name
    # --resume with more epochs continues after epoch 1 with the same network
    resumed = run_training(prepared, run, "0", load_config(None, _overrides(name, "train.epochs=2")), resume=True)
    ckpt = torch.load(run / "fold_0" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and [r["epoch"] for r in ckpt["history"]] == [1, 2]
    assert set(resumed[0].dice_last) == {"CT_1", "MR_1"}
    # infer needs nothing but the run folder: it rebuilds `name` from config.yaml
    rows = run_inference(run, prepared, tmp_path / "out", fold="0", patients="MR_1", overrides=["infer.amp=off"])
    mask = np.asarray(nib.load(tmp_path / "out" / "MR_1_T2SPIR_liver.nii.gz").dataobj)
    assert mask.shape == (40, 36, 10) and rows[0]["case"] == "MR_1_T2SPIR" and np.isfinite(rows[0]["dice"])


def test_deep_supervision_loss_takes_every_scale_with_halving_weights():
    cfg = load_config(None, _overrides("dynunet"))
    model = build_model(cfg.model, cfg.train.roi_size).train()
    out = model(torch.rand(4, 1, 32, 32))
    assert out.shape == (4, 2, 2, 32, 32)  # full resolution + one lower decoder level, both at full size
    label = (torch.rand(4, 1, 32, 32) > 0.5).float()
    loss_fn = build_loss(cfg.train)
    plain = loss_fn.loss
    expected = plain(out[:, 0], label) + 0.5 * plain(out[:, 1], label)
    assert torch.allclose(loss_fn(out, label), expected)
    loss_fn(out, label).backward()
    heads = [p for n, p in model.named_parameters() if n.startswith("deep_supervision_heads")]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    model.eval()
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)  # inference: full resolution only


def test_a_plain_output_is_scored_by_the_plain_loss():
    cfg = load_config(None, SMALL)
    loss_fn = build_loss(cfg.train)
    assert isinstance(loss_fn, DeepSupervised)
    logits, label = torch.randn(2, 2, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert torch.equal(loss_fn(logits, label), loss_fn.loss(logits, label))


@pytest.mark.parametrize("overrides, key", [
    (["model.name=vnet"], "model.name"),
    (["model.name=basicunet", "model.channels=[8,16,32]", "model.strides=[2,2]"], "model.channels"),
    (["model.deep_supervision=true"], "model.deep_supervision"),
    (["model.name=attentionunet", "model.act=relu"], "model.act"),
    (["model.act=gelu"], "model.act"),
    (["model.name=dynunet", "model.deep_supervision=true", "model.deep_supervision_levels=4"],
     "model.deep_supervision_levels"),
])
def test_unknown_names_and_bad_combinations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_run_from_before_model_name_infers_as_a_unet(prepared, tmp_path):
    run = tmp_path / "run"
    run_training(prepared, run, "0", load_config(None, [*SMALL, "train.epochs=1"]))
    before = run_inference(run, prepared, tmp_path / "a", fold="0", patients="MR_1", overrides=["infer.amp=off"])
    for path in [run / "config.yaml", run / "fold_0" / "config.yaml"]:  # as written before model.name existed
        cfg = yaml.safe_load(path.read_text())
        for key in ("name", "deep_supervision", "deep_supervision_levels"):
            del cfg["model"][key]
        path.write_text(yaml.safe_dump(cfg))
    after = run_inference(run, prepared, tmp_path / "b", fold="0", patients="MR_1", overrides=["infer.amp=off"])
    assert after[0]["dice"] == before[0]["dice"]
    a = np.asarray(nib.load(tmp_path / "a" / "MR_1_T2SPIR_liver.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "MR_1_T2SPIR_liver.nii.gz").dataobj)
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_a_network_of_every_organ_learns_them_and_infer_writes_the_liver_alone(prepared, tmp_path):
    """model.organs: five outputs (labels.ORGANS), trained on the organ maps (kidneys and spleen as
    classes of their own, not background); infer thresholds the liver's softmax as before."""
    from pipeline.core.labels import ORGANS
    from pipeline.datasets.datalist import read_datalist
    from pipeline.model.predict import liver_probability
    from pipeline.train.distributed import Dist
    from pipeline.train.fold import build_loaders

    cfg = load_config(None, _overrides("unet", "model.organs=true", "train.epochs=1"))
    assert build_model(cfg.model, cfg.train.roi_size)(torch.rand(2, 1, 32, 32)).shape == (2, len(ORGANS), 32, 32)
    train, val = read_datalist(prepared).split(0)
    train_ds, *_ = build_loaders(cfg, train, val, Dist())
    drawn = {int(v) for i in range(len(train_ds)) for s in train_ds[i] for v in torch.unique(s["label"])}
    assert drawn == set(ORGANS)  # the MR slices bring kidneys (2, 3) and spleen (4) to the loss
    logits = torch.randn(3, len(ORGANS), 4, 4)
    assert torch.allclose(liver_probability(logits), torch.softmax(logits, 1)[:, 1])
    run = tmp_path / "run"
    run_training(prepared, run, "0", cfg)
    rows = run_inference(run, prepared, tmp_path / "out", fold="0", patients="MR_1", overrides=["infer.amp=off"])
    mask = np.asarray(nib.load(tmp_path / "out" / "MR_1_T2SPIR_liver.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1} and np.isfinite(rows[0]["dice"])
