"""run.py evaluate: NIfTI folders, PNG slices with DICOM geometry, CHAOS roots, and bad inputs."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.dicom.series import read_series
from pipeline.evaluate.evaluation import run_evaluation

from helpers import shuffled_names, write_tiny

AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 3.0, 20], [0, 0, 0, 1]])  # 1 x 1 x 3 mm


def cube(shape=(10, 10, 10), lo=(2, 2, 2), size=4, value=1):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = value
    return m


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


def cfg_with(**evaluate):
    cfg = Config()
    for k, v in evaluate.items():
        setattr(cfg.evaluate, k, v)
    return cfg


@pytest.fixture
def nifti_folders(tmp_path):
    ref, pred = tmp_path / "labelsTr", tmp_path / "infer"
    label = cube()
    label[7:9, 7:9, 7:9] = 2  # a kidney: not liver in a prepared label
    save(ref / "CT_1.nii.gz", label)
    save(ref / "MR_2_T2SPIR.nii.gz", cube())
    save(pred / "CT_1_liver.nii.gz", cube(value=1))
    save(pred / "MR_2_T2SPIR.nii.gz", cube(lo=(2, 2, 3), value=255))  # shifted one 3 mm slice
    save(pred / "CT_1_image.nii.gz", np.zeros((10, 10, 10)))  # infer's optional image: no reference
    return pred, ref


def test_nifti_folders_are_matched_by_case_and_scored(nifti_folders, tmp_path, capsys):
    pred, ref = nifti_folders
    out = tmp_path / "eval"
    result = run_evaluation(pred=pred, ref=ref, out_dir=out, cfg=Config())
    rows = {r["case"]: r for r in result["cases"]}
    assert set(rows) == {"CT_1", "MR_2_T2SPIR"}
    assert rows["CT_1"]["dice"] == 1.0 and rows["CT_1"]["score"] == 100.0
    shifted = rows["MR_2_T2SPIR"]
    assert shifted["dice"] == pytest.approx(0.75)
    assert shifted["mssd_mm"] == pytest.approx(3.0)
    assert shifted["assd_mm"] == pytest.approx(2 * (16 * 3 + 4) / 112)
    assert shifted["ref_ml"] == pytest.approx(64 * 3 / 1000)
    assert result["summary"]["dice"]["mean"] == pytest.approx(0.875)
    assert result["summary"]["dice"]["std"] == pytest.approx(0.125)

    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["CT_1", "MR_2_T2SPIR"]
    assert {"dice", "ravd_pct", "assd_mm", "mssd_mm", "hd95_mm", "dice_points", "ravd_points",
            "assd_points", "mssd_points", "score", "pred_ml", "ref_ml"} <= set(table[0])
    assert float(table[1]["dice"]) == pytest.approx(0.75)
    assert json.loads((out / "metrics.json").read_text())["cases"][1]["dice"] == pytest.approx(0.75)
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".partial-*"))
    assert "MR_2_T2SPIR" in result["table"] and "mean ± std" in result["table"]
    assert capsys.readouterr().out == ""  # the API returns the table; run.py prints it


def test_two_single_files_are_paired_whatever_their_names(tmp_path):
    a = save(tmp_path / "mine.nii.gz", cube())
    b = save(tmp_path / "truth.nii", cube())
    result = run_evaluation(pred=a, ref=b, out_dir=tmp_path / "out")
    assert result["cases"][0]["case"] == "truth" and result["cases"][0]["dice"] == 1.0


def test_a_missing_prediction_is_an_error_naming_the_case(nifti_folders, tmp_path):
    pred, ref = nifti_folders
    (pred / "MR_2_T2SPIR.nii.gz").unlink()
    with pytest.raises(PipelineError, match="MR_2_T2SPIR"):
        run_evaluation(pred=pred, ref=ref, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_missing_predictions_can_be_skipped_and_are_listed(nifti_folders, tmp_path):
    pred, ref = nifti_folders
    (pred / "MR_2_T2SPIR.nii.gz").unlink()
    result = run_evaluation(pred=pred, ref=ref, out_dir=tmp_path / "out", cfg=cfg_with(missing="skip"))
    assert [r["case"] for r in result["cases"]] == ["CT_1"]
    assert result["missing"] == ["MR_2_T2SPIR"]


def test_shape_mismatch_names_both_files(tmp_path):
    p = save(tmp_path / "p" / "A.nii.gz", cube(shape=(10, 10, 11)))
    r = save(tmp_path / "r" / "A.nii.gz", cube())
    with pytest.raises(PipelineError, match="shape") as err:
        run_evaluation(pred=p, ref=r, out_dir=tmp_path / "out")
    assert str(p) in str(err.value) and str(r) in str(err.value) and "\n" not in str(err.value)


def test_affine_mismatch_names_both_files(tmp_path):
    moved = AFFINE.copy()
    moved[2, 3] += 0.01
    p = save(tmp_path / "p" / "A.nii.gz", cube(), moved)
    r = save(tmp_path / "r" / "A.nii.gz", cube())
    with pytest.raises(PipelineError, match="affine") as err:
        run_evaluation(pred=p, ref=r, out_dir=tmp_path / "out")
    assert str(p) in str(err.value) and str(r) in str(err.value)


def test_cli_reports_a_bad_input_in_one_error_line_and_writes_nothing(tmp_path, capsys):
    from run import main

    (tmp_path / "empty").mkdir()
    r = save(tmp_path / "r" / "A.nii.gz", cube())
    code = main(["evaluate", "--pred", str(tmp_path / "empty"), "--ref", str(r), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and str(tmp_path / "empty") in err[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# PNG slices with DICOM geometry
# ---------------------------------------------------------------------------------------------
N, ROWS, COLS = 5, 12, 10


def liver_planes():
    """(N, rows, cols) as stored per DICOM file: an off-centre box, so any flip changes the overlap."""
    m = np.zeros((N, ROWS, COLS), dtype=np.uint8)
    m[1:4, 2:7, 1:5] = 1
    return m


@pytest.fixture
def series(tmp_path):
    """A tiny oblique-free MR series with shuffled file names: natural order != slice order."""
    names = shuffled_names(N)
    write_tiny(tmp_path / "DICOM_anon", file_names=names)
    return tmp_path / "DICOM_anon", names


def write_pngs(folder, names, planes, value):
    """PNG named like DICOM file names[k] holds planes[k] (pixels as stored)."""
    folder.mkdir(parents=True)
    for name, plane in zip(names, planes):
        Image.fromarray((plane * value).astype(np.uint8)).save(folder / f"{Path(name).stem}.png")
    return folder


def test_png_prediction_on_dicom_geometry_matches_the_nifti_reference(series, tmp_path):
    dicom, names = series
    _, geom = read_series(dicom)
    by_file = {dicom / n: p for n, p in zip(names, liver_planes())}
    ref = save(tmp_path / "ref" / "case.nii.gz", geom.stack(by_file), geom.affine)
    pngs = write_pngs(tmp_path / "submission", names, liver_planes(), 63)
    result = run_evaluation(pred=pngs, ref=ref, dicom=dicom, out_dir=tmp_path / "out")
    assert result["cases"][0]["dice"] == 1.0 and result["cases"][0]["mssd_mm"] == 0.0


def test_mr_ground_pngs_count_only_the_liver_grey_band(series, tmp_path):
    dicom, names = series
    ground_planes = liver_planes() * 63
    ground_planes[0, 0:3, 0:3] = 126  # right kidney
    ground_planes[4, 8:11, 6:9] = 252  # spleen
    ref = write_pngs(tmp_path / "Ground", names, ground_planes, 1)
    pred = write_pngs(tmp_path / "pred", names, liver_planes(), 255)
    result = run_evaluation(pred=pred, ref=ref, dicom=dicom, out_dir=tmp_path / "out")
    assert result["cases"][0]["dice"] == 1.0


def test_mr_ground_with_an_unknown_grey_level_names_the_png(series, tmp_path):
    dicom, names = series
    planes = liver_planes() * 63
    planes[2, 0, 0] = 126
    planes[3, 0, 0] = 90  # between the liver and kidney bands
    ref = write_pngs(tmp_path / "Ground", names, planes, 1)
    with pytest.raises(PipelineError, match="grey value 90") as err:
        run_evaluation(pred=ref, ref=ref, dicom=dicom, out_dir=tmp_path / "out")
    assert Path(names[3]).stem + ".png" in str(err.value)


def test_png_slices_shifted_by_one_file_lose_overlap(series, tmp_path):
    dicom, names = series
    _, geom = read_series(dicom)
    ref = save(tmp_path / "ref.nii.gz", geom.stack({dicom / n: p for n, p in zip(names, liver_planes())}), geom.affine)
    shifted = np.roll(liver_planes(), 1, axis=2)  # one column to the side
    pred = write_pngs(tmp_path / "pred", names, shifted, 1)
    row = run_evaluation(pred=pred, ref=ref, dicom=dicom, out_dir=tmp_path / "out")["cases"][0]
    assert row["dice"] == pytest.approx(2 * 3 * 5 * 3 / (2 * 3 * 5 * 4))
    assert row["mssd_mm"] == pytest.approx(0.7)  # PixelSpacing[1]: the step between columns


def test_png_folder_without_dicom_is_an_error(tmp_path):
    pngs = write_pngs(tmp_path / "pred", ["a.dcm", "b.dcm"], np.ones((2, 4, 4)), 1)
    r = save(tmp_path / "r.nii.gz", cube())
    with pytest.raises(PipelineError, match="--dicom"):
        run_evaluation(pred=pngs, ref=r, out_dir=tmp_path / "out")


def test_png_count_must_match_the_dicom_files(series, tmp_path):
    dicom, names = series
    pngs = write_pngs(tmp_path / "pred", names[:-1], liver_planes()[:-1], 1)
    with pytest.raises(PipelineError, match="4 PNG files for 5 DICOM files"):
        run_evaluation(pred=pngs, ref=pngs, dicom=dicom, out_dir=tmp_path / "out")


def test_chaos_root_reference_against_infer_style_png_folders(tmp_path):
    root = tmp_path / "Train_Sets"
    names = [f"i{k:04d},0000b.dcm" for k in range(N)]
    write_tiny(root / "CT" / "1" / "DICOM_anon", modality="CT", file_names=names, spacing=(0.8, 0.7, -2.0))
    write_pngs(root / "CT" / "1" / "Ground", [f"liver_GT_{k:03d}.dcm" for k in range(N)], liver_planes(), 1)
    pred = write_pngs(tmp_path / "infer" / "CT_1_png", names, liver_planes(), 63).parent
    result = run_evaluation(pred=pred, ref=tmp_path, out_dir=tmp_path / "out")
    assert [r["case"] for r in result["cases"]] == ["CT_1"]
    assert result["cases"][0]["dice"] == 1.0


def test_png_folder_named_case_png_gives_the_case_id(series, tmp_path):
    dicom, names = series
    pngs = write_pngs(tmp_path / "MR_7_T2SPIR_png", names, liver_planes(), 63)
    result = run_evaluation(pred=pngs, ref=pngs, dicom=dicom, out_dir=tmp_path / "out")
    assert result["cases"][0]["case"] == "MR_7_T2SPIR"


# ---------------------------------------------------------------------------------------------
# Real CHAOS data
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_ground_against_itself_scores_perfectly(tmp_path, real_chaos):
    REAL = real_chaos / "Train_Sets"
    ct = REAL / "CT" / "3"
    result = run_evaluation(pred=ct / "Ground", ref=ct / "Ground", dicom=ct / "DICOM_anon", out_dir=tmp_path)
    row = result["cases"][0]
    assert row["case"] == "CT_3"
    assert (row["dice"], row["ravd_pct"], row["assd_mm"], row["mssd_mm"]) == (1.0, 0.0, 0.0, 0.0)
    assert row["score"] == 100.0
    assert 1000 < row["ref_ml"] < 3000  # an adult liver


@pytest.mark.realdata
def test_real_mr_ground_liver_excludes_the_other_organs(tmp_path, real_chaos):
    REAL = real_chaos / "Train_Sets"
    t2 = REAL / "MR" / "1" / "T2SPIR"
    liver_only = tmp_path / "liver_only"
    liver_only.mkdir()
    for png in sorted((t2 / "Ground").glob("*.png")):
        arr = np.asarray(Image.open(png))
        Image.fromarray((((arr >= 55) & (arr <= 70)) * 255).astype(np.uint8)).save(liver_only / png.name)
    result = run_evaluation(pred=liver_only, ref=t2 / "Ground", dicom=t2 / "DICOM_anon", out_dir=tmp_path / "out")
    assert result["cases"][0]["dice"] == 1.0


def _official_chaos_surface_distances(v_ref, v_seg, dicom_dir):
    """ASSD / MSSD the way the CHAOS evaluation code computes them (independent re-statement).

    Volumes are (file, row, col) stacks in file-name order; world points from the first and last
    DICOM file in file-name order, PixelSpacing and ImageOrientationPatient; KD-tree distances
    between 6-connected border voxels (outside the volume counts as foreground).
    """
    import pydicom
    from scipy import ndimage
    from scipy.spatial import cKDTree

    files = sorted(Path(dicom_dir).glob("*.dcm"))
    first, last = pydicom.dcmread(files[0]), pydicom.dcmread(files[-1])
    t1, tn = np.array(first.ImagePositionPatient, float), np.array(last.ImagePositionPatient, float)
    x, y = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    di, dj = (float(v) for v in first.PixelSpacing)
    m = np.stack([x * di, y * dj, (t1 - tn) / (1 - len(files))], axis=1)

    def border_points(v):
        s = ndimage.generate_binary_structure(3, 1)
        idx = np.array(np.nonzero(v ^ ndimage.binary_erosion(v, structure=s, border_value=1)))
        return (m @ np.stack([idx[1], idx[2], idx[0]])).T + t1

    ref_pts, seg_pts = border_points(v_ref), border_points(v_seg)
    d1, d2 = cKDTree(ref_pts).query(seg_pts)[0], cKDTree(seg_pts).query(ref_pts)[0]
    both = np.concatenate([d1, d2])
    return both.mean(), both.max()


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_distances_equal_the_official_chaos_algorithm(tmp_path, real_chaos):
    REAL = real_chaos / "Train_Sets"
    ct = REAL / "CT" / "3"
    pngs = sorted((ct / "Ground").glob("*.png"))
    v_ref = np.stack([np.asarray(Image.open(p)) != 0 for p in pngs])
    v_seg = v_ref.copy()
    liver_slices = np.flatnonzero(v_ref.any(axis=(1, 2)))
    v_seg[liver_slices[0]] = False  # miss the top liver slice
    v_seg[liver_slices[10]:liver_slices[20]] = np.roll(v_seg[liver_slices[10]:liver_slices[20]], 3, axis=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for p, plane in zip(pngs, v_seg):
        Image.fromarray(plane.astype(np.uint8) * 63).save(pred / p.name)
    row = run_evaluation(pred=pred, ref=ct / "Ground", dicom=ct / "DICOM_anon", out_dir=tmp_path / "out")["cases"][0]
    assd, mssd = _official_chaos_surface_distances(v_ref, v_seg, ct / "DICOM_anon")
    assert row["assd_mm"] == pytest.approx(assd, rel=1e-4)
    assert row["mssd_mm"] == pytest.approx(mssd, rel=1e-4)
    assert 0 < row["assd_mm"] < row["mssd_mm"]


def test_an_organ_label_map_scored_against_itself_counts_only_the_liver(tmp_path):
    labels = np.zeros((12, 10, 6), np.uint8)
    labels[2:6, 2:6, 1:4] = 1  # liver
    labels[7:10, 6:9, 1:4] = 2  # a kidney, which must not count as liver on either side
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(labels, np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "ref" / "MR_1_T2SPIR.nii.gz"))
    run_evaluation(pred=tmp_path / "ref", ref=tmp_path / "ref", out_dir=tmp_path / "out", cfg=Config())
    row = json.loads((tmp_path / "out" / "metrics.json").read_text())["cases"][0]
    assert row["dice"] == 1.0 and row["ref_ml"] == pytest.approx(4 * 4 * 3 * 0.8 * 0.8 * 3.0 / 1000)
