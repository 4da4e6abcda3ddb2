"""Speed-ups of MONAI transforms that inference and training use on whole volumes.

Each class here computes what the named MONAI transform computes (tests/test_transforms.py and
tests/test_infer.py compare them on the same inputs) and records the same metadata, so that
`Invertd` undoes it; they differ only in how the arithmetic is laid out (one buffer instead of
several temporaries, one partition for two percentiles, separable matrix products instead of
3-D convolutions). `pipeline/model/transforms.py` holds the recipe that uses them; `pipeline/model/resample.py` shares their separable products and boxed threshold.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles


class ScaleIntensityRangeOneBuffer(ScaleIntensityRange):
    """MONAI's `ScaleIntensityRange`, computed in place in one output buffer.

    Same operations in the same order (subtract, divide, scale, shift, clip), so the same float32
    values; MONAI allocates a new volume for each of the four steps, which made the CT window the
    dearest step of inference preprocessing.
    Anything but a float32 tensor to float32 with a proper range goes to MONAI's own code.
    """

    def __call__(self, img):  # type: ignore[override]
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
    buffer: the same values at half the cost, where this was most of MR inference preprocessing.
    """

    def _normalize(self, img):  # type: ignore[override]
        from monai.transforms.utils_pytorch_numpy_unification import percentile
        from monai.utils import convert_to_tensor

        if self.relative:
            return super()._normalize(img)
        if isinstance(img, torch.Tensor) and img.numel() > 1_000_000 and not img.is_contiguous():
            # MONAI's numpy branch (its threshold) makes a C-ordered copy of a volume in NIfTI's
            # (Fortran) layout first; a percentile does not depend on the order of the values, so
            # the volume's memory is read as it lies (np.percentile partitions its own copy).
            flat = img.as_tensor() if hasattr(img, "as_tensor") else img
            flat = flat.detach().cpu().numpy().ravel(order="K")
            a_min, a_max = (float(v) for v in np.percentile(flat, [self.lower, self.upper]))
        else:
            a_min, a_max = percentile(img, [self.lower, self.upper])
        scaler = ScaleIntensityRangeOneBuffer(a_min=a_min, a_max=a_max, b_min=self.b_min, b_max=self.b_max,
                                              clip=self.clip, dtype=self.dtype)
        return convert_to_tensor(scaler(img), track_meta=False)


class InPlaneResize(Resize):
    """MONAI `Resize(spatial_size=(H, W, -1), mode="bilinear", anti_aliasing=True)` for (C, H, W, Z)
    volumes, with the anti-aliasing and the resize done as one matrix product per in-plane axis.

    Same result as MONAI's Gaussian pre-smoothing (skimage's sigma rule, MONAI's erf-sampled kernel
    truncated at 4 sigma; edges repeated) followed by torch's bilinear interpolation (both are
    linear and separable, and Z keeps its length), to float32 rounding. Hand-written for speed:
    MONAI smooths with single-channel 3-D convolutions, seconds per CT volume on a CPU, and even
    1-D filters at full resolution cost more than the two small matrix products here
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
        from monai.data import MetaTensor

        if args or kwargs or not isinstance(img, MetaTensor) or img.ndim != 4:
            return super().__call__(img, *args, **kwargs)
        out_size = (*self.roi, int(img.shape[3]))
        meta = self._resized_meta(img, out_size)
        x = img.as_tensor().float()  # (C, H, W, Z)
        y = separable(x, *self.axis_operator(x.shape[1], self.roi[0]), *self.axis_operator(x.shape[2], self.roi[1]))
        return MetaTensor(y.contiguous()).copy_meta_from(meta)

    @classmethod
    @lru_cache(maxsize=16)
    def axis_operator(cls, n: int, m: int, block: int = 32) -> tuple["torch.Tensor", tuple[tuple[slice, slice], ...]]:
        """axis_matrix(n, m) and its bands: blocks of `block` output rows, each with the range of
        input columns it reads. The matrix is banded (a 512 -> 128 row has 14 non-zeros: the
        Gaussian's support plus the bilinear pair), so multiplying band by band skips the zeros,
        with the same values to float32 rounding."""

        matrix = cls.axis_matrix(n, m)
        return matrix, matrix_bands(matrix, block)

    def inverse(self, data):  # type: ignore[override]
        """Back to the source in-plane size: what `Resize.inverse` does (bilinear, no smoothing),
        with the slices as a 2-D batch and the result laid out like a NIfTI volume on disk.

        Resize.inverse interpolates the (C, H, W, Z) volume trilinearly although Z keeps its
        length (weights 1 and 0 along Z: the same values); bilinear per slice is half the work.
        The result is a view of a
        (C, Z, W, H)-ordered tensor, so the mask written later needs no transposing copy in nibabel.
        """
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
        rest is False: on a CT, a small part of the grid. Equal to thresholding
        `inverse` except where the probability lies within float32 rounding (~1e-7) of the threshold.
        """
        from monai.utils import TraceKeys

        transform = self.pop_transform(data)
        orig = tuple(int(v) for v in transform[TraceKeys.ORIG_SIZE])
        x = data.as_tensor().float() if hasattr(data, "as_tensor") else torch.as_tensor(data, dtype=torch.float32)
        if x.ndim != 4 or x.shape[0] != 1 or len(orig) != 3 or orig[2] != x.shape[3]:
            raise ValueError(f"inverse_mask expects (1, H, W, Z) keeping Z, got {tuple(x.shape)} -> {orig}")
        # what `inverse` interpolates with, per axis: (source size, model size)
        w0, w1 = (self.axis_matrix(n, m, anti_aliasing=False) for n, m in zip(x.shape[1:3], orig[:2]))
        return threshold_separable(x[0], w0, w1, orig, threshold)


def matrix_bands(matrix: "torch.Tensor", block: int = 32) -> tuple[tuple[slice, slice], ...]:
    """A banded matrix's bands: blocks of `block` rows, each with the range of columns it reads (one
    zero-weight column for rows that read nothing, e.g. padding)."""
    bands = []
    for start in range(0, matrix.shape[0], block):
        rows = slice(start, min(start + block, matrix.shape[0]))
        cols = torch.nonzero((matrix[rows] != 0).any(dim=0)).flatten()
        bands.append((rows, slice(int(cols[0]), int(cols[-1]) + 1) if cols.numel() else slice(0, 1)))
    return tuple(bands)


def separable(x: "torch.Tensor", m0: "torch.Tensor", bands0, m1: "torch.Tensor", bands1) -> "torch.Tensor":
    """(C, H, W, Z) -> (C, R0, R1, Z): m0 (R0, H) along the first axis and m1 (R1, W) along the second,
    band by band. A volume Fortran-ordered in plane (as read from DICOM / NIfTI) is worked on as its
    (C, Z, W, H) view, with no transposing copy; the result then keeps that layout (a permuted view)."""
    if x.permute(0, 3, 2, 1).is_contiguous():
        y = banded_left(m1, banded_right(x.permute(0, 3, 2, 1), m0, bands0), bands1)  # (C, Z, R1, R0)
        return y.permute(0, 3, 2, 1)
    c, h, w, z = x.shape
    y = banded_left(m0, x.reshape(c, h, w * z), bands0).reshape(c, m0.shape[0], w, z)
    return banded_left(m1, y, bands1)  # (b, w) @ (..., w, z) -> (C, R0, R1, Z)


def threshold_separable(x: "torch.Tensor", w0: "torch.Tensor", w1: "torch.Tensor", out_shape: Sequence[int],
                        threshold: float) -> np.ndarray:
    """`(w0 @ x[:, :, z] @ w1.T) >= threshold` for every slice z of x (H, W, Z), as a bool (N0, N1, Z) array in
    NIfTI's memory layout, computed only where the threshold can be reached: w0 (N0, H) and w1 (N1, W) hold
    non-negative weights summing to at most 1 per row, so a value reaches the threshold only where one of
    the pixels it reads does. Only the box of rows reading such pixels is computed, the rest is False."""
    out = np.zeros(tuple(out_shape), dtype=bool, order="F")
    hit = (x >= threshold).numpy()
    if not hit.any():
        return out
    boxes = []
    for axis, matrix in enumerate((w0, w1)):
        on = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        rows = np.flatnonzero((matrix[:, on[0]:on[-1] + 1] > 0).any(dim=1).numpy())  # outputs that can reach it
        if not rows.size:
            return out
        cols = np.flatnonzero((matrix[rows[0]:rows[-1] + 1] > 0).any(dim=0).numpy())  # inputs they read
        boxes.append((slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)))
    (rows0, cols0), (rows1, cols1) = boxes
    on_z = np.flatnonzero(hit.any(axis=(0, 1)))
    z = slice(int(on_z[0]), int(on_z[-1]) + 1)
    crop = x[cols0, cols1, z].permute(2, 0, 1)  # (Z', h', w')
    values = torch.matmul(torch.matmul(w0[rows0, cols0], crop), w1[rows1, cols1].T)  # (Z', H', W')
    out[rows0, rows1, z] = (values >= threshold).permute(1, 2, 0).numpy()
    return out


def banded_left(matrix: "torch.Tensor", x: "torch.Tensor", bands) -> "torch.Tensor":
    """matrix @ x (contracting x's second-last axis) for a banded matrix, band by band."""

    out = x.new_empty(*x.shape[:-2], matrix.shape[0], x.shape[-1])
    for rows, cols in bands:
        out[..., rows, :] = torch.matmul(matrix[rows, cols], x[..., cols, :])
    return out


def banded_right(x: "torch.Tensor", matrix: "torch.Tensor", bands) -> "torch.Tensor":
    """x @ matrix.T (contracting x's last axis) for a banded matrix, band by band."""

    out = x.new_empty(*x.shape[:-1], matrix.shape[0])
    for rows, cols in bands:
        out[..., rows] = torch.matmul(x[..., cols], matrix[rows, cols].T)
    return out
