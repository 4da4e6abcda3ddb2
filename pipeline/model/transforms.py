"""MONAI dictionary transforms for training, validation and inference.

Deterministic and random parts are kept apart (model-zoo `deterministic_transforms` /
`random_transforms`): CacheDataset caches the deterministic chain once per volume and applies
the random chain on top at every draw.

Data dict in: {"image": path to a NIfTI (X, Y, Z) volume, Z = axial slice axis; CT in HU, MR raw
intensities, "label": path to a uint8 organ map (0 bg, 1 liver, 2 r. kidney, 3 l. kidney, 4 spleen),
"modality": "CT" | "MR"}.

After `deterministic_transforms`: "image" float32 MetaTensor (1, H, W, Z), RAS orientation, in-plane
resized to `roi_size` (H, W), intensities scaled to about [0, 1]; "label" float32 (1, H, W, Z) with
liver = 1, everything else 0. The spatial steps (orientation, resize) are tracked in the MetaTensor,
so `monai.transforms.Invertd` brings a prediction back to the source voxel grid.

After `random_transforms`: a list of `slices_per_volume` dicts, each "image"/"label" (1, H, W).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (CopyItemsd, DeleteItemsd, EnsureChannelFirstd, EnsureTyped, InvertibleTransform,
                              LabelFilterd, LoadImaged, MapTransform, Orientationd, Rand2DElasticd, RandAdjustContrastd,
                              RandAffined, RandBiasFieldd, RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandHistogramShiftd, RandRotate90d, RandScaleIntensityd,
                              RandShiftIntensityd, RandSimulateLowResolutiond, RandSpatialCropd, Resized,
                              ResizeWithPadOrCropd, Spacingd, SqueezeDimd, Transform)

from pipeline.core.config import TrainConfig, pixel_spacing_mm
from pipeline.core.console import quiet_known_library_noise
from pipeline.core.errors import PipelineError
from pipeline.core.labels import LIVER
from pipeline.model.fast_transforms import InPlaneResize
from pipeline.model.intensity import (LABEL_CONTEXT, NormalizeIntensityByModalityd, RandGreyCurved, RandOrganIntensityd,
                                      stack_channels)
from pipeline.model.predict import plain
from pipeline.model.resample import InPlaneResampled

ORIENTATION = "RAS"  # one convention for every volume the network sees


_FG, _BG = "label_fg_indices", "label_bg_indices"


class SliceIndicesd(MapTransform):
    """Per-slice sampling indices for RandCropByPosNegLabeld: one voxel index per axial slice,
    in "label_fg_indices" for slices containing liver and "label_bg_indices" for the others.

    MONAI's FgBgToIndicesd works per voxel, so its "negative" draws land on background voxels
    of liver slices too and the liver/non-liver slice ratio would not be what the config says;
    MONAI has no slice-level sampler, hence this.
    """

    def __init__(self, label_key: str = "label") -> None:
        super().__init__(label_key)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = d[self.label_key]  # (1, H, W, D)
        spatial = tuple(label.shape[1:])
        has_liver = np.asarray((label[0] == LIVER).reshape(-1, spatial[-1]).any(0))  # organ maps too
        z = np.arange(spatial[-1])
        # voxel (0, 0, z) names slice z; the cropper then centres the whole-slice crop in-plane
        flat = np.ravel_multi_index((np.zeros_like(z), np.zeros_like(z), z), spatial)
        d[_FG], d[_BG] = flat[has_liver], flat[~has_liver]
        return d


class SliceMajord(MapTransform):
    """(C, H, W, Z) tensors stored slice by slice in memory (Z outermost), same shape and values.

    Training draws whole axial slices from the cached volumes; stored this way, slice z is one
    contiguous block, so the drawn slice and every augmentation after it work on contiguous memory
    instead of a strided view (torch's searchsorted, in RandHistogramShift, warned about that).
    MONAI has no transform for a memory layout; it is a permute and a copy, once per cached volume.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            stored = plain(img).permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
            if hasattr(img, "as_tensor"):
                from monai.data import MetaTensor

                stored = MetaTensor(stored, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = stored
        return d


class InPlaneResized(MapTransform, InvertibleTransform):
    """Dictionary version of `InPlaneResize` (the image; labels use a plain nearest-exact Resized)."""

    def __init__(self, keys: KeysCollection, roi: Sequence[int]) -> None:
        super().__init__(keys)
        self.resizer = InPlaneResize(roi)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d

    def inverse_mask(self, img, threshold: float) -> np.ndarray:
        """`inverse(img)[0] >= threshold` over the liver's box only (InPlaneResize.inverse_mask)."""
        return self.resizer.inverse_mask(img, threshold)


class NeighbourSlicesd(MapTransform):
    """(1, H, W, D) -> (1 + 2k, H, W, D): channel j holds slice z + j - k (edges repeated).

    2.5D input for the 2D network: each axial slice is seen with its k neighbours above and below,
    so a whole-slice crop at z carries the through-plane context a radiologist scrolls for.
    Intensity-like (no spatial change), so inversion of the spatial steps is unaffected.
    """

    def __init__(self, keys: KeysCollection, context: int) -> None:
        super().__init__(keys)
        self.context = int(context)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:

        d = dict(data)
        if self.context == 0:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            depth = img.shape[-1]
            z = torch.arange(depth)
            idx = [torch.clamp(z + off, 0, depth - 1) for off in range(-self.context, self.context + 1)]
            plain_img = plain(img)
            d[key] = stack_channels(img, [plain_img[..., i] for i in idx])
        return d


class ModalityChanneld(MapTransform):
    """(C, ...) -> (C + 1, ...): a constant channel, 1.0 for CT and 0.0 for MR, from the "modality" field.

    For one model trained on CT and MR together: with the modality as an input it need not guess it
    from the grey levels, where the sequences disagree (the liver is brighter than fat on CT and
    T2-SPIR, darker on T1 in- and opposed-phase). Appended after the random chain, so no intensity
    augmentation touches it; volumes and slices alike.
    """

    def __init__(self, keys: KeysCollection, modality_key: str = "modality") -> None:
        super().__init__(keys)
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:

        d = dict(data)
        modality = d.get(self.modality_key)
        if modality not in ("CT", "MR"):
            raise PipelineError(f"modality channel: modality {modality!r} is neither CT nor MR")
        for key in self.key_iterator(d):
            img = d[key]
            plain_img = plain(img)
            flag = torch.full_like(plain_img[:1], 1.0 if modality == "CT" else 0.0)
            d[key] = stack_channels(img, [plain_img, flag])
        return d


def image_transforms(cfg: TrainConfig, load: bool = True, context: int = 0,
                     modality_channel: bool = False, orient_last: bool = False, reference: bool = False,
                     view: str = "axial") -> list[Transform]:
    """The deterministic chain for "image" only (what infer applies before prediction).

    load=False starts from an in-memory channel-first MetaTensor (infer reads DICOM itself).
    orient_last=True reorients on the model's grid, after the in-plane resize, instead of on the
    source grid: the same image (to float32 rounding) when the reorientation only flips axes
    (`flips_only`), and two full-resolution copies fewer at inference (the flip and its inverse).
    reference=True: MONAI's own Orientationd, Spacingd and ResizeWithPadOrCropd where the chain would
    use InPlaneResampled (what bench/bench_infer.py compares the masks with).
    """
    return deterministic_transforms(cfg, keys=("image",), load=load, context=context,
                                    modality_channel=modality_channel, orient_last=orient_last, reference=reference,
                                    view=view)


def neighbour_organ_maps(cfg: TrainConfig, context: int) -> bool:
    """Whether a 2.5D model's training slices carry their neighbours' organ maps (LABEL_CONTEXT): for
    the organ intensity augmentation only. The cached chain makes them, the random chain moves and drops
    them: both ask here, so that neither keeps a key the other does not expect."""
    return context > 0 and cfg.organ_intensity_prob > 0


def in_plane_fov_mm(shape: Sequence[int], affine: np.ndarray) -> tuple[float, float]:
    """(R, A) extent in mm of a volume of this shape and affine: its in-plane field of view on the
    axes that RAS orientation gives the network (whatever order the voxel axes are stored in)."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    fov = {int(world): float(shape[axis]) * float(zooms[axis]) for axis, (world, _) in enumerate(ornt)}
    return fov[0], fov[1]


def flips_only(affine: np.ndarray) -> bool:
    """True when reorienting a volume with this affine to ORIENTATION flips axes but permutes none.

    Then the orientation commutes with the in-plane resize (both act on whole axes, and bilinear
    sampling of pixel centres is symmetric under a flip), so it may run after it. Axial series,
    CHAOS's among them, are like that; sagittal or coronal ones are not.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return bool(np.array_equal(ornt[:, 0], np.arange(3)))


def deterministic_transforms(cfg: TrainConfig, keys: Sequence[str] = ("image", "label"),
                             with_indices: bool = False, load: bool = True, context: int = 0,
                             modality_channel: bool = False, orient_last: bool = False,
                             keep_organs: bool = False, reference: bool = False, view: str = "axial") -> list[Transform]:
    """Load, channel-first, RAS, per-modality scaling, liver extraction, in-plane resize.

    `keep_organs`: leave the label's organ map (1 liver, 2 / 3 kidneys, 4 spleen), for the random chain's
    organ intensity augmentation, which extracts the liver after it (train.organ_intensity_prob), or
    for a network trained on every organ (model.organs).

    `keys` must start with "image"; "label" is optional (absent at inference). `with_indices`
    appends the liver / non-liver slice indices used by the slice sampler, cached with the volume.
    `context` = model.context_slices: the image gets 1 + 2 * context channels (neighbour slices).
    `modality_channel` = model.modality_channel: one more, constant channel (ModalityChanneld); for
    the volumes training samples slices from, leave it off: random_transforms adds it after augmentation.
    `view` (one of model.views): the plane whose slices the network sees (`view_transforms`); axial is
    the chain below, the others resample the volume to the pixel spacing on all three axes.
    """
    roi = (int(cfg.roi_size[0]), int(cfg.roi_size[1]))  # two values >= 8: config.validate
    keys = tuple(keys)
    has_label = "label" in keys
    if orient_last and has_label:
        # nearest-exact resampling breaks ties towards one side, so a label resize does not commute with a flip
        raise ValueError("orient_last is for image-only chains")
    orient = Orientationd(keys, axcodes=ORIENTATION, labels=None)  # labels=None: axes from the MetaTensor space
    # Z keeps its length (-1): slices are the unit the 2D network learns from.
    # nearest-exact and bilinear sample pixel centres; "nearest" and "area" shift by up to half a
    # source pixel, which misaligned labels with images and inverted masks with the source grid.
    if load:
        quiet_known_library_noise()  # LoadImaged builds readers that warn about a codec it never uses
    spacing = pixel_spacing_mm(cfg)
    # a coronal or sagittal view (model.views): the axial chain's steps, then the view's own
    view_steps = [] if view == "axial" else view_transforms(keys, view, spacing, roi)
    if spacing > 0 and keys == ("image",) and not reference:
        # image-only (inference): orientation, spacing and pad / crop in one separable pass, with an
        # inverse restricted to the liver's box (InPlaneResampled computes what the three MONAI steps
        # of the branch below compute; the scaling commutes with the orientation, which only moves voxels)
        chain = [*([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys)] if load else []),
                 NormalizeIntensityByModalityd("image", cfg.ct_window, cfg.mr_percentiles),
                 InPlaneResampled("image", spacing, roi), *view_steps]
        return _after_spatial(chain, cfg, keys, with_indices, context, modality_channel)
    chain: list[Transform] = [
        *([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys)] if load else []),
        *([] if orient_last else [orient]),
        NormalizeIntensityByModalityd("image", cfg.ct_window, cfg.mr_percentiles),
    ]
    if has_label and not keep_organs:
        # LabelFilter keeps value 1 as 1 and zeroes everything else: liver vs rest for MR organ
        # maps (1..4) and CT maps (0/1) alike.
        chain.append(LabelFilterd("label", applied_labels=[LIVER]))
    if spacing > 0:
        # nnU-Net's way: every slice resampled to one pixel spacing (the liver the same size in pixels
        # whatever the field of view), then padded or cropped about the centre to roi_size. Slices
        # keep their spacing (pixdim <= 0: unchanged). Both steps are MONAI's and Invertd undoes them.
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        chain += [Spacingd(keys, pixdim=(spacing, spacing, -1.0), mode=modes),
                  ResizeWithPadOrCropd(keys, spatial_size=(*roi, -1))]
    else:
        # anti-aliased bilinear for the image; nearest-exact for the label (smoothing would blur it)
        chain.append(InPlaneResized("image", roi))
        if has_label:
            chain.append(Resized("label", spatial_size=(*roi, -1), mode="nearest-exact"))
    if orient_last:
        chain.append(orient)
    return _after_spatial(chain + view_steps, cfg, keys, with_indices, context, modality_channel)


# per view, on a RAS volume (C, R, A, S): the in-plane size for ResizeWithPadOrCropd (the slice axis
# keeps its length: -1) and the axes order that puts the slice axis last, as the axial chain has it
_VIEW_SIZE = {"coronal": lambda roi: (roi[0], -1, roi[1]), "sagittal": lambda roi: (-1, roi[0], roi[1])}
_VIEW_AXES = {"coronal": (0, 1, 3, 2), "sagittal": (0, 2, 3, 1)}  # (C, R, S, A) and (C, A, S, R)


def view_transforms(keys: Sequence[str], view: str, spacing: float, roi: Sequence[int]) -> list[Transform]:
    """The spatial steps of a coronal or sagittal view (model.views) on a RAS volume whose slices are
    already at `spacing` mm (the axial chain's output): the slice axis resampled to `spacing` too
    (MONAI Spacingd: linear for the image, nearest for the label; on MR's 5.5-9 mm slices the
    through-plane axis is interpolated between slices, and a label's steps stay steps; in-plane it
    samples the pixels where they are), padded or cropped about the centre to the roi in the view's
    plane, and transposed so that the view's slices lie along the last axis. Trilinear resampling is
    separable, so this equals resampling the source to `spacing` on all three axes at once, on the
    axial crop; and the source is read through the axial chain's fast path (InPlaneResampled) at
    inference. Every step is invertible (Invertd undoes them in turn)."""
    from monai.transforms import Transposed

    if view not in _VIEW_AXES:
        raise ValueError(f"view_transforms: expected coronal or sagittal, got {view!r}")
    if spacing <= 0:
        raise PipelineError(f"model.views {view}: needs train.pixel_spacing (auto or mm), not slices resized to the roi")
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [Spacingd(keys, pixdim=(spacing, spacing, spacing), mode=modes),
            ResizeWithPadOrCropd(keys, spatial_size=_VIEW_SIZE[view](roi)),
            Transposed(keys, indices=_VIEW_AXES[view])]


def _after_spatial(chain: list, cfg: TrainConfig, keys: tuple, with_indices: bool, context: int,
                   modality_channel: bool) -> list:
    """The deterministic chain's steps after the spatial ones: neighbour slices, slice indices, modality."""
    has_label = "label" in keys
    chain.append(NeighbourSlicesd("image", context))  # model.context_slices (2.5D); a no-op at 0
    if has_label and with_indices and neighbour_organ_maps(cfg, context):
        # the training volumes of a 2.5D model: the neighbour slices' organ maps for RandOrganIntensityd
        chain += [CopyItemsd("label", names=LABEL_CONTEXT), NeighbourSlicesd(LABEL_CONTEXT, context)]
        keys = (*keys, LABEL_CONTEXT)
    if has_label and with_indices:  # the training volumes that slices are drawn from
        chain += [SliceIndicesd("label"), SliceMajord(keys)]
    if modality_channel:
        chain.append(ModalityChanneld("image"))
    return chain


@contextmanager
def without_metadata() -> Iterator[None]:
    """Run MONAI transforms on plain tensors (for the random training chain).

    MONAI re-wraps every output as a MetaTensor while the global `track_meta` flag is on, even
    when its input was a plain tensor, so converting once (EnsureTyped(track_meta=False)) is not
    enough. With the flag off the random chain costs half as much per slice (bench/bench_train.py
    measures the loop against the bare step). The flag is process-global: the caller must not run
    metadata-dependent transforms (validation, Invertd) inside this block.
    """
    from monai.data import get_track_meta, set_track_meta

    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def intensity_transforms(cfg: TrainConfig) -> list[Transform]:
    """The random intensity steps on "image" after the spatial ones, the same in 2D and 3D
    (random_transforms, volumetric.random_transforms_3d)."""
    return [
        # MR surface-coil shading: a slowly varying multiplicative field (exp of a degree-3
        # polynomial; coefficients in +-0.15 give a median max/min ratio of 1.9 over a slice), as on real
        # T2-SPIR livers that lose about half their brightness anteriorly (MR_5).
        RandBiasFieldd("image", degree=3, coeff_range=(-0.15, 0.15), prob=cfg.bias_field_prob),
        RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=0.5),
        # Liver brightness relative to the rest differs between patients (real T2-SPIR, after 1-99
        # percentile scaling: liver mean 0.23 to 0.56); a random monotone remapping covers that.
        RandHistogramShiftd("image", num_control_points=(5, 10), prob=cfg.histogram_shift_prob),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.03),
        RandAdjustContrastd("image", prob=0.3, gamma=tuple(cfg.gamma_range)),
    ]


def random_transforms(cfg: TrainConfig, modality_channel: bool = False, organs: bool = False,
                      context: int = 0) -> list[Transform]:
    """Draw `slices_per_volume` whole axial slices per volume, then augment each in 2D.

    Every random transform is a dictionary transform over ("image", "label"), so a single draw
    moves both (flips, rotations, affine); intensity transforms touch "image" only. `organs`
    (model.organs): the label keeps its organ map (the cached volumes must have kept it:
    deterministic_transforms' keep_organs); otherwise it ends as liver (1) against the rest (0).
    `context` (model.context_slices, as given to deterministic_transforms): with organ intensity
    augmentation, the neighbour slices' organ maps travel with the slice through every spatial step.
    """
    neighbour_organs = neighbour_organ_maps(cfg, context)
    keys = ("image", "label", LABEL_CONTEXT) if neighbour_organs else ("image", "label")
    ratio = cfg.liver_slice_ratio  # in [0, 1]: config.validate
    square = cfg.roi_size[0] == cfg.roi_size[1]
    chain: list[Transform] = [
        # Training slices need no metadata: plain tensors from here on (deterministic, so cached);
        # iterate under `without_metadata()` or MONAI wraps every output again.
        EnsureTyped((*keys, _FG, _BG), data_type="tensor", track_meta=False),
        # (-1, -1, 1): a whole slice; pos/neg weights give the liver / non-liver slice ratio
        # (indices from SliceIndicesd, one per slice).
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=(-1, -1, 1), pos=ratio, neg=1.0 - ratio,
            num_samples=cfg.slices_per_volume, fg_indices_key=_FG, bg_indices_key=_BG, allow_smaller=True),
        SqueezeDimd(keys, dim=-1),  # contiguous: the cached volumes are stored slice by slice (SliceMajord)
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=1),
    ]
    if square:  # a 90-degree turn of a non-square slice would change its shape
        chain.append(RandRotate90d(keys, prob=cfg.rotate90_prob, max_k=3))
    chain += [
        # cache_grid: the identity sampling grid of the (fixed) slice size is made once, not per draw
        RandAffined(keys, prob=cfg.affine_prob, rotate_range=0.26, scale_range=cfg.scale_range,
                    translate_range=(8, 8), mode=("bilinear", *["nearest"] * (len(keys) - 1)), padding_mode="zeros",
                    spatial_size=tuple(cfg.roi_size), cache_grid=True),
    ]
    if cfg.patch_size:
        # nnU-Net's patch-based training: a random crop of the augmented slice (before the intensity
        # steps, which then work on fewer pixels); the network is fully convolutional, so validation and
        # inference give it the whole roi. Only when asked for: a transform in the chain takes the next
        # random seed, so the chain without it draws as before.
        chain.append(RandSpatialCropd(keys, roi_size=tuple(cfg.patch_size), random_size=False))
    chain += intensity_transforms(cfg)
    if cfg.organ_intensity_prob > 0:  # the cached labels kept their organ maps (deterministic_transforms)
        chain.append(RandOrganIntensityd("image", "label", prob=cfg.organ_intensity_prob,
                                         context_key=LABEL_CONTEXT if neighbour_organs else None,
                                         shared=cfg.organ_intensity_shared, texture=cfg.organ_intensity_texture))
        if neighbour_organs:
            chain.append(DeleteItemsd(LABEL_CONTEXT))
        if not organs:
            chain.append(LabelFilterd("label", applied_labels=[LIVER]))
    # nnU-Net's further augmentations, only when asked for: a transform in the chain takes the next
    # random seed (monai.data.utils.set_rnd), so adding them at the end leaves the others' draws as they were
    if cfg.blur_prob > 0:
        chain.append(RandGaussianSmoothd("image", sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=cfg.blur_prob))
    if cfg.lowres_prob > 0:
        chain.append(RandSimulateLowResolutiond("image", prob=cfg.lowres_prob, zoom_range=(0.5, 1.0),
                                                upsample_mode="bilinear"))
    if cfg.elastic_prob > 0:
        chain.append(Rand2DElasticd(keys, spacing=(20, 20), magnitude_range=(1, 2), prob=cfg.elastic_prob,
                                    mode=("bilinear", "nearest"), padding_mode="zeros"))
    if cfg.grey_curve_prob > 0:  # last of the intensity changes: it decides the slice's contrast
        chain.append(RandGreyCurved("image", prob=cfg.grey_curve_prob))
    if modality_channel:  # after every intensity transform, so it stays exactly 0 or 1
        chain.append(ModalityChanneld("image"))
    return chain
