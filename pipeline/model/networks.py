"""Networks and losses built from the config: MONAI 2D networks on slices, and MONAI's DynUNet on 3D
patches for model.dims 3 (inputs (B, C, R, A, S), outputs (B, 2, R, A, S); pipeline.model.volumetric).

Input (B, C, H, W) float32 intensities in about [0, 1] (C = 1 + 2 * context_slices + modality
channel); output (B, 2, H, W) logits, channel 0 background, channel 1 liver (with `model.organs`,
(B, 5, H, W): labels.ORGANS, the liver still channel 1). `model.name` picks the
architecture; the run folder's config.yaml records it, so infer rebuilds the same network from the
run alone (runs from before `model.name` existed are plain UNets, the default).
With `model.deep_supervision` (dynunet), training-mode outputs are (B, 1 + levels, 2, H, W): the
full-resolution logits and the upsampled logits of lower decoder levels; eval mode returns the
full-resolution logits only. Every loss below takes either and a (B, 1, H, W) label of class indices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from pipeline.core.config import Config, ModelConfig, TrainConfig
from pipeline.core.plans import plan_dynunet, plan_dynunet_3d
from pipeline.core.labels import model_output

NORMS = {"instance": "INSTANCE", "batch": "BATCH"}
ACTS = {"relu": "RELU", "leakyrelu": "LEAKYRELU", "prelu": "PRELU"}  # model.act -> MONAI's activation name


def in_channels(cfg: ModelConfig) -> int:
    return 1 + 2 * cfg.context_slices + int(cfg.modality_channel)


def network_input(cfg: Config) -> tuple[list[int], tuple[float, ...] | None]:
    """(input size, voxel size in mm or None) that shape the network: the roi for 2D; for 3D
    (model.dims 3) the patch and its spacing, from which the DynUNet's kernels and strides are planned."""
    if cfg.model.dims == 3:
        from pipeline.model.volumetric import spacing_3d

        return list(cfg.train.patch_3d), spacing_3d(cfg.train)
    return list(cfg.train.roi_size), None


def network_spec(cfg: ModelConfig, roi: Sequence[int] = (160, 160),
                 spacing: Sequence[float] | None = None) -> tuple[str, dict]:
    """(MONAI class name in monai.networks.nets, constructor keyword arguments) of the network
    `cfg.name`, shaped by `cfg` (checked when the config was loaded: config.validate). `roi`
    (train.roi_size) is the input size, from which dynunet derives its strides; for a 3D network
    (model.dims 3) the patch and `spacing` its voxel size (network_input). Plain Python values
    (lists, not tuples), so that a MONAI bundle's config can hold them as they are."""
    c_in, norm = in_channels(cfg), NORMS[cfg.norm]
    common = {"spatial_dims": 2, "in_channels": c_in, "out_channels": len(model_output(cfg.organs))}
    act = {} if cfg.act == "auto" else {"act": ACTS[cfg.act]}  # attentionunet has none: config.validate
    if cfg.dims == 3:  # config.validate: dynunet
        kernels, strides = plan_dynunet_3d(roi, spacing, len(cfg.channels))
        return "DynUNet", {**common, "spatial_dims": 3, "kernel_size": kernels, "strides": strides,
                           "upsample_kernel_size": strides[1:], "filters": list(cfg.channels[:len(strides)]),
                           "dropout": cfg.dropout or None, "norm_name": [norm, {"affine": True}],
                           "deep_supervision": cfg.deep_supervision, "deep_supr_num": cfg.deep_supervision_levels,
                           "res_block": cfg.num_res_units > 0,
                           **({"act_name": act["act"]} if act else {})}
    if cfg.name == "unet":
        return "UNet", {**common, "channels": list(cfg.channels), "strides": list(cfg.strides),
                        "num_res_units": cfg.num_res_units, "dropout": cfg.dropout, "norm": norm, **act}
    if cfg.name == "dynunet":
        act = {"act_name": act["act"]} if act else {}
        strides = [list(s) if isinstance(s, (list, tuple)) else s for s in plan_dynunet(roi, len(cfg.channels))]
        return "DynUNet", {**common, "kernel_size": [3] * len(strides), "strides": strides,
                           "upsample_kernel_size": strides[1:], "filters": list(cfg.channels[:len(strides)]),
                           "dropout": cfg.dropout or None, "norm_name": [norm, {"affine": True}],
                           "deep_supervision": cfg.deep_supervision, "deep_supr_num": cfg.deep_supervision_levels,
                           "res_block": cfg.num_res_units > 0, **act}
    if cfg.name == "segresnet":
        levels = len(cfg.channels)  # SegResNet doubles its filters per level from init_filters
        return "SegResNet", {**common, "init_filters": cfg.channels[0], "dropout_prob": cfg.dropout or None,
                             "norm": [norm, {"affine": True}], "blocks_down": [1, *[2] * (levels - 2), 4],
                             "blocks_up": [1] * (levels - 1), **act}
    if cfg.name == "attentionunet":
        # MONAI's AttentionUnet has batch normalisation built in (model.norm does not apply)
        return "AttentionUnet", {**common, "channels": list(cfg.channels), "strides": list(cfg.strides),
                                 "dropout": cfg.dropout}
    if cfg.name == "basicunet":
        return "BasicUNet", {**common, "features": [*cfg.channels, cfg.channels[0]], "norm": [norm, {"affine": True}],
                             "dropout": cfg.dropout, **act}
    raise ValueError(f"model {cfg.name!r} is not one of unet | dynunet | segresnet | attentionunet | basicunet")


def build_model(cfg: ModelConfig, roi: Sequence[int] = (160, 160), spacing: Sequence[float] | None = None) -> nn.Module:
    """The network of `network_spec(cfg, roi, spacing)`."""
    from monai.networks import nets

    name, kwargs = network_spec(cfg, roi, spacing)
    return getattr(nets, name)(**kwargs)


def load_trained_model(cfg: Config, checkpoint: Path, state: dict | None = None) -> nn.Module:
    """The network `cfg` describes with the weights of `checkpoint` (its loaded dict, when the caller
    already has it), in eval mode: what infer and export both load."""
    from pipeline.core import runs

    state = runs.load_checkpoint(checkpoint) if state is None else state
    return runs.load_weights(build_model(cfg.model, *network_input(cfg)), checkpoint, state["model"]).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class DeepSupervised(nn.Module):
    """Wraps a loss for deep supervision: for outputs (B, S, C, H, W) (DynUNet in training mode),
    MONAI's DeepSupervisionLoss sums the loss over the S scales with weights halving per level
    (1, 1/2, 1/4, ...; DynUNet has already upsampled every scale to the label's size); plain
    (B, C, H, W) outputs pass straight through."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        from monai.losses import DeepSupervisionLoss

        self.loss = loss
        self.deep = DeepSupervisionLoss(loss, weight_mode="exp")

    def forward(self, output, target):
        if output.ndim == target.ndim + 1:
            return self.deep(list(output.unbind(dim=1)), target)
        return self.loss(output, target)


def build_loss(cfg: TrainConfig) -> nn.Module:
    """dice_ce (default) | dice_focal | bce, taking plain or deeply supervised outputs.

    "bce" keeps the two-channel output and uses cross-entropy alone: softmax over two logits is
    a sigmoid of their difference, so this is binary cross-entropy without changing the model or
    the prediction code that the other losses share.
    """
    from monai.losses import DiceCELoss, DiceFocalLoss

    # batch=True: Dice over the whole batch of slices (nnU-Net's "batch dice"); per-slice Dice is
    # erratic on the many slices with little or no liver.
    if cfg.loss == "dice_ce":
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    elif cfg.loss == "dice_focal":
        loss = DiceFocalLoss(to_onehot_y=True, softmax=True, batch=True)
    elif cfg.loss == "bce":
        loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)
    else:
        raise ValueError(f"loss {cfg.loss!r} is not dice_ce | dice_focal | bce")
    return DeepSupervised(loss)
