"""Network plans that follow from sizes: nnU-Net's rule for DynUNet's strides, and the factor an input
size must be a multiple of for a network to give back its own size (config.validate checks sizes
with them, model.networks builds with them)."""
from __future__ import annotations

import math
from typing import Sequence

MIN_FEATURE_MAP = 8  # nnU-Net stops down-sampling an axis before its feature map would go below this


def plan_dynunet(roi: Sequence[int], levels: int) -> list[list[int]]:
    """nnU-Net's rule for the strides of a 2D DynUNet with at most `levels` resolution levels:
    halve an axis while its feature map stays >= MIN_FEATURE_MAP. Returns the strides per level
    ([1, 1] first: the input level), one list per level actually used."""
    size, strides = [int(r) for r in roi], [[1, 1]]
    while len(strides) < levels:
        step = [2 if s // 2 >= MIN_FEATURE_MAP else 1 for s in size]
        if step == [1, 1]:
            break
        size = [s // k for s, k in zip(size, step)]
        strides.append(step)
    return strides


def network_divisor(m, roi: Sequence[int]) -> list[int]:
    """Per axis, the factor an input size must be a multiple of for the network of `m` (the config's
    model section) to down-sample and up-sample it back to the same size (the product of its strides)."""
    if m.name == "dynunet":
        return [math.prod(s[a] for s in plan_dynunet(roi, len(m.channels))) for a in (0, 1)]
    if m.name in ("unet", "attentionunet"):
        return [math.prod(m.strides)] * 2
    return [2 ** (len(m.channels) - 1)] * 2  # segresnet, basicunet: one halving per level


MIN_FEATURE_MAP_3D = 4  # nnU-Net's 3D plans stop halving an axis below this


def plan_dynunet_3d(patch: Sequence[int], spacing: Sequence[float], levels: int) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's 3d_fullres rule for a DynUNet's (kernel sizes, strides), one list per level, for a
    patch of `patch` voxels of `spacing` mm and at most `levels` levels. An axis is halved while its
    voxels are at most twice the finest axis's size and its feature map stays >= MIN_FEATURE_MAP_3D;
    its kernel is 3 where its voxels are at most twice the finest (1 where the axis is still much
    coarser: thick MR slices get in-plane kernels until the in-plane voxels have grown to match)."""
    size, spc = [int(p) for p in patch], [float(s) for s in spacing]

    def kernel() -> list[int]:
        return [3 if s <= 2 * min(spc) else 1 for s in spc]

    kernels, strides = [kernel()], [[1, 1, 1]]
    while len(strides) < levels:
        step = [2 if s <= 2 * min(spc) and n // 2 >= MIN_FEATURE_MAP_3D else 1 for s, n in zip(spc, size)]
        if step == [1, 1, 1]:
            break
        size = [n // k for n, k in zip(size, step)]
        spc = [s * k for s, k in zip(spc, step)]
        strides.append(step)
        kernels.append(kernel())
    return kernels, strides
