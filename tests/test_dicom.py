"""pipeline.dicom: writing series that SimpleITK and dcm2niix read, reading them back exactly."""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.dicom_fixtures import OBLIQUE_COL, OBLIQUE_ROW, ramp_volume, shuffled_names, write_tiny

DCM2NIIX = shutil.which("dcm2niix")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix binary not found on PATH")


def _sitk_read(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_written_oblique_reversed_shuffled_series_reads_back_in_simpleitk(tmp_path):
    vol = ramp_volume(5, 12, 10)
    names = shuffled_names(5)
    write_tiny(tmp_path, vol, spacing=(0.8, 0.7, -2.5), origin=(5.0, -7.0, 40.0),
               row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, file_names=names, modality="CT",
               rescale_intercept=-1024.0, rescale_slope=1.0)
    img = _sitk_read(tmp_path)
    normal = np.cross(OBLIQUE_ROW, OBLIQUE_COL)
    # GDCM sorts ascending along the normal, so with a negative step slice 4 comes first.
    np.testing.assert_allclose(img.GetOrigin(), np.array([5.0, -7.0, 40.0]) + 4 * -2.5 * normal, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.8, 2.5), atol=1e-6)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], OBLIQUE_ROW, atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], OBLIQUE_COL, atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol[::-1])


def test_stored_values_apply_inverse_rescale_and_clip_to_dtype(tmp_path):
    vol = np.full((2, 4, 4), 100.0)
    vol[1] = -5000.0  # below what uint16 with intercept -1024 can hold -> clipped to 0
    paths = write_tiny(tmp_path, vol, modality="CT", rescale_intercept=-1024.0, rescale_slope=2.0)
    first, second = (pydicom.dcmread(p) for p in paths)
    assert first.pixel_array[0, 0] == round((100 + 1024) / 2)
    assert second.pixel_array[0, 0] == 0
    assert float(first.RescaleSlope) == 2.0 and float(first.RescaleIntercept) == -1024.0
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage


def test_per_slice_extra_tags_and_instance_numbers_are_written(tmp_path):
    paths = write_tiny(tmp_path, ramp_volume(3, 4, 4), instance_numbers=[7, 8, 9],
                       extra_tags=lambda k: {"EchoTime": 2.3 + k, "MagneticFieldStrength": 1.5})
    ds = [pydicom.dcmread(p) for p in paths]
    assert [d.InstanceNumber for d in ds] == [7, 8, 9]
    assert [float(d.EchoTime) for d in ds] == [2.3, 3.3, 4.3]
    assert float(ds[0].MagneticFieldStrength) == 1.5


def test_writing_twice_is_byte_identical(tmp_path):
    a = write_tiny(tmp_path / "a", ramp_volume(3, 4, 4))
    b = write_tiny(tmp_path / "b", ramp_volume(3, 4, 4))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert not list((tmp_path / "a").glob(".partial*"))


@needs_dcm2niix
def test_dcm2niix_converts_a_written_series(tmp_path):
    vol = ramp_volume(5, 12, 10)
    write_tiny(tmp_path / "dcm", vol, spacing=(0.8, 0.7, -2.5), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL,
               file_names=shuffled_names(5))
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run([DCM2NIIX, "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(tmp_path / "dcm")],
                   check=True, capture_output=True)
    (nii,) = out.glob("*.nii.gz")
    img = nib.load(nii)
    assert img.shape == (10, 12, 5)
    np.testing.assert_allclose(sorted(img.header.get_zooms()), sorted((0.7, 0.8, 2.5)), atol=1e-5)
    assert sorted(np.asarray(img.dataobj).ravel().tolist()) == sorted(vol.ravel().tolist())
