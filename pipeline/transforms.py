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
from monai.transforms import InvertibleTransform
from monai.transforms import (
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    LabelFilterd,
    LoadImaged,
    MapTransform,
    EnsureTyped,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    Rand2DElasticd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandomizableTransform,
    RandSimulateLowResolutiond,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SqueezeDimd,
    Transform,
)

from pipeline.config import TrainConfig, pixel_spacing_mm
from pipeline.console import quiet_known_library_noise
from pipeline.errors import PipelineError
from pipeline.fast_transforms import (InPlaneResize, ScaleIntensityRangeOneBuffer,
                                      ScaleIntensityRangePercentilesOnePass)
from pipeline.labels import LIVER
from pipeline.predict import plain

ORIENTATION = "RAS"  # one convention for every volume the network sees
_FG, _BG = "label_fg_indices", "label_bg_indices"
# 2.5D training with organ intensity augmentation: the organ maps of the neighbour slices, channel for
# channel with the image's, so each context channel's organs are remapped by their own outline
_LABEL_CONTEXT = "label_context"


class NormalizeIntensityByModalityd(MapTransform):
    """Scale "image" to about [0, 1] with the rule of its modality: CT by a fixed HU window,
    MR by per-volume percentiles (MR grey levels have no physical unit, so only relative
    scaling is meaningful).

    MONAI has the two scalings but no dispatch on a metadata field; this holds one of each.
    """

    def __init__(self, keys: KeysCollection, ct_window: Sequence[float], mr_percentiles: Sequence[float],
                 modality_key: str = "modality") -> None:
        super().__init__(keys)
        self.modality_key = modality_key
        ct = ScaleIntensityRanged(keys, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        ct.scaler = ScaleIntensityRangeOneBuffer(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        mr = ScaleIntensityRangePercentilesd(
            keys, lower=mr_percentiles[0], upper=mr_percentiles[1], b_min=0.0, b_max=1.0, clip=True)
        mr.scaler = ScaleIntensityRangePercentilesOnePass(
            lower=mr_percentiles[0], upper=mr_percentiles[1], b_min=0.0, b_max=1.0, clip=True)
        self.by_modality: dict[str, Transform] = {
            "CT": ct,
            "MR": mr,
        }

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        modality = data.get(self.modality_key)
        if modality not in self.by_modality:
            source = data.get("image_path") or getattr(data.get(self.first_key(data)), "meta", {}).get(
                "filename_or_obj", "<unknown volume>")
            raise PipelineError(
                f"{source}: modality {modality!r} is not one of {sorted(self.by_modality)} (datalist field 'modality')")
        return self.by_modality[modality](data)


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
            d[key] = _stack_channels(img, [plain_img[..., i] for i in idx])
        return d


def _stack_channels(img, channels: list) -> "torch.Tensor":
    """torch.cat(channels) along the channel axis, carrying `img`'s metadata when it is a MetaTensor."""

    stacked = torch.cat(channels, dim=0)
    if hasattr(img, "as_tensor"):
        from monai.data import MetaTensor

        return MetaTensor(stacked, meta=img.meta, applied_operations=img.applied_operations)
    return stacked


class RandGreyCurved(RandomizableTransform, MapTransform):
    """A random grey-level curve, monotone or not: contrast-agnostic training.

    With probability `prob`, the slice's intensities (scaled to [0, 1] by the deterministic chain)
    go through a piecewise-linear curve whose `points` (drawn in the range given) control values
    are drawn uniformly, then stretched to span [0, 1], at evenly spaced intensities; one curve for every channel of the
    slice (context slices are the same scan). The liver can then come out darker or brighter than
    the spleen, fat or muscle, its contrast inverted or flattened, so a model trained with it has
    to find the liver by its shape and position; real scans put it at brightnesses the training
    set lacks (dark liver and spleen with iron overload, other sequences).

    Written here rather than using MONAI's `RandIntensityRemap`: that one draws a curve value per
    distinct grey level (tens of thousands on a float slice, so the curve is noise), has no
    dictionary form, and its inner transform draws from an unseeded random state, which breaks
    `set_determinism`. `RandHistogramShift` draws monotone curves only.
    """

    def __init__(self, keys: KeysCollection, prob: float, points: tuple[int, int] = (3, 7)) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if not 2 <= points[0] <= points[1]:
            raise ValueError(f"points {points}: need 2 <= low <= high")
        self.points = points
        self.values = np.zeros(2, np.float32)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            n = int(self.R.randint(self.points[0], self.points[1] + 1))
            values = self.R.uniform(0.0, 1.0, n)
            # stretched to span [0, 1], as the intensity scaling leaves a real slice: a flat curve
            # would teach faint images the deterministic chain never produces
            self.values = ((values - values.min()) / max(np.ptp(values), 1e-6)).astype(np.float32)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = grey_curve(d[key], self.values)
        return d


class RandOrganIntensityd(RandomizableTransform, MapTransform):
    """Each labelled organ of the slice (liver, kidneys, spleen; CT labels hold the liver alone) moved
    to a brightness of its own: contrast-agnostic training where a global curve cannot help.

    With probability `prob` per slice, every organ present gets its mean intensity moved to a level
    drawn uniformly in [0, 1] (the slice's scaled range), its texture around the mean kept, scaled by
    a factor drawn in `texture` (a darkened organ's texture shrinks with its signal, to a third at a
    third of the brightness; down to 0.25 rather than 0.5 lifted real MR with a dark liver and spleen
    by 0.10 Dice at the same unperturbed Dice, README). A liver and spleen darkened together (iron
    overload), a liver brighter or darker than its neighbours, organs alike: the model must use the
    organ's shape and place, not its grey level. MONAI has no label-wise intensity transform.

    `shared`: the fraction of those slices where every organ gets the same level (each its own
    texture factor): organs alike, as a liver and spleen darkened together by iron overload are,
    which independent draws give rarely (both below 0.2: one slice in 25). Drawn only when > 0, so
    that 0 keeps the random stream of runs from before it.

    `context_key`: for a 2.5D image, the key of the organ maps of its channels (neighbour slices),
    so that each channel's organs move by their own outline with the same draws. Without it every
    channel would be remapped inside the centre slice's outline, and the neighbour channels would
    show the centre's label as an edge, a cue that no real scan has.
    """

    def __init__(self, image_key: str, label_key: str, prob: float, context_key: str | None = None,
                 shared: float = 0.0, texture: Sequence[float] | None = None) -> None:
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.context_key = context_key
        self.shared = shared
        texture = TrainConfig().organ_intensity_texture if texture is None else texture  # the config's default
        self.texture = (float(texture[0]), float(texture[1]))
        self.draws = np.zeros((0, 2), np.float32)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        # one (level, contrast) pair per possible organ label, drawn every time: same stream length
        self.draws = np.stack([self.R.uniform(0.0, 1.0, 8), self.R.uniform(*self.texture, 8)], axis=1).astype(np.float32)
        if self.shared > 0 and self.R.uniform() < self.shared:
            self.draws[:, 0] = self.draws[0, 0]  # label 0 (background) is never remapped: its level is spare

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        if self.context_key is not None:
            maps = torch.as_tensor(d[self.context_key])  # one organ map per image channel
        else:
            maps = torch.as_tensor(d[self.label_key])[:1]  # the slice's own, for every channel
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).clone()
            for channel in range(img.shape[0]):
                label = maps[channel] if len(maps) > 1 else maps[0]
                for value in torch.unique(label).tolist():
                    value = int(value)
                    if value <= 0 or value >= len(self.draws):
                        continue
                    inside = label == value
                    level, contrast = (float(v) for v in self.draws[value])
                    region = img[channel][inside]
                    img[channel][inside] = (region - region.mean()) * contrast + level
            d[key] = img
        return d


def grey_curve(img, values: np.ndarray):
    """`img` in [0, 1] (clamped) through the piecewise-linear curve through (i / (n-1), values[i])."""
    x = torch.as_tensor(img)
    ys = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    pos = x.clamp(0.0, 1.0) * (len(values) - 1)
    low = pos.floor().clamp(max=len(values) - 2)
    i = low.long()
    return torch.lerp(ys[i], ys[i + 1], pos - low)


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
            d[key] = _stack_channels(img, [plain_img, flag])
        return d


def image_transforms(cfg: TrainConfig, load: bool = True, context: int = 0,
                     modality_channel: bool = False, orient_last: bool = False) -> list[Transform]:
    """The deterministic chain for "image" only (what infer applies before prediction).

    load=False starts from an in-memory channel-first MetaTensor (infer reads DICOM itself).
    orient_last=True reorients on the model's grid, after the in-plane resize, instead of on the
    source grid: the same image (to float32 rounding) when the reorientation only flips axes
    (`flips_only`), and two full-resolution copies fewer at inference (the flip and its inverse).
    """
    return deterministic_transforms(cfg, keys=("image",), load=load, context=context,
                                    modality_channel=modality_channel, orient_last=orient_last)


def neighbour_organ_maps(cfg: TrainConfig, context: int) -> bool:
    """Whether a 2.5D model's training slices carry their neighbours' organ maps (_LABEL_CONTEXT): for
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
                             keep_organs: bool = False) -> list[Transform]:
    """Load, channel-first, RAS, per-modality scaling, liver extraction, in-plane resize.

    `keep_organs`: leave the label's organ map (1 liver, 2 / 3 kidneys, 4 spleen), for the random chain's
    organ intensity augmentation, which extracts the liver after it (train.organ_intensity_prob), or
    for a network trained on every organ (model.organs).

    `keys` must start with "image"; "label" is optional (absent at inference). `with_indices`
    appends the liver / non-liver slice indices used by the slice sampler, cached with the volume.
    `context` = model.context_slices: the image gets 1 + 2 * context channels (neighbour slices).
    `modality_channel` = model.modality_channel: one more, constant channel (ModalityChanneld); for
    the volumes training samples slices from, leave it off: random_transforms adds it after augmentation.
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
    chain: list[Transform] = [
        *([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys)] if load else []),
        *([] if orient_last else [orient]),
        NormalizeIntensityByModalityd("image", cfg.ct_window, cfg.mr_percentiles),
    ]
    if has_label and not keep_organs:
        # LabelFilter keeps value 1 as 1 and zeroes everything else: liver vs rest for MR organ
        # maps (1..4) and CT maps (0/1) alike.
        chain.append(LabelFilterd("label", applied_labels=[LIVER]))
    spacing = pixel_spacing_mm(cfg)
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
    chain.append(NeighbourSlicesd("image", context))  # model.context_slices (2.5D); a no-op at 0
    if has_label and with_indices and neighbour_organ_maps(cfg, context):
        # the training volumes of a 2.5D model: the neighbour slices' organ maps for RandOrganIntensityd
        chain += [CopyItemsd("label", names=_LABEL_CONTEXT), NeighbourSlicesd(_LABEL_CONTEXT, context)]
        keys = (*keys, _LABEL_CONTEXT)
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
    keys = ("image", "label", _LABEL_CONTEXT) if neighbour_organs else ("image", "label")
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
    chain += [
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
    if cfg.organ_intensity_prob > 0:  # the cached labels kept their organ maps (deterministic_transforms)
        chain.append(RandOrganIntensityd("image", "label", prob=cfg.organ_intensity_prob,
                                         context_key=_LABEL_CONTEXT if neighbour_organs else None,
                                         shared=cfg.organ_intensity_shared, texture=cfg.organ_intensity_texture))
        if neighbour_organs:
            chain.append(DeleteItemsd(_LABEL_CONTEXT))
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
