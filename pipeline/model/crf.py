"""A clean-up through the third dimension that uses the image: mean-field iterations of a two-label
conditional random field on the liver probability, on the model's grid (infer.crf_weight).

Each voxel's liver logit becomes the network's logit plus `weight` times the kernel-weighted mean of
(2q - 1) over its neighbours (q: the current liver probability), with a bilateral kernel
exp(-d^2 / 2 THETA_MM^2) * exp(-dI^2 / 2 THETA_INTENSITY^2): neighbours close in space and in grey
level pull a voxel to their label, across an edge of the image they do not. The window is local
(RADIUS voxels in-plane, one slice above and below), the message is normalised by the kernel's mass
(so `weight` is in logit units), and only the box where the liver is possible (probability >=
BOX_LEVEL, plus the window's reach) is computed.

Written here rather than MONAI's `CRF` block: that one needs MONAI's compiled extension (`monai._C`,
a permutohedral lattice), which MONAI's pip wheel lacks, and a fully connected kernel is not what
was measured (docs/decisions.md#crf).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

THETA_MM = 5.0  # spatial width of the kernel
THETA_INTENSITY = 0.05  # grey-level width, on the network's input scale (CT window / MR 1-99 percentiles -> [0, 1])
RADIUS = 2  # in-plane window radius (voxels); through the plane: one slice on each side
ITERATIONS = 5
BOX_LEVEL = 0.05  # the box computed: where the probability reaches this, plus the window's reach
_STORE_LIMIT = 2 ** 25  # kernel values kept between iterations (float32: 128 MB); above, recomputed each time


def _offsets(radius: int) -> list[tuple[int, int, int]]:
    return [(dx, dy, dz) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1)
            for dz in (-1, 0, 1) if (dx, dy, dz) != (0, 0, 0)]


def crf_refine(probs: torch.Tensor, image: torch.Tensor, spacing: Sequence[float], weight: float,
               iterations: int = ITERATIONS, radius: int = RADIUS, theta_mm: float = THETA_MM,
               theta_intensity: float = THETA_INTENSITY) -> torch.Tensor:
    """`probs` (H, W, Z) liver probability refined by the image `image` (H, W, Z, the network's input
    intensities) on a grid of `spacing` mm per axis; a new tensor, `probs` outside the box unchanged.
    Beyond the box the image and the label repeat their edge values."""
    if weight <= 0 or iterations <= 0:
        return probs
    near = torch.nonzero(probs >= BOX_LEVEL)
    if not len(near):
        return probs
    reach = torch.tensor([2 * radius, 2 * radius, 2])
    lo = torch.clamp(near.min(0).values - reach, min=0)
    hi = torch.minimum(near.max(0).values + reach + 1, torch.tensor(probs.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    p = probs[box].float().clamp(1e-4, 1 - 1e-4)
    X, Y, Z = p.shape
    # The grid padded by the window's reach and flattened: every neighbour at offset (dx, dy, dz) is then
    # the same flat distance away, so each step of the sums below is one contiguous slice (fast), computed
    # over the span from the first to the last box voxel (pad voxels inside the span are computed and dropped)
    padded = (X + 2 * radius, Y + 2 * radius, Z + 2)
    strides = (padded[1] * padded[2], padded[2], 1)
    pad = (1, 1, radius, radius, radius, radius)  # F.pad's order: the last axis (Z) first

    def padded_flat(values: torch.Tensor) -> torch.Tensor:  # the box's values, their edges repeated
        return torch.nn.functional.pad(values[None, None], pad, mode="replicate").reshape(-1)

    img = padded_flat(image[box].float().clamp(0, 1))
    first = radius * strides[0] + radius * strides[1] + 1
    span = (X - 1) * strides[0] + (Y - 1) * strides[1] + (Z - 1) + 1
    # one of each pair of opposite offsets: the kernel is symmetric, k(i, i + o) = k(i + o, i), so the kernel of -o
    # at i is the kernel of o at i - o, read from the same values (half the memory and the exponentials)
    offsets = [o for o in _offsets(radius) if o > (0, 0, 0)]
    near_weights = [float(np.exp(-((dx * spacing[0]) ** 2 + (dy * spacing[1]) ** 2 + (dz * spacing[2]) ** 2)
                                 / (2 * theta_mm ** 2))) for dx, dy, dz in offsets]
    shift = [dx * strides[0] + dy * strides[1] + dz for dx, dy, dz in offsets]  # all > 0

    def kernel(i: int) -> torch.Tensor:  # k(p, p + o) for p from first - o to the span's end
        diff = img[first:first + span + shift[i]] - img[first - shift[i]:first + span]
        return torch.exp(diff.square_().mul_(-0.5 / theta_intensity ** 2)).mul_(near_weights[i])

    stored = [kernel(i) for i in range(len(offsets))] if (span + shift[-1]) * len(offsets) <= _STORE_LIMIT else None

    def both_ways(i: int, values: torch.Tensor | None, out: torch.Tensor) -> None:
        """out += k(i, i + o) v(i + o) + k(i, i - o) v(i - o) over the span (v = 1 when values is None)."""
        k = stored[i] if stored is not None else kernel(i)
        forward, backward = k[shift[i]:], k[:span]
        if values is None:
            out += forward
            out += backward
        else:
            out.addcmul_(forward, values[first + shift[i]:first + span + shift[i]])
            out.addcmul_(backward, values[first - shift[i]:first + span - shift[i]])

    mass = torch.zeros(span)
    for i in range(len(offsets)):
        both_ways(i, None, mass)
    mass.clamp_(min=1e-6)
    unary = padded_flat(torch.log(p) - torch.log1p(-p))[first:first + span]
    q = p
    for _ in range(iterations):
        label = padded_flat(2 * q - 1)
        message = torch.zeros(span)
        for i in range(len(offsets)):
            both_ways(i, label, message)
        label[first:first + span] = torch.sigmoid(unary + weight * message / mass)  # (a buffer now)
        q = label.view(padded)[radius:radius + X, radius:radius + Y, 1:1 + Z]
    out = probs.clone()
    out[box] = q.to(out.dtype)
    return out


def grid_spacing(image) -> list[float]:
    """Voxel size (mm) of a MetaTensor's grid along its three spatial axes (its affine's columns)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def refine_probs(probs, image, weight: float, channel: int = 0):
    """infer.crf_weight on a network's output: `probs` (1, H, W, Z) refined with the input image's
    intensity channel `channel` (the centre slice when model.context_slices adds neighbours)."""
    if weight <= 0:
        return probs
    from pipeline.model.predict import plain

    refined = crf_refine(plain(probs)[0], plain(image)[channel], grid_spacing(image), weight)
    return refined[None]
