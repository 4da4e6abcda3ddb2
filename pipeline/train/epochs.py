"""One epoch of training, and the validation on whole held-out volumes."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config
from pipeline.core.console import progress
from pipeline.core.device import autocast_context
from pipeline.core.labels import LIVER
from pipeline.evaluate.metrics import dice
from pipeline.model.inversion import ViewProbs, source_masks
from pipeline.model.predict import liver_probability, mask_confidence, plain, slice_logits, smooth_through_slices
from pipeline.model.transforms import without_metadata
from pipeline.train.state import FoldState


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


def validate(model: nn.Module, val_items: list[dict], refs: list, transforms, loss_fn, cfg: Config,
             device, overlays: dict | None = None,
             confidences: dict | None = None) -> tuple[float, dict[str, float], dict[str, float]]:
    """(mean val loss, Dice per patient, raw Dice per patient) on whole held-out volumes.

    Every slice is predicted (slices batched, as SliceInferer would), the liver probability is mapped
    back to the source voxel grid by inverting the resize and reorientation (Invertd), and Dice is
    computed in 3D there against the untouched label; a patient's Dice is the mean over its cases.
    With several views (model.views; an item's "views" lists (view, transformed item) and
    `transforms` maps each view to the Compose that made it), each view is predicted along its own
    slices and their probabilities averaged on the source grid, as infer does.
    The Dice that counts (best checkpoint, CV summary) is that of the mask `infer` would write, i.e.
    after the config's infer section (slice smoothing, then the mask's post-processing), but without the
    CRF (infer.crf_weight: a few tenths of a second per patient at every validation would come out of the
    training budget); the raw mask's Dice (smoothed, not post-processed) is kept beside it.
    With a dict `overlays`, the first tracking.OVERLAY_PATIENTS patients' overlay images are put in it
    (from the first view); with a dict `confidences`, each patient's predict.mask_confidence (the model's
    own probability on its grid, before the smoothing, as infer measures it; the mean over the patient's
    cases and views).
    """
    model.eval()  # the bare network (FoldState.eval_model): no DDP wrapper on the validating rank
    losses, dice_by_patient, raw_by_patient = [], {}, {}
    if not isinstance(transforms, dict):  # one Compose: the axial view alone
        transforms = {"axial": transforms}
    for item, ref in zip(val_items, refs):
        parts = []
        for view, view_item in item.get("views", [("axial", item)]):
            if cfg.model.dims == 3:  # whole volumes by sliding windows (pipeline.model.volumetric)
                from pipeline.model.volumetric import volume_logits

                logits = volume_logits(model, view_item["image"], cfg, cfg.train.batch_3d, device, cfg.train.amp)
            else:
                logits = slice_logits(model, view_item["image"], cfg.train.batch_size, device, cfg.train.amp)
            with torch.inference_mode():
                losses.append(float(loss_fn(logits[None], plain(view_item["label"])[None]).item()))
            # only the liver channel goes back (half the resampling), computed as infer computes it
            # (predict.liver_probability: logits (K, H, W, D) as a batch of one -> (1, H, W, D))
            probs = liver_probability(logits[None])
            if confidences is not None:
                confidences.setdefault(item["patient"], []).append(mask_confidence(probs))
            liver = smooth_through_slices(probs, cfg.infer.slice_smoothing if cfg.model.dims == 2 else 0)
            if overlays is not None and not parts:
                _add_overlay(overlays, item["patient"], view_item, liver, cfg.model.context_slices)
            parts.append(ViewProbs(liver, view_item["image"], transforms[view]))
        # back on the label's grid the way infer does it (each view through the Compose that made it)
        raw, cleaned = source_masks(parts, tuple(ref.shape[1:]), cfg.infer)
        for masks, by_patient in ((raw, raw_by_patient), (cleaned, dice_by_patient)):
            by_patient.setdefault(item["patient"], []).append(dice(masks, ref[0]))
    model.train()
    if confidences is not None:  # None (no liver probability at all) counts as nothing to be sure of
        confidences.update({p: float(np.mean([c or 0.0 for c in cs])) for p, cs in confidences.items()})
    mean = {p: float(np.mean(d)) for p, d in dice_by_patient.items()}
    return float(np.mean(losses)), mean, {p: float(np.mean(d)) for p, d in raw_by_patient.items()}


def _add_overlay(overlays: dict, patient: str, item: dict, liver, context: int) -> None:
    """The patient's overlay image (truth and mask on the slice with the most liver), for TensorBoard."""
    from pipeline.train.tracking import OVERLAY_PATIENTS, overlay

    if patient in overlays or len(overlays) >= OVERLAY_PATIENTS:
        return
    truth_grid = np.asarray(plain(item["label"])[0]) == LIVER  # (H, W, D) on the model's grid
    z = int(np.argmax(truth_grid.sum(axis=(0, 1)))) if truth_grid.any() else truth_grid.shape[2] // 2
    centre = np.asarray(plain(item["image"])[context, :, :, z])  # the slice itself
    # RAS model grid shown radiologically: the patient's right on the left, anterior at the top
    view = [a[:, ::-1].T for a in (centre, truth_grid[:, :, z], np.asarray(liver[0, :, :, z]) >= 0.5)]
    overlays[patient] = overlay(*view)
