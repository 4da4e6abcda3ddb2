"""Typed configuration: nested dataclasses loaded strictly from YAML.

`configs/default.yaml` lists every field below with a one-line comment. Loading is strict:
an unknown key or a value of the wrong type raises `ConfigError` naming the dotted key.
`section.key=value` overrides (from `--set`) are parsed with `yaml.safe_load`, checked the
same way, and logged.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.plans import network_divisor, plan_dynunet
from pipeline.core.files import atomic_path

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class ConfigError(PipelineError):
    """A config file or override is invalid; the message names the key."""


AmpMode = Literal["auto", "native_bf16", "bf16", "fp16", "off"]


@dataclass
class SynthConfig:
    patients: int = 5  # patients per modality (CT and MR each get this many)
    seed: int = 0  # same seed -> byte-identical data set
    ct_size: int = 160  # in-plane matrix of the CT series (rows = columns)
    mr_size: int = 128  # in-plane matrix of the MR series
    ct_slices: list[int] = field(default_factory=lambda: [40, 56])  # [min, max] CT slice count
    mr_slices: list[int] = field(default_factory=lambda: [26, 36])  # [min, max] MR slice count
    workers: int = 0  # processes writing patients side by side (0: one per CPU core); same bytes either way


@dataclass
class PrepareConfig:
    sequences: list[str] = field(default_factory=lambda: ["CT", "T1DUAL_InPhase", "T1DUAL_OutPhase", "T2SPIR"])
    folds: int = 5  # number of patient-level cross-validation folds
    fold_seed: int = 0  # seed of the patient -> fold assignment
    spacing_tolerance: float = 0.01  # max relative deviation of a slice step from the median
    orientation_tolerance: float = 1e-4  # max difference between slice direction cosines
    liver_labels: list[int] = field(default_factory=list)  # MSD/nnU-Net data sets: liver label values ([] = from the names)


ModelName = Literal["unet", "dynunet", "segresnet", "attentionunet", "basicunet"]


@dataclass
class ModelConfig:
    # MONAI 2D network: unet | dynunet (nnU-Net's, strides derived from train.roi_size) | segresnet |
    # attentionunet | basicunet (five levels)
    name: ModelName = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # features per level
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # down-sampling per level (unet, attentionunet)
    num_res_units: int = 1  # residual units per block (0 = plain convolutions)
    dropout: float = 0.0  # dropout probability
    # activation: auto = the network's own (unet PReLU, dynunet and basicunet LeakyReLU, segresnet ReLU)
    act: Literal["auto", "relu", "leakyrelu", "prelu"] = "auto"
    norm: Literal["instance", "batch"] = "instance"  # normalisation layer
    context_slices: int = 0  # neighbouring slices on each side fed as extra input channels (2.5D); 0 = plain 2D
    # one more input channel, 1 on CT slices and 0 on MR: tells one model of both modalities which it sees
    modality_channel: bool = False
    deep_supervision: bool = False  # dynunet: the loss also on lower decoder levels, summed (nnU-Net)
    deep_supervision_levels: int = 2  # decoder levels below full resolution that deep supervision adds
    # trained on every labelled organ (liver, kidneys, spleen: labels.ORGANS, one output each) instead of
    # liver against the rest; infer still writes the liver alone
    organs: bool = False
    # planes the slice-wise network is trained on and predicts along (multi-planar 2D): axial, coronal,
    # sagittal; infer averages the views' probabilities on the source grid. Views besides axial need a
    # pixel spacing (train.pixel_spacing auto or mm): the volume is resampled to that spacing on all three axes
    views: list[str] = field(default_factory=lambda: ["axial"])
    dims: int = 2  # 2: slice-wise networks (above); 3: DynUNet on 3D patches (pipeline.model.volumetric)


VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class TrainConfig:
    roi_size: list[int] = field(default_factory=lambda: [160, 160])  # in-plane model input size
    # in-plane pixel spacing in mm that slices are resampled to before being padded / cropped to
    # roi_size (0 = off: every slice resized to roi_size whatever its field of view); "auto": training
    # sets it from the data (pipeline.train.cv.auto_pixel_spacing) and saves the number in the run's config
    pixel_spacing: float | Literal["auto"] = "auto"
    # training on random crops of this size from each roi_size slice (nnU-Net's patch-based training:
    # cheaper steps, more of them in a budget); validation and inference see the whole roi ([] = off)
    patch_size: list[int] = field(default_factory=list)
    # model.dims 3: the patch [R, A, S] in voxels at (pixel_spacing, pixel_spacing, slice_spacing) mm,
    # patches per optimisation step, and the through-plane spacing ("auto": the data set's median)
    patch_3d: list[int] = field(default_factory=lambda: [128, 128, 32])
    batch_3d: int = 2
    slice_spacing: float | Literal["auto"] = "auto"
    ct_window: list[float] = field(default_factory=lambda: [-150.0, 250.0])  # CT HU window [min, max]
    mr_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])  # MR intensity percentiles
    liver_slice_ratio: float = 0.85  # fraction of training slices that contain liver
    slices_per_volume: int = 8  # 2D slices drawn from each volume per epoch
    batch_size: int = 16  # slices per optimisation step (per process under DDP)
    epochs: int = 700  # epochs per fold
    # minutes of training per fold (0 = off): after the warm-up the run times itself and fixes
    # train.epochs to what fits; the fixed count is saved (config.yaml, checkpoints) and --resume keeps it
    budget_minutes: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: SGD with Nesterov momentum (nnU-Net's, with schedule poly)
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 1e-4  # weight decay
    momentum: float = 0.99  # sgd's Nesterov momentum
    warmup_epochs: int = 2  # linear warm-up before the decay
    schedule: Literal["cosine", "poly"] = "cosine"  # decay after warm-up
    loss: Literal["dice_ce", "dice_focal", "bce"] = "dice_ce"
    val_every: int = 4  # validate every N epochs
    amp: AmpMode = "auto"  # auto: CUDA AMP on GPU, float32 on CPU; native_bf16: bf16 on CPUs with AVX512-BF16/AMX
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader workers
    cache_rate: float = 1.0  # fraction of volumes whose deterministic transforms are cached
    seed: int = 0  # seed of weights, sampling and augmentation
    flip_prob: float = 0.0  # probability of a flip, per in-plane axis (off: a flip swaps liver and spleen sides)
    rotate90_prob: float = 0.0  # probability of a random 90-degree turn (square roi only)
    affine_prob: float = 0.5  # probability of a small rotation/scale/shift
    scale_range: float = 0.2  # zoom of the affine augmentation: factor drawn in [1 - r, 1 + r]
    bias_field_prob: float = 0.3  # probability of a smooth multiplicative intensity field (MR coil shading)
    intensity_scale: float = 0.3  # intensity scaling augmentation: factor drawn in [1 - s, 1 + s] (p 0.5)
    histogram_shift_prob: float = 0.3  # probability of a random monotone remapping of the grey levels
    ema_decay: float = 0.0  # exponential moving average of the weights, validated and saved (0 = off)
    # nnU-Net's further augmentations, off by default (probability per slice; added after the others)
    blur_prob: float = 0.0  # Gaussian blur, sigma 0.5-1.5 pixels
    lowres_prob: float = 0.0  # low-resolution simulation: down-sampled by 0.5-1, up-sampled again
    elastic_prob: float = 0.0  # elastic deformation
    grey_curve_prob: float = 0.0  # random grey-level curve, monotone or not (contrast-agnostic training)
    organ_intensity_prob: float = 0.5  # each labelled organ moved to a random brightness of its own
    organ_intensity_shared: float = 0.0  # of those slices, the fraction where every organ gets one level (organs alike)
    # the moved organ's texture scaled by a factor drawn in this range
    organ_intensity_texture: list[float] = field(default_factory=lambda: [0.25, 1.5])
    # gamma of the contrast augmentation (p 0.3): wider than nnU-Net's [0.7, 1.5], which left the model weaker on
    # real MR under strong gamma changes at the same unperturbed Dice (docs/decisions.md#gamma-range)
    gamma_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    tensorboard: bool = True  # TensorBoard event files in each fold folder (when tensorboard is installed)
    # torch.compile of the training network: auto = on for a fold of >= 1000 steps or a budget of >= 5 minutes
    # (a compile takes about a minute the first time, seconds from inductor's cache), on | off
    compile: Literal["auto", "on", "off"] = "auto"


@dataclass
class InferConfig:
    folds: str = "all"  # "all" = ensemble of every fold's checkpoint, or one fold number
    # best: the epoch with the highest validation Dice; last: the final epoch. A Dice reported on
    # the same patients that chose "best" is optimistic: score held-out patients with "last".
    checkpoint: Literal["best", "last"] = "best"
    batch_size: int = 32  # slices per forward pass
    largest_component: bool = True  # keep only the largest connected liver component
    # fill enclosed holes in the liver mask. Off by default: on held-out data it made no measurable
    # difference (docs/decisions.md#fill-holes) and costs a labelling of the background around the liver per series
    fill_holes: bool = False
    # through-plane consistency: each slice's liver probability averaged with this many neighbouring
    # slices on each side before the 0.5 threshold (0 = off; docs/decisions.md#slice-smoothing)
    slice_smoothing: int = 1
    # test-time augmentation: each slice also predicted zoomed by these factors about its centre, the
    # liver probabilities zoomed back and averaged ([1.0] = off; docs/decisions.md#test-time-zooms)
    tta_scales: list[float] = field(default_factory=lambda: [1.0])
    crf_weight: float = 4.0  # mean-field CRF on the liver probability with the image's edges (0 = off; model/crf.py)
    sw_overlap: float = 0.25  # model.dims 3: overlap of the sliding windows (fraction of the patch)
    amp: AmpMode = "auto"  # auto: CUDA AMP on GPU, bf16 on CPUs that have it
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_image: bool = False  # also write the image NIfTI beside each mask
    # quality control: a mask outside this liver volume range (ml) is flagged (warning, "qc" in inference.json)
    qc_liver_ml: list[float] = field(default_factory=lambda: [200.0, 5000.0])
    qc_min_agreement: float = 0.8  # flag a mask when a fold model's own mask agrees less (Dice) with the ensemble's
    qc_min_confidence: float = 0.85  # flag a mask whose fold models' mean predict.mask_confidence is below this
    # ... or below the lowest confidence the run's fold models had on their own validation patients less
    # this margin, when that is higher (infer.load_run: a run of confident models is held to its own level)
    qc_confidence_margin: float = 0.01
    montage: bool = True  # write a PNG montage per case


@dataclass
class EvaluateConfig:
    hd_percentile: float = 95.0  # percentile of the Hausdorff distance reported besides MSSD
    missing: Literal["error", "skip"] = "error"  # reference case without a prediction (skip: listed in metrics.json)


@dataclass
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. "a number or auto"
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp) if arg is not type(None))
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    names = {float: "a number", int: "an integer", str: "a string", bool: "true/false"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads off/on as booleans; the user meant the word
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {' | '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list ({_type_name(item_tp)} each), got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads '1e-3' (no dot) as a string; accept it as the number it clearly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/no/yes as booleans; for a string option such as amp=off the
            # user meant the word.
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")  # pragma: no cover


def _apply_mapping(obj: Any, mapping: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from `mapping`, recursing into nested sections."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _check_value(dotted, value, hints[key]))


def train_input_size(t: "TrainConfig") -> list[int]:
    """The in-plane size of a training batch's slices: train.patch_size, or the whole roi."""
    return list(t.patch_size or t.roi_size)


def pixel_spacing_mm(t: "TrainConfig") -> float:
    """train.pixel_spacing as a number: 0 = slices resized to the roi. Training replaces "auto" with
    the data's spacing before anything is saved, so a config that still says "auto" was never
    trained (made by hand, or a transform chain built without data): resized, as before "auto"."""
    return 0.0 if t.pixel_spacing == "auto" else float(t.pixel_spacing)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def validate(cfg: Config) -> Config:
    """Checks that involve more than one key's type (ranges, lengths, keys that must agree), run
    whenever a config is loaded, so that a bad value stops a command before any data is read."""
    m, t, i = cfg.model, cfg.train, cfg.infer
    down = len(plan_dynunet(t.roi_size, len(m.channels))) - 1 if len(t.roi_size) == 2 else 0
    divisor = network_divisor(m, t.roi_size) if len(t.roi_size) == 2 else "?"
    rules = [
        ("model.channels", len(m.channels) >= 2, f"expected at least 2 levels, got {m.channels}"),
        ("model.strides", m.name not in ("unet", "attentionunet") or len(m.strides) == len(m.channels) - 1,
         f"expected {len(m.channels) - 1} values for {len(m.channels)} model.channels, got {m.strides}"),
        ("model.context_slices", m.context_slices >= 0, f"expected >= 0, got {m.context_slices}"),
        ("model.channels", m.name != "basicunet" or len(m.channels) == 5,
         f"basicunet has five levels: expected 5 values, got {m.channels}"),
        ("model.channels", m.name != "segresnet" or len(m.channels) >= 3,
         f"segresnet needs at least 3 levels, got {m.channels}"),
        ("model.deep_supervision", not m.deep_supervision or m.name == "dynunet",
         f"only model.name=dynunet has deep supervision, not {m.name}"),
        ("model.deep_supervision_levels", not m.deep_supervision or 1 <= m.deep_supervision_levels < down,
         f"expected 1..{down - 1} for a dynunet with {down} down-samplings at train.roi_size {t.roi_size}, "
         f"got {m.deep_supervision_levels}"),
        ("model.act", m.act == "auto" or m.name != "attentionunet",
         f"MONAI's AttentionUnet has a fixed activation: expected auto, got {m.act}"),
        ("model.views", bool(m.views) and len(set(m.views)) == len(m.views) and set(m.views) <= set(VIEWS),
         f"expected one or more of {', '.join(VIEWS)}, each once, got {m.views}"),
        ("model.views", m.views == ["axial"] or t.pixel_spacing == "auto" or t.pixel_spacing > 0,
         f"views besides axial resample the volume to train.pixel_spacing on every axis: expected auto or mm > 0, "
         f"got {t.pixel_spacing}"),
        ("model.dims", m.dims in (2, 3), f"expected 2 or 3, got {m.dims}"),
        ("model.dims", m.dims == 2 or (m.name == "dynunet" and m.views == ["axial"] and m.context_slices == 0
                                       and (t.pixel_spacing == "auto" or t.pixel_spacing > 0)),
         f"3D is model.name dynunet on whole volumes at a pixel spacing: expected dynunet, views [axial], "
         f"context_slices 0, pixel_spacing auto or mm (got {m.name}, {m.views}, {m.context_slices}, {t.pixel_spacing})"),
        ("train.patch_3d", len(t.patch_3d) == 3 and all(p >= 16 and p % 2 ** (len(m.channels) - 1) == 0
                                                         for p in t.patch_3d),
         f"expected [R, A, S], each >= 16 and a multiple of {2 ** (len(m.channels) - 1)} "
         f"({len(m.channels)} model.channels levels), got {t.patch_3d}"),
        ("train.batch_3d", t.batch_3d >= 1, f"expected >= 1, got {t.batch_3d}"),
        ("train.slice_spacing", t.slice_spacing == "auto" or t.slice_spacing > 0,
         f"expected auto or mm > 0, got {t.slice_spacing}"),
        ("infer.sw_overlap", 0.0 <= i.sw_overlap < 1.0, f"expected a fraction in [0, 1), got {i.sw_overlap}"),
        ("model.dropout", 0.0 <= m.dropout < 1.0, f"expected a value in [0, 1), got {m.dropout}"),
        ("train.roi_size", len(t.roi_size) == 2 and min(t.roi_size, default=0) >= 8,
         f"expected [H, W] with both >= 8, got {t.roi_size}"),
        ("train.patch_size", not t.patch_size or (
            len(t.patch_size) == 2 and len(t.roi_size) == 2
            and all(8 <= p <= r and p % d == 0 for p, r, d in zip(t.patch_size, t.roi_size, divisor))),
         f"expected [] or [H, W] within train.roi_size {t.roi_size}, multiples of {divisor} "
         f"(the {m.name}'s down-sampling), got {t.patch_size}"),
        ("train.liver_slice_ratio", 0.0 <= t.liver_slice_ratio <= 1.0,
         f"expected a value in [0, 1], got {t.liver_slice_ratio}"),
        ("train.slices_per_volume", t.slices_per_volume >= 1, f"expected >= 1, got {t.slices_per_volume}"),
        ("train.batch_size", t.slices_per_volume >= 1 and t.batch_size >= 1 and t.batch_size % t.slices_per_volume == 0,
         f"({t.batch_size}) must be a multiple of train.slices_per_volume ({t.slices_per_volume}): "
         "a batch is whole volumes' draws"),
        ("train.epochs", t.epochs >= 1, f"expected >= 1, got {t.epochs}"),
        ("train.val_every", t.val_every >= 1, f"expected >= 1, got {t.val_every}"),
        ("train.ema_decay", 0.0 <= t.ema_decay < 1.0, f"expected a value in [0, 1), got {t.ema_decay}"),
        ("train.budget_minutes", t.budget_minutes >= 0, f"expected >= 0 (0 = off), got {t.budget_minutes}"),
        ("train.pixel_spacing", t.pixel_spacing == "auto" or t.pixel_spacing >= 0,
         f"expected auto or mm >= 0 (0 = off), got {t.pixel_spacing}"),
        ("train.organ_intensity_texture", len(t.organ_intensity_texture) == 2
         and 0 <= t.organ_intensity_texture[0] <= t.organ_intensity_texture[1],
         f"expected [min, max] with 0 <= min <= max, got {t.organ_intensity_texture}"),
        ("train.gamma_range", len(t.gamma_range) == 2 and 0 < t.gamma_range[0] <= t.gamma_range[1],
         f"expected [min, max] with 0 < min <= max, got {t.gamma_range}"),
        ("train.momentum", 0.0 <= t.momentum < 1.0, f"expected a value in [0, 1), got {t.momentum}"),
        *[(f"train.{k}", 0.0 <= getattr(t, k) <= 1.0, f"expected a probability in [0, 1], got {getattr(t, k)}")
          for k in ("blur_prob", "lowres_prob", "elastic_prob", "grey_curve_prob", "organ_intensity_prob",
                    "organ_intensity_shared", "affine_prob", "flip_prob", "rotate90_prob", "bias_field_prob",
                    "histogram_shift_prob")],
        ("train.device", bool(_DEVICE.match(t.device)), f"expected auto | cpu | cuda | cuda:N, got {t.device!r}"),
        ("infer.device", bool(_DEVICE.match(i.device)), f"expected auto | cpu | cuda | cuda:N, got {i.device!r}"),
        ("infer.folds", i.folds == "all" or i.folds.isdigit(), f"expected 'all' or a fold number, got {i.folds!r}"),
        ("infer.batch_size", i.batch_size >= 1, f"expected >= 1, got {i.batch_size}"),
        ("infer.slice_smoothing", i.slice_smoothing >= 0, f"expected slices >= 0 (0 = off), got {i.slice_smoothing}"),
        ("infer.crf_weight", i.crf_weight >= 0, f"expected a weight >= 0 (0 = off), got {i.crf_weight}"),
        ("infer.tta_scales", bool(i.tta_scales) and all(0.5 <= s <= 2.0 for s in i.tta_scales),
         f"expected one or more zoom factors in [0.5, 2] ([1.0] = off), got {i.tta_scales}"),
        ("infer.qc_liver_ml", len(i.qc_liver_ml) == 2 and 0 <= i.qc_liver_ml[0] < i.qc_liver_ml[1],
         f"expected [low, high] in ml with 0 <= low < high, got {i.qc_liver_ml}"),
        ("infer.qc_min_agreement", 0.0 <= i.qc_min_agreement <= 1.0, f"expected a Dice in [0, 1], got {i.qc_min_agreement}"),
        ("infer.qc_min_confidence", 0.0 <= i.qc_min_confidence <= 1.0,
         f"expected a value in [0, 1], got {i.qc_min_confidence}"),
        ("infer.qc_confidence_margin", 0.0 <= i.qc_confidence_margin <= 1.0,
         f"expected a value in [0, 1] (1 = only infer.qc_min_confidence), got {i.qc_confidence_margin}"),
    ]
    for key, ok, problem in rules:
        if not ok:
            raise ConfigError(f"config {key}: {problem}")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'section.key=value' into (['section', 'key'], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return parts, value


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply_mapping(cfg, nested)
        log.info("config override %s = %r", ".".join(parts), value)
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- `configs/default.yaml` (or `path`) <- overrides, checked strictly."""
    cfg = Config()
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        try:
            _apply_mapping(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"{path}: config file not found")
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply_mapping(cfg, data)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
