"""The in-plane resampling of train.pixel_spacing for image-only chains (inference), in one separable pass.

`InPlaneResampled` computes what MONAI's `Orientationd(RAS)` + `Spacingd(pixdim=(s, s, -1),
bilinear)` + `ResizeWithPadOrCropd(roi)` compute for the image (tests/test_resample.py compares them
on real series), and undoes it for the network's probabilities: fully (`inverse`, what `Invertd`
does), or only over the liver's box (`inverse_mask`, the threshold of that inverse).

Why hand-written: Spacingd resamples the whole volume through `grid_sample` in 3-D (trilinear,
although the slices keep their spacing) after Orientationd has copied it to flip its axes, and
Invertd does both again at full resolution on the way back: on a 512 x 512 CT most of inference.
When reorienting only flips axes (axial series), the three steps are, per in-plane axis, one linear
map from source pixels to roi pixels with two non-zero weights a row (bilinear between the two
source pixels around each sample, clamped at the border as grid_sample's "border" padding, zero
where the crop pads); the flip is a reversal of that map's columns, and the slices only flip. The
geometry (output shape, affine, the sample positions) is MONAI's own, read from the same three
transforms run lazily on an empty tensor, so the two cannot drift apart. Other orientations go
through the three MONAI transforms themselves.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Orientationd, ResizeWithPadOrCropd, Spacingd

from pipeline.model.fast_transforms import matrix_bands, separable, threshold_separable

ORIENTATION = "RAS"


@dataclass(frozen=True)
class AxisMap:
    """One in-plane axis: model pixel i samples the RAS-ordered source at x = clip(a * (i + shift) + b,
    0, n - 1) when 0 <= i + shift < m (Spacing's grid), else it is padding (0)."""

    n: int  # source pixels
    roi: int  # model pixels
    m: int  # pixels of Spacing's grid before the pad / crop
    a: float
    b: float
    shift: int
    flip: bool  # the source axis runs opposite to RAS


def _monai_steps(spacing: float, roi: Sequence[int], lazy: bool = False) -> list:
    return [Orientationd("image", axcodes=ORIENTATION, labels=None, lazy=lazy),
            Spacingd("image", pixdim=(spacing, spacing, -1.0), mode="bilinear", lazy=lazy),
            ResizeWithPadOrCropd("image", spatial_size=(*roi, -1), lazy=lazy)]


def plan(shape: Sequence[int], affine: np.ndarray, spacing: float, roi: Sequence[int]):
    """(AxisMap of axis 0, of axis 1, Z flipped, output shape, output affine) of a volume of `shape`
    with `affine`, or None when reorienting it would permute axes (the MONAI transforms then run)."""
    from monai.data import MetaTensor

    d = {"image": MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *shape), affine=torch.as_tensor(affine))}
    affines, shapes = [np.asarray(affine, dtype=np.float64)], [tuple(int(s) for s in shape)]
    for step in _monai_steps(spacing, roi, lazy=True):
        d = step(d)
        affines.append(np.asarray(d["image"].peek_pending_affine(), dtype=np.float64))
        shapes.append(tuple(int(s) for s in d["image"].peek_pending_shape()))
    orient, spac, crop = (np.linalg.solve(affines[k], affines[k + 1]) for k in range(3))
    linear = [orient[:3, :3], spac[:3, :3], crop[:3, :3]]
    if any(np.abs(x - np.diag(np.diag(x))).max() > 1e-6 for x in linear) or abs(spac[2, 2] - 1) > 1e-6 \
            or abs(crop[0, 0] - 1) > 1e-6 or abs(crop[1, 1] - 1) > 1e-6:
        return None
    axes = []
    for ax in (0, 1):
        shift = float(crop[ax, 3])
        if abs(shift - round(shift)) > 1e-6:
            return None
        axes.append(AxisMap(n=shapes[0][ax], roi=shapes[3][ax], m=shapes[2][ax], a=float(spac[ax, ax]),
                            b=float(spac[ax, 3]), shift=int(round(shift)), flip=bool(orient[ax, ax] < 0)))
    return axes[0], axes[1], bool(orient[2, 2] < 0), shapes[3], affines[3]


def forward_matrix(ax: AxisMap) -> torch.Tensor:
    """(roi, n) float32: the model pixels as weights of the source pixels (in source order)."""
    i = np.arange(ax.roi)
    j = i + ax.shift
    inside = (j >= 0) & (j <= ax.m - 1)
    x = np.clip(ax.a * j + ax.b, 0.0, ax.n - 1)  # grid_sample's "border" padding clamps the position
    f = np.minimum(np.floor(x).astype(np.int64), ax.n - 1)
    w = x - f
    matrix = np.zeros((ax.roi, ax.n))
    np.add.at(matrix, (i[inside], f[inside]), 1.0 - w[inside])
    upper = inside & (w > 0)
    np.add.at(matrix, (i[upper], np.minimum(f[upper] + 1, ax.n - 1)), w[upper])
    return torch.as_tensor(matrix[:, ::-1].copy() if ax.flip else matrix, dtype=torch.float32)


def inverse_matrix(ax: AxisMap) -> torch.Tensor:
    """(n, roi) float32: the source pixels (in source order) as weights of the model pixels: Spacing's
    inverse resampling (bilinear on its grid, border) after the pad / crop's inverse (zeros where the
    crop cut)."""
    r = np.arange(ax.n)
    j = np.clip((r - ax.b) / ax.a, 0.0, ax.m - 1)
    f = np.minimum(np.floor(j).astype(np.int64), ax.m - 1)
    w = j - f
    matrix = np.zeros((ax.n, ax.roi))
    for col, weight in ((f, 1.0 - w), (np.minimum(f + 1, ax.m - 1), w)):
        i = col - ax.shift
        keep = (i >= 0) & (i < ax.roi) & (weight > 0)
        np.add.at(matrix, (r[keep], i[keep]), weight[keep])
    return torch.as_tensor(matrix[::-1].copy() if ax.flip else matrix, dtype=torch.float32)


class InPlaneResampled(MapTransform, InvertibleTransform):
    """Orientationd(RAS) + Spacingd((spacing, spacing, -1), bilinear) + ResizeWithPadOrCropd(roi) on
    "image" (C, X, Y, Z), in one separable pass when reorienting only flips axes; see the module doc."""

    def __init__(self, keys: KeysCollection, spacing: float, roi: Sequence[int]) -> None:
        super().__init__(keys)
        self.spacing, self.roi = float(spacing), tuple(int(r) for r in roi)
        self.steps = _monai_steps(self.spacing, self.roi)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._forward(d[key])
        return d

    def _forward(self, img):
        from monai.data import MetaTensor
        from monai.transforms.inverse import TraceableTransform

        found = plan(img.shape[1:], np.asarray(img.affine, dtype=np.float64), self.spacing, self.roi) \
            if isinstance(img, MetaTensor) and img.ndim == 4 else None
        if found is None:
            d = {"image": img}
            for step in self.steps:
                d = step(d)
            return d["image"]
        ax0, ax1, flip_z, out_shape, _ = found
        m0, m1 = forward_matrix(ax0), forward_matrix(ax1)
        y = separable(img.as_tensor().float(), m0, matrix_bands(m0), m1, matrix_bands(m1))
        if flip_z:
            y = y.flip(3)
        xform = np.linalg.solve(np.asarray(img.affine, dtype=np.float64), found[4])  # output index -> source index
        meta = TraceableTransform.track_transform_meta(
            img, sp_size=out_shape, affine=xform, orig_size=tuple(int(s) for s in img.shape[1:]),
            extra_info={"axes": [asdict(ax0), asdict(ax1)], "flip_z": flip_z, "xform": xform.tolist()},
            transform_info=self.get_transform_info(), lazy=False)
        return MetaTensor(y.contiguous()).copy_meta_from(meta)

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._inverse(d[key])
        return d

    def _inverse(self, img):
        from monai.data import MetaTensor
        from monai.utils import TraceKeys

        op = self.get_most_recent_transform(img, check=False)
        if op[TraceKeys.CLASS_NAME] != type(self).__name__:  # the MONAI steps ran: undo them in turn
            # on a copy of the record: MONAI's inverses take items out of it as they go
            d = {"image": MetaTensor(img.as_tensor(), meta=img.meta, applied_operations=copy.deepcopy(img.applied_operations))}
            for step in reversed(self.steps):
                d = step.inverse(d)
            return d["image"]
        op = self.pop_transform(img)
        ax0, ax1, flip_z, orig = _recorded(op)
        with self.trace_transform(False):
            meta = _source_meta(self, img, op, orig)
        x = img.as_tensor().float()
        if flip_z:
            x = x.flip(3)
        i0, i1 = inverse_matrix(ax0), inverse_matrix(ax1)
        # laid out as (C, Z, r1, r0): the result comes in NIfTI's memory layout, as a mask is written
        x = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
        return MetaTensor(separable(x, i0, matrix_bands(i0), i1, matrix_bands(i1))).copy_meta_from(meta)

    def inverse_mask(self, img, threshold: float) -> np.ndarray:
        """`inverse(img)[0] >= threshold` for a one-channel probability map (1, r0, r1, Z), as a bool
        (n0, n1, Z) array in NIfTI's memory layout, computed only where the threshold can be reached.

        Each source value is a combination of model pixels with non-negative weights summing to at most
        1 (threshold_separable computes only the box that can reach the threshold). Equal to thresholding
        `inverse` except where the probability lies within float32 rounding of the threshold.
        """
        from monai.utils import TraceKeys

        op = self.get_most_recent_transform(img, check=False)
        if op[TraceKeys.CLASS_NAME] != type(self).__name__:
            return np.asarray(self._inverse(img)[0]) >= threshold
        op = self.pop_transform(img)
        ax0, ax1, flip_z, orig = _recorded(op)
        x = img.as_tensor().float() if hasattr(img, "as_tensor") else torch.as_tensor(img, dtype=torch.float32)
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"inverse_mask expects one channel (1, H, W, Z), got {tuple(x.shape)}")
        if flip_z:
            x = x.flip(3)
        return threshold_separable(x[0], inverse_matrix(ax0), inverse_matrix(ax1), orig, threshold)


def _recorded(op: dict) -> tuple[AxisMap, AxisMap, bool, tuple[int, ...]]:
    from monai.utils import TraceKeys

    info = op[TraceKeys.EXTRA_INFO]
    ax0, ax1 = (AxisMap(**a) for a in info["axes"])
    return ax0, ax1, bool(info["flip_z"]), tuple(int(v) for v in op[TraceKeys.ORIG_SIZE])


def _source_meta(transform: InPlaneResampled, img, op: dict, orig: tuple[int, ...]):
    """The source grid's metadata: the affine before the forward pass (recorded as its inverse)."""
    from monai.transforms.inverse import TraceableTransform
    from monai.utils import TraceKeys

    xform = np.linalg.inv(np.asarray(op[TraceKeys.EXTRA_INFO]["xform"], dtype=np.float64))
    return TraceableTransform.track_transform_meta(
        img, sp_size=orig, affine=xform, orig_size=tuple(int(s) for s in img.shape[1:]),
        transform_info=transform.get_transform_info(), lazy=False)
