"""A fold's training state: model, optimizer, schedule, random streams; checkpoints that resume it exactly.

Checkpoints hold tensors and plain Python types only and load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core import runs
from pipeline.core.config import Config, config_to_dict
from pipeline.model.networks import build_model, network_input
from pipeline.train.distributed import Dist


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to the peak, then cosine or polynomial (power 0.9, nnU-Net's) decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    raise ValueError(f"schedule {schedule!r} is not cosine | poly")


def rng_state() -> dict:
    """torch / numpy / python RNG states as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def seed_epoch(seed: int, epoch: int, rank: int, dataset, generator: torch.Generator) -> None:
    """Make every random draw of an epoch a function of (seed, epoch, rank) alone.

    Augmentation, sampling order and dropout then do not depend on how the process got here,
    so a resumed run repeats exactly what an uninterrupted run does.
    """
    from monai.data.utils import set_rnd

    epoch_seed = (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed)
    random.seed(epoch_seed)
    generator.manual_seed(epoch_seed)
    set_rnd(dataset, epoch_seed)


@dataclass
class FoldState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # completed epochs
    best_dice: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    ema: nn.Module | None = None  # torch AveragedModel of the weights (train.ema_decay > 0)
    schedule: dict = field(default_factory=dict)  # {"total": steps the LR decays over}; the budget may fix it
    budget_epochs: int | None = None  # epochs that train.budget_minutes fixed (kept by --resume)
    compiled: nn.Module | None = None  # torch.compile of `model` (train.compile), for batches of compiled_batch
    compiled_batch: int = 0  # the batch size it was compiled for

    def step_model(self, batch: int) -> nn.Module:
        """The network a training step of `batch` slices calls: the compiled one (same parameters) for
        the batch size it was compiled for; the plain one for an epoch's smaller last batch, which would
        otherwise compile it again (a minute on a CPU) for a step or two."""
        return self.compiled if self.compiled is not None and batch == self.compiled_batch else self.model

    @property
    def module(self) -> nn.Module:
        """The trained network without its DDP wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as the checkpoint's "model": the weight average when kept."""
        return self.ema.module if self.ema is not None else self.module


def save_checkpoint(path: Path, state: FoldState, cfg: Config) -> None:
    """Weights + optimizer + scheduler + counters + RNG + config, written atomically."""
    payload = {
        # "model" holds the weights to predict with (infer loads it); with a weight average, the
        # raw weights and the average's state are kept too, so that --resume continues both
        "model": state.eval_model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "epoch": state.epoch, "best_dice": state.best_dice,
        "best_epoch": state.best_epoch, "history": state.history, "rng": rng_state(),
        "config": config_to_dict(cfg), "budget_epochs": state.budget_epochs,
    }
    if state.ema is not None:
        payload |= {"train_model": state.module.state_dict(), "ema": state.ema.state_dict()}
    runs.save_checkpoint(path, payload)


def load_checkpoint(path: Path, state: FoldState) -> dict:
    """Restore `state` from `path`; returns the config dict the checkpoint was trained with."""
    ckpt = runs.load_checkpoint(path)
    if state.ema is not None and "ema" in ckpt:
        state.module.load_state_dict(ckpt["train_model"])
        state.ema.load_state_dict(ckpt["ema"])
    else:
        state.module.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.epoch, state.best_dice, state.best_epoch = ckpt["epoch"], ckpt["best_dice"], ckpt["best_epoch"]
    state.history = list(ckpt["history"])
    state.budget_epochs = ckpt.get("budget_epochs")
    set_rng_state(ckpt["rng"])
    return ckpt["config"]


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def make_state(cfg: Config, device, dd: Dist, steps_per_epoch: int) -> FoldState:
    from monai.utils import set_determinism

    set_determinism(seed=cfg.train.seed)
    model = build_model(cfg.model, *network_input(cfg)).to(device)
    if dd.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True,
                                    weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_epochs * steps_per_epoch
    schedule = {"total": cfg.train.epochs * steps_per_epoch}  # read at every step: the budget may fix it later
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup, schedule["total"], cfg.train.schedule))
    state = FoldState(model, optimizer, scheduler, schedule=schedule)
    if cfg.train.ema_decay > 0:  # below 1: config.validate
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        state.ema = AveragedModel(state.module, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                                  use_buffers=True)
    return state
