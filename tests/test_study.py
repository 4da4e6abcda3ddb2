"""Study folders and PACS exports: every CT / MR image series under a folder tree, the rest skipped
with its reason, and a bad series skipped without stopping the others."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.dicom.series import read_series
from pipeline.dicom.study import scan_study

from helpers import (assert_one_line_error, cli_infer, ellipsoid_volume, infer_in_process, make_run, ramp_volume,
                     write_tiny)

STUDY = "1.2.826.0.1.3680043.8.498.1"


def make_export(root: Path) -> dict[str, list[Path]]:
    """A PACS-like export: nested folders, a series split over two folders, a folder with two
    series, a localizer, a single-slice series, a DICOMDIR, a text file and a DICOM SEG."""
    made = {}
    mr = write_tiny(root / "tmp_mr", ellipsoid_volume(n=6), series_uid=STUDY + ".10", study_uid=STUDY,
                    series_description="T2 SPIR/ax", extra_tags={"SeriesNumber": 3})
    (root / "PAT/ST1/A").mkdir(parents=True)
    (root / "PAT/ST1/B").mkdir(parents=True)
    for k, f in enumerate(mr):  # one series over two folders, file names that collide across them
        shutil.move(str(f), str(root / "PAT/ST1" / ("A" if k % 2 else "B") / f"IM{k // 2}"))
    shutil.rmtree(root / "tmp_mr")
    made["mr"] = sorted((root / "PAT/ST1").rglob("IM*"))
    made["ct"] = write_tiny(root / "PAT/ST1/C", ramp_volume(5, 12, 10), modality="CT", series_uid=STUDY + ".20",
                            study_uid=STUDY, series_description="abdomen", extra_tags={"SeriesNumber": 2},
                            file_names=[f"ct{k}" for k in range(5)])
    # a second series in the same folder: a CT localizer
    write_tiny(root / "PAT/ST1/C", ramp_volume(2, 12, 10), modality="CT", series_uid=STUDY + ".30",
               study_uid=STUDY, series_description="scout", file_names=["loc0", "loc1"],
               extra_tags={"SeriesNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    write_tiny(root / "PAT/ST1/D", ramp_volume(1, 12, 10), series_uid=STUDY + ".40", study_uid=STUDY,
               series_description="one slice", extra_tags={"SeriesNumber": 4})
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (root / "PAT/readme.txt").write_text("exported by a PACS")
    return made


def test_scan_finds_series_by_uid_not_folder_and_says_why_the_rest_is_skipped(tmp_path):
    made = make_export(tmp_path)
    scan = scan_study(tmp_path)
    assert [s.name for s in scan.series] == ["2_abdomen", "3_T2_SPIR_ax"]  # sanitised, numeric order
    ct, mr = scan.series
    assert ct.modality == "CT" and sorted(ct.files) == sorted(made["ct"])
    assert mr.modality == "MR" and sorted(mr.files) == made["mr"]  # reunited from two folders
    reasons = {what: why for what, why in scan.skipped}
    assert reasons["DICOMDIR"] == "DICOMDIR"
    assert reasons[str(Path("PAT/readme.txt"))] == "not a DICOM file"
    assert reasons[str(Path("PAT/ST1/C/loc0"))] == "localizer"
    assert any(why == "single-slice series" and what.startswith("4_one_slice") for what, why in scan.skipped)
    # the series reads from its files wherever they lie, as from one folder
    vol, geom = read_series(mr.files)
    assert vol.shape == (20, 24, 6) and geom.series_uid == STUDY + ".10"


@pytest.mark.slow
def test_infer_on_an_export_segments_every_series_and_lists_the_skipped(tmp_path):
    make_export(tmp_path / "export")
    from pipeline.outputs.dicom_objects import write_seg

    # a SEG already in the export (e.g. from an earlier run) is not an image to segment
    _, geom = read_series(sorted((tmp_path / "export/PAT/ST1/C").glob("ct*")))
    write_seg(tmp_path / "export/PAT/ST1/old_seg.dcm", np.ones(geom.shape, np.uint8), geom, case="c", run_name="r")
    run_dir = make_run(tmp_path / "run")
    res = cli_infer("--run-dir", str(run_dir), "--input", str(tmp_path / "export"), "--out", str(tmp_path / "out"),
               "--format", "nifti,dicom-seg")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.glob("*_liver.*")} == {
        "2_abdomen_liver.nii.gz", "2_abdomen_liver.seg.dcm", "3_T2_SPIR_ax_liver.nii.gz", "3_T2_SPIR_ax_liver.seg.dcm"}
    summary = json.loads((out / "inference.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["2_abdomen", "3_T2_SPIR_ax"]
    reasons = {s["input"]: s["reason"] for s in summary["skipped"]}
    assert reasons[str(Path("PAT/ST1/old_seg.dcm"))].startswith("SEG object")
    # the printed table names both the segmented and the skipped, and each skip is a warning line
    assert "3_T2_SPIR_ax" in res.stdout and "localizer" in res.stdout
    assert sum("skipped" in line for line in res.stderr.splitlines() if "WARNING" in line) == len(summary["skipped"])


@pytest.mark.slow
def test_a_broken_series_in_a_study_is_skipped_and_the_others_go_on(tmp_path):
    make_export(tmp_path / "export")
    ct_files = sorted((tmp_path / "export/PAT/ST1/C").glob("ct*"))
    ct_files[2].write_bytes(ct_files[2].read_bytes()[:300])  # truncated mid-header: a gap in the CT series
    run_dir = make_run(tmp_path / "run")
    res = cli_infer("--run-dir", str(run_dir), "--input", str(tmp_path / "export"), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out/inference.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["3_T2_SPIR_ax"]
    reasons = {s["input"]: s["reason"] for s in summary["skipped"]}
    assert "damaged" in reasons[str(Path("PAT/ST1/C/ct2"))]
    assert "2_abdomen" in reasons and "ct" in reasons["2_abdomen"]  # the series' error names a file
    assert "Traceback" not in res.stderr


def test_a_tree_without_images_fails_with_one_line_naming_what_was_skipped(tmp_path):
    (tmp_path / "t/sub").mkdir(parents=True)
    (tmp_path / "t/sub/a.txt").write_text("x")
    res = infer_in_process("--run-dir", str(make_run(tmp_path / "run")), "--input", str(tmp_path / "t"), "--out",
               str(tmp_path / "out"))
    assert_one_line_error(res, "no CT or MR image series", "not a DICOM file")
    assert not (tmp_path / "out").exists()


def test_series_option_picks_one_series_of_a_study(tmp_path):
    from pipeline.infer.inputs import collect_cases

    make_export(tmp_path)
    cases = collect_cases(tmp_path, series_uid=STUDY + ".20")
    assert [c.case for c in cases] == ["2_abdomen"]
    assert cases[0].load().array.shape == (10, 12, 5)
    with pytest.raises(PipelineError, match="no image series with SeriesInstanceUID or name 9.9"):
        collect_cases(tmp_path, series_uid="9.9")
    assert [c.case for c in collect_cases(tmp_path, series_uid="3_T2_SPIR_ax")] == ["3_T2_SPIR_ax"]  # by name


@pytest.mark.slow
@pytest.mark.realdata
def test_real_series_mixed_in_one_tree_are_found_and_read_as_from_their_folders(tmp_path, real_chaos):
    """Three real series, their files linked into shared folders (as an export by date would put them)."""
    folders = [real_chaos / "Train_Sets" / p / "DICOM_anon" for p in ("CT/3", "MR/1/T2SPIR", "MR/2/T2SPIR")]
    for k, folder in enumerate(folders):
        for j, f in enumerate(sorted(folder.iterdir())):
            target = tmp_path / "export" / f"day{j % 3}" / f"s{k}_{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    scan = scan_study(tmp_path / "export")
    assert len(scan.series) == 3 and scan.skipped == []
    by_uid = {s.series_uid: s for s in scan.series}
    for folder in folders:
        vol, geom = read_series(folder)
        found = by_uid[geom.series_uid]
        vol2, geom2 = read_series(found.files)
        np.testing.assert_array_equal(vol2, vol)
        np.testing.assert_array_equal(geom2.affine, geom.affine)
        assert found.modality == geom.modality


@pytest.mark.slow
@pytest.mark.realdata
def test_real_export_gets_nifti_seg_and_rtstruct_per_series_all_valid(tmp_path, real_chaos):
    """The issue's end point: a PACS-style export of real series in, NIfTI + SEG + RTSTRUCT out for
    each image series, every DICOM object dciodvfy-clean and holding the NIfTI mask's voxels."""
    from helpers import check_rtstruct_against_source, check_seg_against_source

    folders = {p: real_chaos / "Train_Sets" / p / "DICOM_anon" for p in ("CT/3", "MR/1/T2SPIR")}
    for k, folder in enumerate(folders.values()):
        for j, f in enumerate(sorted(folder.iterdir())):
            target = tmp_path / "export" / "PATIENT" / f"part{j % 2}" / f"s{k}_{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    (tmp_path / "export" / "DICOMDIR").write_bytes(b"\0" * 132)
    run_dir = make_run(tmp_path / "run")
    res = cli_infer("--run-dir", str(run_dir), "--input", str(tmp_path / "export"), "--out", str(tmp_path / "out"),
               "--format", "nifti,dicom-seg,rtstruct", "--set", "infer.montage=false")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert len(summary["cases"]) == 2 and [s["input"] for s in summary["skipped"]] == ["DICOMDIR"]
    for row in summary["cases"]:
        mask = np.asarray(nib.load(str(tmp_path / "out" / row["mask"])).dataobj)
        case = row["case"]
        # which real series this case is: the one whose geometry has the mask's shape
        folder = next(f for f in folders.values() if read_series(f, pixels=False)[1].shape == mask.shape)
        check_seg_against_source(tmp_path / "out" / f"{case}_liver.seg.dcm", mask, folder)
        check_rtstruct_against_source(tmp_path / "out" / f"{case}_liver.rtstruct.dcm", mask, folder, min_dice=0.98)
