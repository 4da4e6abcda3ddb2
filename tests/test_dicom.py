"""pipeline.dicom.series: writing series that SimpleITK and dcm2niix read, reading them back exactly."""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from helpers import GEOMETRIES, OBLIQUE_COL, OBLIQUE_ROW, ramp_volume, shuffled_names, write_tiny

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


from pipeline.core.errors import PipelineError  # noqa: E402
# ---------------------------------------------------------------------------------------------
# read_series: order, geometry and agreement with dcm2niix
# ---------------------------------------------------------------------------------------------
from pipeline.dicom.geometry import from_nifti_slice, to_nifti_slice  # noqa: E402
from pipeline.dicom.series import read_series
from pipeline.dicom.volume import write_nifti  # noqa: E402


def _dcm2niix(folder, out):
    out.mkdir()
    subprocess.run([DCM2NIIX, "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    (nii,) = out.glob("*.nii.gz")
    return nib.load(nii)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_read_series_orders_slices_by_position_not_file_name(tmp_path, name):
    vol = ramp_volume(5, 12, 10)
    kw = GEOMETRIES[name]
    write_tiny(tmp_path, vol, file_names=shuffled_names(5), **kw)
    data, geo = read_series(tmp_path)
    step = kw["spacing"][2]
    ascending = vol if step > 0 else vol[::-1]  # NIfTI slices run up the normal
    assert data.dtype == np.float32 and data.shape == (10, 12, 5) == geo.shape
    for k in range(5):
        np.testing.assert_array_equal(from_nifti_slice(data[:, :, k]), ascending[k])
    np.testing.assert_allclose(geo.spacing, (kw["spacing"][1], kw["spacing"][0], abs(step)), atol=1e-6)
    # geo.files[k] really is the file holding NIfTI slice k
    for k, f in enumerate(geo.files):
        np.testing.assert_array_equal(pydicom.dcmread(f).pixel_array, ascending[k])


@needs_dcm2niix
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_read_series_matches_dcm2niix_affine_and_voxels(tmp_path, name):
    vol = ramp_volume(5, 12, 10)
    write_tiny(tmp_path / "dcm", vol, file_names=shuffled_names(5), modality="CT",
               rescale_intercept=-1024.0, **GEOMETRIES[name])
    data, geo = read_series(tmp_path / "dcm")
    ref = _dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    np.testing.assert_allclose(geo.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(data, ref.get_fdata(dtype=np.float32))


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    vol = np.arange(2 * 4 * 4, dtype=float).reshape(2, 4, 4) * 2.0 - 1000.0
    write_tiny(tmp_path, vol, modality="CT", rescale_slope=2.0, rescale_intercept=-1000.0)
    data, geo = read_series(tmp_path)
    assert geo.modality == "CT"
    np.testing.assert_array_equal(from_nifti_slice(data[:, :, 1]), vol[1])


def test_each_file_keeps_its_own_rescale_and_the_pydicom_fallback_agrees(tmp_path, monkeypatch):
    import pydicom
    import SimpleITK
    from pydicom.pixels import apply_modality_lut

    paths = write_tiny(tmp_path, ramp_volume(3, 6, 5), modality="MR", rescale_slope=1.0, rescale_intercept=0.0)
    ds = pydicom.dcmread(paths[1])
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-7"  # scanners may rescale every file differently
    ds.save_as(paths[1])
    data, geo = read_series(tmp_path)
    for k, f in enumerate(geo.files):
        ds = pydicom.dcmread(f)
        np.testing.assert_allclose(from_nifti_slice(data[:, :, k]), apply_modality_lut(ds.pixel_array, ds), rtol=1e-6)

    # the default (files read once, stacked from memory) agrees with SimpleITK and with pydicom file by file
    from pipeline.dicom.pixels import read_pixels_in_order

    via_sitk = read_pixels_in_order(geo.files, geo.rows, geo.cols)
    np.testing.assert_allclose(via_sitk, data, rtol=1e-6)

    def broken(*args, **kwargs):
        raise RuntimeError("no GDCM today")

    monkeypatch.setattr(SimpleITK, "ReadImage", broken)  # the file-by-file pydicom path
    fallback = read_pixels_in_order(geo.files, geo.rows, geo.cols)
    np.testing.assert_array_equal(fallback, data)
    assert data.flags["F_CONTIGUOUS"] and fallback.flags["F_CONTIGUOUS"]  # NIfTI's layout


def test_compressed_series_read_like_the_uncompressed_one(tmp_path):
    import pydicom
    from pydicom.uid import RLELossless

    plain_dir, rle_dir = tmp_path / "plain", tmp_path / "rle"
    vol = ramp_volume(4, 6, 5) * 3 - 40
    write_tiny(plain_dir, vol, modality="CT", rescale_slope=1.0, rescale_intercept=-1024.0)
    rle_dir.mkdir()
    for f in sorted(plain_dir.iterdir()):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)  # pydicom's own RLE encoder; read back through SimpleITK (GDCM)
        ds.save_as(rle_dir / f.name)
    assert pydicom.dcmread(next(rle_dir.iterdir())).file_meta.TransferSyntaxUID == RLELossless
    plain, geo_plain = read_series(plain_dir)
    rle, geo_rle = read_series(rle_dir)
    np.testing.assert_array_equal(rle, plain)
    np.testing.assert_allclose(geo_rle.affine, geo_plain.affine)


def test_stack_and_unstack_are_inverse_and_follow_file_order(tmp_path):
    vol = ramp_volume(4, 6, 5)
    paths = write_tiny(tmp_path, vol, spacing=(1, 1, -2), file_names=shuffled_names(4))
    data, geo = read_series(tmp_path)
    per_file = geo.unstack(data)
    for k, p in enumerate(paths):  # paths[k] holds volume[k], as written
        np.testing.assert_array_equal(per_file[p], vol[k])
    np.testing.assert_array_equal(geo.stack(per_file), data)
    np.testing.assert_array_equal(from_nifti_slice(to_nifti_slice(vol[0])), vol[0])
    # NIfTI j runs bottom-up: the last stored row becomes j = 0
    np.testing.assert_array_equal(to_nifti_slice(vol[0])[:, 0], vol[0][-1, :])


def test_stack_names_the_file_with_a_wrongly_shaped_slice(tmp_path):
    write_tiny(tmp_path, ramp_volume(3, 6, 5))
    _, geo = read_series(tmp_path)
    slices = {f: np.zeros((6, 5)) for f in geo.files}
    slices[geo.files[1]] = np.zeros((5, 6))
    with pytest.raises(PipelineError, match=rf"{geo.files[1].name}.*shape"):
        geo.stack(slices)


def test_harmless_non_dicom_files_are_skipped_with_a_warning(tmp_path, caplog):
    write_tiny(tmp_path, ramp_volume(3, 4, 4))
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "notes.txt").write_text("hello")
    write_tiny(tmp_path / "dd", ramp_volume(1, 4, 4))
    dicomdir = pydicom.dcmread(next((tmp_path / "dd").iterdir()))
    del dicomdir.ImagePositionPatient
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.save_as(tmp_path / "DICOMDIR")
    data, geo = read_series(tmp_path)
    assert data.shape[2] == 3 and len(geo.files) == 3
    assert "notes.txt" in caplog.text and "DICOMDIR" in caplog.text and ".DS_Store" in caplog.text


# ---------------------------------------------------------------------------------------------
# read_series: every integrity error names the file (or folder) and the problem
# ---------------------------------------------------------------------------------------------
def test_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(PipelineError, match=r"nowhere.*not found"):
        read_series(tmp_path / "nowhere")


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(PipelineError, match=r"empty: no DICOM image files"):
        read_series(tmp_path / "empty")


def test_several_series_in_one_folder_are_listed_unless_one_is_picked(tmp_path):
    write_tiny(tmp_path, ramp_volume(3, 4, 4), series_uid="1.2.3.1", file_names=["a1", "a2", "a3"])
    write_tiny(tmp_path, ramp_volume(2, 4, 4), series_uid="1.2.3.2", file_names=["b1", "b2"])
    with pytest.raises(PipelineError, match=r"holds 2 series.*1\.2\.3\.1 \(3 files\).*1\.2\.3\.2 \(2 files\)"):
        read_series(tmp_path)
    data, geo = read_series(tmp_path, series_uid="1.2.3.2")
    assert data.shape[2] == 2 and geo.series_uid == "1.2.3.2"
    with pytest.raises(PipelineError, match=r"no series with SeriesInstanceUID 9\.9"):
        read_series(tmp_path, series_uid="9.9")


def test_missing_slice_is_reported_as_uneven_spacing(tmp_path):
    paths = write_tiny(tmp_path, ramp_volume(5, 4, 4))
    paths[2].unlink()
    with pytest.raises(PipelineError, match=rf"{paths[3].name}: uneven slice spacing.*missing slice"):
        read_series(tmp_path)


def test_duplicate_slice_position_is_an_error(tmp_path):
    write_tiny(tmp_path, ramp_volume(3, 4, 4), extra_tags=lambda k: {"ImagePositionPatient": [0, 0, min(k, 1) * 2.0]})
    with pytest.raises(PipelineError, match=r"duplicate slice"):
        read_series(tmp_path)


def test_inconsistent_orientation_names_the_file(tmp_path):
    tilt = [1, 0, 0, 0, 0.9998, 0.02]
    paths = write_tiny(tmp_path, ramp_volume(4, 4, 4),
                       extra_tags=lambda k: {"ImageOrientationPatient": tilt} if k == 3 else {})
    with pytest.raises(PipelineError, match=rf"{paths[3].name}: ImageOrientationPatient .* differs"):
        read_series(tmp_path)


def test_gantry_tilt_is_an_error(tmp_path):
    paths = write_tiny(tmp_path, ramp_volume(4, 4, 4),
                       extra_tags=lambda k: {"ImagePositionPatient": [0.0, 0.5 * k, 2.5 * k]})
    with pytest.raises(PipelineError, match=rf"{paths[1].name}: .*gantry tilt"):
        read_series(tmp_path)


def test_differing_matrix_sizes_are_an_error(tmp_path):
    write_tiny(tmp_path, ramp_volume(2, 4, 4), series_uid="1.2.3", file_names=["a1", "a2"])
    write_tiny(tmp_path, ramp_volume(1, 6, 4), series_uid="1.2.3", file_names=["b1"], origin=(-10, -20, 40))
    with pytest.raises(PipelineError, match=r"b1: image is 6x4"):
        read_series(tmp_path)


@pytest.mark.parametrize("allocated,stored,signed", [(16, 16, 0), (16, 16, 1), (16, 12, 0), (16, 12, 1),
                                                     (8, 8, 0), (8, 7, 1), (32, 32, 1), (32, 20, 0)])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_stored_pixels_equal_pydicom_pixel_array_on_every_bit_pattern(tmp_path, allocated, stored, signed, syntax):
    """The bytes-as-array fast path masks and sign-extends exactly as pydicom does, high bits set or not."""
    import copy

    from pipeline.dicom.pixels import stored_pixels

    ds = copy.deepcopy(pydicom.dcmread(write_tiny(tmp_path, ramp_volume(1, 8, 6))[0]))
    rng = np.random.default_rng(allocated + stored + signed)
    raw = rng.integers(0, 2 ** allocated, size=48, dtype=np.uint64).astype(f"<u{allocated // 8}")
    raw[:4] = [0, 2 ** allocated - 1, 2 ** (stored - 1), 2 ** (stored - 1) - 1]  # edges of the stored range
    ds.file_meta.TransferSyntaxUID = syntax
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, signed
    ds.PixelData = raw.tobytes()
    ours = stored_pixels(ds, 8, 6)
    assert ours.dtype == ds.pixel_array.dtype
    np.testing.assert_array_equal(ours, ds.pixel_array)


def test_unreadable_pixel_data_names_the_file(tmp_path):
    paths = write_tiny(tmp_path, ramp_volume(3, 8, 8))
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:-40])  # truncated pixel data
    with pytest.raises(PipelineError, match=rf"{paths[1].name}: cannot decode pixel data"):
        read_series(tmp_path)


# ---------------------------------------------------------------------------------------------
# write_nifti
# ---------------------------------------------------------------------------------------------
def test_write_nifti_sets_sform_and_qform_and_is_byte_reproducible(tmp_path):
    write_tiny(tmp_path / "dcm", ramp_volume(3, 6, 5), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    data, geo = read_series(tmp_path / "dcm")
    a = write_nifti(tmp_path / "a.nii.gz", data, geo.affine, np.int16)
    b = write_nifti(tmp_path / "b.nii.gz", data, geo.affine, np.int16)
    assert a.read_bytes() == b.read_bytes()
    img = nib.load(a)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), geo.affine, atol=1e-4)
    np.testing.assert_allclose(img.affine, geo.affine, atol=1e-6)
    assert img.get_data_dtype() == np.int16
    assert not list(tmp_path.glob(".partial*"))


def test_write_nifti_refuses_an_identity_affine(tmp_path):
    with pytest.raises(PipelineError, match="identity"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((2, 2, 2)), np.eye(4), np.uint8)


@needs_dcm2niix
@pytest.mark.parametrize("dtype,intercept", [(np.uint8, 0.0), (np.int16, 0.0), (np.uint16, -1024.0)])
def test_every_supported_dtype_reads_back_exactly_and_converts_with_dcm2niix(tmp_path, dtype, intercept):
    vol = (np.arange(3 * 5 * 7).reshape(3, 5, 7) % 97 - (40 if dtype == np.int16 else 0)).astype(float)
    write_tiny(tmp_path / "dcm", vol, dtype=dtype, rescale_intercept=intercept, modality="CT")
    data, geo = read_series(tmp_path / "dcm")
    for k in range(3):
        np.testing.assert_array_equal(from_nifti_slice(data[:, :, k]), vol[k])
    ref = _dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    np.testing.assert_array_equal(data, ref.get_fdata(dtype=np.float32))


def test_image_without_position_is_an_error_not_a_silent_skip(tmp_path):
    paths = write_tiny(tmp_path, ramp_volume(3, 4, 4))
    ds = pydicom.dcmread(paths[1])
    del ds.ImagePositionPatient
    ds.save_as(paths[1])
    with pytest.raises(PipelineError, match=rf"{paths[1].name}: missing or invalid ImagePositionPatient"):
        read_series(tmp_path)
