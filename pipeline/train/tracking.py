"""TensorBoard event files beside metrics.csv: `tensorboard --logdir RUN_DIR` compares folds and runs.

Per epoch: train/loss, train/lr, time/epoch_s; per validation: val/loss, val/dice_mean,
val/raw_dice_mean, val_dice/<patient>, and overlays of a few validation patients (the slice with
the most liver on the model's grid: the image in grey, the network's liver in red, the reference
outline in green). An optional dependency: without `tensorboard` (torch.utils.tensorboard) or
`tensorboardX` the run says so in one info line and writes everything else as before.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OVERLAY_PATIENTS = 3  # validation patients drawn as overlay images at each validation


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        return None


class EventLog:
    """Writes the fold's TensorBoard events into `folder` (nothing when disabled or unavailable)."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        writer = _summary_writer()
        if writer is None:
            log.info("TensorBoard event files not written: pip install tensorboard to get them")
            return
        self.writer = writer(log_dir=str(folder))

    def epoch(self, row: dict, patients: list[str]) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for key, tag in (("train_loss", "train/loss"), ("lr", "train/lr"), ("epoch_time_s", "time/epoch_s"),
                         ("val_loss", "val/loss"), ("val_dice_mean", "val/dice_mean"),
                         ("val_raw_dice_mean", "val/raw_dice_mean"), ("val_confidence_min", "val/confidence_min")):
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), step)
        for p in patients:
            if row.get(f"val_dice_{p}") is not None:
                self.writer.add_scalar(f"val_dice/{p}", float(row[f"val_dice_{p}"]), step)

    def overlays(self, images: dict[str, np.ndarray], step: int) -> None:
        if self.writer is None:
            return
        for patient, rgb in images.items():
            self.writer.add_image(f"overlay/{patient}", rgb, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: `image` (H, W, about [0, 1]) in grey, `pred` tinted red, the
    outline of `truth` in green (rows = the model grid's first axis, as stored there)."""
    from scipy import ndimage

    grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    rgb = np.stack([grey, grey, grey], axis=-1)
    pred = np.asarray(pred, dtype=bool)
    rgb[pred] = 0.55 * rgb[pred] + 0.45 * np.array([1.0, 0.1, 0.1], np.float32)
    truth = np.asarray(truth, dtype=bool)
    edge = truth & ~ndimage.binary_erosion(truth)
    rgb[edge] = np.array([0.1, 1.0, 0.1], np.float32)
    return rgb
