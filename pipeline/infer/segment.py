"""One volume -> its liver mask on the source grid: the run's transforms, the fold ensemble, the inversion.

The mask has exactly the shape and affine of the image NIfTI that `prepare` (and dcm2niix) writes
for the same series. The model sees the volume through the run's own deterministic transforms
(orientation, normalisation, in-plane resampling); the liver probability goes back to the source grid
through their inverse before the threshold, so nothing is resampled twice and labels are never
interpolated.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline.core.config import pixel_spacing_mm
from pipeline.dicom.volume import Volume
from pipeline.infer.loaded import LoadedRun
from pipeline.infer.qc import flag_mask
from pipeline.model.postprocess import postprocess


class Stages:
    """Seconds spent per stage of one case (reported in inference.json and by bench_infer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def preprocess_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str, reference: bool = False):
    """(Compose, image MetaTensor) of `volume` through the run's deterministic image transforms
    (`reference`: MONAI's own spatial steps instead of InPlaneResampled, for comparisons)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.model.transforms import flips_only, image_transforms

    pre = Compose(image_transforms(run.cfg.train, load=False, context=run.cfg.model.context_slices,
                                   modality_channel=run.cfg.model.modality_channel,
                                   orient_last=pixel_spacing_mm(run.cfg.train) <= 0 and flips_only(affine),
                                   reference=reference))
    image = MetaTensor(torch.as_tensor(volume[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    return pre, pre({"image": image, "modality": modality})["image"]


def network_probs(run: LoadedRun, image, stages: Stages, model_masks: list | None = None,
                  model_confidences: list | None = None):
    """Stage 2: fold-ensemble liver probability (1, H, W, Z) on the model's grid, smoothed through the
    slices (infer.slice_smoothing); each model's own mask appended to `model_masks` when given, for
    the fold agreement, and its confidence to `model_confidences` (both before the smoothing)."""
    from pipeline.model.predict import predict_volume, smooth_through_slices

    with stages("network"):
        probs = predict_volume(run.models, image, batch_size=run.cfg.infer.batch_size, device=run.device,
                               amp=run.cfg.infer.amp, model_masks=model_masks, model_confidences=model_confidences,
                               scales=run.cfg.infer.tta_scales)
        return smooth_through_slices(probs, run.cfg.infer.slice_smoothing)


def checked_network_probs(run: LoadedRun, image, stages: Stages) -> tuple:
    """network_probs with what the quality check needs from the fold models: (probabilities, fold
    agreement (predict.fold_agreement), their mean confidence (predict.ensemble_confidence))."""
    from pipeline.model.predict import ensemble_confidence, fold_agreement

    masks: list = []
    confidences: list = []
    probs = network_probs(run, image, stages, masks, confidences)
    return probs, fold_agreement(masks, probs), ensemble_confidence(confidences)


def liver_on_source_grid(probs, image, transform, shape: tuple[int, ...], stages: Stages) -> np.ndarray:
    """Liver probability (X, Y, Z float32) on the source grid: MONAI Invertd through `transform`,
    the Compose that made `image`."""
    from pipeline.model.predict import source_grid_inverter, to_source_grid

    with stages("invert"):
        inv = to_source_grid(probs, image, source_grid_inverter(transform))
        liver = np.asarray(inv[0], dtype=np.float32)
    if liver.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {liver.shape} != image {tuple(shape)}")
    return liver


def liver_mask_on_source_grid(probs, image, transform, shape: tuple[int, ...], stages: Stages) -> np.ndarray:
    """Boolean liver mask (X, Y, Z), liver probability >= 0.5 on the source grid.

    When the first spatial step was the in-plane resize (train.pixel_spacing 0) or the in-plane
    resampling to the run's pixel spacing (`InPlaneResampled`, axial series), the steps after it are
    undone with MONAI's Invertd on the model's grid and that step by its `inverse_mask`, which
    interpolates only the liver's box (equal to thresholding the full inversion up to float32 rounding
    at 0.5; tests/test_infer.py, tests/test_resample.py). Otherwise: the full inversion, then the
    threshold.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.model.predict import source_grid_inverter
    from pipeline.model.resample import InPlaneResampled
    from pipeline.model.transforms import InPlaneResized

    steps = list(transform.transforms)
    first = [i for i, t in enumerate(steps) if isinstance(t, (InPlaneResized, InPlaneResampled))]
    ops = [op["class"] for op in image.applied_operations]
    if not first or not ops or ops[0] not in ("InPlaneResize", "InPlaneResampled"):
        return liver_on_source_grid(probs, image, transform, shape, stages) >= 0.5
    with stages("invert"):
        pred = MetaTensor(probs, meta=image.meta, applied_operations=list(image.applied_operations))
        later = steps[first[0] + 1:]
        if len(ops) > 1:
            pred = source_grid_inverter(Compose(later))({"pred": pred, "image": image})["pred"]
        step = steps[first[0]]
        mask = step.inverse_mask(pred, 0.5) if isinstance(step, InPlaneResampled) else step.resizer.inverse_mask(pred, 0.5)
    if mask.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {mask.shape} != image {tuple(shape)}")
    return mask


def predict_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str,
                 stages: Stages | None = None) -> np.ndarray:
    """Liver probability (X, Y, Z, float32) on the grid of `volume` (fold ensemble average)."""
    stage = stages or Stages()
    with stage("preprocess"):
        pre, image = preprocess_case(run, volume, affine, modality)
    return liver_on_source_grid(network_probs(run, image, stage), image, pre, volume.shape, stage)


@dataclass
class Segmentation:
    """What one volume yields: the mask infer writes and the API returns, and its quality check."""

    mask: np.ndarray  # (X, Y, Z) on the source grid, 1 = liver, after infer's post-processing
    probs: object  # the fold ensemble's liver probability on the model's grid (1, H, W, Z), smoothed
    liver_ml: float
    agreement: float | None  # predict.fold_agreement (None with one model)
    confidence: float | None  # the fold models' mean predict.mask_confidence
    flags: list[str] = field(default_factory=list)  # quality_flags and cropped_liver: why to look before trusting


def segment_volume(run: LoadedRun, volume: Volume, modality: str, name: str,
                   stages: Stages | None = None) -> Segmentation:
    """The one path from a volume to its liver mask, used by infer, the Python API, the viewer and the
    benches: the run's deterministic transforms, the fold ensemble (smoothed through the slices), the
    liver probability back on the source grid, thresholded at 0.5, post-processed (infer section), and
    the quality check (a warning line naming `name` when it flags anything). Seconds per stage go to
    `stages` (preprocess, network, invert, postprocess)."""
    import torch

    stages = stages if stages is not None else Stages()
    with torch.inference_mode():
        with stages("preprocess"):
            transform, image = preprocess_case(run, volume.array, volume.affine, modality)
        probs, agreement, confidence = checked_network_probs(run, image, stages)
        raw = liver_mask_on_source_grid(probs, image, transform, volume.array.shape, stages)
    with stages("postprocess"):
        mask = postprocess(raw, run.cfg.infer.largest_component, run.cfg.infer.fill_holes)
    liver_ml = float(mask.sum() * volume.voxel_ml)
    flags = flag_mask(run, name, liver_ml, agreement, confidence, probs, volume.array.shape, volume.affine)
    return Segmentation(mask, probs, liver_ml, agreement, confidence, flags)
