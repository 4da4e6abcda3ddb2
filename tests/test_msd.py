"""prepare from Medical Segmentation Decathlon / nnU-Net style NIfTI data sets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.datasets.prepare import prepare_dataset

from helpers import make_msd

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


@pytest.mark.parametrize("style", ["msd", "nnunet"])
def test_msd_and_nnunet_sets_prepare_with_tumour_as_liver(tmp_path, style):
    data = make_msd(tmp_path / "data", style=style)
    out = prepare_dataset(data, tmp_path / "prep", load_config(None, ["prepare.folds=2"]))
    assert [e["case"] for e in out["training"]] == [f"CT_liver_{i}" for i in range(4)]
    assert {e["fold"] for e in out["training"]} == {0, 1} and all(e["modality"] == "CT" for e in out["training"])
    for e in out["training"]:
        src = np.asarray(nib.load(str(data / "labelsTr" / f"{e['case'][3:]}.nii.gz")).dataobj)
        label = nib.load(str(tmp_path / "prep" / e["label"]))
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.isin(src, [1, 2]).astype(np.uint8))
        np.testing.assert_allclose(label.affine, AFFINE)
    assert json.loads((tmp_path / "prep" / "datalist.json").read_text())["labels"] == {"0": "background", "1": "liver"}


def test_liver_labels_from_the_config_and_mr_channels(tmp_path):
    data = make_msd(tmp_path / "data", style="nnunet", modality="T2 SPIR")
    out = prepare_dataset(data, tmp_path / "prep", load_config(None, ["prepare.folds=2", "prepare.liver_labels=[1]"]))
    e = out["training"][0]
    assert e["modality"] == "MR" and e["case"].startswith("MR_")
    src = np.asarray(nib.load(str(data / "labelsTr" / "liver_0.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "prep" / e["label"])).dataobj), src == 1)


@pytest.mark.parametrize("damage,words", [
    ("grid", ["labelsTr/liver_1.nii.gz", "imagesTr/liver_1.nii.gz", "not on the grid", "5 mm", "never resampled"]),
    ("shape", ["labelsTr/liver_1.nii.gz", "not on the grid", "shape (23, 20, 6) vs (24, 20, 6)"]),
    ("value", ["liver_1.nii.gz", "outside the declared"]),
    ("nan", ["liver_1.nii.gz", "NaN"]),
    ("names", ["no label named liver", "prepare.liver_labels"]),
])
def test_bad_sets_fail_naming_the_file(tmp_path, damage, words):
    data = make_msd(tmp_path / "data")
    label_path, image_path = data / "labelsTr" / "liver_1.nii.gz", data / "imagesTr" / "liver_1.nii.gz"
    label = nib.load(str(label_path))
    arr = np.asarray(label.dataobj).copy()
    if damage == "grid":
        shifted = AFFINE.copy()
        shifted[0, 3] = 5.0
        nib.save(nib.Nifti1Image(arr, shifted), str(label_path))
    elif damage == "shape":
        nib.save(nib.Nifti1Image(arr[:-1], AFFINE), str(label_path))
    elif damage == "value":
        arr[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(arr, AFFINE), str(label_path))
    elif damage == "nan":
        img = np.asarray(nib.load(str(image_path)).dataobj).copy()
        img[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(img, AFFINE), str(image_path))
    else:
        meta = json.loads((data / "dataset.json").read_text())
        meta["labels"] = {"0": "background", "1": "organ", "2": "cancer"}
        (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as err:
        prepare_dataset(data, tmp_path / "prep", load_config(None, ["prepare.folds=2"]))
    for w in words:
        assert w in str(err.value)


@pytest.mark.slow
def test_a_prepared_msd_set_trains(tmp_path, tiny_train_overrides):
    data = make_msd(tmp_path / "data")
    prepare_dataset(data, tmp_path / "prep", load_config(None, ["prepare.folds=2"]))
    sets = [a for s in [*tiny_train_overrides, "train.epochs=1"] for a in ("--set", s)]
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), "train", "--data", str(tmp_path / "prep"), "--run-dir",
                          str(tmp_path / "run"), "--fold", "0", "-q", *sets], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "fold_0" / "last.pt").is_file()


def test_a_label_stored_with_flipped_and_swapped_axes_is_reordered_exactly(tmp_path):
    """The same voxel grid in another axis order (a viewer keeping DICOM's row order, say) is not a
    resampling: the label is reordered voxel for voxel onto the image's grid."""
    data = make_msd(tmp_path / "data")
    label_path = data / "labelsTr" / "liver_1.nii.gz"
    label = nib.load(str(label_path))
    arr = np.asarray(label.dataobj)
    # the same voxels with axis 1 reversed and axes 0 / 1 swapped; the affine follows
    flipped = arr[:, ::-1, :]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, arr.shape[1] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    stored = np.ascontiguousarray(flipped.transpose(1, 0, 2))
    nib.save(nib.Nifti1Image(stored, AFFINE @ flip @ swap), str(label_path))
    prepare_dataset(data, tmp_path / "prep", load_config(None, ["prepare.folds=2"]))
    entry = next(e for e in json.loads((tmp_path / "prep" / "datalist.json").read_text())["training"]
                 if e["case"].endswith("liver_1"))
    prepared = nib.load(str(tmp_path / "prep" / entry["label"]))
    np.testing.assert_array_equal(np.asarray(prepared.dataobj), (arr == 1) | (arr == 2))
    np.testing.assert_allclose(prepared.affine, AFFINE, atol=1e-5)
