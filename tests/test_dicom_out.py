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
from tests.test_infer import _cli, _cli_error, _assert_one_line_error, ellipsoid_volume, make_run

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


def file_planes(mask: np.ndarray, geometry) -> np.ndarray:
    """The mask as each source file stores its pixels, in geometry order, through SeriesGeometry.unstack
    (the path chaos-png output uses, tested against the Ground PNGs): independent of dicom_out."""
    planes = geometry.unstack(mask)
    return np.stack([planes[Path(f)] for f in geometry.files]) > 0


def check_seg_against_source(seg_path: Path, mask: np.ndarray, series_folder: Path) -> None:
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
    np.testing.assert_array_equal(seg_planes(seg_path, geom), file_planes(mask, geom))


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


def test_empty_mask_still_writes_a_valid_seg_and_rtstruct(tmp_path):
    from pipeline.dicom_out import write_rtstruct, write_seg

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    _, geom = read_series(series)
    empty = np.zeros(geom.shape, np.uint8)
    seg = write_seg(tmp_path / "empty.seg.dcm", empty, geom, case="s", run_name="run")
    rt = write_rtstruct(tmp_path / "e.rtstruct.dcm", empty, geom, case="s", run_name="r")
    assert dciodvfy_errors(seg) == [] and dciodvfy_errors(rt) == []
    assert not seg_planes(seg, geom).any()
    assert "ContourSequence" not in pydicom.dcmread(rt).ROIContourSequence[0]  # an ROI without contours


def test_seg_needs_the_source_headers(tmp_path):
    from dataclasses import replace

    from pipeline.dicom_out import write_seg

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    _, geom = read_series(series)
    with pytest.raises(PipelineError, match="needs the source series' headers"):
        write_seg(tmp_path / "x.seg.dcm", np.zeros(geom.shape, np.uint8), replace(geom, headers=[]),
                  case="s", run_name="run")


def test_unknown_format_and_seg_of_nifti_input_fail_with_one_line(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    run_dir = make_run(tmp_path / "run")
    res = _cli_error("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "o1"), "--format", "nifti,seg")
    _assert_one_line_error(res, "--format", "seg", "dicom-seg")
    assert not (tmp_path / "o1").exists()
    prepared = make_prepared_dataset(tmp_path / "prep", n_mr=1, n_ct=0)  # NIfTI: no DICOM to reference
    res = _cli_error("--run-dir", str(run_dir), "--input", str(prepared), "--out", str(tmp_path / "o2"),
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


# --------------------------------------------------------------------------- RTSTRUCT
def rasterise_rtstruct(rt_path: Path, geometry) -> np.ndarray:
    """The RTSTRUCT's "Liver" contours back on the source images, (frames, rows, cols) in geometry
    order: each contour's pixel centres inside it (skimage polygon2mask), contours of one image
    combined by the even-odd rule (holes are contours inside contours)."""
    from skimage.draw import polygon2mask

    rt = pydicom.dcmread(rt_path)
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(geometry.headers)}
    out = np.zeros((len(index), geometry.rows, geometry.cols), bool)
    roi = rt.ROIContourSequence[0]
    for item in roi.get("ContourSequence", []):
        assert item.ContourGeometricType == "CLOSED_PLANAR"
        k = index[str(item.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        src = geometry.headers[k]
        xyz = np.array([float(v) for v in item.ContourData]).reshape(-1, 3)
        assert len(xyz) == int(item.NumberOfContourPoints)
        iop = np.array([float(v) for v in src.ImageOrientationPatient])
        dr, dc = (float(v) for v in src.PixelSpacing)
        d = xyz - np.array([float(v) for v in src.ImagePositionPatient])
        normal = np.cross(iop[:3], iop[3:])
        assert np.abs(d @ normal).max() < 1e-3  # in the image's plane
        rc = np.stack([d @ iop[3:] / dr, d @ iop[:3] / dc], axis=1)
        out[k] ^= polygon2mask((geometry.rows, geometry.cols), rc)
    return out


def check_rtstruct_against_source(rt_path: Path, mask: np.ndarray, series_folder: Path, min_dice: float = 1.0):
    from pipeline.metrics import dice

    assert dciodvfy_errors(rt_path) == []
    _, geom = read_series(series_folder)
    rt = pydicom.dcmread(rt_path)
    src = pydicom.dcmread(geom.files[0], stop_before_pixels=True)
    assert rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rt.Modality == "RTSTRUCT"
    assert rt.StudyInstanceUID == src.StudyInstanceUID and rt.FrameOfReferenceUID == src.FrameOfReferenceUID
    frame_ref = rt.ReferencedFrameOfReferenceSequence[0]
    series_ref = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series_ref.ContourImageSequence} == \
        {str(ds.SOPInstanceUID) for ds in geom.headers}
    assert rt.StructureSetROISequence[0].ROIName == "Liver"
    assert rt.RTROIObservationsSequence[0].RTROIInterpretedType == "ORGAN"
    for item in rt.ROIContourSequence[0].get("ContourSequence", []):
        assert max(len(str(v)) for v in item.ContourData) <= 16  # DS values fit
    back, truth = rasterise_rtstruct(rt_path, geom), file_planes(mask, geom)
    score = dice(back, truth) if truth.any() else float(not back.any())
    assert score >= min_dice, score
    return back, truth


def test_rtstruct_contours_rasterise_back_to_the_mask_with_holes_and_islands(tmp_path):
    from pipeline.dicom_out import write_rtstruct

    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume(n=6, rows=40, cols=36), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL,
               spacing=(0.8, 0.7, -2.5))
    _, geom = read_series(series)
    mask = np.zeros(geom.shape, np.uint8)
    mask[5:25, 6:30, 1:5] = 1
    mask[10:14, 12:16, 2:4] = 0  # a hole
    mask[29:33, 30:34, 3] = 1  # an island
    out = write_rtstruct(tmp_path / "liver.rtstruct.dcm", mask, geom, case="s", run_name="run")
    back, truth = check_rtstruct_against_source(out, mask, series, min_dice=1.0)
    np.testing.assert_array_equal(back, truth)  # iso-line contours of pixel masks give the pixels back
    rt = pydicom.dcmread(out)
    per_image = {}
    for item in rt.ROIContourSequence[0].ContourSequence:
        uid = str(item.ContourImageSequence[0].ReferencedSOPInstanceUID)
        per_image[uid] = per_image.get(uid, 0) + 1
    assert sorted(per_image.values()) == [1, 1, 2, 3]  # plain, plain, hole, hole + island


def test_infer_writes_all_formats_together(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume(), spacing=(0.8, 0.7, -2.5))
    run_dir = make_run(tmp_path / "run")
    res = _cli("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "out"),
               "--format", "dicom-seg,rtstruct,chaos-png", "-q")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.glob("s_liver*")} == {"s_liver.nii.gz", "s_liver.seg.dcm", "s_liver.rtstruct.dcm"}
    mask = np.asarray(nib.load(str(out / "s_liver.nii.gz")).dataobj)
    check_seg_against_source(out / "s_liver.seg.dcm", mask, series)
    check_rtstruct_against_source(out / "s_liver.rtstruct.dcm", mask, series, min_dice=1.0)
    assert not list(out.glob(".partial-*"))  # only finished files (io.atomic_path)


@pytest.mark.realdata
def test_real_mr_rtstruct_and_seg_of_a_liver_shaped_mask(tmp_path, real_chaos):
    """The real liver label of an MR patient (a real outline, islands and all) as the mask."""
    from pipeline.chaos import png_stack_liver
    from pipeline.dicom_out import write_rtstruct, write_seg

    patient = real_chaos / "Train_Sets" / "MR" / "1" / "T2SPIR"
    series = patient / "DICOM_anon"
    _, geom = read_series(series, pixels=False)
    pngs = {Path(f): patient / "Ground" / f"{Path(f).stem}.png" for f in geom.files}  # same stems (data README)
    mask = png_stack_liver(pngs, geom).astype(np.uint8)
    assert mask.any()
    rt = write_rtstruct(tmp_path / "MR_1.rtstruct.dcm", mask, geom, case="MR_1", run_name="run")
    check_rtstruct_against_source(rt, mask, series, min_dice=0.98)
    seg = write_seg(tmp_path / "MR_1.seg.dcm", mask, geom, case="MR_1", run_name="run")
    check_seg_against_source(seg, mask, series)
