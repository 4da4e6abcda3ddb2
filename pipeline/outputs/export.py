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

import logging
import warnings
from pathlib import Path

import numpy as np

from pipeline.core import runs
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json
from pipeline.outputs.bundle import export_bundle
from pipeline.outputs.fold_models import (axial_slices_only, check_logits, fold_model, preprocessing_description,
                                          sample_input)

log = logging.getLogger(__name__)


FORMATS = ("zip", "bundle", "onnx", "torchscript")


ONNX_OPSET = 17


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
        return export_bundle(run_dir, checkpoints[0], out, modality)
    return _export_networks(run_dir, checkpoints, out, fmt)


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
        cfg, model, _ = fold_model(checkpoint)
        axial_slices_only(cfg, checkpoint.parent, f"--format {fmt} with its preprocessing.json")
        x = sample_input(cfg)
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
    return check_logits(path.name, session.run(None, {"image": x.numpy()})[0], want)


def _write_torchscript(model, x, path: Path, want: np.ndarray) -> float:
    import torch

    with warnings.catch_warnings():
        # torch marks TorchScript deprecated; MONAI bundles and many deployments still load .ts files
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return check_logits(path.name, loaded(x).numpy(), want)
