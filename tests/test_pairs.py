"""prepare from your own scans: DICOM series or NIfTI images with NIfTI or DICOM SEG masks, paired by
a CSV or by name; several data sets prepared into one folder with unique ids."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.datasets.prepare import prepare_dataset
from pipeline.dicom.volume import read_dicom_series
from pipeline.outputs.dicom_objects import write_seg

from helpers import ellipsoid_volume, make_chaos_tree, make_msd, write_tiny

CFG = load_config(None, ["prepare.folds=2"])


def _series(folder: Path, seed: int, **kw):
    """A tiny MR series and a liver mask on its grid (NIfTI order)."""
    write_tiny(folder, ellipsoid_volume() + seed, **kw)
    volume = read_dicom_series(folder)
    liver = (volume.array > 700).astype(np.uint8)
    liver[:2, :, :] = 0
    return volume, liver


def _label_of(prep: Path, case: str) -> np.ndarray:
    entry = next(e for e in json.loads((prep / "datalist.json").read_text())["training"] if e["case"] == case)
    return np.asarray(nib.load(str(prep / entry["label"])).dataobj)


@pytest.fixture
def own(tmp_path):
    """Three patients: a DICOM series with a SEG, one with a NIfTI mask in DICOM row order (as
    viewers that keep the stored rows save it), and a NIfTI image with a NIfTI mask."""
    root = tmp_path / "own"
    a, mask_a = _series(root / "dicom" / "anna", 0)
    write_seg(root / "masks" / "anna_liver.dcm", mask_a, a.geometry, case="anna", run_name="test")
    b, mask_b = _series(root / "dicom" / "ben", 1, spacing=(0.8, 0.7, -2.5))
    rows_order = mask_b[:, ::-1, :]  # j runs down the rows, as stored: the affine says so
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, mask_b.shape[1] - 1
    nib.save(nib.Nifti1Image(rows_order, b.affine @ flip), str(root / "masks" / "ben.nii.gz"))
    c, mask_c = _series(tmp_path / "tmp_c", 2)
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(c.array, c.affine), str(root / "nifti" / "carl_image.nii.gz"))
    nib.save(nib.Nifti1Image(mask_c, c.affine), str(root / "nifti" / "carl_mask.nii.gz"))
    (root / "pairs.csv").write_text("image,label,patient,modality\n"
                                    "dicom/anna,masks/anna_liver.dcm,anna,\n"
                                    "dicom/ben,masks/ben.nii.gz,ben,\n"
                                    "nifti/carl_image.nii.gz,nifti/carl_mask.nii.gz,carl,MR\n")
    return root, {"anna": (a, mask_a), "ben": (b, mask_b), "carl": (c, mask_c)}


def test_a_pairs_csv_prepares_seg_and_nifti_masks_onto_their_images(own, tmp_path):
    root, truth = own
    datalist = prepare_dataset(root / "pairs.csv", tmp_path / "prep", CFG)
    assert sorted(e["case"] for e in datalist["training"]) == ["anna", "ben", "carl"]
    assert {e["modality"] for e in datalist["training"]} == {"MR"}  # DICOM header / the CSV
    for case, (volume, mask) in truth.items():
        np.testing.assert_array_equal(_label_of(tmp_path / "prep", case), mask)
        image = nib.load(str(tmp_path / "prep" / "imagesTr" / f"{case}.nii.gz"))
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
    assert {int(e["fold"]) for e in datalist["training"]} <= {0, 1}


def test_images_and_labels_paired_by_name(own, tmp_path):
    root, truth = own
    named = tmp_path / "named"
    (named / "labels").mkdir(parents=True)
    (named / "images").mkdir()
    for case in ("anna", "ben"):
        (named / "images" / case).symlink_to(root / "dicom" / case)
    (named / "labels" / "anna.seg.dcm").symlink_to(root / "masks" / "anna_liver.dcm")
    (named / "labels" / "ben.nii.gz").symlink_to(root / "masks" / "ben.nii.gz")
    datalist = prepare_dataset(named, tmp_path / "prep", CFG)
    assert sorted(e["patient"] for e in datalist["training"]) == ["anna", "ben"]
    for case in ("anna", "ben"):
        np.testing.assert_array_equal(_label_of(tmp_path / "prep", case), truth[case][1])


@pytest.mark.parametrize("damage,words", [
    ("grid", ["masks/ben.nii.gz", "dicom/ben", "not on the grid", "never resampled"]),
    ("values", ["masks/ben.nii.gz", "outside the declared"]),
    ("other_series", ["anna_liver.dcm", "does not reference the image series"]),
    ("columns", ["pairs.csv", "missing patient"]),
    ("modality", ["pairs.csv:4", "modality column"]),
    ("missing", ["pairs.csv:2", "not found"]),
])
def test_bad_pairs_fail_naming_the_files(own, tmp_path, damage, words):
    root, truth = own
    csv = root / "pairs.csv"
    b, mask_b = truth["ben"]
    if damage == "grid":
        shifted = b.affine.copy()
        shifted[2, 3] += 2.5  # one slice off
        nib.save(nib.Nifti1Image(mask_b, shifted), str(root / "masks" / "ben.nii.gz"))
    elif damage == "values":
        bad = mask_b.copy()
        bad[0, 0, 0] = 3
        nib.save(nib.Nifti1Image(bad, b.affine), str(root / "masks" / "ben.nii.gz"))
    elif damage == "other_series":  # anna's SEG paired with ben's series
        csv.write_text("image,label,patient\ndicom/ben,masks/anna_liver.dcm,ben\n")
        words = [*words[:1], "dicom/ben", *words[1:]]
    elif damage == "columns":
        csv.write_text("image,label\ndicom/ben,masks/ben.nii.gz\n")
    elif damage == "modality":
        csv.write_text(csv.read_text().replace(",carl,MR", ",carl,"))
    else:
        csv.write_text(csv.read_text().replace("masks/anna_liver.dcm", "masks/nobody.dcm"))
    with pytest.raises(PipelineError) as err:
        prepare_dataset(csv, tmp_path / "prep", CFG)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_several_data_sets_prepare_into_one_folder_with_unique_ids(own, tmp_path):
    root, truth = own
    make_chaos_tree(tmp_path / "chaos")
    msd = make_msd(tmp_path / "Task03_Liver", n=4)
    datalist = prepare_dataset([tmp_path / "chaos", msd, root / "pairs.csv"], tmp_path / "prep",
                               load_config(None, ["prepare.folds=3"]))
    entries = datalist["training"]
    cases = [e["case"] for e in entries]
    assert len(set(cases)) == len(cases)
    prefixes = {s["prefix"] for s in datalist["sources"]}
    assert prefixes == {"CHAOS_", f"{json.loads((msd / 'dataset.json').read_text())['name']}_", "pairs_"}
    assert all(any(e["patient"].startswith(p) for p in prefixes) for e in entries)
    assert "pairs_anna" in cases and "CHAOS_CT_1" in cases
    assert sum(s["cases"] for s in datalist["sources"]) == len(entries)
    assert datalist["labels"]["1"] == "liver" and "4" in datalist["labels"]  # CHAOS's organs kept
    # whole patients per fold, drawn over all sources together
    fold_of = {}
    for e in entries:
        assert fold_of.setdefault(e["patient"], e["fold"]) == e["fold"]
    assert set(fold_of.values()) == {0, 1, 2}
    np.testing.assert_array_equal(_label_of(tmp_path / "prep", "pairs_anna"), truth["anna"][1])
    # and they train together (CHAOS organ maps beside liver-only masks)
    from pipeline.train.cv import run_training
    from tests.conftest import TINY_TRAIN

    results = run_training(tmp_path / "prep", tmp_path / "run", 0, load_config(None, [*TINY_TRAIN, "train.epochs=1"]))
    val = {e["patient"] for e in entries if e["fold"] == 0}
    assert set(results[0].dice_last) == val


@pytest.mark.realdata
def test_a_real_series_with_its_seg_prepares_to_its_liver(real_chaos, tmp_path):
    from pipeline.datasets.chaos import find_cases, read_ground

    case = next(c for c in find_cases(real_chaos, sequences=["T2SPIR"]) if c.patient == "MR_1")
    volume = read_dicom_series(case.dicom_dir)
    liver = (read_ground(case, volume.geometry) == 1).astype(np.uint8)
    write_seg(tmp_path / "mr1.seg.dcm", liver, volume.geometry, case="MR_1", run_name="test")
    (tmp_path / "pairs.csv").write_text(f"image,label,patient\n{case.dicom_dir},mr1.seg.dcm,MR_1\n")
    datalist = prepare_dataset(tmp_path / "pairs.csv", tmp_path / "prep", CFG)
    assert datalist["training"][0]["modality"] == "MR"
    np.testing.assert_array_equal(_label_of(tmp_path / "prep", "MR_1"), liver)
