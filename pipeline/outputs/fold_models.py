"""A run's fold models as the exports see them: config and network of a checkpoint, the modality it is
for, the input channels, the preprocessing described in words and numbers, logits checked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import runs
from pipeline.core.config import Config, pixel_spacing_mm
from pipeline.core.errors import PipelineError
from pipeline.core.labels import LIVER, model_output
from pipeline.model import crf

MODALITIES = ("CT", "MR")


LOGIT_TOLERANCE = 1e-3  # largest |logit difference| an exported network may show against PyTorch (float32)


def fold_model(checkpoint: Path):
    """(the fold's config, its network in eval mode with the checkpoint's weights, the checkpoint dict)."""
    from pipeline.model.networks import load_trained_model

    cfg = runs.read_config(checkpoint.parent)
    ckpt = runs.load_checkpoint(checkpoint)
    return cfg, load_trained_model(cfg, checkpoint, ckpt), ckpt


def axial_slices_only(cfg: Config, where: Path, what: str) -> None:
    """A one-line error for a format that describes the axial slice-wise network alone (a MONAI bundle's
    inference config, preprocessing.json beside ONNX / TorchScript) when the run is multi-planar
    (model.views) or 3D (model.dims): the zip carries every kind of run."""
    if cfg.model.views != ["axial"] or cfg.model.dims != 2:
        kind = "3D" if cfg.model.dims != 2 else f"multi-planar ({', '.join(cfg.model.views)})"
        raise PipelineError(f"{where}: a {kind} run: {what} describes axial 2D slices only; export this run as a "
                            "zip (--format zip), which infer and the API take")


def fold_modalities(fold_dir: Path) -> list[str]:
    """The modalities a fold was trained on: split.json's "modalities", or (older runs) the CT_ / MR_
    prefixes of its training cases, CHAOS's naming; [] when neither says."""
    split = runs.read_split(fold_dir)
    if split is None:
        return []
    if split.get("modalities"):
        return sorted(split["modalities"])
    prefixes = {str(c).split("_")[0] for c in split.get("train", {}).get("cases", [])}
    return sorted(prefixes) if prefixes and prefixes <= set(MODALITIES) else []


def choose_modality(fold_dir: Path, modality: str | None) -> str:
    seen = fold_modalities(fold_dir)
    if modality is not None:
        if modality not in MODALITIES:
            raise PipelineError(f"--modality {modality!r}: choose CT or MR")
        if seen and modality not in seen:
            raise PipelineError(f"{fold_dir}: trained on {', '.join(seen)} only, not {modality}")
        return modality
    if len(seen) == 1:
        return seen[0]
    raise PipelineError(f"{fold_dir}: the fold was trained on {' and '.join(seen) or 'unrecorded modalities'}; "
                        f"say which images the bundle is for with --modality CT or --modality MR")


def input_channels(cfg: Config) -> dict[str, str]:
    """What each input channel of the network holds, in order."""
    k = cfg.model.context_slices
    names = {str(j): ("slice z" if j == k else f"slice z{j - k:+d} (edges repeated)") for j in range(1 + 2 * k)}
    if cfg.model.modality_channel:
        names[str(len(names))] = "modality: 1.0 on CT, 0.0 on MR (constant)"
    return names


def preprocessing_description(cfg: Config) -> dict:
    """The run's preprocessing and post-processing as data (preprocessing.json), for whoever runs
    an exported network without this package."""
    h, w = (int(v) for v in cfg.train.roi_size)
    return {
        "orientation": "reorient the volume (NIfTI voxel order, affine to RAS mm) to axis codes RAS, as "
                       "nibabel's io_orientation / MONAI's Orientationd(axcodes='RAS') do; axis 2 is then the "
                       "slice axis",
        "axcodes": "RAS",
        "slice_axis": 2,
        "normalisation": {
            "CT": {"rule": "window", "window_hu": list(cfg.train.ct_window), "to": [0.0, 1.0], "clip": True},
            "MR": {"rule": "percentiles of the whole volume", "percentiles": list(cfg.train.mr_percentiles),
                   "to": [0.0, 1.0], "clip": True},
        },
        **({"in_plane_resample": {"pixel_spacing_mm": pixel_spacing_mm(cfg.train), "mode": "bilinear",
                                  "then": f"padded (zeros) or cropped about the centre to {h}x{w}",
                                  "as": "MONAI's Spacingd(pixdim=(s, s, -1)) and ResizeWithPadOrCropd",
                                  "slices": "each axial slice keeps its place; the slice count is unchanged"}}
           if pixel_spacing_mm(cfg.train) > 0 else
           {"in_plane_resize": {"size": [h, w], "mode": "bilinear, align_corners false",
                                "anti_aliasing": "Gaussian pre-smoothing when shrinking, sigma (scale - 1) / 2 per "
                                                 "axis (MONAI's Resize(anti_aliasing=True))",
                                "slices": "each axial slice keeps its place; the slice count is unchanged"}}),
        "input": {"name": "image", "shape": ["slices", len(input_channels(cfg)), h, w], "dtype": "float32",
                  "channels": input_channels(cfg)},
        "output": {"name": "logits", "shape": ["slices", len(outputs := model_output(cfg.model.organs)), h, w],
                   "dtype": "float32", "channels": {str(k): v for k, v in outputs.items()}},
        "combine": "softmax over the output channels per model; the liver channel averaged over the models",
        "slice_smoothing": (f"each slice's averaged liver probability replaced by its mean with the {k} slice(s) on "
                            f"each side, the first and last slices repeated beyond the ends (a moving average "
                            f"through the slices, before going back to the source grid)"
                            if (k := cfg.infer.slice_smoothing) > 0 else "none"),
        "test_time_zoom": ({"scales": [float(v) for v in scales],
                            "rule": "each model's liver probability the mean over its predictions of the slices "
                                    "zoomed by every scale about the slice centre (bilinear, zeros outside) and "
                                    "zoomed back by 1 / scale, before the models are averaged"}
                           if (scales := cfg.infer.tta_scales) != [1.0] else "none"),
        "crf": ({"weight": weight, "theta_mm": crf.THETA_MM, "theta_intensity": crf.THETA_INTENSITY,
                 "radius_voxels": crf.RADIUS, "slices_each_side": 1, "iterations": crf.ITERATIONS,
                 "rule": "after the smoothing, on the model's grid: each iteration sets every voxel's liver logit to "
                         "the network's plus weight x the mean of (2q - 1) over its window, weighted by "
                         "exp(-d^2 / 2 theta_mm^2) exp(-dI^2 / 2 theta_intensity^2) (d in mm, I the centre input "
                         "channel); only the box of probability >= 0.05 plus the window's reach "
                         "(pipeline/model/crf.py)"}
                if (weight := cfg.infer.crf_weight) > 0 else "none"),
        "to_source_grid": "the averaged liver probability taken back through those steps to the source grid "
                          "(bilinear, no smoothing; as MONAI's Invertd does) and reoriented to the source axes",
        "threshold": f"liver (label {LIVER}) where the probability on the source grid is >= 0.5",
        "postprocessing": {"largest_component": bool(cfg.infer.largest_component), "connectivity": 26,
                           "fill_holes": bool(cfg.infer.fill_holes)},
    }


def check_logits(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    if not np.isfinite(diff) or diff > LOGIT_TOLERANCE:
        raise RuntimeError(f"{name}: exported network differs from PyTorch by {diff:.3g} (> {LOGIT_TOLERANCE:g})")
    return diff


def sample_input(cfg: Config, batch: int = 3):
    import torch

    h, w = (int(v) for v in cfg.train.roi_size)
    return torch.rand(batch, len(input_channels(cfg)), h, w, generator=torch.Generator().manual_seed(0))
