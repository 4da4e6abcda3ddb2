"""Whole-volume prediction with 2D networks, shared by training validation and `infer`.

Volumes are (1, H, W, D) float32 tensors as produced by `pipeline.model.transforms.deterministic_transforms`
(D = axial slice axis, H, W = the model's roi size); outputs keep that grid.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from pipeline.core.device import autocast_context
from pipeline.core.labels import LIVER


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The data of a MONAI MetaTensor as a plain tensor (networks run much faster on those)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def slice_logits(model: nn.Module, image: torch.Tensor, batch_size: int, device: torch.device,
                 amp: str = "off") -> torch.Tensor:
    """Logits of every axial slice: image (C, H, W, D) -> float32 (K, H, W, D) on the CPU.

    The slices go through the network as batches of `batch_size`. MONAI's SliceInferer gives the
    same numbers (tests/test_infer.py checks it) but runs its sliding-window machinery per slice;
    with the window equal to the whole slice that aggregation is an identity, and it cost a third
    on top of the forward passes.
    The caller sets eval/train mode; this only runs the slices through the model.
    """
    slices = as_slices(image)
    return torch.cat([logits.cpu() for _, logits in _batch_logits(model, slices, batch_size, device, amp)]
                     ).permute(1, 2, 3, 0)


def as_slices(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W, D) volume -> contiguous (D, C, H, W): its axial slices as one batch."""
    if image.ndim != 4:
        raise ValueError(f"predict: expected an image of shape (C, H, W, D), got {tuple(image.shape)}")
    return plain(image).permute(3, 0, 1, 2).contiguous()


def _batch_logits(model: nn.Module, slices: torch.Tensor, batch_size: int, device: torch.device,
                  amp: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice, float32 logits (B, K, H, W) on `device`) for slices (D, C, H, W), `batch_size`
    at a time, under inference mode and the autocast of `amp`."""
    with torch.inference_mode(), autocast_context(device, amp):
        for start in range(0, slices.shape[0], batch_size):
            yield start, model(slices[start:start + batch_size].to(device)).float()


def liver_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) softmax probability of the liver channel. With two channels
    (background, liver) that is the sigmoid of their difference: one channel to exponentiate
    instead of two (tests/test_infer.py compares with torch.softmax); a network of every organ
    (model.organs, labels.ORGANS) takes the full softmax."""
    if logits.shape[1] == 2:
        return torch.sigmoid(logits[:, LIVER] - logits[:, 0])
    if logits.shape[1] <= LIVER:
        raise ValueError(f"predict: expected a model with a liver output (channel {LIVER}), "
                         f"got {logits.shape[1]} outputs")
    return torch.softmax(logits, 1)[:, LIVER]


def zoom_slices(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) slices with their content zoomed by `scale` about the slice centre, same size
    (bilinear; zeros where a shrunk slice leaves its frame). zoom_slices(zoom_slices(x, s), 1 / s)
    lands back on the same pixel grid: the sampling grid is an exact scaling about the centre
    (align_corners=False), where MONAI's Zoom rounds the zoomed size to whole pixels and would
    shift the way back by up to half a pixel."""
    if scale == 1.0:
        return x
    import torch.nn.functional as F

    theta = torch.tensor([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def predict_volume(models: Sequence[nn.Module], image: torch.Tensor, batch_size: int,
                   device: torch.device, amp: str = "off", model_masks: list | None = None,
                   model_confidences: list | None = None, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Liver probability (softmax channel LIVER) averaged over `models`: image (C, H, W, D) -> float32
    (1, H, W, D). Models are put in eval mode and restored afterwards. With a list `model_masks`,
    each model's own liver mask (probability >= 0.5, bool (D, H, W)) is appended to it; with a list
    `model_confidences`, each model's `mask_confidence` of its own probabilities (one model's, not
    the average's: averaging folds softens the probabilities whether or not they are right).
    `scales` (infer.tta_scales): test-time augmentation, each model's probability the mean over the
    slices zoomed by every scale (zoom_slices) and zoomed back; (1.0,) = none.
    """
    if not models:
        raise ValueError("predict: no model to predict with")
    # The slices are gathered into one contiguous batch once for all models (not a strided gather
    # per batch and model). Each batch's logits are turned into liver probabilities and summed as
    # they come (liver_probability), with no concatenated copy of every model's logits (extra
    # passes over memory that had made the network stage measurably slower than the forward passes alone).
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"predict: test-time scales must be positive, got {list(scales)}")
    slices = as_slices(image)
    total = torch.zeros(slices.shape[0], *slices.shape[2:])  # (D, H, W)
    views = [(s, slices if s == 1.0 else zoom_slices(slices, s)) for s in scales]
    mine = torch.zeros(total.shape) if len(views) > 1 else None  # one model's mean over the scales
    for model in models:
        was_training = model.training
        model.eval()
        own = torch.zeros(total.shape, dtype=torch.bool) if model_masks is not None else None
        sums = torch.zeros(3, dtype=torch.float64) if model_confidences is not None else None
        try:
            for scale, view in views:
                for start, logits in _batch_logits(model, view, batch_size, device, amp):
                    probs = liver_probability(logits).cpu()
                    if mine is None:  # no test-time augmentation: straight into the sum
                        _add_model_batch(total, own, sums, start, probs)
                    else:
                        mine[start:start + probs.shape[0]] += zoom_slices(probs[:, None], 1.0 / scale)[:, 0]
            if mine is not None:
                _add_model_batch(total, own, sums, 0, mine.div_(len(views)))
                mine.zero_()
        finally:
            model.train(was_training)
        if own is not None:
            model_masks.append(own)
        if sums is not None:
            model_confidences.append(confidence_from_sums(sums))
    return total.div_(len(models))[None].permute(0, 2, 3, 1)


def _add_model_batch(total: torch.Tensor, own: torch.Tensor | None, sums: torch.Tensor | None, start: int,
                     probs: torch.Tensor) -> None:
    """One model's liver probabilities of slices start.. (B, H, W) into the ensemble's sum, its own
    mask and its confidence sums."""
    total[start:start + probs.shape[0]] += probs
    if sums is not None:
        sums += confidence_sums(probs)
    if own is not None:
        own[start:start + probs.shape[0]] = probs >= 0.5


def source_grid_inverter(transform):
    """MONAI Invertd that maps "pred" back through `transform`, the Compose that made "image".

    Invertd matches the image's applied operations to the very transform objects that made them,
    so build it from the same Compose instance. Probabilities are resampled with the recorded
    (bilinear) mode, not nearest: the hard labels come after, on the source grid.
    """
    from monai.transforms import Invertd

    return Invertd("pred", transform=transform, orig_keys="image", nearest_interp=False)


def to_source_grid(probs: torch.Tensor, image: torch.Tensor, inverter) -> torch.Tensor:
    """Probabilities (C, H, W, D) on the transformed grid of `image` -> the source voxel grid."""
    from monai.data import MetaTensor

    pred = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
    return inverter({"pred": pred, "image": image})["pred"]


def fold_agreement(model_masks: Sequence[torch.Tensor], probs: torch.Tensor) -> float | None:
    """The lowest Dice between one model's own mask and the ensemble's (probs (1, H, W, D) >= 0.5),
    on the model's grid; None with fewer than two models. Low when the folds disagree, which is
    where an ensemble's mask deserves a second look."""
    if len(model_masks) < 2:
        return None
    ensemble = (probs[0] >= 0.5).permute(2, 0, 1)  # (D, H, W), as the masks
    # evaluate.metrics.dice's formula (1 when both are empty), counted once for the ensemble: on CT
    # volumes its general form (a copy of each mask per call) cost a tenth of the network's time
    found = int(torch.count_nonzero(ensemble))

    def agreement(own: torch.Tensor) -> float:
        total = int(torch.count_nonzero(own)) + found
        return 1.0 if total == 0 else 2.0 * int(torch.count_nonzero(own & ensemble)) / total

    return min(agreement(own.bool()) for own in model_masks)


def mask_confidence(probs) -> float | None:
    """How sure the network is of its own mask: the soft Dice between the liver probability and its
    threshold at 0.5, 2 sum(p m) / (sum p + sum m) with m = p >= 0.5, over any array or tensor of
    probabilities. Near 1 when the probabilities sit near 0 and 1, lower when much of the mask, or of
    the probability outside it, is uncertain; it needs one model only, where the fold agreement needs
    two. None when there is no probability mass at all (nothing to be sure of)."""
    return confidence_from_sums(confidence_sums(torch.as_tensor(probs, dtype=torch.float32)))


def confidence_sums(p: torch.Tensor) -> torch.Tensor:
    """mask_confidence's three terms of probabilities p (sum of p inside its mask, sum of p, voxels
    of the mask), float64: they add up over batches of slices."""
    mask = p >= 0.5
    return torch.stack([torch.where(mask, p, 0.0).sum(dtype=torch.float64), p.sum(dtype=torch.float64),
                        mask.sum().to(torch.float64)])


def confidence_from_sums(sums: torch.Tensor) -> float | None:
    total = float(sums[1] + sums[2])
    return None if total == 0 else 2.0 * float(sums[0]) / total


def ensemble_confidence(model_confidences: Sequence[float | None]) -> float | None:
    """The fold models' mean confidence (predict_volume's `model_confidences`), over the models that
    had any probability mass; None when none had."""
    known = [c for c in model_confidences if c is not None]
    return sum(known) / len(known) if known else None


def smoothing_window(neighbours: int) -> int:
    """Slices in the moving average of infer.slice_smoothing = `neighbours` on each side."""
    return 2 * neighbours + 1


def smooth_through_slices(probs: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Liver probability (C, H, W, Z) on the model's grid, each slice averaged with `neighbours` slices
    on each side (a moving average along Z, the volume's end slices repeated; infer.slice_smoothing).

    The 2D network sees one slice at a time, so its masks can jump between slices where the liver's
    tip meets bowel of the same brightness; averaging with the neighbours before the threshold keeps
    what the adjacent slices agree on. A Savitzky-Golay filter of order 0 is that moving average.
    """
    if neighbours <= 0 or probs.shape[-1] < 2:
        return probs
    # A sum of shifted copies along Z (slice-major in memory: each shift is one contiguous block), the
    # ends repeated. MONAI's SavitzkyGolaySmooth of order 0 gives the same numbers (to float rounding,
    # tests/test_infer.py) through a padded 1D convolution that cost 40x as much on a CT volume.
    x = plain(probs).movedim(-1, 0)  # (Z, C, H, W)
    out = x.clone()
    for shift in range(1, neighbours + 1):
        k = min(shift, x.shape[0])
        out[shift:] += x[:-shift]  # the slice `shift` below ...
        out[:k] += x[:1]  # ... or the first slice where there is none
        out[:-shift] += x[shift:]  # the slice `shift` above ...
        out[-k:] += x[-1:]  # ... or the last one
    return out.div_(smoothing_window(neighbours)).movedim(0, -1)
