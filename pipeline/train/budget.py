"""How long a fold trains: `train.budget_minutes` fixes the epochs from the first ones' pace, and
`train.compile` decides whether the network is compiled.
"""
from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import torch

from pipeline.core.config import Config, train_input_size
from pipeline.core.device import autocast_context
from pipeline.model.networks import in_channels
from pipeline.train.distributed import Dist
from pipeline.train.state import FoldState

log = logging.getLogger(__name__)


COMPILE_MIN_STEPS = 1000  # train.compile=auto: a fold of at least this many steps is compiled ...


COMPILE_MIN_BUDGET = 5.0  # ... or one with a budget of at least this many minutes


def compiles(cfg: Config, device, steps_per_epoch: int) -> bool:
    """Whether the training network is compiled (train.compile): `on`, or `auto` where it pays back, a
    fold of COMPILE_MIN_STEPS steps or a budget of COMPILE_MIN_BUDGET minutes, on a CPU with a C++
    compiler (inductor writes C++ for CPUs) or a CUDA GPU. `steps_per_epoch`: this process's (len(loader))."""
    t = cfg.train
    if t.compile != "auto":
        return t.compile == "on"
    if device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False
    if t.budget_minutes > 0:
        return t.budget_minutes >= COMPILE_MIN_BUDGET
    return t.epochs * steps_per_epoch >= COMPILE_MIN_STEPS


def compile_network(state: FoldState, cfg: Config, device, fold: int) -> None:
    """state.compiled = torch.compile(state.model), compiled now, forward and backward, on a batch of
    zeros of the training batch's shape (one graph: dynamic=False; an epoch's smaller last batch runs
    uncompiled, FoldState.step_model), so that the epochs the budget times run compiled from their first step. The weights' buffers
    (batch-norm statistics), the gradients and the random generators are left as they were. Where
    compiling fails (no working compiler), one warning, and the fold trains uncompiled."""
    t0 = time.perf_counter()
    state.model.train()  # the graph of a training step (a change of mode would compile another)
    net = torch.compile(state.model, dynamic=False)
    if cfg.model.dims == 3:
        x = torch.zeros(cfg.train.batch_3d, in_channels(cfg.model), *cfg.train.patch_3d, device=device)
    else:
        x = torch.zeros(cfg.train.batch_size, in_channels(cfg.model), *train_input_size(cfg.train), device=device)
    buffers = [b.detach().clone() for b in state.module.buffers()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast_context(device, cfg.train.amp):
                out = net(x)
            (out.float().sum() * 0.0).backward()
    except Exception as exc:  # inductor's failures are many kinds of error; training goes on uncompiled
        log.warning("fold %d: torch.compile failed (%s); training uncompiled (train.compile=off avoids trying)",
                    fold, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        return
    finally:
        state.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(state.module.buffers(), buffers):
                b.copy_(saved)
    state.compiled, state.compiled_batch = net, len(x)
    log.info("fold %d: network compiled (torch.compile) in %.0f s", fold, time.perf_counter() - t0)


CALIBRATION_SHARE = 0.05  # of train.budget_minutes measured before the epochs are fixed


def budget_calibrates_now(cfg: Config, state: FoldState, epoch: int, elapsed_s: float) -> bool:
    """Whether this epoch fixes the budget's epoch count: after the warm-up, once 5% of the budget has
    passed (or one epoch before train.epochs would end the run). Measured over the warm-up alone (two
    epochs, seconds), a moment's load from another process moves the count between the folds of one
    run; the median of the epochs over the first twentieth of the budget is steadier, and the cosine
    schedule is then barely past its start (docs/decisions.md#epochs-and-budget)."""
    if cfg.train.budget_minutes <= 0 or state.budget_epochs is not None or epoch < max(1, cfg.train.warmup_epochs):
        return False
    return elapsed_s >= CALIBRATION_SHARE * cfg.train.budget_minutes * 60 or epoch >= cfg.train.epochs - 1


def epochs_within_budget(cfg: Config, history: list[dict], elapsed_s: float, dd: Dist) -> int:
    """How many epochs fit train.budget_minutes: the epochs done, plus what the time left buys at the
    measured cost of an epoch (training time, plus a validation every val_every epochs)."""
    train_s = [r["epoch_time_s"] - r.get("val_time_s", 0.0) for r in history]
    per_epoch = dd.mean(float(np.median(train_s))) + dd.from_main(history[-1].get("val_time_s", 0.0)) / cfg.train.val_every
    left = cfg.train.budget_minutes * 60 - dd.mean(elapsed_s)
    return max(len(history), len(history) + int(left // max(per_epoch, 1e-6)))


def fix_epochs(cfg: Config, state: FoldState, epochs: int, steps_per_epoch: int) -> None:
    """Make `epochs` the fold's schedule: the LR decays to zero over it, and the fold's config says
    train.epochs = `epochs` with the budget off, so that a rerun with that config.yaml repeats the
    same schedule; state.budget_epochs, saved in the checkpoints, makes --resume keep it too."""
    cfg.train.epochs = state.budget_epochs = int(epochs)
    cfg.train.budget_minutes = 0.0
    state.schedule["total"] = cfg.train.epochs * steps_per_epoch
