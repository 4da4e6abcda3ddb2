"""What a fold records as it trains: metrics.csv, train.log, the settings it ran with."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core import runs
from pipeline.core.config import Config, pixel_spacing_mm
from pipeline.core.console import FORMAT as LOG_FORMAT
from pipeline.core.console import terminal_level
from pipeline.core.device import amp_dtype, cpu_has_native_bf16
from pipeline.train.distributed import Dist
from pipeline.train.state import FoldState, save_checkpoint

log = logging.getLogger(__name__)


@contextmanager
def fold_log_file(path: Path, enabled: bool) -> Iterator[None]:
    """Copy everything the "pipeline" loggers say during this fold into train.log."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("pipeline")
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    # Under a command, INFO reaches the file whatever the terminal shows (-q quiets the terminal, not
    # the run's record; the terminal's handler keeps the command's level: console.command_output).
    # From Python, the caller's logging set-up decides, as for every other logger.
    level = logger.level
    if terminal_level() is not None and not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)
        handler.close()


def log_settings(cfg: Config, fold: int, train: list[dict], val: list[dict], device, dd: Dist, steps: int,
                 data_dir: Path, fold_dir: Path) -> None:
    t, m = cfg.train, cfg.model
    lines = [
        f"data {data_dir} -> {fold_dir}",
        f"fold {fold}: {len(train)} training cases ({len({e['patient'] for e in train})} patients), "
        f"{len(val)} validation cases ({', '.join(sorted({e['patient'] for e in val}))})",
        f"device {device}, amp {t.amp} ({str(amp_dtype(device, t.amp) or 'float32').removeprefix('torch.')}), "
        f"processes {dd.world}, seed {t.seed}",
        f"model {m.name} channels {m.channels} strides {m.strides} res_units {m.num_res_units} "
        f"dropout {m.dropout} norm {m.norm}" + (", modality channel" if m.modality_channel else ""),
        (f"3D patches {t.patch_3d} of {pixel_spacing_mm(t):g} x {pixel_spacing_mm(t):g} x {t.slice_spacing} mm voxels, "
         f"batch {t.batch_3d}, {steps} steps/epoch, {t.epochs} epochs" if m.dims == 3 else
         f"roi {t.roi_size} ({f'{pixel_spacing_mm(t):g} mm pixels' if pixel_spacing_mm(t) > 0 else 'resized'}), "
         f"{t.slices_per_volume} slices/volume (liver ratio {t.liver_slice_ratio}), "
         f"batch {t.batch_size}, {steps} steps/epoch, {t.epochs} epochs"
         + (f", views {', '.join(m.views)}" if m.views != ["axial"] else "")),
        f"loss {t.loss}, {'AdamW' if t.optimizer == 'adamw' else f'SGD (Nesterov, momentum {t.momentum})'} "
        f"lr {t.lr} wd {t.weight_decay}, warm-up {t.warmup_epochs} epochs then {t.schedule}",
    ]
    for line in lines:
        log.info(line)
    if device.type == "cpu" and t.amp == "bf16" and not cpu_has_native_bf16():
        log.warning("train.amp=bf16 on a CPU without AVX512-BF16/AMX: bf16 is emulated there and slower "
                    "than float32; consider --set train.amp=off")


def finish_epoch(fold_dir: Path, state: FoldState, row: dict, cfg: Config, patients: list[str]) -> None:
    """Best checkpoint on a new best mean Dice, last checkpoint always, metrics, summary line."""
    dice = row.get("val_dice_mean")
    if runs.improves(row, state.best_dice):
        state.best_dice, state.best_epoch = dice, state.epoch
        save_checkpoint(runs.checkpoint_path(fold_dir, "best"), state, cfg)
    save_checkpoint(runs.checkpoint_path(fold_dir, "last"), state, cfg)
    runs.write_metrics(fold_dir, state.history, patients)
    val = "" if dice is None else (f"  val loss {row['val_loss']:.4f}  val Dice {dice:.4f}"
                                    f" (raw {row['val_raw_dice_mean']:.4f})")
    log.info("epoch %3d/%d  train loss %.4f%s  lr %.2e  %.1fs  (best %.4f @ %d)", state.epoch, cfg.train.epochs,
             row["train_loss"], val, row["lr"], row["epoch_time_s"], state.best_dice, state.best_epoch)
