"""Intensity dictionary transforms of our own: normalisation by modality, random grey curves, organ
intensity remapping. Images are (C, H, W[, Z]) MetaTensors; labels are never touched.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (MapTransform, RandomizableTransform, ScaleIntensityRanged,
                              ScaleIntensityRangePercentilesd, Transform)

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.model.fast_transforms import ScaleIntensityRangeOneBuffer, ScaleIntensityRangePercentilesOnePass

# 2.5D training with organ intensity augmentation: the organ maps of the neighbour slices, channel for
# channel with the image's, so each context channel's organs are remapped by their own outline
LABEL_CONTEXT = "label_context"


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


def stack_channels(img, channels: list) -> "torch.Tensor":
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
    third of the brightness; the range's evidence: docs/decisions.md#organ-texture). A liver and spleen darkened together (iron
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
