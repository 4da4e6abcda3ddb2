"""DICOM SEG and RTSTRUCT from stripped real sources: valid objects or one clear line, the NIfTI mask always.

A real MR series with, in turn, each identifier the writers copy or reference emptied and deleted
(the way research exports and anonymisers leave them), segmented with `--format dicom-seg,rtstruct`.
"""
from __future__ import annotations

import json
import shutil

import pydicom
import pytest

from conftest import run_main
from helpers import dciodvfy_errors, make_run

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
            "PatientID", "StudyDate")
REFUSED = {"FrameOfReferenceUID"}  # nothing valid can reference images without one: both formats refused


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("stripped") / "run")


def _strip(real_chaos, folder, keyword: str, mode: str, file_meta_too: bool = False) -> None:
    folder.mkdir()
    for path in sorted((real_chaos / "Train_Sets" / "MR" / "1" / "T2SPIR" / "DICOM_anon").iterdir()):
        ds = pydicom.dcmread(path)
        if mode == "emptied":
            setattr(ds, keyword, "")
        elif keyword in ds:
            delattr(ds, keyword)
        if file_meta_too:
            del ds.file_meta["MediaStorageSOPInstanceUID"]
        ds.save_as(folder / path.name)


def _infer(run, series, out):
    return run_main("infer", "--run-dir", str(run), "--input", str(series), "--out", str(out), "-q",
                    "--format", "nifti,dicom-seg,rtstruct", "--set", "infer.montage=false")


@pytest.mark.parametrize("mode", ["emptied", "deleted"])
@pytest.mark.parametrize("keyword", KEYWORDS)
def test_a_stripped_series_gives_valid_objects_or_one_line_and_always_its_mask(real_chaos, run, tmp_path, keyword,
                                                                               mode):
    series, out = tmp_path / "series", tmp_path / "out"
    _strip(real_chaos, series, keyword, mode)
    res = _infer(run, series, out)
    assert res.returncode == 0, res.stderr
    assert (out / "series_liver.nii.gz").is_file()
    row = json.loads((out / "inference.json").read_text())["cases"][0]
    written = [out / f"series_liver.{kind}.dcm" for kind in ("seg", "rtstruct")]
    if keyword in REFUSED:
        assert not any(p.exists() for p in written)
        assert any(keyword in note for note in row["dicom_notes"]), row["dicom_notes"]
        assert len([line for line in res.stderr.splitlines() if keyword in line]) == 1, res.stderr  # one line
        return
    for path in written:
        assert path.is_file(), (path, res.stderr)
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(path) == [], path
        obj = pydicom.dcmread(path)
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert str(obj.get(uid, "")).strip(), (path, uid)
    seg, rt = (pydicom.dcmread(p) for p in written)
    assert seg.StudyInstanceUID == rt.StudyInstanceUID  # one study for both outputs of the case
    if keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert any(keyword in note for note in row["dicom_notes"]), row["dicom_notes"]
        assert any("DICOM outputs" in line and keyword in line for line in res.stderr.splitlines()), res.stderr


def test_an_image_without_any_sop_instance_uid_refuses_the_dicom_formats_in_one_line(real_chaos, run, tmp_path):
    series, out = tmp_path / "series", tmp_path / "out"
    _strip(real_chaos, series, "SOPInstanceUID", "deleted", file_meta_too=True)
    res = _infer(run, series, out)
    assert res.returncode == 0, res.stderr
    assert (out / "series_liver.nii.gz").is_file()
    assert not (out / "series_liver.seg.dcm").exists() and not (out / "series_liver.rtstruct.dcm").exists()
    lines = [line for line in res.stderr.splitlines() if "SOPInstanceUID" in line]
    assert len(lines) == 1 and "file meta" in lines[0], res.stderr


def test_an_export_stripped_like_the_totalsegmentator_example_gives_valid_objects(real_chaos, run, tmp_path):
    """Study, series, SOP instance and class UIDs and PatientID empty in every file at once, the file meta
    still holding the SOP UIDs: the anonymisation of TotalSegmentator's public example CT."""
    series, out = tmp_path / "series", tmp_path / "out"
    series.mkdir()
    for path in sorted((real_chaos / "Train_Sets" / "MR" / "1" / "T2SPIR" / "DICOM_anon").iterdir()):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID"):
            setattr(ds, keyword, "")
        ds.save_as(series / path.name)
    res = _infer(run, series, out)
    assert res.returncode == 0, res.stderr
    seg, rt = (out / f"series_liver.{kind}.dcm" for kind in ("seg", "rtstruct"))
    assert seg.is_file() and rt.is_file() and (out / "series_liver.nii.gz").is_file()
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(seg) == [] and dciodvfy_errors(rt) == []
    notes = json.loads((out / "inference.json").read_text())["cases"][0]["dicom_notes"]
    assert any("StudyInstanceUID" in n for n in notes) and any("file meta" in n for n in notes)
