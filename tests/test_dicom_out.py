"""DICOM SEG output: validated by dciodvfy, read back by highdicom, same voxels as the NIfTI mask."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.core.errors import PipelineError
from pipeline.dicom.series import read_series

from helpers import (OBLIQUE_COL, OBLIQUE_ROW, assert_one_line_error, check_rtstruct_against_source,
                     check_seg_against_source, cli_infer, dciodvfy_errors, ellipsoid_volume, infer_in_process,
                     make_prepared_dataset, make_run, seg_planes, shuffled_names, write_tiny)

hd = pytest.importorskip("highdicom")


@pytest.mark.parametrize("name,kw", [
    ("axial", {}),
    ("oblique_shuffled", {"row_dir": OBLIQUE_ROW, "col_dir": OBLIQUE_COL, "spacing": (0.8, 0.7, -2.5),
                          "file_names": shuffled_names(6, seed=3)}),
])
def test_seg_holds_the_mask_on_the_source_images(tmp_path, name, kw):
    from pipeline.outputs.dicom_objects import write_seg

    series = tmp_path / name
    write_tiny(series, ellipsoid_volume(), **kw)
    _, geom = read_series(series)
    mask = np.zeros(geom.shape, np.uint8)
    mask[3:12, 4:15, 1:5] = 1
    mask[5:7, 6:8, 2] = 0  # a hole, and an empty first and last slice
    out = write_seg(tmp_path / "liver.seg.dcm", mask, geom, case=name, run_name="run")
    check_seg_against_source(out, mask, series)


def test_anonymised_source_without_type2_attributes_gives_a_valid_seg_with_them_empty(tmp_path):
    from pipeline.outputs.dicom_objects import TYPE2_COPIED, write_seg

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
    from pipeline.outputs.dicom_objects import write_rtstruct, write_seg

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

    from pipeline.outputs.dicom_objects import write_seg

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
    res = infer_in_process("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "o1"), "--format", "nifti,seg")
    assert_one_line_error(res, "--format", "seg", "dicom-seg")
    assert not (tmp_path / "o1").exists()
    prepared = make_prepared_dataset(tmp_path / "prep", n_mr=1, n_ct=0)  # NIfTI: no DICOM to reference
    res = infer_in_process("--run-dir", str(run_dir), "--input", str(prepared), "--out", str(tmp_path / "o2"),
               "--format", "dicom-seg")
    assert_one_line_error(res, "dicom-seg", "DICOM input")


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_seg_is_valid_and_matches_the_mask(tmp_path, real_chaos):
    from pipeline.outputs.dicom_objects import write_seg

    series = real_chaos / "Train_Sets" / "CT" / "3" / "DICOM_anon"
    _, geom = read_series(series, pixels=False)
    mask = np.zeros(geom.shape, np.uint8)
    mask[150:330, 200:380, 10:60] = 1  # a box across slices; frames outside it are empty
    out = write_seg(tmp_path / "CT_3_liver.seg.dcm", mask, geom, case="CT_3", run_name="run")
    check_seg_against_source(out, mask, series)


def test_rtstruct_contours_rasterise_back_to_the_mask_with_holes_and_islands(tmp_path):
    from pipeline.outputs.dicom_objects import write_rtstruct

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


@pytest.mark.slow
def test_infer_writes_all_formats_together(tmp_path):
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume(), spacing=(0.8, 0.7, -2.5))
    run_dir = make_run(tmp_path / "run")
    res = cli_infer("--run-dir", str(run_dir), "--input", str(series), "--out", str(tmp_path / "out"),
               "--format", "dicom-seg,rtstruct,chaos-png", "-q")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.glob("s_liver*")} == {"s_liver.nii.gz", "s_liver.seg.dcm", "s_liver.rtstruct.dcm"}
    mask = np.asarray(nib.load(str(out / "s_liver.nii.gz")).dataobj)
    check_seg_against_source(out / "s_liver.seg.dcm", mask, series)
    check_rtstruct_against_source(out / "s_liver.rtstruct.dcm", mask, series, min_dice=1.0)
    assert not list(out.glob(".partial-*"))  # only finished files (io.atomic_path)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_mr_rtstruct_and_seg_of_a_liver_shaped_mask(tmp_path, real_chaos):
    """The real liver label of an MR patient (a real outline, islands and all) as the mask."""
    from pipeline.datasets.chaos import png_stack_liver
    from pipeline.outputs.dicom_objects import write_rtstruct, write_seg

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
