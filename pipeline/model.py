"""Network and loss built from the config: a MONAI 2D UNet on single-channel axial slices.

Input (B, 1, H, W) float32 intensities in about [0, 1]; output (B, 2, H, W) logits, channel 0
background, channel 1 liver. Every loss below takes those logits and a (B, 1, H, W) label of 0/1.
"""
from __future__ import annotations

from torch import nn
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.networks.nets import UNet

from pipeline.config import ModelConfig, TrainConfig
from pipeline.labels import MODEL_OUTPUT

NUM_CLASSES = len(MODEL_OUTPUT)  # background, liver
NORMS = {"instance": "INSTANCE", "batch": "BATCH"}


def build_model(cfg: ModelConfig) -> nn.Module:
    """MONAI UNet(spatial_dims=2, in_channels=1 + 2 * context_slices (+ 1 with modality_channel),
    out_channels=2) shaped by `cfg` (checked when the config was loaded: config.validate)."""
    return UNet(
        spatial_dims=2, in_channels=1 + 2 * cfg.context_slices + int(cfg.modality_channel), out_channels=NUM_CLASSES,
        channels=tuple(cfg.channels), strides=tuple(cfg.strides), num_res_units=cfg.num_res_units,
        dropout=cfg.dropout, norm=NORMS[cfg.norm],
    )


def build_loss(cfg: TrainConfig) -> nn.Module:
    """dice_ce (default) | dice_focal | bce.

    "bce" keeps the two-channel output and uses cross-entropy alone: softmax over two logits is
    a sigmoid of their difference, so this is binary cross-entropy without changing the model or
    the prediction code that the other losses share.
    """
    # batch=True: Dice over the whole batch of slices (nnU-Net's "batch dice"); per-slice Dice is
    # erratic on the many slices with little or no liver.
    if cfg.loss == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    if cfg.loss == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, batch=True)
    if cfg.loss == "bce":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)
    raise ValueError(f"loss {cfg.loss!r} is not dice_ce | dice_focal | bce")
