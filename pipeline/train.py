"""Train the slice-wise 2D network on prepared NIfTI volumes, one fold or the whole cross-validation.

Reads only the prepared datalist (pipeline.datalist) and the NIfTI files it lists (see
pipeline/transforms.py for the volume conventions). Writes a self-describing run folder through
pipeline.runs (its layout is described there).

Under `torchrun` (WORLD_SIZE > 1) one fold trains with DistributedDataParallel; only rank 0
validates and writes.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import math
import os
import random
import shutil
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline import runs
from pipeline.config import Config, config_to_dict, pixel_spacing_mm, save_config, train_input_size
from pipeline.console import FORMAT as LOG_FORMAT
from pipeline.console import progress, quiet_known_library_noise, terminal_level
from pipeline.datalist import Datalist, read_datalist
from pipeline.device import amp_dtype, autocast_context, cpu_has_native_bf16, resolve_device
from pipeline.errors import PipelineError
from pipeline.io import safe_name, write_text
from pipeline.labels import LIVER, model_output
from pipeline.model import build_loss, build_model, in_channels
from pipeline.postprocess import postprocess
from pipeline.predict import (liver_probability, mask_confidence, plain, slice_logits, smooth_through_slices,
                              source_grid_inverter, to_source_grid)
from pipeline.tracking import EventLog
from pipeline.transforms import ORIENTATION, deterministic_transforms, random_transforms, without_metadata

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data

def reference_transform():
    """The liver mask on the label file's own voxel grid (1, X, Y, Z), for Dice on the source grid."""
    from monai.transforms import Compose, EnsureChannelFirstd, LabelFilterd, LoadImaged

    quiet_known_library_noise()  # LoadImaged builds readers that warn about a codec it never uses
    return Compose([LoadImaged("label", reader="NibabelReader", image_only=True),
                    EnsureChannelFirstd("label"), LabelFilterd("label", applied_labels=[LIVER])])


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, value: float) -> float:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value if self.main else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world


@contextmanager
def distributed(device_spec: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist(), resolve_device(device_spec)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(rank, world, local_rank), device
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- schedule, rng

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


# ----------------------------------------------------------------------------- fold state

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


# ----------------------------------------------------------------------------- epochs

def train_one_epoch(state: FoldState, loader, loss_fn, device, amp: str, scaler, desc: str, show: bool) -> float:
    """One pass over the training volumes; returns the mean loss of this process's batches."""
    state.model.train()
    total, n = 0.0, 0
    bar = progress(loader, desc=desc, leave=False, disable=not show, unit="batch")
    with without_metadata():  # the random chain runs inside the iteration
        for batch in bar:
            image, label = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
            state.optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, amp):
                loss = loss_fn(state.step_model(len(image))(image), label)
            scaler.scale(loss).backward()
            scaler.step(state.optimizer)
            scaler.update()
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(state.module)
            total, n = total + float(loss.item()), n + 1
            bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(1, n)


def validate(model: nn.Module, val_items: list[dict], refs: list, inverter, loss_fn, cfg: Config,
             device, overlays: dict | None = None,
             confidences: dict | None = None) -> tuple[float, dict[str, float], dict[str, float]]:
    """(mean val loss, Dice per patient, raw Dice per patient) on whole held-out volumes.

    Every slice is predicted (slices batched, as SliceInferer would), the liver probability is mapped
    back to the source voxel grid by inverting the resize and reorientation (Invertd), and Dice is
    computed in 3D there against the untouched label; a patient's Dice is the mean over its cases.
    The Dice that counts (best checkpoint, CV summary) is that of the mask `infer` would write, i.e.
    after the config's infer section (slice smoothing, then the mask's post-processing); the raw mask's
    Dice (smoothed, not post-processed) is kept beside it.
    With a dict `overlays`, the first tracking.OVERLAY_PATIENTS patients' overlay images are put in it;
    with a dict `confidences`, each patient's predict.mask_confidence (the model's own probability on
    its grid, before the smoothing, as infer measures it; the mean over the patient's cases).
    """
    from monai.metrics import compute_dice

    from pipeline.tracking import OVERLAY_PATIENTS, overlay

    model.eval()  # the bare network (FoldState.eval_model): no DDP wrapper on the validating rank
    losses, dice_by_patient, raw_by_patient = [], {}, {}
    for item, ref in zip(val_items, refs):
        logits = slice_logits(model, item["image"], cfg.train.batch_size, device, cfg.train.amp)
        with torch.inference_mode():
            losses.append(float(loss_fn(logits[None], plain(item["label"])[None]).item()))
        # only the liver channel goes back (half the resampling), computed as infer computes it
        # (predict.liver_probability: logits (K, H, W, D) as a batch of one -> (1, H, W, D))
        probs = liver_probability(logits[None])
        if confidences is not None:
            confidences.setdefault(item["patient"], []).append(mask_confidence(probs))
        liver = smooth_through_slices(probs, cfg.infer.slice_smoothing)
        if overlays is not None and item["patient"] not in overlays and len(overlays) < OVERLAY_PATIENTS:
            truth_grid = np.asarray(plain(item["label"])[0]) == LIVER  # (H, W, D) on the model's grid
            z = int(np.argmax(truth_grid.sum(axis=(0, 1)))) if truth_grid.any() else truth_grid.shape[2] // 2
            centre = np.asarray(plain(item["image"])[cfg.model.context_slices, :, :, z])  # the slice itself
            # RAS model grid shown radiologically: the patient's right on the left, anterior at the top
            view = [a[:, ::-1].T for a in (centre, truth_grid[:, :, z], np.asarray(liver[0, :, :, z]) >= 0.5)]
            overlays[item["patient"]] = overlay(*view)
        raw = np.asarray(to_source_grid(liver, item["image"], inverter)[0]) >= 0.5
        cleaned = postprocess(raw, cfg.infer.largest_component, cfg.infer.fill_holes)
        truth = ref[None].float()
        for masks, by_patient in ((raw, raw_by_patient), (cleaned, dice_by_patient)):
            pred = torch.as_tensor(np.asarray(masks, dtype=np.float32))[None, None]
            dice = compute_dice(pred, truth, include_background=True, ignore_empty=False)
            by_patient.setdefault(item["patient"], []).append(float(dice.item()))
    model.train()
    if confidences is not None:  # None (no liver probability at all) counts as nothing to be sure of
        confidences.update({p: float(np.mean([c or 0.0 for c in cs])) for p, cs in confidences.items()})
    mean = {p: float(np.mean(d)) for p, d in dice_by_patient.items()}
    return float(np.mean(losses)), mean, {p: float(np.mean(d)) for p, d in raw_by_patient.items()}


# ----------------------------------------------------------------------------- outputs

def write_metrics(path: Path, rows: list[dict], patients: list[str]) -> None:
    columns = ["epoch", "train_loss", "val_loss", "val_dice_mean", *[f"val_dice_{p}" for p in patients],
               "val_raw_dice_mean", "val_confidence_min", "lr", "epoch_time_s"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    write_text(path, buf.getvalue())


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
        f"roi {t.roi_size} ({f'{pixel_spacing_mm(t):g} mm pixels' if pixel_spacing_mm(t) > 0 else 'resized'}), "
        f"{t.slices_per_volume} slices/volume (liver ratio {t.liver_slice_ratio}), "
        f"batch {t.batch_size}, {steps} steps/epoch, {t.epochs} epochs",
        f"loss {t.loss}, {'AdamW' if t.optimizer == 'adamw' else f'SGD (Nesterov, momentum {t.momentum})'} "
        f"lr {t.lr} wd {t.weight_decay}, warm-up {t.warmup_epochs} epochs then {t.schedule}",
    ]
    for line in lines:
        log.info(line)
    if device.type == "cpu" and t.amp == "bf16" and not cpu_has_native_bf16():
        log.warning("train.amp=bf16 on a CPU without AVX512-BF16/AMX: bf16 is emulated there and slower "
                    "than float32; consider --set train.amp=off")


# ----------------------------------------------------------------------------- one fold

def build_loaders(cfg: Config, train: list[dict], val: list[dict], dd: Dist):
    from monai.data import CacheDataset, DataLoader, partition_dataset
    from monai.transforms import Compose

    t = cfg.train  # batch_size is a multiple of slices_per_volume: config.validate
    if dd.world > 1:
        # Each rank caches and draws from its own share; even shares keep step counts equal.
        train = partition_dataset(train, num_partitions=dd.world, shuffle=True, seed=t.seed,
                                  even_divisible=True)[dd.rank]
    organs = cfg.model.organs
    train_tf = Compose(deterministic_transforms(t, with_indices=True, context=cfg.model.context_slices,
                                               keep_organs=organs or t.organ_intensity_prob > 0)
                       + random_transforms(t, modality_channel=cfg.model.modality_channel, organs=organs,
                                           context=cfg.model.context_slices))
    # as_contiguous=False keeps SliceMajord's slice-by-slice layout (CacheDataset would make it C-ordered)
    train_ds = CacheDataset(train, train_tf, cache_rate=t.cache_rate, num_workers=None, progress=False,
                            as_contiguous=False)
    generator = torch.Generator()
    loader = DataLoader(train_ds, batch_size=t.batch_size // t.slices_per_volume, shuffle=True,
                        num_workers=t.num_workers, generator=generator, drop_last=False)
    val_items, refs, val_tf = [], [], Compose(deterministic_transforms(
        t, context=cfg.model.context_slices, modality_channel=cfg.model.modality_channel, keep_organs=organs))
    if dd.main:
        val_ds = CacheDataset(val, val_tf, num_workers=None, progress=False)
        val_items = [val_ds[i] | {"patient": e["patient"]} for i, e in enumerate(val)]
        ref_tf = reference_transform()
        refs = [ref_tf({"label": e["label"]})["label"] > 0 for e in val]
    return train_ds, loader, generator, val_items, refs, val_tf


def make_state(cfg: Config, device, dd: Dist, steps_per_epoch: int) -> FoldState:
    from monai.utils import set_determinism

    set_determinism(seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.train.roi_size).to(device)
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


COMPILE_MIN_STEPS = 1000  # train.compile=auto: a fold of at least this many steps is compiled ...
COMPILE_MIN_BUDGET = 5.0  # ... or one with a budget of at least this many minutes
# (bench/bench_compile.py, session 14, default UNet on real MR, 2-core AVX2 CPU: 1.15-1.25x the slices per
# second of the eager loop; the first compile ~1 minute, seconds from inductor's on-disk cache)


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
    state.compiled, state.compiled_batch = net, cfg.train.batch_size
    log.info("fold %d: network compiled (torch.compile) in %.0f s", fold, time.perf_counter() - t0)


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    dice_best: dict[str, float]
    dice_last: dict[str, float]
    minutes: float


def train_fold(datalist: Datalist, run_dir: Path, fold: int, cfg: Config, dd: Dist, device,
               resume: bool) -> FoldResult:
    fold_dir = runs.fold_dir(run_dir, fold)
    last_path = runs.checkpoint_path(fold_dir, "last")
    cfg = copy.deepcopy(cfg)  # the budget fixes this fold's epochs in its own copy
    if last_path.exists() and not resume:
        raise PipelineError(f"{last_path}: exists; pass --resume to continue this fold or choose another --run-dir")
    train, val = datalist.split(fold)
    patients = datalist.patients(fold)
    if dd.main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    with fold_log_file(fold_dir / runs.TRAIN_LOG, dd.main):
        train_ds, loader, generator, val_items, refs, val_tf = build_loaders(cfg, train, val, dd)
        steps = len(loader)
        compiled = compiles(cfg, device, steps)
        state = make_state(cfg, device, dd, steps)
        if resume and last_path.exists():
            saved = load_checkpoint(last_path, state)
            if state.budget_epochs is not None and cfg.train.budget_minutes > 0:
                fix_epochs(cfg, state, state.budget_epochs, steps)  # the schedule the budget fixed, not a new one
            changes = config_changes(saved, config_to_dict(cfg))
            log.info("fold %d: resumed from %s after epoch %d", fold, last_path, state.epoch)
            if changes:
                log.warning("fold %d: resuming with a changed config: %s", fold, "; ".join(changes))
        elif resume:
            log.warning("fold %d: --resume but %s does not exist; starting from scratch", fold, last_path)
        if dd.main:
            runs.write_fold_metadata(fold_dir, cfg, fold, train, val, datalist.labels, model_output(cfg.model.organs), {
                "ct_window": cfg.train.ct_window, "mr_percentiles": cfg.train.mr_percentiles,
                "roi_size": cfg.train.roi_size, "orientation": ORIENTATION, "output_range": [0.0, 1.0]})
            log_settings(cfg, fold, train, val, device, dd, steps, datalist.folder, fold_dir)
        loss_fn = build_loss(cfg.train)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.train.amp) == torch.float16)
        inverter = source_grid_inverter(val_tf)
        events = EventLog(fold_dir, enabled=dd.main and cfg.train.tensorboard)
        t_start = time.perf_counter()  # the budget counts the compile's time too
        if compiled:
            compile_network(state, cfg, device, fold)
        t_loop = time.perf_counter()  # the budget's calibration times epochs, not the compile
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch + 1
            t0 = time.perf_counter()
            seed_epoch(cfg.train.seed, epoch, dd.rank, train_ds, generator)
            train_loss = dd.mean(train_one_epoch(state, loader, loss_fn, device, cfg.train.amp, scaler,
                                                 f"fold {fold} epoch {epoch}/{cfg.train.epochs}", dd.main))
            row = {"epoch": epoch, "train_loss": round(train_loss, 6), "lr": state.scheduler.get_last_lr()[0]}
            dd.barrier()
            calibrate = budget_calibrates_now(cfg, state, epoch, time.perf_counter() - t_loop)
            if dd.world > 1 and cfg.train.budget_minutes > 0 and state.budget_epochs is None:
                calibrate = dd.from_main(float(calibrate)) > 0.5  # a time, so every rank follows rank 0
            if dd.main and (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs or calibrate):
                t_val = time.perf_counter()
                images = {} if events.writer is not None else None
                confidence: dict = {}
                val_loss, dice, raw = validate(state.eval_model, val_items, refs, inverter, loss_fn, cfg, device,
                                               overlays=images, confidences=confidence)
                events.overlays(images or {}, epoch)
                row |= {"val_loss": round(val_loss, 6), "val_dice_mean": round(float(np.mean(list(dice.values()))), 6),
                        "val_raw_dice_mean": round(float(np.mean(list(raw.values()))), 6),
                        # infer's quality check compares a new mask's confidence with this (infer.load_run)
                        "val_confidence_min": round(min(confidence.values()), 6) if confidence else None}
                row |= {f"val_dice_{p}": round(d, 6) for p, d in dice.items()}
                row["val_time_s"] = round(time.perf_counter() - t_val, 3)
            dd.barrier()
            row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
            state.epoch = epoch
            state.history.append(row)
            if calibrate:
                fit = epochs_within_budget(cfg, state.history, time.perf_counter() - t_start, dd)
                budget = cfg.train.budget_minutes
                fix_epochs(cfg, state, fit, steps)
                log.info("fold %d: train.budget_minutes=%g fits %d epochs: train.epochs fixed to %d", fold, budget,
                         fit, fit)
                if dd.main:
                    save_config(cfg, fold_dir / runs.CONFIG)
            if dd.main:
                finish_epoch(fold_dir, state, row, cfg, patients)
                events.epoch(row, patients)
        minutes = (time.perf_counter() - t_start) / 60
        events.close()
        if dd.main:
            from pipeline.plots import plot_curves

            write_metrics(fold_dir / runs.METRICS, state.history, patients)
            plot_curves(state.history, patients, fold_dir / runs.CURVES, title=f"fold {fold}")
    return fold_result(fold, state, patients, minutes)


CALIBRATION_SHARE = 0.05  # of train.budget_minutes measured before the epochs are fixed


def budget_calibrates_now(cfg: Config, state: FoldState, epoch: int, elapsed_s: float) -> bool:
    """Whether this epoch fixes the budget's epoch count: after the warm-up, once 5% of the budget has
    passed (or one epoch before train.epochs would end the run). Measured over the warm-up alone (two
    epochs, seconds), a moment's load from another process had moved the count by 15% between the
    folds of one run (132-170 epochs at 10 minutes, session 10); the median of the epochs in the first
    30 s of ten minutes is steadier, and the cosine schedule is then barely past its start."""
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


def finish_epoch(fold_dir: Path, state: FoldState, row: dict, cfg: Config, patients: list[str]) -> None:
    """Best checkpoint on a new best mean Dice, last checkpoint always, metrics, summary line."""
    dice = row.get("val_dice_mean")
    if dice is not None and dice > state.best_dice:
        state.best_dice, state.best_epoch = dice, state.epoch
        save_checkpoint(runs.checkpoint_path(fold_dir, "best"), state, cfg)
    save_checkpoint(runs.checkpoint_path(fold_dir, "last"), state, cfg)
    write_metrics(fold_dir / runs.METRICS, state.history, patients)
    val = "" if dice is None else (f"  val loss {row['val_loss']:.4f}  val Dice {dice:.4f}"
                                    f" (raw {row['val_raw_dice_mean']:.4f})")
    log.info("epoch %3d/%d  train loss %.4f%s  lr %.2e  %.1fs  (best %.4f @ %d)", state.epoch, cfg.train.epochs,
             row["train_loss"], val, row["lr"], row["epoch_time_s"], state.best_dice, state.best_epoch)


def fold_result(fold: int, state: FoldState, patients: list[str], minutes: float) -> FoldResult:
    def dice_at(epoch: int) -> dict[str, float]:
        row = next((r for r in state.history if r["epoch"] == epoch), {})
        return {p: row[f"val_dice_{p}"] for p in patients if f"val_dice_{p}" in row}

    last_val = max((r["epoch"] for r in state.history if r.get("val_dice_mean") is not None), default=-1)
    return FoldResult(fold, state.best_epoch, dice_at(state.best_epoch), dice_at(last_val), minutes)


# ----------------------------------------------------------------------------- entry point

def write_cv_summary(run_dir: Path, results: list[FoldResult]) -> None:
    """cv_summary.csv: fold, patient, Dice at the best checkpoint and at the last validation."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "patient", "dice", "dice_last"])
    for r in results:
        for p, d in sorted(r.dice_best.items()):
            writer.writerow([r.fold, p, f"{d:.6f}", f"{r.dice_last.get(p, float('nan')):.6f}"])
    write_text(run_dir / runs.CV_SUMMARY, buf.getvalue())


def format_cv_summary(results: list[FoldResult]) -> str:
    """The cross-validation table: one line per fold, then the means over every patient. The best
    checkpoint is chosen on the validation patients, which flatters it: the last one is beside it."""
    lines = [f"{'fold':>4}  {'patients':>8}  {'best Dice':>9}  {'min':>6}  {'best epoch':>10}  {'last Dice':>9}  "
             f"{'minutes':>7}"]
    best_all, last_all = [], []
    for r in results:
        best, last = list(r.dice_best.values()), list(r.dice_last.values())
        best_all, last_all = best_all + best, last_all + last
        lines.append(f"{r.fold:>4}  {len(best):>8}  {np.mean(best):>9.4f}  {min(best):>6.4f}  {r.best_epoch:>10}  "
                     f"{np.mean(last):>9.4f}  {r.minutes:>7.1f}")
    for name, values in (("best checkpoint", best_all), ("last checkpoint", last_all)):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"all folds, {name}: Dice {np.mean(values):.4f} ± {std:.4f} "
                     f"(mean ± std over {len(values)} patients)")
    return "\n".join(lines)


def auto_pixel_spacing(cfg: Config, entries: list[dict], announce: bool = True) -> Config:
    """`train.pixel_spacing: auto` -> the spacing (mm, 2 decimals) that fits the median field of view of
    the data set's volumes into roi_size (nnU-Net's choice of the median), on a copy of `cfg`.

    Every fold of a run shares it (infer preprocesses a case once for its fold ensemble), so it comes
    from all the volumes, not from one fold's. A model then sees a liver at one size in pixels
    whatever field of view a scanner chose: resizing every slice to roi_size instead shrank livers on
    wider fields of view (real MR padded to 1.5x its field of view lost 0.09 Dice: README).
    Headers only (nibabel reads no voxels); the axes as RAS orientation will put them. `announce`:
    log the choice (one process of several does).
    """
    if cfg.train.pixel_spacing != "auto" or not entries:
        return cfg
    import nibabel as nib

    from pipeline.transforms import in_plane_fov_mm

    per_volume = []
    for e in entries:
        img = nib.load(str(e["image"]))
        fov = in_plane_fov_mm(img.shape, img.affine)
        per_volume.append(max(fov[0] / cfg.train.roi_size[0], fov[1] / cfg.train.roi_size[1]))
    spacing = round(float(np.median(per_volume)), 2)
    if announce:
        log.info("train.pixel_spacing=auto: %.2f mm (the median field of view of %d volumes fits roi %s; volumes "
                 "need %.2f-%.2f mm)", spacing, len(per_volume), cfg.train.roi_size, min(per_volume), max(per_volume))
    cfg = copy.deepcopy(cfg)
    cfg.train.pixel_spacing = spacing
    return cfg


def run_training(data_dir: str | Path, run_dir: str | Path, fold: str | int, cfg: Config,
                 resume: bool = False) -> list[FoldResult]:
    """Train fold `fold` ("0".."k-1") or every fold ("all") of DATA_DIR's datalist into RUN_DIR.

    Returns one FoldResult per fold trained; with "all", RUN_DIR/cv_summary.csv is written too
    (`format_cv_summary` gives the table `run.py` prints).
    """
    run_dir = Path(run_dir)
    datalist = read_datalist(data_dir)
    folds = datalist.parse_folds(fold)
    for e in datalist.entries:
        safe_name(e["patient"], "patient id")  # patients become CSV columns and log lines
    if resume and cfg.train.pixel_spacing == "auto" and (run_dir / runs.CONFIG).is_file():
        # a resumed run keeps the spacing its models were trained at (runs from before "auto" saved 0)
        cfg = copy.deepcopy(cfg)
        cfg.train.pixel_spacing = runs.read_config(run_dir).train.pixel_spacing
    with distributed(cfg.train.device) as (dd, device):
        cfg = auto_pixel_spacing(cfg, datalist.entries, announce=dd.main)
        if dd.main:
            runs.write_run_config(run_dir, cfg)
        results = [train_fold(datalist, run_dir, k, cfg, dd, device, resume) for k in folds]
        if dd.main and str(fold) == "all":
            write_cv_summary(run_dir, results)
    return results
