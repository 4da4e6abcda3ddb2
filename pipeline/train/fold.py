"""One fold of the slice-wise 2D network: its loaders, its epochs with validation and checkpoints, its result.

Reads only the prepared datalist (pipeline.datasets.datalist) and the NIfTI files it lists (see
pipeline/model/transforms.py for the volume conventions). Writes a self-describing run folder through
pipeline.core.runs (its layout is described there).

Under `torchrun` (WORLD_SIZE > 1) one fold trains with DistributedDataParallel; only rank 0
validates and writes.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core import runs
from pipeline.core.config import Config, config_to_dict, save_config
from pipeline.core.console import quiet_known_library_noise
from pipeline.core.device import amp_dtype
from pipeline.core.errors import PipelineError
from pipeline.core.labels import LIVER
from pipeline.datasets.datalist import Datalist
from pipeline.model.networks import build_loss
from pipeline.model.transforms import deterministic_transforms, random_transforms
from pipeline.train.budget import budget_calibrates_now, compile_network, compiles, epochs_within_budget, fix_epochs
from pipeline.train.distributed import Dist
from pipeline.train.epochs import train_one_epoch, validate
from pipeline.train.records import finish_epoch, fold_log_file, log_settings
from pipeline.train.state import FoldState, config_changes, load_checkpoint, make_state, seed_epoch
from pipeline.train.tracking import EventLog

log = logging.getLogger(__name__)


def reference_transform():
    """The liver mask on the label file's own voxel grid (1, X, Y, Z), for Dice on the source grid."""
    from monai.transforms import Compose, EnsureChannelFirstd, LabelFilterd, LoadImaged

    quiet_known_library_noise()  # LoadImaged builds readers that warn about a codec it never uses
    return Compose([LoadImaged("label", reader="NibabelReader", image_only=True),
                    EnsureChannelFirstd("label"), LabelFilterd("label", applied_labels=[LIVER])])


def build_loaders(cfg: Config, train: list[dict], val: list[dict], dd: Dist):
    from monai.data import CacheDataset, DataLoader, partition_dataset

    t = cfg.train  # batch_size is a multiple of slices_per_volume: config.validate
    if dd.world > 1:
        # Each rank caches and draws from its own share; even shares keep step counts equal.
        train = partition_dataset(train, num_partitions=dd.world, shuffle=True, seed=t.seed,
                                  even_divisible=True)[dd.rank]
    if cfg.model.dims == 3:
        train_ds, volumes_per_step, val_tfs = _datasets_3d(cfg, train)
    else:
        train_ds, volumes_per_step, val_tfs = _datasets_2d(cfg, train)
    generator = torch.Generator()
    loader = DataLoader(train_ds, batch_size=volumes_per_step, shuffle=True, num_workers=t.num_workers,
                        generator=generator, drop_last=False)
    val_items, refs = [], []
    if dd.main:
        views = list(val_tfs)
        val_ds = {view: CacheDataset(val, tf, num_workers=None, progress=False) for view, tf in val_tfs.items()}
        # one item per case: the first view's transformed volume, and every view's in "views"
        val_items = [val_ds[views[0]][i] | {"patient": e["patient"], "views": [(v, val_ds[v][i]) for v in views]}
                     for i, e in enumerate(val)]
        ref_tf = reference_transform()
        refs = [ref_tf({"label": e["label"]})["label"] > 0 for e in val]
    return train_ds, loader, generator, val_items, refs, val_tfs


def _datasets_2d(cfg: Config, train: list[dict]):
    """(training dataset, volumes per step, validation Compose per view) of the slice-wise network:
    each of model.views draws its slices from its own cached volumes."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    t, organs = cfg.train, cfg.model.organs
    per_view = []
    for view in cfg.model.views:
        train_tf = Compose(deterministic_transforms(t, with_indices=True, context=cfg.model.context_slices,
                                                   keep_organs=organs or t.organ_intensity_prob > 0, view=view)
                           + random_transforms(t, modality_channel=cfg.model.modality_channel, organs=organs,
                                               context=cfg.model.context_slices))
        # as_contiguous=False keeps SliceMajord's slice-by-slice layout (CacheDataset would make it C-ordered)
        per_view.append(CacheDataset(train, train_tf, cache_rate=t.cache_rate, num_workers=None, progress=False,
                                     as_contiguous=False))
    val_tfs = {view: Compose(deterministic_transforms(t, context=cfg.model.context_slices, view=view,
                                                      modality_channel=cfg.model.modality_channel, keep_organs=organs))
               for view in cfg.model.views}
    train_ds = per_view[0] if len(per_view) == 1 else ViewsDataset(per_view)
    return train_ds, t.batch_size // t.slices_per_volume, val_tfs


def _datasets_3d(cfg: Config, train: list[dict]):
    """_datasets_2d for model.dims 3: cached volumes at the 3D spacing, one random patch per volume and
    draw, train.batch_3d volumes per step; validation on whole volumes (pipeline.model.volumetric)."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    from pipeline.model.volumetric import deterministic_transforms_3d, random_transforms_3d

    t, organs = cfg.train, cfg.model.organs
    train_tf = Compose(deterministic_transforms_3d(t, keep_organs=organs or t.organ_intensity_prob > 0,
                                                   with_indices=True)
                       + random_transforms_3d(t, modality_channel=cfg.model.modality_channel, organs=organs))
    train_ds = CacheDataset(train, train_tf, cache_rate=t.cache_rate, num_workers=None, progress=False)
    val_tf = Compose(deterministic_transforms_3d(t, modality_channel=cfg.model.modality_channel, keep_organs=organs))
    return train_ds, t.batch_3d, {"axial": val_tf}


class ViewsDataset(torch.utils.data.ConcatDataset):
    """The training slices of several views (model.views) as one dataset: every view's volumes,
    shuffled together by the loader. `set_random_state` gives each view's random chain its own seed
    (MONAI's set_rnd would give every member of a list the same one)."""

    def set_random_state(self, seed: int) -> None:
        from monai.data.utils import set_rnd

        for k, dataset in enumerate(self.datasets):
            set_rnd(dataset, seed + 7919 * k)


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    dice_best: dict[str, float]
    dice_last: dict[str, float]
    minutes: float

def fold_result(fold: int, state: FoldState, patients: list[str], minutes: float) -> FoldResult:
    def dice_at(epoch: int) -> dict[str, float]:
        row = next((r for r in state.history if r["epoch"] == epoch), {})
        return {p: row[f"val_dice_{p}"] for p in patients if f"val_dice_{p}" in row}

    last_val = max((r["epoch"] for r in state.history if r.get("val_dice_mean") is not None), default=-1)
    return FoldResult(fold, state.best_epoch, dice_at(state.best_epoch), dice_at(last_val), minutes)


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
        train_ds, loader, generator, val_items, refs, val_tfs = build_loaders(cfg, train, val, dd)
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
            runs.write_fold_metadata(fold_dir, cfg, fold, train, val)
            log_settings(cfg, fold, train, val, device, dd, steps, datalist.folder, fold_dir)
        loss_fn = build_loss(cfg.train)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.train.amp) == torch.float16)
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
                val_loss, dice, raw = validate(state.eval_model, val_items, refs, val_tfs, loss_fn, cfg, device,
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
            from pipeline.train.curves import plot_curves

            runs.write_metrics(fold_dir, state.history, patients)
            plot_curves(state.history, patients, fold_dir / runs.CURVES, title=f"fold {fold}")
    return fold_result(fold, state, patients, minutes)
