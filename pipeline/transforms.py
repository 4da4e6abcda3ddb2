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
from functools import lru_cache
from typing import Hashable, Iterator, Mapping, Sequence

import numpy as np

from monai.config import KeysCollection
from monai.transforms import InvertibleTransform
from monai.transforms import (
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
    RandGaussianNoised,
    RandHistogramShiftd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    Resized,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
    SqueezeDimd,
    Transform,
)

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.predict import plain

ORIENTATION = "RAS"  # one convention for every volume the network sees
LIVER_LABEL = 1  # the liver's value in the prepared organ label maps
_FG, _BG = "label_fg_indices", "label_bg_indices"


class ScaleIntensityRangeOneBuffer(ScaleIntensityRange):
    """MONAI's `ScaleIntensityRange`, computed in place in one output buffer.

    Same operations in the same order (subtract, divide, scale, shift, clip), so the same float32
    values; MONAI allocates a new volume for each of the four steps, which made the CT window the
    dearest step of inference preprocessing (512x512x78 CT on 2 cores: 0.124 s vs 0.034 s; 0.018 s
    since glibc keeps freed memory, pipeline/runtime.py).
    Anything but a float32 tensor to float32 with a proper range goes to MONAI's own code.
    """

    def __call__(self, img):  # type: ignore[override]
        import torch
        from monai.data import MetaTensor, get_track_meta

        if (not isinstance(img, torch.Tensor) or img.dtype != torch.float32
                or self.dtype not in (None, np.float32, torch.float32)
                or self.a_max == self.a_min or self.b_min is None or self.b_max is None):
            return super().__call__(img)
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        out = torch.sub(x, self.a_min).div_(self.a_max - self.a_min)
        # scaling by 1 and shifting by 0 (the usual [0, 1] target) change no value: skipped, 2 of 5 passes
        if self.b_max - self.b_min != 1.0:
            out.mul_(self.b_max - self.b_min)
        if self.b_min != 0.0:
            out.add_(self.b_min)
        if self.clip:
            out.clamp_(self.b_min, self.b_max)
        if isinstance(img, MetaTensor) and get_track_meta():
            return MetaTensor(out).copy_meta_from(img)
        return out


class ScaleIntensityRangePercentilesOnePass(ScaleIntensityRangePercentiles):
    """MONAI's `ScaleIntensityRangePercentiles` with both percentiles from one partition of the
    volume (MONAI's `percentile` called once with [lower, upper], not twice) and the scaling in one
    buffer: the same values, 0.03 s instead of 0.06 s per real T2-SPIR series on 2 cores, where this
    was most of inference preprocessing.
    """

    def _normalize(self, img):  # type: ignore[override]
        from monai.transforms.utils_pytorch_numpy_unification import percentile
        from monai.utils import convert_to_tensor

        if self.relative:
            return super()._normalize(img)
        a_min, a_max = percentile(img, [self.lower, self.upper])
        scaler = ScaleIntensityRangeOneBuffer(a_min=a_min, a_max=a_max, b_min=self.b_min, b_max=self.b_max,
                                              clip=self.clip, dtype=self.dtype)
        return convert_to_tensor(scaler(img), track_meta=False)


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
        has_liver = np.asarray((label[0] > 0).reshape(-1, spatial[-1]).any(0))
        z = np.arange(spatial[-1])
        # voxel (0, 0, z) names slice z; the cropper then centres the whole-slice crop in-plane
        flat = np.ravel_multi_index((np.zeros_like(z), np.zeros_like(z), z), spatial)
        d[_FG], d[_BG] = flat[has_liver], flat[~has_liver]
        return d


class InPlaneResize(Resize):
    """MONAI `Resize(spatial_size=(H, W, -1), mode="bilinear", anti_aliasing=True)` for (C, H, W, Z)
    volumes, with the anti-aliasing and the resize done as one matrix product per in-plane axis.

    Same result as MONAI's Gaussian pre-smoothing (skimage's sigma rule, MONAI's erf-sampled kernel
    truncated at 4 sigma; edges repeated) followed by torch's bilinear interpolation (both are
    linear and separable, and Z keeps its length), to float32 rounding. Hand-written for speed:
    MONAI smooths with single-channel 3-D convolutions, ~10 s on a 512x512x78 CT on 2 CPU cores,
    and even scipy's 1-D filters at full resolution took ~0.45 s; the matrix form is ~0.05 s
    (bench/bench_infer.py profiles it). The operation is recorded exactly as `Resize` records it,
    so MONAI's `Invertd` undoes it through `inverse` (bilinear back to the source size, as
    `Resize.inverse` does).
    """

    def __init__(self, roi: Sequence[int]) -> None:
        super().__init__(spatial_size=(*roi, -1), mode="bilinear", anti_aliasing=True)
        self.roi = tuple(int(r) for r in roi)

    @staticmethod
    @lru_cache(maxsize=16)
    def axis_matrix(n: int, m: int, anti_aliasing: bool = True) -> "torch.Tensor":
        """(m, n) float32: bilinear resize n -> m, after Gaussian smoothing when shrinking if
        `anti_aliasing` (the forward resize; `inverse` does not smooth). Cached: the series of a run
        share a few sizes; callers only read it."""
        import torch
        from monai.networks.layers.convutils import gaussian_1d
        from scipy.ndimage import correlate1d

        eye = np.eye(n)
        sigma = max((n / m - 1.0) / 2.0, 0.0) if anti_aliasing else 0.0
        if sigma > 0:
            kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").double().numpy()
            eye = correlate1d(eye, kernel, axis=0, mode="nearest")  # column j = smoothed unit vector j
        # torch's own interpolation applied to unit vectors gives its weights exactly
        rows = torch.nn.functional.interpolate(torch.as_tensor(eye.T)[:, None], size=m, mode="linear",
                                               align_corners=False)[:, 0]  # (n, m)
        return rows.T.contiguous().float()

    def _resized_meta(self, img, out_size: tuple[int, ...]):
        """The bookkeeping of monai.transforms.spatial.functional.resize, unchanged: affine scaled,
        the operation recorded in applied_operations while this transform is tracing."""
        from monai.transforms.inverse import TraceableTransform
        from monai.transforms.utils import scale_affine
        from monai.utils import TraceKeys

        orig = tuple(int(v) for v in img.shape[1:])
        extra = {"mode": "bilinear", "align_corners": TraceKeys.NONE, "dtype": "float32", "new_dim": 0}
        return TraceableTransform.track_transform_meta(
            img, sp_size=out_size, affine=scale_affine(orig, out_size, align_corners=False), extra_info=extra,
            orig_size=orig, transform_info=self.get_transform_info(), lazy=False)

    def __call__(self, img, *args, **kwargs):  # type: ignore[override]
        import torch
        from monai.data import MetaTensor

        if args or kwargs or not isinstance(img, MetaTensor) or img.ndim != 4:
            return super().__call__(img, *args, **kwargs)
        out_size = (*self.roi, int(img.shape[3]))
        meta = self._resized_meta(img, out_size)
        x = img.as_tensor().float()  # (C, H, W, Z)
        c, h, w, z = x.shape
        (m0, b0), (m1, b1) = self.axis_operator(h, self.roi[0]), self.axis_operator(w, self.roi[1])
        if x.permute(0, 3, 2, 1).is_contiguous():
            # Fortran-ordered in plane, as read from DICOM/NIfTI: work on the (C, Z, W, H) view
            # rather than paying for a transposing copy
            y = _banded_left(m1, _banded_right(x.permute(0, 3, 2, 1), m0, b0), b1)  # (C, Z, roi1, roi0)
            return MetaTensor(y.permute(0, 3, 2, 1).contiguous()).copy_meta_from(meta)
        y = _banded_left(m0, x.reshape(c, h, w * z), b0).reshape(c, self.roi[0], w, z)
        y = _banded_left(m1, y, b1)  # (b, w) @ (..., w, z) -> (C, roi0, roi1, Z)
        return MetaTensor(y.contiguous()).copy_meta_from(meta)

    @classmethod
    @lru_cache(maxsize=16)
    def axis_operator(cls, n: int, m: int, block: int = 32) -> tuple["torch.Tensor", tuple[tuple[slice, slice], ...]]:
        """axis_matrix(n, m) and its bands: blocks of `block` output rows, each with the range of
        input columns it reads. The matrix is banded (a 512 -> 128 row has 14 non-zeros: the
        Gaussian's support plus the bilinear pair), so multiplying band by band skips the zeros:
        0.023 vs 0.043 s for a 512x512x78 CT, same values to float32 rounding."""
        import torch

        matrix = cls.axis_matrix(n, m)
        bands = []
        for start in range(0, m, block):
            rows = slice(start, min(start + block, m))
            cols = torch.nonzero((matrix[rows] != 0).any(dim=0)).flatten()
            bands.append((rows, slice(int(cols[0]), int(cols[-1]) + 1)))
        return matrix, tuple(bands)

    def inverse(self, data):  # type: ignore[override]
        """Back to the source in-plane size: what `Resize.inverse` does (bilinear, no smoothing),
        with the slices as a 2-D batch and the result laid out like a NIfTI volume on disk.

        Resize.inverse interpolates the (C, H, W, Z) volume trilinearly although Z keeps its
        length (weights 1 and 0 along Z: the same values); bilinear per slice is half the work
        (CT 160x160x78 -> 512x512x78: 0.036 vs 0.074 s on 2 cores). The result is a view of a
        (C, Z, W, H)-ordered tensor, so the mask written later needs no transposing copy in nibabel.
        """
        import torch
        from monai.data import MetaTensor
        from monai.utils import TraceKeys

        transform = self.pop_transform(data)
        orig = tuple(int(v) for v in transform[TraceKeys.ORIG_SIZE])
        if not isinstance(data, MetaTensor) or data.ndim != 4 or len(orig) != 3 or orig[2] != data.shape[3]:
            return self.inverse_transform(data, transform)
        with self.trace_transform(False):
            meta = self._resized_meta(data, orig)
        c, h, w, z = data.shape
        x = data.as_tensor().float().permute(0, 3, 2, 1).reshape(c * z, 1, w, h)  # every slice of every channel
        y = torch.nn.functional.interpolate(x, size=(orig[1], orig[0]), mode="bilinear", align_corners=False)
        return MetaTensor(y.reshape(c, z, orig[1], orig[0]).permute(0, 3, 2, 1)).copy_meta_from(meta)

    def inverse_mask(self, data, threshold: float) -> np.ndarray:
        """`inverse(data)[0] >= threshold` for a one-channel probability map, as a bool (H, W, Z)
        array in NIfTI's memory layout, computed only where the threshold can be reached.

        A bilinear value is a convex combination of its source neighbours, so it reaches the
        threshold only next to a source pixel that does: only the output box that depends on the
        source pixels at or above the threshold is interpolated (matrix form, as `axis_matrix`), the
        rest is False. On the real CT that is a fifth of the 512x512x78 grid. Equal to thresholding
        `inverse` except where the probability lies within float32 rounding (~1e-7) of the threshold.
        """
        import torch
        from monai.utils import TraceKeys

        transform = self.pop_transform(data)
        orig = tuple(int(v) for v in transform[TraceKeys.ORIG_SIZE])
        x = data.as_tensor().float() if hasattr(data, "as_tensor") else torch.as_tensor(data, dtype=torch.float32)
        if x.ndim != 4 or x.shape[0] != 1 or len(orig) != 3 or orig[2] != x.shape[3]:
            raise PipelineError(f"internal error: inverse_mask expects (1, H, W, Z) keeping Z, got {tuple(x.shape)} -> {orig}")
        out = np.zeros(orig, dtype=bool, order="F")
        hit = (x[0] >= threshold).numpy()
        if not hit.any():
            return out
        box_in, weights = [], []
        for axis, (n, m) in enumerate(zip(x.shape[1:3], orig[:2])):
            on = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
            matrix = self.axis_matrix(n, m, anti_aliasing=False)  # what `inverse` interpolates with
            rows = np.flatnonzero((matrix[:, on[0]:on[-1] + 1] > 0).any(dim=1).numpy())  # outputs that can reach it
            cols = np.flatnonzero((matrix[rows[0]:rows[-1] + 1] > 0).any(dim=0).numpy())  # inputs they read
            box_in.append(slice(int(cols[0]), int(cols[-1]) + 1))
            weights.append((slice(int(rows[0]), int(rows[-1]) + 1), matrix[rows[0]:rows[-1] + 1, box_in[-1]]))
        (rows0, w0), (rows1, w1) = weights
        on_z = np.flatnonzero(hit.any(axis=(0, 1)))
        z = slice(int(on_z[0]), int(on_z[-1]) + 1)
        crop = x[0, box_in[0], box_in[1], z].permute(2, 0, 1)  # (Z', h', w')
        values = torch.matmul(torch.matmul(w0, crop), w1.T)  # (Z', H', W')
        out[rows0, rows1, z] = (values >= threshold).permute(1, 2, 0).numpy()
        return out


def _banded_left(matrix: "torch.Tensor", x: "torch.Tensor", bands) -> "torch.Tensor":
    """matrix @ x (contracting x's second-last axis) for a banded matrix, band by band."""
    import torch

    out = x.new_empty(*x.shape[:-2], matrix.shape[0], x.shape[-1])
    for rows, cols in bands:
        out[..., rows, :] = torch.matmul(matrix[rows, cols], x[..., cols, :])
    return out


def _banded_right(x: "torch.Tensor", matrix: "torch.Tensor", bands) -> "torch.Tensor":
    """x @ matrix.T (contracting x's last axis) for a banded matrix, band by band."""
    import torch

    out = x.new_empty(*x.shape[:-1], matrix.shape[0])
    for rows, cols in bands:
        out[..., rows] = torch.matmul(x[..., cols], matrix[rows, cols].T)
    return out


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
        import torch

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
    import torch

    stacked = torch.cat(channels, dim=0)
    if hasattr(img, "as_tensor"):
        from monai.data import MetaTensor

        return MetaTensor(stacked, meta=img.meta, applied_operations=img.applied_operations)
    return stacked


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
        import torch

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


def _check_roi(cfg: TrainConfig) -> tuple[int, int]:
    if len(cfg.roi_size) != 2 or min(cfg.roi_size) < 8:
        raise PipelineError(f"config train.roi_size: expected [H, W] with both >= 8, got {cfg.roi_size}")
    return int(cfg.roi_size[0]), int(cfg.roi_size[1])


def image_transforms(cfg: TrainConfig, load: bool = True, context: int = 0,
                     modality_channel: bool = False, orient_last: bool = False) -> list[Transform]:
    """The deterministic chain for "image" only (what infer applies before prediction).

    load=False starts from an in-memory channel-first MetaTensor (infer reads DICOM itself).
    orient_last=True reorients on the model's grid, after the in-plane resize, instead of on the
    source grid: the same image (to float32 rounding) when the reorientation only flips axes
    (`flips_only`), and two full-resolution copies fewer at inference (the flip and its inverse:
    ~0.02 s each on a 512x512x78 CT).
    """
    return deterministic_transforms(cfg, keys=("image",), load=load, context=context,
                                    modality_channel=modality_channel, orient_last=orient_last)


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
                             modality_channel: bool = False, orient_last: bool = False) -> list[Transform]:
    """Load, channel-first, RAS, per-modality scaling, liver extraction, in-plane resize.

    `keys` must start with "image"; "label" is optional (absent at inference). `with_indices`
    appends the liver / non-liver slice indices used by the slice sampler, cached with the volume.
    `context` = model.context_slices: the image gets 1 + 2 * context channels (neighbour slices).
    `modality_channel` = model.modality_channel: one more, constant channel (ModalityChanneld); for
    the volumes training samples slices from, leave it off: random_transforms adds it after augmentation.
    """
    roi = _check_roi(cfg)
    keys = tuple(keys)
    has_label = "label" in keys
    if orient_last and has_label:
        # nearest-exact resampling breaks ties towards one side, so a label resize does not commute with a flip
        raise PipelineError("internal error: orient_last is for image-only chains")
    orient = Orientationd(keys, axcodes=ORIENTATION, labels=None)  # labels=None: axes from the MetaTensor space
    # Z keeps its length (-1): slices are the unit the 2D network learns from.
    # nearest-exact and bilinear sample pixel centres; "nearest" and "area" shift by up to half a
    # source pixel, which misaligned labels with images and inverted masks with the source grid.
    chain: list[Transform] = [
        *([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys)] if load else []),
        *([] if orient_last else [orient]),
        NormalizeIntensityByModalityd("image", cfg.ct_window, cfg.mr_percentiles),
    ]
    if has_label:
        # LabelFilter keeps value 1 as 1 and zeroes everything else: liver vs rest for MR organ
        # maps (1..4) and CT maps (0/1) alike.
        chain.append(LabelFilterd("label", applied_labels=[LIVER_LABEL]))
    # anti-aliased bilinear for the image; nearest-exact for the label (smoothing would blur it)
    chain.append(InPlaneResized("image", roi))
    if has_label:
        chain.append(Resized("label", spatial_size=(*roi, -1), mode="nearest-exact"))
    if orient_last:
        chain.append(orient)
    chain.append(NeighbourSlicesd("image", context))  # model.context_slices (2.5D); a no-op at 0
    if has_label and with_indices:
        chain.append(SliceIndicesd("label"))
    if modality_channel:
        chain.append(ModalityChanneld("image"))
    return chain


@contextmanager
def without_metadata() -> Iterator[None]:
    """Run MONAI transforms on plain tensors (for the random training chain).

    MONAI re-wraps every output as a MetaTensor while the global `track_meta` flag is on, even
    when its input was a plain tensor, so converting once (EnsureTyped(track_meta=False)) is not
    enough. With the flag off the random chain costs 1.5 instead of 3.3 ms per 160x160 slice on one
    core (measured on the real T2-SPIR fold 0; RandCropByPosNegLabeld 0.67 -> 0.16 ms,
    RandAffined 1.34 -> 0.82 ms). The flag is process-global: the caller must not run
    metadata-dependent transforms (validation, Invertd) inside this block.
    """
    from monai.data import get_track_meta, set_track_meta

    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def random_transforms(cfg: TrainConfig, modality_channel: bool = False) -> list[Transform]:
    """Draw `slices_per_volume` whole axial slices per volume, then augment each in 2D.

    Every random transform is a dictionary transform over ("image", "label"), so a single draw
    moves both (flips, rotations, affine); intensity transforms touch "image" only.
    """
    keys = ("image", "label")
    ratio = cfg.liver_slice_ratio
    if not 0.0 <= ratio <= 1.0:
        raise PipelineError(f"config train.liver_slice_ratio: expected a value in [0, 1], got {ratio}")
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
        SqueezeDimd(keys, dim=-1),
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=1),
    ]
    if square:  # a 90-degree turn of a non-square slice would change its shape
        chain.append(RandRotate90d(keys, prob=cfg.rotate90_prob, max_k=3))
    chain += [
        RandAffined(keys, prob=cfg.affine_prob, rotate_range=0.26, scale_range=cfg.scale_range,
                    translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="zeros"),
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
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
    ]
    if modality_channel:  # after every intensity transform, so it stays exactly 0 or 1
        chain.append(ModalityChanneld("image"))
    return chain
