"""CHAOS layout, Ground pairing, folds and `prepare_dataset` on a tiny CHAOS tree in tmp_path."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.datasets.chaos import find_cases, pair_ground, png_labels, read_ground
from pipeline.datasets.prepare import prepare_dataset
from pipeline.datasets.splits import assign_folds
from pipeline.dicom.series import read_series

from helpers import make_chaos_tree

REPO = Path(__file__).resolve().parents[1]
ALL_CASES = ["CT_1", "MR_2_T1DUAL_InPhase", "MR_2_T1DUAL_OutPhase", "MR_2_T2SPIR"]


@pytest.fixture
def tree(tmp_path):
    truth = make_chaos_tree(tmp_path / "raw")
    return tmp_path / "raw", truth


def _case(root, name):
    (case,) = [c for c in find_cases(root) if c.case == name]
    return case


# --- layout ------------------------------------------------------------------------------------
def test_find_cases_accepts_the_root_or_train_sets_and_names_cases_by_modality(tree):
    root, _ = tree
    for r in (root, root / "Train_Sets"):
        cases = find_cases(r)
        assert [c.case for c in cases] == ALL_CASES
        assert {c.patient for c in cases} == {"CT_1", "MR_2"}
        assert all(c.ground_dir is not None and c.dicom_dir.is_dir() for c in cases)
    assert [c.case for c in find_cases(root, sequences=["T2SPIR"])] == ["MR_2_T2SPIR"]
    assert [c.case for c in find_cases(root, patients=["CT_1"])] == ["CT_1"]


def test_test_sets_layout_without_ground_gives_cases_without_ground_dir(tree, tmp_path):
    root, _ = tree
    test_sets = tmp_path / "t" / "Test_Sets"
    shutil.copytree(root / "Train_Sets", test_sets, ignore=shutil.ignore_patterns("Ground"))
    cases = find_cases(tmp_path / "t")
    assert [c.case for c in cases] == ALL_CASES and all(c.ground_dir is None for c in cases)


def test_non_numeric_patient_folder_is_rejected_before_it_becomes_a_path(tree):
    root, _ = tree
    (root / "Train_Sets/MR/..evil").mkdir()
    (root / "Train_Sets/MR/x1").mkdir()
    with pytest.raises(PipelineError, match=r"MR/x1: patient folder name must be a number"):
        find_cases(root)


def test_unknown_sequence_and_unknown_patient_are_errors(tree):
    root, _ = tree
    with pytest.raises(PipelineError, match=r"unknown sequence.*T1 .*known: CT"):
        find_cases(root, sequences=["T1 "])
    with pytest.raises(PipelineError, match=r"patient\(s\) MR_9 not found"):
        find_cases(root, patients=["MR_9"])


def test_a_folder_that_is_not_a_chaos_root_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="not a CHAOS root"):
        find_cases(tmp_path)


# --- Ground pairing ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_CASES)
def test_ground_pngs_land_on_the_slice_of_their_dicom_file(tree, name):
    root, truth = tree
    _, geo = read_series(_case(root, name).dicom_dir)
    labels = read_ground(_case(root, name), geo)
    assert labels.dtype == np.uint8 and labels.shape == geo.shape
    per_file = geo.unstack(labels)
    for path, expected in truth[name].items():
        np.testing.assert_array_equal(per_file[path], expected, err_msg=str(path))


def test_ct_ground_pngs_follow_natural_file_order(tree):
    root, _ = tree
    case = _case(root, "CT_1")
    pairs = pair_ground(case, read_series(case.dicom_dir)[1].files)
    assert {d.name: p.name for d, p in pairs.items()}["i0003,0000b.dcm"] == "liver_GT_003.png"


def test_outphase_pairs_by_order_with_inphase_stems_and_by_stem_when_stems_match(tree):
    root, _ = tree
    case = _case(root, "MR_2_T1DUAL_OutPhase")
    files = read_series(case.dicom_dir)[1].files
    assert {d.name: p.name for d, p in pair_ground(case, files).items()}["IMG-0004-00003.dcm"] == "IMG-0004-00004.png"
    # a copy of the data where OutPhase files carry the Ground stems
    for f in case.dicom_dir.iterdir():
        f.rename(f.with_name(f"X{f.name}"))
    for png in case.ground_dir.iterdir():
        shutil.copy(png, png.with_name(f"XIMG-0004-{int(png.stem[-5:]) - 1:05d}.png"))
    case = _case(root, "MR_2_T1DUAL_OutPhase")
    files = read_series(case.dicom_dir)[1].files
    pairs = pair_ground(case, files)
    assert all(p.stem == d.stem for d, p in pairs.items())


def test_outphase_pairing_is_verified_against_inphase_positions(tree):
    root, _ = tree
    case = _case(root, "MR_2_T1DUAL_OutPhase")
    victim = case.dicom_dir / "IMG-0004-00003.dcm"
    ds = pydicom.dcmread(victim)
    ds.ImagePositionPatient = [float(v) + 0.5 for v in ds.ImagePositionPatient]
    ds.save_as(victim)
    with pytest.raises(PipelineError, match=r"IMG-0004-00003.dcm: ImagePositionPatient differs from .*IMG-0004-00004.dcm"):
        pair_ground(case, sorted(case.dicom_dir.iterdir()))


def test_missing_ground_png_names_the_dicom_file(tree):
    root, _ = tree
    (root / "Train_Sets/MR/2/T2SPIR/Ground/IMG-0002-00003.png").unlink()
    case = _case(root, "MR_2_T2SPIR")
    with pytest.raises(PipelineError, match=r"IMG-0002-00003.dcm: no Ground PNG IMG-0002-00003.png"):
        pair_ground(case, sorted(case.dicom_dir.iterdir()))


def test_extra_ground_png_is_an_error(tree):
    root, _ = tree
    ground = root / "Train_Sets/MR/2/T2SPIR/Ground"
    shutil.copy(ground / "IMG-0002-00001.png", ground / "IMG-0002-00099.png")
    case = _case(root, "MR_2_T2SPIR")
    with pytest.raises(PipelineError, match=r"IMG-0002-00099.png: extra Ground PNG"):
        pair_ground(case, sorted(case.dicom_dir.iterdir()))
    ct = _case(root, "CT_1")
    shutil.copy(ct.ground_dir / "liver_GT_000.png", ct.ground_dir / "liver_GT_006.png")
    with pytest.raises(PipelineError, match=r"liver_GT_006.png: extra Ground PNG"):
        pair_ground(ct, sorted(ct.dicom_dir.iterdir()))


def test_ground_png_of_the_wrong_size_names_the_png(tree):
    root, _ = tree
    png = root / "Train_Sets/CT/1/Ground/liver_GT_002.png"
    Image.fromarray(np.zeros((5, 5), bool)).save(png)
    case = _case(root, "CT_1")
    with pytest.raises(PipelineError, match=r"liver_GT_002.png: PNG is 5x5, DICOM is 16x14"):
        read_ground(case, read_series(case.dicom_dir)[1])


@pytest.mark.parametrize("value,label", [(0, 0), (55, 1), (70, 1), (126, 2), (189, 3), (240, 4), (255, 4)])
def test_mr_grey_levels_map_to_organ_labels(tmp_path, value, label):
    png = tmp_path / "g.png"
    Image.fromarray(np.full((3, 4), value, np.uint8)).save(png)
    assert (png_labels(png, "MR", (3, 4)) == label).all()


@pytest.mark.parametrize("value", [1, 100, 150, 210])
def test_mr_grey_level_outside_the_known_ranges_names_png_and_value(tmp_path, value):
    png = tmp_path / "g.png"
    arr = np.zeros((3, 4), np.uint8)
    arr[1, 2] = value
    Image.fromarray(arr).save(png)
    with pytest.raises(PipelineError, match=rf"g.png: grey value {value} is outside"):
        png_labels(png, "MR", (3, 4))


def test_one_bit_ct_png_reads_as_liver_one(tmp_path):
    png = tmp_path / "liver_GT_000.png"
    arr = np.zeros((3, 4), bool)
    arr[1, 1:3] = True
    Image.fromarray(arr).save(png)
    assert Image.open(png).mode == "1"
    np.testing.assert_array_equal(png_labels(png, "CT", (3, 4)), arr.astype(np.uint8))


# --- folds -------------------------------------------------------------------------------------
def test_folds_are_balanced_seeded_stratified_and_independent_of_input_order():
    patients = [f"CT_{i}" for i in range(7)] + [f"MR_{i}" for i in range(13)]
    folds = assign_folds(patients, 5, seed=3)
    assert folds == assign_folds(list(reversed(patients)), 5, seed=3)
    assert folds != assign_folds(patients, 5, seed=4)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    ct_folds = {folds[p] for p in patients if p.startswith("CT")}
    assert len(ct_folds) == 5  # 7 CT patients reach every fold


# --- prepare_dataset ---------------------------------------------------------------------------
def test_prepare_writes_matching_images_labels_and_a_datalist_monai_loads(tree, tmp_path):
    from monai.data import load_decathlon_datalist

    root, _ = tree
    out = tmp_path / "prep"
    datalist = prepare_dataset(root, out, Config())
    assert [e["case"] for e in datalist["training"]] == ALL_CASES
    loaded = load_decathlon_datalist(out / "datalist.json", True, "training")
    assert {e["patient"] for e in loaded} == {"CT_1", "MR_2"}
    for entry in loaded:
        image, label = nib.load(entry["image"]), nib.load(entry["label"])
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine, atol=0)
        assert label.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3, 4}
    ct = nib.load(out / "imagesTr/CT_1.nii.gz")
    assert ct.get_data_dtype() == np.int16
    liver = np.asarray(nib.load(out / "labelsTr/CT_1.nii.gz").dataobj) == 1
    assert 140 <= ct.get_fdata()[liver].mean() <= 147  # the tree's liver is 140 HU + texture 0..6
    data = json.loads((out / "datalist.json").read_text())
    assert data["labels"]["1"] == "liver" and data["numFolds"] == 5
    assert (out / "config.yaml").is_file()
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("case,patient,sequence") and len(summary) == 1 + len(ALL_CASES)


def test_folds_never_split_a_patient(tree, tmp_path):
    root, _ = tree
    datalist = prepare_dataset(root, tmp_path / "prep", Config())
    fold_of: dict[str, set] = {}
    for e in datalist["training"]:
        fold_of.setdefault(e["patient"], set()).add(e["fold"])
    assert all(len(f) == 1 for f in fold_of.values())


def test_prepare_twice_gives_byte_identical_files_and_no_partial_files(tree, tmp_path):
    root, _ = tree
    prepare_dataset(root, tmp_path / "a", Config())
    prepare_dataset(root, tmp_path / "b", Config())
    prepare_dataset(root, tmp_path / "a", Config())  # a rerun over existing outputs
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * len(ALL_CASES) + 3
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.startswith(".partial")]


def test_prepare_never_modifies_the_raw_data(tree, tmp_path):
    root, _ = tree
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    prepare_dataset(root, tmp_path / "prep", Config())
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_sequences_option_limits_the_cases_and_warns_about_older_outputs(tree, tmp_path, caplog):
    root, _ = tree
    prepare_dataset(root, tmp_path / "prep", Config())
    cfg = Config()
    cfg.prepare.sequences = ["CT", "T2SPIR"]
    datalist = prepare_dataset(root, tmp_path / "prep", cfg)
    assert [e["case"] for e in datalist["training"]] == ["CT_1", "MR_2_T2SPIR"]
    assert "4 NIfTI files from an earlier run are not in this datalist" in caplog.text


def test_cli_prepare_error_is_one_line_naming_the_file_and_exits_2(tree, tmp_path):
    root, _ = tree
    (root / "Train_Sets/MR/2/T2SPIR/Ground/IMG-0002-00002.png").unlink()
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "prepare", "-q", "--data", str(root), "--out", str(tmp_path / "o"),
         "--sequences", "T2SPIR"], capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "IMG-0002-00002.dcm: no Ground PNG" in errors[0]
    assert "Traceback" not in result.stderr


def test_image_dtype_is_int16_only_when_lossless():
    from pipeline.datasets.prepare import image_dtype

    assert image_dtype(np.array([-1024.0, 0.0, 3071.0], np.float32)) == np.int16
    assert image_dtype(np.array([0.5, 1.0], np.float32)) == np.float32
    assert image_dtype(np.array([0.0, 40000.0], np.float32)) == np.float32
