"""`prepare` on the real CHAOS data in ../shared/data/chaos-real (skipped when absent)."""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.config import Config
from pipeline.datasets.chaos import find_cases
from pipeline.datasets.prepare import prepare_dataset

DCM2NIIX = shutil.which("dcm2niix")
MR_IDS = [1, 2, 5, 8, 13, 19, 20, 22, 31, 33, 36, 38]

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, real_chaos):
    out = tmp_path_factory.mktemp("real_prepared")
    datalist = prepare_dataset(real_chaos, out, Config())
    return out, {e["case"]: e for e in datalist["training"]}


@pytest.mark.slow
def test_ct_patient_and_every_mr_patient_prepare(prepared):
    _, entries = prepared
    assert set(entries) == {"CT_3", *(f"MR_{i}_T2SPIR" for i in MR_IDS)}


def test_label_and_image_shapes_and_affines_agree(prepared):
    out, entries = prepared
    for entry in entries.values():
        image, label = nib.load(out / entry["image"]), nib.load(out / entry["label"])
        assert image.shape == label.shape, entry["case"]
        np.testing.assert_array_equal(image.affine, label.affine)
        assert np.asarray(label.dataobj).max() >= 1, f"{entry['case']}: empty label"


def test_ct_label_sits_on_the_liver(prepared):
    out, entries = prepared
    hu = nib.load(out / entries["CT_3"]["image"]).get_fdata()
    liver = np.asarray(nib.load(out / entries["CT_3"]["label"]).dataobj) == 1
    assert 80 <= hu[liver].mean() <= 200


def test_mr_labels_keep_all_four_organs(prepared):
    out, entries = prepared
    values = set(np.unique(np.asarray(nib.load(out / entries["MR_1_T2SPIR"]["label"]).dataobj)).tolist())
    assert values == {0, 1, 2, 3, 4}


def test_folds_never_split_a_patient(prepared):
    _, entries = prepared
    fold_of: dict[str, set] = {}
    for e in entries.values():
        fold_of.setdefault(e["patient"], set()).add(e["fold"])
    assert all(len(f) == 1 for f in fold_of.values())
    assert len({f for folds in fold_of.values() for f in folds}) == 5


@pytest.mark.slow
@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix binary not found on PATH")
def test_affines_and_voxels_equal_dcm2niix(prepared, tmp_path, real_chaos):
    out, entries = prepared
    for case in find_cases(real_chaos):
        dest = tmp_path / case.case
        dest.mkdir()
        subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "%s", "-o", str(dest), str(case.dicom_dir)],
                       check=True, capture_output=True)
        (ref_path,) = dest.glob("*.nii")
        ref, ours = nib.load(ref_path), nib.load(out / entries[case.case]["image"])
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3, err_msg=case.case)
        np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata(), err_msg=case.case)


@pytest.mark.slow
def test_pixels_from_memory_equal_simpleitk_on_the_real_ct(real_chaos):
    from pipeline.dicom.pixels import read_pixels_in_order
    from pipeline.dicom.series import read_series

    ct = next(s for s in find_cases(real_chaos) if s.modality == "CT")
    volume, geom = read_series(ct.dicom_dir)  # files read once, pixels stacked from memory
    np.testing.assert_array_equal(volume, read_pixels_in_order(geom.files, geom.rows, geom.cols))  # SimpleITK
    assert volume.flags["F_CONTIGUOUS"] and float(volume.min()) < -900.0  # HU, rescale applied
