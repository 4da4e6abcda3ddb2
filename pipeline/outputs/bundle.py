"""A MONAI bundle of one fold, written in MONAI's own components only (LoadImaged ... SliceInferer ...
Invertd ... SaveImaged), so `python -m monai.bundle run` needs MONAI, nibabel, pytorch-ignite and fire,
not this package.

    OUT/configs/{inference,metadata}.json, OUT/models/model.pt, OUT/docs/{README.md,data_license.txt}
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.config import Config, pixel_spacing_mm
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json, write_text
from pipeline.core.labels import LIVER, model_output
from pipeline.model.predict import smoothing_window
from pipeline.outputs.fold_models import axial_slices_only, choose_modality, fold_model, input_channels

log = logging.getLogger(__name__)


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


def bundle_inference_config(cfg: Config, modality: str) -> dict:
    """configs/inference.json: the run's inference for one model in MONAI components.

    The steps are those of `run.py infer` (pipeline.model.transforms.image_transforms, predict_volume,
    Invertd, postprocess) in MONAI's reference implementations: Resized with anti-aliasing where
    infer uses its faster equal InPlaneResize, SliceInferer where infer batches the slices itself,
    KeepLargestConnectedComponentd where infer labels with cc3d; the masks agree (tests/test_export.py).
    """
    from pipeline.model.networks import network_spec

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


def export_bundle(run_dir: Path, checkpoint: Path, out: Path, modality: str | None) -> Path:
    import torch

    cfg, model, ckpt = fold_model(checkpoint)
    axial_slices_only(cfg, checkpoint.parent, "a MONAI bundle's inference config")
    modality = choose_modality(checkpoint.parent, modality)
    if cfg.infer.tta_scales != [1.0]:
        log.warning("%s: infer.tta_scales %s is not in the bundle: it predicts each slice once, as infer does "
                    "with tta_scales [1.0]", checkpoint.parent, cfg.infer.tta_scales)
    if cfg.infer.crf_weight > 0:
        log.warning("%s: infer.crf_weight %s is not in the bundle: its masks are the network's probability "
                    "thresholded, as infer's with crf_weight 0", checkpoint.parent, cfg.infer.crf_weight)
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
