"""run.py export: a MONAI bundle that `monai.bundle run` runs to infer's masks, ONNX and TorchScript
networks equal to the PyTorch model, and the errors for what cannot be exported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.infer.inference import run_inference
from pipeline.outputs.export import export_run
from pipeline.train.cv import run_training
from tests.conftest import ROOT, TINY_TRAIN

from helpers import make_prepared_dataset

# A run of both modalities with both extra kinds of input channel (neighbour slices, modality flag),
# so that the bundle's two Lambdad steps are exercised; enough epochs for a mask with a shape.
RUN = [*TINY_TRAIN, "train.epochs=6", "model.context_slices=1", "model.modality_channel=true",
       "infer.montage=false", "infer.amp=off"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_prepared_dataset(root / "prepared", n_mr=2, n_ct=2, shape=(48, 40, 12), folds=2)
    run_dir = root / "run"
    run_training(data, run_dir, "all", load_config(None, RUN))
    return root, data, run_dir


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def spaced(tmp_path_factory):
    """A run whose slices are resampled to 2 mm pixels (the data's are 1.5 mm) and padded / cropped
    to the roi: 36 x 30 pixels at 2 mm, so one axis is cropped and the other padded; its network
    learns every organ (model.organs: five outputs, of which the bundle writes the liver)."""
    root = tmp_path_factory.mktemp("export_spacing")
    data = make_prepared_dataset(root / "prepared", n_mr=2, n_ct=2, shape=(48, 40, 12), folds=2)
    run_dir = root / "run"
    run_training(data, run_dir, "0", load_config(None, [*RUN, "train.pixel_spacing=2.0", "model.organs=true"]))
    return root, data, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resized", "pixel_spacing"])
def test_the_bundle_runs_with_monai_alone_and_writes_infers_masks(trained, spaced, tmp_path, which):
    root, data, run_dir = trained if which == "resized" else spaced
    bundle = export_run(run_dir, tmp_path / "bundle", "bundle", fold="0", modality="MR")
    for part in ("configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.pt",
                 "docs/README.md", "docs/data_license.txt"):
        assert (bundle / part).is_file(), part
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image_format = meta["network_data_format"]["inputs"]["image"]
    assert image_format["num_channels"] == 4 and image_format["spatial_shape"] == [32, 32]  # 3 slices + modality
    outputs = {"0": "background", "1": "liver"} if which == "resized" else {
        "0": "background", "1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == outputs

    images = tmp_path / "images"  # the MR volumes only: the bundle was exported for MR
    images.mkdir()
    cases = [e["case"] for e in json.loads((data / "datalist.json").read_text())["training"] if e["modality"] == "MR"]
    for case in cases:
        (images / f"{case}.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    # the command as the issue gives it, from another folder than the bundle's
    done = _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"),
                         "--dataset_dir", str(images), "--output_dir", str(tmp_path / "masks"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the bundle leaves the CRF out (export warns): infer without it
    run_inference(run_dir, data, tmp_path / "infer", ["infer.montage=false", "infer.amp=off", "infer.crf_weight=0"],
                  fold="0", patients=",".join(c.split("_T2SPIR")[0] for c in cases))
    for case in cases:
        ours = nib.load(str(tmp_path / "infer" / f"{case}_liver.nii.gz"))
        theirs = nib.load(str(tmp_path / "masks" / f"{case}_liver.nii.gz"))
        assert theirs.shape == ours.shape and theirs.get_data_dtype() == np.uint8
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-4)
        a, b = np.asarray(ours.dataobj) > 0, np.asarray(theirs.dataobj) > 0
        assert a.sum() > 50, f"{case}: the test model should find some liver"
        # MONAI's chain in the bundle and infer's own inversion differ at a few voxels of the mask's edge,
        # the bundle's always the fuller (a few voxels of ~2700 with this test's model; docs/dicom-outputs.md)
        assert _dice(a, b) >= 0.998, (case, _dice(a, b))
        assert set(np.unique(np.asarray(theirs.dataobj))) <= {0, 1}  # the liver alone, whatever the network

    # MONAI's own check that the network takes and gives what metadata.json says (what
    # `python -m monai.bundle verify_net_in_out` runs, called here without a second interpreter start);
    # it raises on a mismatch of channels or dtype
    from monai.bundle import verify_net_in_out

    verify_net_in_out("network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"))


def test_a_bundle_needs_one_fold_and_a_modality_when_the_run_does_not_say(trained, tmp_path):
    _, _, run_dir = trained
    with pytest.raises(PipelineError, match="one model; choose a fold"):
        export_run(run_dir, tmp_path / "b", "bundle")
    with pytest.raises(PipelineError, match="--modality CT or --modality MR"):  # trained on CT and MR
        export_run(run_dir, tmp_path / "b", "bundle", fold="1")
    assert not (tmp_path / "b").exists()
    bundle = export_run(run_dir, tmp_path / "b", "bundle", fold="1", modality="CT")
    assert json.loads((bundle / "configs" / "inference.json").read_text())["modality"] == "CT"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_networks_give_the_pytorch_logits(trained, tmp_path, fmt):
    from pipeline.core.runs import load_checkpoint
    from pipeline.model.networks import build_model

    _, _, run_dir = trained
    out = export_run(run_dir, tmp_path / fmt, fmt)
    description = json.loads((out / "preprocessing.json").read_text())
    assert [m["fold"] for m in description["models"]] == ["fold_0", "fold_1"]
    assert description["input"]["shape"][1:] == [4, 32, 32] and len(description["input"]["channels"]) == 4
    assert description["normalisation"]["CT"]["window_hu"] == [-150.0, 250.0]
    cfg = load_config(None, RUN)
    x = torch.rand(5, 4, 32, 32, generator=torch.Generator().manual_seed(3))  # another batch size than exported
    for entry in description["models"]:
        model = build_model(cfg.model, cfg.train.roi_size)
        model.load_state_dict(load_checkpoint(run_dir / entry["fold"] / "best.pt")["model"])
        with torch.inference_mode():
            want = model.eval()(x).numpy()
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": x.numpy()})[0]
        else:
            with torch.inference_mode():
                got = torch.jit.load(str(out / entry["file"])).eval()(x).numpy()
        assert got.shape == (5, 2, 32, 32)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
        assert entry["max_abs_logit_difference"] is not None and entry["max_abs_logit_difference"] <= 1e-3


@pytest.mark.slow
def test_export_command_line(trained, tmp_path):
    _, _, run_dir = trained
    cmd = [sys.executable, str(ROOT / "run.py"), "export", "--run-dir", str(run_dir)]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "model")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "--format" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([*cmd, "--out", str(tmp_path / "model.zip"), "--fold", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model.zip").is_file()
    done = subprocess.run([*cmd, "--out", str(tmp_path / "b"), "--format", "bundle", "--fold", "0",
                           "--modality", "MR"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "models" / "model.pt").is_file()
