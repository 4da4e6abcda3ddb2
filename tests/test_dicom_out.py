"""DICOM SEG output: validated by dciodvfy, read back by highdicom, same voxels as the NIfTI mask."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.dicom import read_series
from pipeline.errors import PipelineError
from tests.nifti_fixtures import make_prepared_dataset
from tests.dicom_fixtures import OBLIQUE_COL, OBLIQUE_ROW, shuffled_names, write_tiny
from tests.test_infer import _cli, _assert_one_line_error, ellipsoid_volume, make_run

hd = pytest.importorskip("highdicom")
LIVER_SNOMED = "10200004"
ANATOMICAL_STRUCTURE_SNOMED = "91723000"


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for `path` (the reference DICOM validator, Debian dicom3tools)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def seg_planes(seg_path: Path, geometry) -> np.ndarray:
    """The SEG's liver segment as (frames, rows, cols), one plane per source file in geometry order
    (zeros where the SEG omits an empty frame)."""
    seg = hd.seg.segread(seg_path)
    uids = [str(ds.SOPInstanceUID) for ds in geometry.headers]
    present = {str(ref.ReferencedSOPInstanceUID)
               for item in seg.PerFrameFunctionalGroupsSequence
               for ref in item.DerivationImageSequence[0].SourceImageSequence}
    out = np.zeros((len(uids), geometry.rows, geometry.cols), np.uint8)
    hits = [i for i, u in enumerate(uids) if u in present]
    if hits:
        pixels = seg.get_pixels_by_source_instance([uids[i] for i in hits], segment_numbers=[1])
        out[hits] = pixels[..., 0]
    return out


def check_seg_against_source(seg_path: Path, mask: np.ndarray, series_folder: Path) -> None:
    from pipeline.dicom_out import source_frames

    assert dciodvfy_errors(seg_path) == []
    _, geom = read_series(series_folder)
    seg = pydicom.dcmread(seg_path)
    src = pydicom.dcmread(geom.files[0], stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    # files into the source's patient and study, on the source's frame of reference
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg.get(keyword) == src.get(keyword), keyword
    assert seg.PatientID == src.get("PatientID", "")
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    # every source image referenced
    refs = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(ds.SOPInstanceUID) for ds in geom.headers}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == LIVER_SNOMED
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ANATOMICAL_STRUCTURE_SNOMED
    # the same voxels as the mask, frame by frame on the source images
    np.testing.assert_array_equal(seg_planes(seg_path, geom), source_frames(mask, geom) > 0)


@pytest.mark.parametrize("name,kw", [
    ("axial", {}),
    ("oblique_shuffled", {"row_dir": OBLIQUE_ROW, "col_dir": OBLIQUE_COL, "spacing": (0.8, 0.7, -2.5),
                          "file_names": shuffled_names(6, seed=3)}),
])
def test_seg_holds_the_mask_on_the_source_images(tmp_path, name, kw):
    from pipeline.dicom_out import write_seg

    series = tmp_path / name
    write_tiny(series, ellipsoid_volume(), **kw)
    _, geom = read_series(series)
    mask = np.zeros(geom.shape, np.uint8)
    mask[3:12, 4:15, 1:5] = 1
    mask[5:7, 6:8, 2] = 0  # a hole, and an empty first and last slice
    out = write_seg(tmp_path / "liver.seg.dcm", mask, geom, case=name, run_name="run")
    check_seg_against_source(out, mask, series)


def test_anonymised_source_without_type2_attributes_gives_a_valid_seg_with_them_empty(tmp_path):
    from pipeline.dicom_out import TYPE2_COPIED, write_seg

    series = tmp_path / "anon"
    files = write_tiny(series, ellipsoid_volume())
    for f in files:  # strip what anonymisers strip; the source files are ours to damage here
        ds = pydicom.dcmread(f)
        for keyword in TYPE2_COPIED:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(f)
    _, geom = read_series(series)
    before = [sorted(ds.keys()) for ds in geom.headers]
    mask = np.zeros(geom.shape, np.uint8)
    mask[2:10, 2:10, 1:4] = 1
    out = write_seg(tmp_path / "liver.seg.dcm", mask, geom, case="anon", run_name="run")
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber"):
        assert keyword in seg and not seg[keyword].value, keyword
    assert [sorted(ds.keys()) for ds in geom.headers] == before  # the geometry's headers untouched


def test_empty_mask_still_writes_a_valid_seg(tmp_path):
    from pipeline.dicom_out import write_seg

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    _, geom = read_series(series)
    out = write_seg(tmp_path / "empty.seg.dcm", np.zeros(geom.shape, np.uint8), geom, case="s", run_name="run")
    assert dciodvfy_errors(out) == []
    assert not seg_planes(out, geom).any()


def test_seg_needs_the_source_headers(tmp_path):
    from dataclasses import replace

    from pipeline.dicom_out import write_seg

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    _, geom = read_series(series)
    with pytest.raises(PipelineError, match="needs the source series' headers"):
        write_seg(tmp_path / "x.seg.dcm", np.zeros(geom.shape, np.uint8), replace(geom, headers=[]),
                  case="s", run_name="run")


def test_infer_writes_seg_beside_the_nifti_with_the_same_voxels(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume(), spacing=(0.8, 0.7, -2.5))
    run_dir = make_run(tmp_path / "run")
    res = _cli("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "out"),
               "--format", "nifti,dicom-seg", "-q")
    assert res.returncode == 0, res.stderr
    mask = np.asarray(nib.load(str(tmp_path / "out" / "s_liver.nii.gz")).dataobj)
    check_seg_against_source(tmp_path / "out" / "s_liver.seg.dcm", mask, series)
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_unknown_format_and_seg_of_nifti_input_fail_with_one_line(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    run_dir = make_run(tmp_path / "run")
    res = _cli("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "o1"), "--format", "nifti,seg")
    _assert_one_line_error(res, "--format", "seg", "dicom-seg")
    assert not (tmp_path / "o1").exists()
    prepared = make_prepared_dataset(tmp_path / "prep", n_mr=1, n_ct=0)  # NIfTI: no DICOM to reference
    res = _cli("--run-dir", str(run_dir), "--input", str(prepared), "--out", str(tmp_path / "o2"),
               "--format", "dicom-seg")
    _assert_one_line_error(res, "dicom-seg", "DICOM input")


@pytest.mark.realdata
def test_real_ct_seg_is_valid_and_matches_the_mask(tmp_path, real_chaos):
    from pipeline.dicom_out import write_seg

    series = real_chaos / "Train_Sets" / "CT" / "3" / "DICOM_anon"
    _, geom = read_series(series, pixels=False)
    mask = np.zeros(geom.shape, np.uint8)
    mask[150:330, 200:380, 10:60] = 1  # a box across slices; frames outside it are empty
    out = write_seg(tmp_path / "CT_3_liver.seg.dcm", mask, geom, case="CT_3", run_name="run")
    check_seg_against_source(out, mask, series)
