"""The 3D option (model.dims 3): MONAI DynUNet on 3D patches, nnU-Net's 3d_fullres way.

Volumes are resampled to (train.pixel_spacing, train.pixel_spacing, train.slice_spacing) mm in RAS
orientation; training draws random patches of train.patch_3d voxels (MONAI RandCropByPosNegLabeld,
a third of them centred on liver) and augments them with MONAI's 3D dictionary transforms;
validation and infer predict whole volumes with MONAI's SlidingWindowInferer (Gaussian-weighted
windows of the patch size) and bring the liver probability back to the source grid with Invertd.

After `deterministic_transforms_3d`: "image" float32 MetaTensor (C, R, A, S) at the run's spacing,
padded to at least the patch; "label" (1, R, A, S), liver 1 (or the organ map for the organ
intensity augmentation). The layout matches the 2D chains' (1, H, W, D): the liver probability
(1, R, A, S) goes through the same inversion (pipeline.model.inversion).
"""
from __future__ import annotations

from typing import Sequence

import torch
from monai.transforms import (CopyItemsd, DeleteItemsd, EnsureChannelFirstd, EnsureTyped, FgBgToIndicesd, LabelFilterd,
                              LoadImaged, Orientationd, RandAffined, RandCropByPosNegLabeld, Spacingd, SpatialPadd,
                              Transform)

from pipeline.core.config import Config, TrainConfig, pixel_spacing_mm
from pipeline.core.console import quiet_known_library_noise
from pipeline.core.errors import PipelineError
from pipeline.core.labels import LIVER
from pipeline.model.intensity import NormalizeIntensityByModalityd, RandOrganIntensityd

_LIVER = "liver"  # a liver-only copy of the label, for the sampler's indices
_FG, _BG = f"{_LIVER}_fg_indices", f"{_LIVER}_bg_indices"  # FgBgToIndicesd's names


def spacing_3d(cfg: TrainConfig) -> tuple[float, float, float]:
    """The voxel size (mm) the 3D network sees: the pixel spacing in-plane, train.slice_spacing through
    the plane (both numbers once training has resolved "auto")."""
    pixel, through = pixel_spacing_mm(cfg), cfg.slice_spacing
    if pixel <= 0 or through == "auto" or float(through) <= 0:
        raise PipelineError(f"model.dims 3: needs train.pixel_spacing and train.slice_spacing in mm, got "
                            f"{cfg.pixel_spacing} and {cfg.slice_spacing} (training sets them from the data)")
    return pixel, pixel, float(through)


def deterministic_transforms_3d(cfg: TrainConfig, keys: Sequence[str] = ("image", "label"), load: bool = True,
                                modality_channel: bool = False, keep_organs: bool = False,
                                with_indices: bool = False) -> list[Transform]:
    """Load, channel-first, RAS, per-modality scaling, liver extraction (unless `keep_organs`), the
    run's 3D spacing (trilinear image, nearest label), padded to at least the patch. Every spatial step
    is MONAI's and invertible. `modality_channel`: the constant CT / MR channel (not for the volumes
    training crops from: the random chain adds it after augmentation). `with_indices`: the liver / other
    voxel indices the patch sampler draws centres from (the training volumes)."""
    from pipeline.model.transforms import ORIENTATION, ModalityChanneld

    keys = tuple(keys)
    if load:
        quiet_known_library_noise()
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    chain: list[Transform] = [
        *([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys)] if load else []),
        Orientationd(keys, axcodes=ORIENTATION, labels=None),  # the 2D chains' orientation
        NormalizeIntensityByModalityd("image", cfg.ct_window, cfg.mr_percentiles),
    ]
    if "label" in keys and not keep_organs:
        chain.append(LabelFilterd("label", applied_labels=[LIVER]))
    chain += [Spacingd(keys, pixdim=spacing_3d(cfg), mode=modes),
              SpatialPadd(keys, spatial_size=tuple(cfg.patch_3d))]  # a volume smaller than the patch is padded
    if with_indices and "label" in keys:
        # the liver's voxels and the rest, once per cached volume, for the patch sampler (RandCropByPosNegLabeld
        # would otherwise search the whole volume at every draw, and an organ map's kidneys would count as liver)
        chain += [CopyItemsd("label", names=_LIVER), LabelFilterd(_LIVER, applied_labels=[LIVER]),
                  FgBgToIndicesd(_LIVER), DeleteItemsd(_LIVER)]
    if modality_channel:
        chain.append(ModalityChanneld("image"))
    return chain


def random_transforms_3d(cfg: TrainConfig, modality_channel: bool = False, organs: bool = False) -> list[Transform]:
    """One random patch per volume and draw (a third of them centred on a liver voxel, nnU-Net's
    foreground oversampling), then MONAI's 3D augmentations: a rotation about the body's long axis,
    scaling and shift (the slices' own plane, as the 2D chain), and the 2D chain's intensity steps."""
    from pipeline.model.transforms import ModalityChanneld, intensity_transforms

    keys = ("image", "label")
    patch = tuple(cfg.patch_3d)
    chain: list[Transform] = [
        EnsureTyped((*keys, _FG, _BG), data_type="tensor", track_meta=False),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=1.0, neg=2.0, num_samples=1,
                               fg_indices_key=_FG, bg_indices_key=_BG, allow_smaller=True),
        DeleteItemsd((_FG, _BG)),
        RandAffined(keys, prob=cfg.affine_prob, rotate_range=(0.0, 0.0, 0.26),
                    scale_range=(cfg.scale_range, cfg.scale_range, 0.0), translate_range=(8, 8, 0),
                    mode=("bilinear", "nearest"), padding_mode="zeros", spatial_size=patch, cache_grid=True),
        *intensity_transforms(cfg),
    ]
    if cfg.organ_intensity_prob > 0:  # the cached labels kept their organ maps (keep_organs)
        chain.append(RandOrganIntensityd("image", "label", prob=cfg.organ_intensity_prob,
                                         shared=cfg.organ_intensity_shared, texture=cfg.organ_intensity_texture))
        if not organs:
            chain.append(LabelFilterd("label", applied_labels=[LIVER]))
    if modality_channel:
        chain.append(ModalityChanneld("image"))
    return chain


def sliding_window(cfg: Config, batch: int):
    """MONAI's SlidingWindowInferer over windows of the patch size, `batch` windows at a time,
    overlapping by infer.sw_overlap, blended with Gaussian weights (nnU-Net's)."""
    from monai.inferers import SlidingWindowInferer

    return SlidingWindowInferer(roi_size=tuple(cfg.train.patch_3d), sw_batch_size=batch,
                                overlap=cfg.infer.sw_overlap, mode="gaussian", progress=False)


def volume_logits(model: torch.nn.Module, image: torch.Tensor, cfg: Config, batch: int, device: torch.device,
                  amp: str = "off") -> torch.Tensor:
    """Logits of a whole volume: image (C, R, A, S) -> float32 (K, R, A, S) on the CPU."""
    from pipeline.core.device import autocast_context
    from pipeline.model.predict import plain

    x = plain(image)[None].to(device)
    with torch.inference_mode(), autocast_context(device, amp):
        return sliding_window(cfg, batch)(x, model).float()[0].cpu()


def predict_volume_3d(models: Sequence[torch.nn.Module], image: torch.Tensor, cfg: Config, device: torch.device,
                      amp: str = "off", model_masks: list | None = None,
                      model_confidences: list | None = None) -> torch.Tensor:
    """predict.predict_volume for 3D models: the mean liver probability (1, R, A, S) of `models`, each
    model's own mask ((S, R, A) bool, the 2D masks' slice-first layout) and confidence when asked."""
    from pipeline.model.predict import confidence_from_sums, confidence_sums, liver_probability

    if not models:
        raise ValueError("predict: no model to predict with")
    total = None
    for model in models:
        was_training = model.training
        model.eval()
        try:
            probs = liver_probability(volume_logits(model, image, cfg, cfg.infer.batch_size, device, amp)[None])
        finally:
            model.train(was_training)
        total = probs if total is None else total + probs
        if model_masks is not None:
            model_masks.append((probs[0] >= 0.5).permute(2, 0, 1))
        if model_confidences is not None:
            model_confidences.append(confidence_from_sums(confidence_sums(probs)))
    return total.div_(len(models))


def auto_slice_spacing(cfg: Config, entries: list[dict]) -> float:
    """train.slice_spacing "auto" for a 3D run: the median through-plane voxel size of the data set's
    volumes (nnU-Net's median spacing), 2 decimals; headers only."""
    import nibabel as nib
    import numpy as np

    through = []
    for e in entries:
        img = nib.load(str(e["image"]))
        ornt = nib.orientations.io_orientation(img.affine)
        axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])  # the voxel axis RAS puts along S
        through.append(float(np.linalg.norm(img.affine[:3, axis])))
    return round(float(np.median(through)), 2)
