"""Whole-volume prediction with 2D networks, shared by training validation and `infer`.

Volumes are (1, H, W, D) float32 tensors as produced by `pipeline.transforms.deterministic_transforms`
(D = axial slice axis, H, W = the model's roi size); outputs keep that grid.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise PipelineError(f"config device: {spec!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"config device: {spec!r} requested but CUDA is not available")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX). Elsewhere oneDNN emulates bf16,
    slower than float32, so infer's "auto" keeps float32 there."""
    try:  # private torch helpers (torch.cpu._is_*_supported); if they are gone, assume no
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full float32.

    "auto" is fp16 CUDA AMP on GPU and float32 on CPU (infer's load_run picks bf16 on CPUs that have
    it). bf16 training on CPU is opt-in (train.amp=bf16). Measured on this project's 2-core CPU
    (AVX512-BF16), real MR T2-SPIR, 5 patient-wise folds, 280 epochs: 6.1 instead of 8.5 min per fold
    and per-patient Dice 0.911 +- 0.023 (best checkpoint) / 0.907 (last epoch) against float32's
    0.909 / 0.903, but fold 2 at 0.8997 against 0.9024, just under the 0.90 target; session 1 had
    measured a loss (0.869 vs 0.885, one fold, older recipe). A candidate default, not yet one.
    """
    if amp not in AMP_MODES:
        raise PipelineError(f"config amp: expected one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


@contextlib.contextmanager
def autocast_context(device: torch.device, amp: str) -> Iterator[None]:
    """torch.autocast for `amp` on `device`; a no-op when that resolves to float32."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The data of a MONAI MetaTensor as a plain tensor (networks run much faster on those)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def slice_logits(model: nn.Module, image: torch.Tensor, batch_size: int, device: torch.device,
                 amp: str = "off") -> torch.Tensor:
    """Logits of every axial slice: image (C, H, W, D) -> float32 (K, H, W, D) on the CPU.

    The slices go through the network as batches of `batch_size`. MONAI's SliceInferer gives the
    same numbers (tests/test_infer.py checks it) but runs its sliding-window machinery per slice;
    with the window equal to the whole slice that aggregation is an identity, and it cost a third
    on top of the forward passes (real CT, 78 slices, 5 models, bf16: 0.99 s vs 0.75 s).
    The caller sets eval/train mode; this only runs the slices through the model.
    """
    slices = as_slices(image)
    return torch.cat([logits.cpu() for _, logits in _batch_logits(model, slices, batch_size, device, amp)]
                     ).permute(1, 2, 3, 0)


def as_slices(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W, D) volume -> contiguous (D, C, H, W): its axial slices as one batch."""
    if image.ndim != 4:
        raise PipelineError(f"predict: expected an image of shape (C, H, W, D), got {tuple(image.shape)}")
    return plain(image).permute(3, 0, 1, 2).contiguous()


def _batch_logits(model: nn.Module, slices: torch.Tensor, batch_size: int, device: torch.device,
                  amp: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice, float32 logits (B, K, H, W) on `device`) for slices (D, C, H, W), `batch_size`
    at a time, under inference mode and the autocast of `amp`."""
    with torch.inference_mode(), autocast_context(device, amp):
        for start in range(0, slices.shape[0], batch_size):
            yield start, model(slices[start:start + batch_size].to(device)).float()


def predict_volume(models: Sequence[nn.Module], image: torch.Tensor, batch_size: int,
                   device: torch.device, amp: str = "off") -> torch.Tensor:
    """Liver probability (softmax channel 1) averaged over `models`: image (C, H, W, D) -> float32
    (1, H, W, D). Models are put in eval mode and restored afterwards.
    """
    if not models:
        raise PipelineError("predict: no model to predict with")
    # The slices are gathered into one contiguous batch once for all models (not a strided gather
    # per batch and model). Each batch's logits are turned into liver probabilities and summed as
    # they come: softmax's liver channel is the sigmoid of the logit difference, one channel to
    # exponentiate instead of two (tests/test_infer.py compares with torch.softmax), and no
    # concatenated copy of every model's logits (those extra passes over memory had made the
    # network stage 5% slower than the forward passes alone on a real CT).
    slices = as_slices(image)
    total = torch.zeros(slices.shape[0], *slices.shape[2:])  # (D, H, W)
    for model in models:
        was_training = model.training
        model.eval()
        try:
            for start, logits in _batch_logits(model, slices, batch_size, device, amp):
                if logits.shape[1] != 2:
                    raise PipelineError(f"predict: expected a background/liver model with 2 outputs, "
                                        f"got {logits.shape[1]}")
                total[start:start + logits.shape[0]] += torch.sigmoid(logits[:, 1] - logits[:, 0]).cpu()
        finally:
            model.train(was_training)
    return total.div_(len(models))[None].permute(0, 2, 3, 1)


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


def postprocess(mask: np.ndarray, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Binary liver mask (X, Y, Z) -> cleaned uint8 mask (liver 1): MONAI's KeepLargestConnectedComponent
    and FillHoles, computed as below (equal results, tested).

    What infer writes (infer.largest_component, infer.fill_holes) and what validation scores.

    Both transforms run on the mask's bounding box plus a one-voxel background margin: components
    and enclosed holes are the same there as in the whole volume, at a fraction of the cost
    (a liver fills a few percent of a CT volume).
    """
    out = np.zeros_like(mask, dtype=np.uint8)  # the mask's memory layout (NIfTI's, from infer): no copy when written
    if not mask.any():
        return out
    box = []
    for axis in range(mask.ndim):  # from the projections: np.nonzero on a CT volume took ~0.2 s
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    box = tuple(box)
    crop = np.pad(mask[box].astype(np.uint8), 1)  # the margin also where the box meets the volume's edge
    full = np.ones((3,) * crop.ndim, bool)  # 26-connectivity in 3-D, MONAI's connectivity=3
    if largest_component:
        # What MONAI's KeepLargestConnectedComponent(applied_labels=[1], connectivity=3) does
        # (get_largest_connected_component_mask: label, nothing to do for one component, else keep
        # the first of the argsort of the sizes, reversed), written out so that the labelling runs
        # on the C-ordered view (`_label`): MONAI labels the NIfTI-ordered box as it is, 0.044-0.051 s
        # on the real CT's, against 0.031 s here. The result equals MONAI's (tests/test_infer.py).
        labels, count = _label(crop, full)
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            crop = (labels == np.argsort(sizes)[::-1][0]).astype(np.uint8)
    if fill_holes:
        # MONAI's FillHoles (full connectivity) marks the background reachable from outside by
        # iterated binary dilation, ~0.3 s on a CT liver's box; one labelling of the background does
        # the same in ~0.05 s: with the one-voxel margin, the outside is the component at the corner.
        # The result equals MONAI's (tests/test_infer.py compares them).
        background, _ = _label(crop == 0, full)
        crop = np.where((background > 0) & (background != background[(0,) * crop.ndim]), 1, crop).astype(np.uint8)
    out[box] = crop[1:-1, 1:-1, 1:-1]
    return out


def _label(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy.ndimage.label, run on the C-ordered view of a Fortran-ordered (NIfTI-layout) mask.

    scipy walks the array in C order; on a Fortran-ordered CT liver box that took 0.044 s, on its
    transpose (a view of the same memory) 0.031 s. The components are the same, the neighbourhood
    being symmetric under the transpose, so the labels are transposed back as a view.
    """
    from scipy import ndimage

    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        labels, count = ndimage.label(mask.T, structure=structure.T)
        return labels.T, count
    return ndimage.label(mask, structure=structure)

