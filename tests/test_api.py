"""pipeline.api.segment: the mask run.py infer writes, from a DICOM folder, a NIfTI file or an array."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.infer import run_inference
from pipeline.volume import read_dicom_series
from tests.dicom_fixtures import write_tiny
from tests.test_infer import ellipsoid_volume, make_run


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

    _, series, run_dir, expected = case
    mask = api.segment(series, run=run_dir)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))
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
