"""A trained run taken elsewhere: a MONAI bundle, ONNX or TorchScript networks (the zip of a run
folder, which this project's own `infer` reads, is `runs.export_zip`).

    export_run(RUN, OUT, "bundle", fold=0)   OUT/configs/{inference,metadata}.json, OUT/models/model.pt,
                                             OUT/docs/{README.md,data_license.txt}
    export_run(RUN, OUT, "onnx")             OUT/fold_<k>.onnx per chosen fold + OUT/preprocessing.json
    export_run(RUN, OUT, "torchscript")      OUT/fold_<k>.ts per chosen fold + OUT/preprocessing.json

The bundle is written in MONAI's own components only (LoadImaged ... SliceInferer ... Invertd ...
SaveImaged), so `python -m monai.bundle run` needs MONAI, nibabel, pytorch-ignite and fire, not
this package. The ONNX and TorchScript files hold the network alone; preprocessing.json says what
to do around it (orientation, normalisation, in-plane size, channels, how to combine the folds,
threshold, post-processing). Every exported network is checked against the PyTorch model on the
same input before the export counts as done (ONNX through onnxruntime when it is installed).
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from pipeline import runs
from pipeline.config import Config, pixel_spacing_mm
from pipeline.errors import PipelineError
from pipeline.io import write_json, write_text
from pipeline.labels import LIVER, model_output
from pipeline.predict import smoothing_window

log = logging.getLogger(__name__)

FORMATS = ("zip", "bundle", "onnx", "torchscript")
MODALITIES = ("CT", "MR")
ONNX_OPSET = 17
LOGIT_TOLERANCE = 1e-3  # largest |logit difference| an exported network may show against PyTorch (float32)
BUNDLE_NAME = "chaos_liver_2d"
# configs/logging.conf, which `monai.bundle run` reads when present: INFO lines to the console
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
DATA_LICENCE = """The weights in models/ were trained on the CHAOS challenge data
(Kavur et al., Medical Image Analysis 69, 2021; doi:10.5281/zenodo.3362844), which is licensed under
Creative Commons Attribution-NonCommercial-ShareAlike 4.0 (CC BY-NC-SA 4.0):
https://creativecommons.org/licenses/by-nc-sa/4.0/
If the run was trained on other data as well, their licences apply too.
"""


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "zip", fold: str = "all", which: str = "best",
               modality: str | None = None) -> Path:
    """Write the run in format `fmt` (FORMATS) to `out`; returns what was written.

    zip: all chosen folds (runs.export_zip). bundle: one fold (the run's only fold, or `fold`), for
    `modality` (CT or MR; from the fold's training data when it holds one modality). onnx /
    torchscript: one file per chosen fold.
    """
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "zip":
        return runs.export_zip(run_dir, out, folds=fold, which=which)
    run_dir, out = runs.open_run(Path(run_dir)), Path(out)
    checkpoints = runs.select_checkpoints(run_dir, fold, which)
    if fmt == "bundle":
        if len(checkpoints) > 1:
            found = ", ".join(c.parent.name for c in checkpoints)
            raise PipelineError(f"{run_dir}: a bundle holds one model; choose a fold with --fold (found {found})")
        return _export_bundle(run_dir, checkpoints[0], out, modality)
    return _export_networks(run_dir, checkpoints, out, fmt)


# --------------------------------------------------------------------------- shared pieces
def _fold_model(checkpoint: Path):
    """(the fold's config, its network in eval mode with the checkpoint's weights, the checkpoint dict)."""
    from pipeline.model import load_trained_model

    cfg = runs.read_config(checkpoint.parent)
    ckpt = runs.load_checkpoint(checkpoint)
    return cfg, load_trained_model(cfg, checkpoint, ckpt), ckpt


def _fold_modalities(fold_dir: Path) -> list[str]:
    """The modalities a fold was trained on: split.json's "modalities", or (older runs) the CT_ / MR_
    prefixes of its training cases, CHAOS's naming; [] when neither says."""
    path = fold_dir / runs.SPLIT
    if not path.is_file():
        return []
    split = json.loads(path.read_text())
    if split.get("modalities"):
        return sorted(split["modalities"])
    prefixes = {str(c).split("_")[0] for c in split.get("train", {}).get("cases", [])}
    return sorted(prefixes) if prefixes and prefixes <= set(MODALITIES) else []


def _choose_modality(fold_dir: Path, modality: str | None) -> str:
    seen = _fold_modalities(fold_dir)
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
        "to_source_grid": "the averaged liver probability taken back through those steps to the source grid "
                          "(bilinear, no smoothing; as MONAI's Invertd does) and reoriented to the source axes",
        "threshold": f"liver (label {LIVER}) where the probability on the source grid is >= 0.5",
        "postprocessing": {"largest_component": bool(cfg.infer.largest_component), "connectivity": 26,
                           "fill_holes": bool(cfg.infer.fill_holes)},
    }


def _check_logits(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    if not np.isfinite(diff) or diff > LOGIT_TOLERANCE:
        raise RuntimeError(f"{name}: exported network differs from PyTorch by {diff:.3g} (> {LOGIT_TOLERANCE:g})")
    return diff


def _sample_input(cfg: Config, batch: int = 3):
    import torch

    h, w = (int(v) for v in cfg.train.roi_size)
    return torch.rand(batch, len(input_channels(cfg)), h, w, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- ONNX and TorchScript
def _export_networks(run_dir: Path, checkpoints: list[Path], out: Path, fmt: str) -> Path:
    import torch

    if fmt == "onnx":
        try:
            import onnx  # noqa: F401 - torch's exporter needs it
        except ImportError:
            raise PipelineError("--format onnx needs the onnx package (and onnxruntime to check the export): "
                                "pip install -c constraints.txt -e '.[export]'") from None
    suffix = ".onnx" if fmt == "onnx" else ".ts"
    out.mkdir(parents=True, exist_ok=True)
    models, cfg = [], None
    for checkpoint in checkpoints:
        cfg, model, _ = _fold_model(checkpoint)
        x = _sample_input(cfg)
        with torch.inference_mode():
            want = model(x).numpy()
        path = out / f"{checkpoint.parent.name}{suffix}"
        tmp = path.with_name(f".partial-{path.name}")
        try:
            if fmt == "onnx":
                diff = _write_onnx(model, x, tmp, want)
            else:
                diff = _write_torchscript(model, x, tmp, want)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        models.append({"file": path.name, "fold": checkpoint.parent.name, "checkpoint": checkpoint.stem,
                       "max_abs_logit_difference": diff})
        log.info("%s: %s written (largest logit difference to PyTorch %s)", run_dir.name, path.name,
                 "not checked" if diff is None else f"{diff:.2g}")
    description = {"format": fmt, "run": run_dir.resolve().name, "models": models,
                   **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
                   "model_name": cfg.model.name, **preprocessing_description(cfg)}
    write_json(out / "preprocessing.json", description)
    return out


def _write_onnx(model, x, path: Path, want: np.ndarray) -> float | None:
    """torch.onnx.export (TorchScript-based exporter: no onnxscript needed), the slice count free;
    checked with onnxruntime when it is installed (None: not checked)."""
    import torch

    with warnings.catch_warnings():
        # Instance normalisation without running statistics normalises with each slice's own
        # statistics in eval mode too; the exporter says so for every such layer.
        warnings.filterwarnings("ignore", message=r".*operator 'instance_norm' is set to train=True",
                                category=UserWarning)
        # torch.nn's instance normalisation checks the channel count and that a slice has more than
        # one pixel; the tracer records those checks as constants, which holds for every input of
        # the network's fixed channel count and slice size (only the slice count is left free)
        warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean",
                                category=torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "slices"}, "logits": {0: "slices"}}, opset_version=ONNX_OPSET)
    try:
        import onnxruntime
    except ImportError:
        log.warning("%s: onnxruntime is not installed; the exported network was not checked", path.name)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _check_logits(path.name, session.run(None, {"image": x.numpy()})[0], want)


def _write_torchscript(model, x, path: Path, want: np.ndarray) -> float:
    import torch

    with warnings.catch_warnings():
        # torch marks TorchScript deprecated; MONAI bundles and many deployments still load .ts files
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return _check_logits(path.name, loaded(x).numpy(), want)


# --------------------------------------------------------------------------- MONAI bundle
def bundle_inference_config(cfg: Config, modality: str) -> dict:
    """configs/inference.json: the run's inference for one model in MONAI components.

    The steps are those of `run.py infer` (pipeline.transforms.image_transforms, predict_volume,
    Invertd, postprocess) in MONAI's reference implementations: Resized with anti-aliasing where
    infer uses its faster equal InPlaneResize, SliceInferer where infer batches the slices itself,
    KeepLargestConnectedComponentd where infer labels with cc3d; the masks agree (tests/test_export.py).
    """
    from pipeline.model import network_spec

    h, w = (int(v) for v in cfg.train.roi_size)
    net_name, net_kwargs = network_spec(cfg.model, cfg.train.roi_size)
    k = int(cfg.model.context_slices)
    pre = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
        "$@normalise[@modality]",
    ]
    if pixel_spacing_mm(cfg.train) > 0:
        spacing = pixel_spacing_mm(cfg.train)
        pre += [{"_target_": "Spacingd", "keys": "image", "pixdim": [spacing, spacing, -1.0], "mode": "bilinear"},
                {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [h, w, -1]}]
    else:
        pre.append({"_target_": "Resized", "keys": "image", "spatial_size": [h, w, -1], "mode": "bilinear",
                    "anti_aliasing": True})
    if k:
        pre.append({"_target_": "Lambdad", "keys": "image", "func":
                    f"$lambda x: torch.cat([x[..., torch.clamp(torch.arange(x.shape[-1]) + o, 0, x.shape[-1] - 1)] "
                    f"for o in range({-k}, {k + 1})], dim=0)"})
    if cfg.model.modality_channel:
        pre.append({"_target_": "Lambdad", "keys": "image", "func":
                    "$lambda x, flag=(1.0 if @modality == 'CT' else 0.0): torch.cat([x, torch.full_like(x[:1], flag)], dim=0)"})
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        # a network of every organ (model.organs): background = 1 - liver, so that argmax is infer's
        # liver probability >= 0.5 rule (kidneys and spleen are not written)
        *([{"_target_": "Lambdad", "keys": "pred", "func": f"$lambda x: torch.cat([1 - x[{LIVER}:{LIVER + 1}], "
            f"x[{LIVER}:{LIVER + 1}]], dim=0)"}] if cfg.model.organs else []),
        *([{"_target_": "SavitzkyGolaySmoothd", "keys": "pred",
            "window_length": smoothing_window(cfg.infer.slice_smoothing),
            "order": 0, "axis": 3, "mode": "replicate"}] if cfg.infer.slice_smoothing > 0 else []),
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if cfg.infer.largest_component:
        post.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [LIVER],
                     "connectivity": 3})
    if cfg.infer.fill_holes:
        post.append({"_target_": "FillHolesd", "keys": "pred", "applied_labels": [LIVER]})
    post.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "liver",
                 "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False,
                 "separate_folder": False, "print_log": False})
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import numpy", "$import torch"],
        # MONAI puts the bundle's folder at sys.path[1] before `run` (ConfigWorkflow.run), so the bundle
        # works from any current directory; --bundle_root DIR overrides it
        "bundle_root": "$sys.path[1]",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "modality": modality,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": net_name, **net_kwargs},
        "network": "$@network_def.to(@device)",
        "normalise": {
            "CT": {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(cfg.train.ct_window[0]),
                   "a_max": float(cfg.train.ct_window[1]), "b_min": 0.0, "b_max": 1.0, "clip": True},
            "MR": {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image",
                   "lower": float(cfg.train.mr_percentiles[0]), "upper": float(cfg.train.mr_percentiles[1]),
                   "b_min": 0.0, "b_max": 1.0, "clip": True},
        },
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
                    "glob.glob(os.path.join(@dataset_dir, '*.nii'))))",
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SliceInferer", "roi_size": [h, w], "sw_batch_size": int(cfg.infer.batch_size),
                    "spatial_dim": 2},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def bundle_metadata(cfg: Config, modality: str, run_name: str, fold: str, ckpt: dict) -> dict:
    import monai
    import nibabel
    import torch

    from pipeline import __version__

    h, w = (int(v) for v in cfg.train.roi_size)
    versions = {"nibabel": nibabel.__version__}
    for package in ("pytorch-ignite", "fire", "scikit-image"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed here: the receiver needs it, the version is a hint
            pass
    dice = ckpt.get("best_dice") if isinstance(ckpt.get("best_dice"), float) else None
    outputs = model_output(cfg.model.organs)  # the network's channels
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from run {run_name}, {fold} (chaos-liver {__version__})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": versions,
        "name": BUNDLE_NAME,
        "task": f"Liver segmentation of {modality} volumes, slice by slice (2D {cfg.model.name})",
        "description": f"A 2D {cfg.model.name} trained with the chaos-liver pipeline on axial slices resized to "
                       f"{h}x{w}; it segments the liver of every NIfTI volume in dataset_dir and writes "
                       f"<name>_liver.nii.gz masks (uint8, 1 = liver) on each volume's own grid into output_dir.",
        "authors": "chaos-liver contributors",
        "copyright": "Copyright (c) chaos-liver contributors",
        "data_source": "CHAOS challenge (https://chaos.grand-challenge.org/), plus whatever else the run was "
                       "trained on",
        "data_type": "nifti",
        "image_classes": f"one {modality} volume (CT in Hounsfield units, MR in scanner units)",
        "label_classes": "0 background, 1 liver",
        "pred_classes": "0 background, 1 liver",
        "eval_metrics": {"val_mean_dice": dice} if dice is not None else {},
        "intended_use": "Research only; not a medical device and not for clinical decisions",
        "references": ["Kavur, A. E. et al. CHAOS Challenge - combined (CT-MR) healthy abdominal organ "
                       "segmentation. Medical Image Analysis 69 (2021) 101950"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": modality,
                                 "num_channels": len(input_channels(cfg)), "spatial_shape": [h, w],
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": input_channels(cfg)}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(outputs),
                                 "spatial_shape": [h, w], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False,
                                 "channel_def": {str(k): v for k, v in outputs.items()}}},
        },
    }


BUNDLE_README = """# {name}: liver segmentation ({modality}, 2D {model})

Exported from the run `{run}` ({fold}, {which} checkpoint) of the chaos-liver pipeline.

## Run it

    pip install monai nibabel pytorch-ignite fire scikit-image
    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --dataset_dir IMAGES --output_dir MASKS

Every `*.nii.gz` / `*.nii` volume in IMAGES gets `<name>_liver.nii.gz` in MASKS: uint8, 1 = liver, on the
volume's own grid (shape and affine), ready to open over the image in 3D Slicer or ITK-SNAP.
The images must be {modality} volumes with axial slices (`--modality` is CT or MR, for a model trained on both).
`--bundle_root BUNDLE` if MONAI cannot find the bundle's folder by itself.

## What it does

Reorient to RAS, {norm}, bring each axial slice to {h}x{w} ({resize}), run the
network slice by slice (SliceInferer), softmax{smooth}, resize and reorient the probabilities back
(Invertd), argmax{post}.

## What `run.py infer` does that this bundle does not

- DICOM input (series, study folders, multi-frame), DICOM SEG / RTSTRUCT / CHAOS PNG output;
- several folds averaged (a bundle holds one model);
- bf16 on CPUs that have it (the bundle predicts in float32);
- the quality flags (liver volume, fold agreement), montages and inference.json.

## Data licence

See `docs/data_license.txt`: the weights come from CC BY-NC-SA 4.0 data (non-commercial use).
"""


def _export_bundle(run_dir: Path, checkpoint: Path, out: Path, modality: str | None) -> Path:
    import torch

    cfg, model, ckpt = _fold_model(checkpoint)
    modality = _choose_modality(checkpoint.parent, modality)
    if cfg.infer.tta_scales != [1.0]:
        log.warning("%s: infer.tta_scales %s is not in the bundle: it predicts each slice once, as infer does "
                    "with tta_scales [1.0]", checkpoint.parent, cfg.infer.tta_scales)
    tmp = out.with_name(f".partial-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "configs").mkdir(parents=True)
    (tmp / "models").mkdir()
    (tmp / "docs").mkdir()
    try:
        torch.save(model.state_dict(), tmp / "models" / "model.pt")
        write_json(tmp / "configs" / "inference.json", bundle_inference_config(cfg, modality))
        write_json(tmp / "configs" / "metadata.json",
                   bundle_metadata(cfg, modality, run_dir.resolve().name, checkpoint.parent.name, ckpt))
        norm = (f"window {cfg.train.ct_window[0]:g} to {cfg.train.ct_window[1]:g} HU -> [0, 1]" if modality == "CT"
                else f"percentiles {cfg.train.mr_percentiles[0]:g} / {cfg.train.mr_percentiles[1]:g} -> [0, 1]")
        post = (", largest connected component" if cfg.infer.largest_component else "") + (
            ", holes filled" if cfg.infer.fill_holes else "")
        write_text(tmp / "docs" / "README.md", BUNDLE_README.format(
            name=BUNDLE_NAME, modality=modality, model=cfg.model.name, run=run_dir.resolve().name,
            fold=checkpoint.parent.name, which=checkpoint.stem, norm=norm, h=cfg.train.roi_size[0],
            w=cfg.train.roi_size[1], post=post,
            smooth=(f", a moving average through {smoothing_window(cfg.infer.slice_smoothing)} slices "
                    f"(SavitzkyGolaySmoothd)"
                    if cfg.infer.slice_smoothing > 0 else ""),
            resize=(f"resampled to {pixel_spacing_mm(cfg.train):g} mm pixels, then padded or cropped about the centre"
                    if pixel_spacing_mm(cfg.train) > 0 else "bilinear resize with anti-aliasing")))
        write_text(tmp / "configs" / "logging.conf", LOGGING_CONF)
        write_text(tmp / "docs" / "data_license.txt", DATA_LICENCE)
        if out.exists():
            if not (out / "configs" / "inference.json").is_file():
                raise PipelineError(f"{out}: exists and is not a bundle; choose another --out")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
