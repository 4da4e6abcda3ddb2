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
from pipeline.infer.qc import flag_mask, member_agreement
from pipeline.model.inversion import (ViewProbs, probability_on_source_grid, views_mask_on_source_grid,
                                      views_on_source_grid)
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


def preprocess_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str, reference: bool = False,
                    view: str = "axial"):
    """(Compose, image MetaTensor) of `volume` through the run's deterministic image transforms for one
    of its model.views (`reference`: MONAI's own spatial steps instead of InPlaneResampled, for comparisons)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.model.transforms import flips_only, image_transforms

    if run.cfg.model.dims == 3:
        from pipeline.model.volumetric import deterministic_transforms_3d

        pre = Compose(deterministic_transforms_3d(run.cfg.train, keys=("image",), load=False,
                                                  modality_channel=run.cfg.model.modality_channel))
    else:
        pre = Compose(image_transforms(run.cfg.train, load=False, context=run.cfg.model.context_slices,
                                       modality_channel=run.cfg.model.modality_channel,
                                       orient_last=pixel_spacing_mm(run.cfg.train) <= 0 and flips_only(affine),
                                       reference=reference, view=view))
    image = MetaTensor(torch.as_tensor(volume[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    return pre, pre({"image": image, "modality": modality})["image"]


def network_probs(run: LoadedRun, image, stages: Stages, model_masks: list | None = None,
                  model_confidences: list | None = None):
    """Stage 2: fold-ensemble liver probability (1, H, W, Z) on the model's grid, smoothed through the
    slices (infer.slice_smoothing), refined with the image (infer.crf_weight > 0: model/crf.py); each
    model's own mask appended to `model_masks` when given, for the fold agreement, and its confidence
    to `model_confidences` (both before the smoothing)."""
    from pipeline.model.crf import refine_probs
    from pipeline.model.predict import predict_volume, smooth_through_slices

    with stages("network"):
        if run.cfg.model.dims == 3:  # sliding windows over the volume; nothing to smooth through slices
            from pipeline.model.volumetric import predict_volume_3d

            probs = predict_volume_3d(run.models, image, run.cfg, run.device, run.cfg.infer.amp, model_masks,
                                      model_confidences)
        else:
            probs = predict_volume(run.models, image, batch_size=run.cfg.infer.batch_size, device=run.device,
                                   amp=run.cfg.infer.amp, model_masks=model_masks,
                                   model_confidences=model_confidences, scales=run.cfg.infer.tta_scales)
            probs = smooth_through_slices(probs, run.cfg.infer.slice_smoothing)
    if run.cfg.infer.crf_weight <= 0:
        return probs
    with stages("crf"):
        return refine_probs(probs, image, run.cfg.infer.crf_weight, run.cfg.model.context_slices)


def checked_network_probs(run: LoadedRun, image, stages: Stages) -> tuple:
    """network_probs with what the quality check needs from the fold models: (probabilities, fold
    agreement (predict.fold_agreement), their mean confidence (predict.ensemble_confidence))."""
    from pipeline.model.predict import ensemble_confidence, fold_agreement

    masks: list = []
    confidences: list = []
    probs = network_probs(run, image, stages, masks, confidences)
    return probs, fold_agreement(masks, probs), ensemble_confidence(confidences)


def predict_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str,
                 stages: Stages | None = None) -> np.ndarray:
    """Liver probability (X, Y, Z, float32) on the grid of `volume` (fold ensemble average; with several
    model.views, their mean where each saw: inversion.views_on_source_grid)."""
    stage = stages or Stages()
    parts = []
    for view in run.cfg.model.views:
        with stage("preprocess"):
            pre, image = preprocess_case(run, volume, affine, modality, view=view)
        parts.append(ViewProbs(network_probs(run, image, stage), image, pre))
    with stage("invert"):
        return probability_on_source_grid(parts, volume.shape)


def view_parts(run: LoadedRun, volume: Volume, modality: str, stages: Stages) -> tuple[list, list, list]:
    """One run's prediction of `volume` along each of its model.views: (ViewProbs per view, the fold
    agreement per view, the fold models' confidence per view)."""
    parts, agreements, confidences = [], [], []
    for view in run.cfg.model.views:
        with stages("preprocess"):
            transform, image = preprocess_case(run, volume.array, volume.affine, modality, view=view)
        probs, agreement, confidence = checked_network_probs(run, image, stages)
        parts.append(ViewProbs(probs, image, transform))
        agreements.append(agreement)
        confidences.append(confidence)
    return parts, agreements, confidences


@dataclass
class Segmentation:
    """What one volume yields: the mask infer writes and the API returns, and its quality check."""

    mask: np.ndarray  # (X, Y, Z) on the source grid, 1 = liver, after infer's post-processing
    probs: object  # the fold ensemble's liver probability on the model's grid (1, H, W, Z), smoothed (the axial view's)
    liver_ml: float
    agreement: float | None  # predict.fold_agreement (None with one model)
    confidence: float | None  # the fold models' mean predict.mask_confidence
    flags: list[str] = field(default_factory=list)  # quality_flags and cropped_liver: why to look before trusting
    member_agreement: float | None = None  # qc.member_agreement of the views or fused runs (None: one of each)


def segment_volume(run: LoadedRun, volume: Volume, modality: str, name: str,
                   stages: Stages | None = None) -> Segmentation:
    """The one path from a volume to its liver mask, used by infer, the Python API, the viewer and the
    benches: the run's deterministic transforms, the fold ensemble (smoothed through the slices), the
    liver probability back on the source grid (with several model.views, each view's, averaged there),
    thresholded at 0.5, post-processed (infer section), and the quality check (a warning line naming
    `name` when it flags anything). Seconds per stage go to `stages` (preprocess, network, invert,
    postprocess)."""
    import torch

    stages = stages if stages is not None else Stages()
    members, shape = run.members, volume.array.shape
    predicted = []
    with torch.inference_mode():
        for member in members:
            predicted.append(view_parts(member, volume, modality, stages))
        own: list = []  # each view's or fused run's own (mask, voxels it saw), for member_agreement
        with stages("invert"):
            if len(members) == 1 and len(predicted[0][0]) == 1:
                raw = views_mask_on_source_grid(predicted[0][0], shape)
            elif len(members) == 1:  # a multi-planar run: its views' mean where each saw
                raw = views_on_source_grid(predicted[0][0], shape, own) >= 0.5
            else:  # fused runs (infer --run-dir A --run-dir B): the mean of each run's probability
                total = np.zeros(shape, np.float32)
                for parts, _, _ in predicted:
                    probs = probability_on_source_grid(parts, shape)
                    own.append((probs >= 0.5, None))
                    total += probs
                raw = total >= 0.5 * len(members)
        members_agree = member_agreement(own, raw)
    with stages("postprocess"):
        mask = postprocess(raw, run.cfg.infer.largest_component, run.cfg.infer.fill_holes)
    liver_ml = float(mask.sum() * volume.voxel_ml)
    # over every view of every run: the fold models' lowest agreement, their mean confidence, checked
    # against the runs' mean confidence level
    agreement = min((a for _, agreements, _ in predicted for a in agreements if a is not None), default=None)
    known = [c for _, _, confidences in predicted for c in confidences if c is not None]
    confidence = sum(known) / len(known) if known else None
    level = sum(m.min_confidence for m in members) / len(members)
    # the cut-edge check reads the first run's axial grid (the in-plane crop); other views alone have none
    views = run.cfg.model.views
    axial = predicted[0][0][views.index("axial")].probs if "axial" in views else None
    flags = flag_mask(run, name, liver_ml, agreement, confidence, axial, shape, volume.affine, min_confidence=level,
                      members=members_agree)
    return Segmentation(mask, axial if axial is not None else predicted[0][0][0].probs, liver_ml, agreement, confidence,
                        flags, members_agree)
