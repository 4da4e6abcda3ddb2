"""pipeline.api.segment: the mask run.py infer writes, from a DICOM folder, a NIfTI file or an array."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.dicom.volume import read_dicom_series
from pipeline.infer.inference import run_inference

from helpers import ellipsoid_volume, make_run, write_tiny


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    series = root / "s"
    write_tiny(series, ellipsoid_volume(), spacing=(0.8, 0.7, -2.5))
    run_dir = make_run(root / "run", folds=(0, 1))
    run_inference(run_dir, series, root / "out", ["infer.montage=false"])
    return root, series, run_dir, nib.load(str(root / "out" / "s_liver.nii.gz"))


def test_segment_a_dicom_folder_gives_infers_mask(case):
    from pipeline import api

    root, series, run_dir, expected = case
    mask = api.segment(series, run=run_dir)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))
    # infer's quality check comes with the mask, the same figures as inference.json's row
    row = json.loads((root / "out" / "inference.json").read_text())["cases"][0]
    qc = mask.extra["qc"]
    assert qc["flags"] == row["qc"]
    assert qc["liver_ml"] == pytest.approx(row["liver_ml"])
    assert round(qc["confidence"], 4) == row["confidence"] and round(qc["fold_agreement"], 4) == row["fold_agreement"]
    np.testing.assert_allclose(mask.affine, expected.affine)
    assert mask.get_data_dtype() == np.uint8
    loaded = len(api._CACHE)
    api.segment(series, run=run_dir)  # the models stay loaded
    assert len(api._CACHE) == loaded


def test_segment_an_array_or_a_nifti_file_with_its_modality(case, tmp_path):
    from pipeline.api import Segmenter

    _, series, run_dir, expected = case
    volume = read_dicom_series(series)
    segmenter = Segmenter(run_dir)
    from_array = segmenter(volume.array, affine=volume.affine, modality="MR")
    np.testing.assert_array_equal(np.asarray(from_array.dataobj), np.asarray(expected.dataobj))
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(nifti))
    from_file = segmenter(nifti, modality="MR")
    np.testing.assert_array_equal(np.asarray(from_file.dataobj), np.asarray(expected.dataobj))
    with pytest.raises(PipelineError, match="modality"):
        segmenter(nifti)
    with pytest.raises(PipelineError, match="affine"):
        segmenter(volume.array)
    with pytest.raises(PipelineError, match="not found"):
        segmenter(tmp_path / "missing")


@pytest.mark.slow
def test_a_run_exported_as_zip_infers_the_same_masks(case, tmp_path):
    import io
    import subprocess
    import sys
    import zipfile

    import torch

    from helpers import ROOT, assert_one_line_error, cli_infer, infer_in_process

    root, series, run_dir, expected = case
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), "export", "--run-dir", str(run_dir), "--out",
                          str(tmp_path / "model.zip")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    names = sorted(zipfile.ZipFile(tmp_path / "model.zip").namelist())
    assert "config.yaml" in names and "fold_0/best.pt" in names and "fold_1/best.pt" in names
    assert not any(n.endswith(("last.pt", "train.log", "metrics.csv")) for n in names)  # inference only
    with zipfile.ZipFile(tmp_path / "model.zip") as z, z.open("fold_0/best.pt") as f:
        zipped = torch.load(io.BytesIO(f.read()), weights_only=True)
    full = torch.load(run_dir / "fold_0" / "best.pt", weights_only=True)
    assert "optimizer" in full and not {"optimizer", "scheduler", "rng"} & set(zipped)  # no resume state
    assert zipped["history"] == full["history"][-1:] and all(torch.equal(zipped["model"][k], v) for k, v in full["model"].items())
    # a zip as earlier versions wrote it (whole checkpoints) still loads, and both give the folder's masks
    with zipfile.ZipFile(tmp_path / "old.zip", "w") as z:
        z.write(run_dir / "config.yaml", "config.yaml")
        for k in (0, 1):
            for name in ("config.yaml", "split.json", "best.pt"):
                z.write(run_dir / f"fold_{k}" / name, f"fold_{k}/{name}")
    for zip_name in ("model.zip", "old.zip"):
        res = cli_infer("--run-dir", str(tmp_path / zip_name), "--input", str(series), "--out", str(tmp_path / f"out_{zip_name}"),
                        "--set", "infer.montage=false", "-q")
        assert res.returncode == 0, res.stderr
        got = nib.load(str(tmp_path / f"out_{zip_name}" / "s_liver.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
    # a zip with a member outside the run layout is refused before anything is unpacked
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("config.yaml", "{}")
        z.writestr("../escape.txt", "x")
    res = infer_in_process("--run-dir", str(tmp_path / "evil.zip"), "--input", str(series), "--out", str(tmp_path / "o2"))
    assert_one_line_error(res, "not a run zip", "../escape.txt")
    assert not (tmp_path.parent / "escape.txt").exists()


@pytest.mark.slow
def test_prepare_train_infer_evaluate_as_typed_functions(tmp_path):
    """The stages from Python: an MSD-style set prepared, one fold trained, its validation patients
    segmented and scored; evaluate's Dice is infer's Dice for the same masks."""
    import json

    from pipeline import api
    from tests.conftest import TINY_TRAIN

    from helpers import make_msd

    data = make_msd(tmp_path / "Task03_Liver", n=4)
    datalist = api.prepare(data, tmp_path / "prepared", folds=2)
    assert len(datalist["training"]) == 4 and "table" in datalist
    assert {int(e["fold"]) for e in datalist["training"]} == {0, 1}
    results = api.train(tmp_path / "prepared", tmp_path / "run", fold=0, overrides=TINY_TRAIN)
    assert [r.fold for r in results] == [0]
    val = json.loads((tmp_path / "run" / "fold_0" / "split.json").read_text())["val"]["patients"]
    assert sorted(results[0].dice_last) == sorted(val)
    rows = run_inference(tmp_path / "run", tmp_path / "prepared", tmp_path / "infer",
                         ["infer.montage=false"], patients=",".join(val))
    metrics = api.evaluate(tmp_path / "infer", tmp_path / "prepared" / "labelsTr", tmp_path / "eval",
                           overrides=["evaluate.missing=skip"])  # the training patients were not segmented
    scored = {r["case"]: r["dice"] for r in metrics["cases"]}
    assert sorted(scored) == sorted(r["case"] for r in rows)
    for row in rows:
        assert scored[row["case"]] == pytest.approx(row["dice"], abs=1e-6)
    with pytest.raises(PipelineError, match="not found"):
        api.prepare(tmp_path / "missing", tmp_path / "p2")


def test_a_mask_the_quality_check_doubts_comes_with_its_flag_and_a_warning(case, caplog):
    from pipeline.api import Segmenter

    _, series, run_dir, _ = case
    doubtful = Segmenter(run_dir, overrides=["infer.qc_min_confidence=1.0", "infer.qc_liver_ml=[0.0,0.001]",
                                        "infer.qc_min_agreement=0.0"])
    with caplog.at_level("WARNING", logger="pipeline.infer"):
        qc = doubtful(series).extra["qc"]
    assert [f.split(" ")[0] for f in qc["flags"]] == ["liver", "low"]  # volume, then confidence
    assert "check this mask" in caplog.text and str(series) in caplog.text


def test_segment_loads_a_run_again_once_it_was_trained_again(tmp_path):
    import os
    import shutil

    from pipeline import api

    run = make_run(tmp_path / "run", folds=(0, 1))
    volume = ellipsoid_volume()
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    api.segment(volume, run, affine, "MR", fold=0)
    cached = [s for k, s in api._CACHE.items() if k[0] == str(run.resolve())]
    api.segment(volume, run, affine, "MR", fold=0)
    assert [s for k, s in api._CACHE.items() if k[0] == str(run.resolve())] == cached  # loaded once
    checkpoint = run / "fold_0" / "best.pt"
    shutil.copy2(run / "fold_1" / "best.pt", checkpoint)  # fold 0 trained again
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    api.segment(volume, run, affine, "MR", fold=0)
    now = [s for k, s in api._CACHE.items() if k[0] == str(run.resolve())]
    assert len(now) == 1 and now[0] is not cached[0]
