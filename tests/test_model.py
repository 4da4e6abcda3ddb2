"""Network and loss built from the config (pipeline/model/networks.py)."""

import dataclasses

import pytest
import torch
from torch import nn

from pipeline.core.config import ModelConfig, TrainConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.model.networks import build_loss, build_model


def small_model_config(**changes) -> ModelConfig:
    """A tiny UNet so that every test builds and runs it in milliseconds."""
    cfg = ModelConfig(channels=[4, 8], strides=[2], num_res_units=0, dropout=0.0, norm="instance")
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------- build_model


@pytest.mark.parametrize("context_slices,modality_channel,in_channels", [
    (0, False, 1),
    (0, True, 2),
    (1, False, 3),
    (2, True, 6),
])
def test_model_takes_one_channel_per_slice_of_context_plus_modality_and_returns_two_logit_channels(
        context_slices, modality_channel, in_channels):
    model = build_model(small_model_config(context_slices=context_slices, modality_channel=modality_channel))
    model.eval()
    x = torch.rand(3, in_channels, 16, 16)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 2, 16, 16)
    assert y.dtype == torch.float32


def test_model_rejects_an_input_with_a_channel_count_other_than_the_configured_one():
    model = build_model(small_model_config(context_slices=1, modality_channel=True))  # expects 4 channels
    model.eval()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            model(torch.rand(1, 3, 16, 16))


# The shape checks run when the config is loaded (config.validate), so that a bad value stops a
# command before any data is read; build_model itself trusts a loaded config.


@pytest.mark.parametrize("channels,strides", [
    ("[4, 8]", "[2, 2]"),
    ("[4, 8, 16]", "[2]"),
    ("[4, 8]", "[]"),
])
def test_model_config_with_strides_not_matching_the_channel_levels_is_an_error_naming_model_strides(
        channels, strides):
    with pytest.raises(PipelineError, match=r"model\.strides"):
        load_config(overrides=[f"model.channels={channels}", f"model.strides={strides}"])


def test_a_model_with_a_single_level_is_an_error_naming_model_channels():
    with pytest.raises(PipelineError, match=r"model\.channels: expected at least 2 levels"):
        load_config(overrides=["model.channels=[4]", "model.strides=[]"])


def test_strides_are_checked_only_for_the_networks_that_use_them():
    cfg = load_config(overrides=["model.name=segresnet", "model.channels=[4, 8, 16]"])  # default strides: 4 values
    assert cfg.model.strides == [2, 2, 2, 2]
    with pytest.raises(PipelineError, match=r"model\.strides"):
        load_config(overrides=["model.name=attentionunet", "model.channels=[4, 8, 16]"])


def test_model_config_with_matching_channels_and_strides_loads_and_builds():
    cfg = load_config(overrides=["model.channels=[4, 8, 16]", "model.strides=[2, 2]", "model.num_res_units=0"])
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_model_config_with_negative_context_slices_is_an_error_naming_the_key():
    with pytest.raises(PipelineError, match=r"model\.context_slices"):
        load_config(overrides=["model.context_slices=-1"])


@pytest.mark.parametrize("norm,wanted,unwanted", [
    ("instance", nn.InstanceNorm2d, nn.BatchNorm2d),
    ("batch", nn.BatchNorm2d, nn.InstanceNorm2d),
])
def test_model_uses_the_configured_normalisation_layers(norm, wanted, unwanted):
    model = build_model(small_model_config(norm=norm))
    kinds = [type(m) for m in model.modules()]
    assert wanted in kinds
    assert unwanted not in kinds


@pytest.mark.parametrize("name, act, wanted, unwanted", [
    ("unet", "auto", nn.PReLU, nn.ReLU),
    ("unet", "relu", nn.ReLU, nn.PReLU),
    ("dynunet", "prelu", nn.PReLU, nn.LeakyReLU),
    ("segresnet", "leakyrelu", nn.LeakyReLU, nn.ReLU),
    ("basicunet", "relu", nn.ReLU, nn.LeakyReLU),
])
def test_model_activation_comes_from_the_config(name, act, wanted, unwanted):
    channels = [4, 8, 16, 32, 64] if name == "basicunet" else [4, 8, 16]
    cfg = small_model_config(name=name, act=act, channels=channels, strides=[2] * (len(channels) - 1))
    kinds = {type(m) for m in build_model(cfg, (32, 32)).modules()}
    assert wanted in kinds
    assert unwanted not in kinds


@pytest.mark.parametrize("p", [0.1, 0.37])
def test_model_dropout_probability_comes_from_the_config(p):
    model = build_model(small_model_config(dropout=p))
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts, "no dropout layer in the network"
    assert all(d.p == pytest.approx(p) for d in dropouts)


def test_model_with_dropout_zero_is_deterministic_in_training_mode():
    torch.manual_seed(0)
    model = build_model(small_model_config(dropout=0.0, norm="instance"))
    model.train()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_model_with_dropout_is_random_in_training_mode_and_not_in_eval_mode():
    torch.manual_seed(0)
    model = build_model(small_model_config(dropout=0.5, norm="instance"))
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------- build_loss


def label_and_logits(margin: float = 8.0):
    """A (2, 1, 16, 16) 0/1 label (second slice without liver) and logits that agree with it."""
    label = torch.zeros(2, 1, 16, 16)
    label[0, 0, 4:12, 3:10] = 1
    fg = label[:, 0] * 2 - 1  # +1 on liver, -1 elsewhere
    logits = torch.stack([-margin * fg, margin * fg], dim=1)
    return label, logits


def hand_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of -log softmax(logits)[true class]."""
    log_p = logits.log_softmax(dim=1)
    target = label[:, 0].long()
    return -log_p.gather(1, target[:, None]).mean()


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal", "bce"])
def test_loss_is_lower_for_a_correct_prediction_than_for_an_inverted_one(loss):
    fn = build_loss(TrainConfig(loss=loss))
    label, good = label_and_logits()
    bad = good.flip(1)  # swap background and liver logits
    l_good, l_bad = fn(good, label).item(), fn(bad, label).item()
    assert l_good < 0.05
    assert l_bad > 0.5
    assert l_good < l_bad


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal", "bce"])
def test_loss_is_differentiable_with_respect_to_the_logits(loss):
    fn = build_loss(TrainConfig(loss=loss))
    label, logits = label_and_logits(margin=0.5)
    logits = logits.clone().requires_grad_(True)
    fn(logits, label).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bce_loss_is_plain_cross_entropy_without_a_dice_term():
    torch.manual_seed(0)
    label, _ = label_and_logits()
    logits = torch.randn(2, 2, 16, 16)
    got = build_loss(TrainConfig(loss="bce"))(logits, label)
    assert got.item() == pytest.approx(hand_cross_entropy(logits, label).item(), abs=1e-6)


def test_dice_ce_loss_adds_a_batch_dice_term_to_cross_entropy():
    # Dice is pooled over the whole batch (batch=True): with a slice that has no liver, a
    # per-slice Dice would give a very different value.
    torch.manual_seed(0)
    label, _ = label_and_logits()
    logits = torch.randn(2, 2, 16, 16)
    got = build_loss(TrainConfig(loss="dice_ce"))(logits, label).item()

    prob = logits.softmax(dim=1)
    onehot = torch.cat([1 - label, label], dim=1)
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice_loss = (1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()
    want = hand_cross_entropy(logits, label) + dice_loss
    assert got == pytest.approx(want.item(), abs=1e-5)
    # and it really is not the cross-entropy alone
    assert abs(got - hand_cross_entropy(logits, label).item()) > 0.1


def test_the_three_losses_are_different_functions():
    torch.manual_seed(0)
    label, _ = label_and_logits()
    logits = torch.randn(2, 2, 16, 16)
    values = {name: build_loss(TrainConfig(loss=name))(logits, label).item() for name in ("dice_ce", "dice_focal", "bce")}
    assert len({round(v, 4) for v in values.values()}) == 3, values
