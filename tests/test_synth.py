"""The synthetic CHAOS generator: official layout, readable headers, determinism, plausible contrast."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from pipeline.core.config import SynthConfig
from pipeline.core.errors import PipelineError
from pipeline.datasets.synthetic.generate import CT_IDS, MR_IDS, MR_LEVELS, generate_dataset

# Tiny in-plane matrices keep the suite fast; the slice counts still cover dome to kidneys.
TINY = dict(ct_size=48, mr_size=48, ct_slices=[30, 34], mr_slices=[24, 28])


def tiny(**kw) -> SynthConfig:
    return SynthConfig(**{"patients": 2, "seed": 0, **TINY, **kw})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth"), tiny())


def series_folders(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*.dcm")})


def read_volume(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Slices in file-name order, rescaled, as stored (rows, cols) -- the order Ground PNGs follow."""
    ds = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    return vol, ds


def read_ground(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(f)) for f in sorted(folder.glob("*.png"))])


@pytest.mark.slow
def test_layout_has_the_official_train_sets_folders_and_chaos_ids(root):
    assert root.name == "Train_Sets"
    assert sorted(int(p.name) for p in (root / "CT").iterdir()) == CT_IDS[:2]
    assert sorted(int(p.name) for p in (root / "MR").iterdir()) == MR_IDS[:2]
    for pid in MR_IDS[:2]:
        mr = root / "MR" / str(pid)
        assert sorted(p.name for p in mr.iterdir()) == ["T1DUAL", "T2SPIR"]
        assert sorted(p.name for p in (mr / "T1DUAL").iterdir()) == ["DICOM_anon", "Ground"]
        assert sorted(p.name for p in (mr / "T1DUAL" / "DICOM_anon").iterdir()) == ["InPhase", "OutPhase"]
    assert not list(root.parent.glob(".synth-partial*")), "scratch folder left behind"


def test_ct_files_are_named_like_chaos_and_run_head_to_feet(root):
    for ct in (root / "CT").iterdir():
        files = sorted((ct / "DICOM_anon").glob("*.dcm"))
        n = len(files)
        assert [f.name for f in files] == [f"i{k:04d},0000b.dcm" for k in range(n)]
        ground = sorted((ct / "Ground").glob("*.png"))
        assert [g.name for g in ground] == [f"liver_GT_{k:03d}.png" for k in range(n)]
        ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        z = [float(d.ImagePositionPatient[2]) for d in ds]
        assert all(a > b for a, b in zip(z, z[1:])), "i0000 must be the most superior slice"
        assert [int(d.InstanceNumber) for d in ds] == list(range(1, n + 1))
        assert all(float(d.RescaleIntercept) == -1000 and d.PixelRepresentation == 0 for d in ds)
        assert {d.PatientPosition for d in ds} <= {"FFS", "HFS"}


def test_t1dual_out_phase_is_odd_in_phase_even_and_ground_carries_in_phase_stems(root):
    for mr in (root / "MR").iterdir():
        t1 = mr / "T1DUAL"
        inp = sorted((t1 / "DICOM_anon" / "InPhase").glob("*.dcm"))
        out = sorted((t1 / "DICOM_anon" / "OutPhase").glob("*.dcm"))
        n = len(inp)
        assert n == len(out) > 0
        assert [f.name for f in out] == [f"IMG-0004-{2 * k + 1:05d}.dcm" for k in range(n)]
        assert [f.name for f in inp] == [f"IMG-0004-{2 * k + 2:05d}.dcm" for k in range(n)]
        assert [g.stem for g in sorted((t1 / "Ground").glob("*.png"))] == [f.stem for f in inp]
        t2 = mr / "T2SPIR"
        assert [g.stem for g in sorted((t2 / "Ground").glob("*.png"))] == \
               [f.stem for f in sorted((t2 / "DICOM_anon").glob("*.dcm"))]


def test_in_and_out_phase_share_geometry_but_not_echo_time_or_series(root):
    for mr in (root / "MR").iterdir():
        base = mr / "T1DUAL" / "DICOM_anon"
        inp = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((base / "InPhase").glob("*.dcm"))]
        out = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((base / "OutPhase").glob("*.dcm"))]
        for a, b in zip(inp, out):
            assert a.ImagePositionPatient == b.ImagePositionPatient
            assert a.ImageOrientationPatient == b.ImageOrientationPatient
            assert a.PixelSpacing == b.PixelSpacing
        assert 4.0 < float(inp[0].EchoTime) < 5.0 and 2.0 < float(out[0].EchoTime) < 2.6
        assert inp[0].SeriesInstanceUID != out[0].SeriesInstanceUID
        t2 = pydicom.dcmread(next((mr / "T2SPIR" / "DICOM_anon").glob("*.dcm")), stop_before_pixels=True)
        assert float(t2.EchoTime) > 50 and t2.SeriesDescription == "T2SPIR"
        assert t2.StudyInstanceUID == inp[0].StudyInstanceUID


def test_every_series_reads_with_simpleitk_with_one_slice_per_file(root):
    for folder in series_folders(root):
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
        assert len(names) == len(list(folder.glob("*.dcm")))
        image = sitk.ReadImage(names)
        assert image.GetSize()[2] == len(names)
        assert all(s > 0 for s in image.GetSpacing())


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix binary not on PATH")
def test_every_series_converts_with_dcm2niix(root, tmp_path):
    for i, folder in enumerate(series_folders(root)):
        out = tmp_path / str(i)
        out.mkdir()
        subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "s", "-o", str(out), str(folder)],
                       check=True, capture_output=True)
        assert len(list(out.glob("*.nii"))) == 1, f"dcm2niix did not write one volume for {folder}"


def test_ct_ground_is_1_bit_and_mr_ground_uses_the_official_grey_levels(root):
    for png in (root / "CT").rglob("*.png"):
        assert Image.open(png).mode == "1"
    for mr in (root / "MR").iterdir():
        for seq in ("T1DUAL", "T2SPIR"):
            g = read_ground(mr / seq / "Ground")
            assert set(np.unique(g)) <= {0, *MR_LEVELS.values()}
            assert set(np.unique(g)) == {0, *MR_LEVELS.values()}, f"organ missing in {mr / seq}"


def test_organs_come_and_go_across_slices(root):
    for ct in (root / "CT").iterdir():
        area = read_ground(ct / "Ground").reshape(-1, 48 * 48).sum(1)
        assert area.max() > 0
        assert area[0] < area.max() / 2, "the most superior CT slice should show little or no liver"
    for mr in (root / "MR").iterdir():
        g = read_ground(mr / "T2SPIR" / "Ground")
        liver_z = np.nonzero((g == 63).any(axis=(1, 2)))[0].mean()
        kidney_z = np.nonzero((g == 126).any(axis=(1, 2)))[0].mean()
        assert kidney_z < liver_z, "MR slices ascend, so the kidneys must sit below the liver"


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_and_another_seed_different_data(root, tmp_path):
    # `root` was written by one process per core (2 on CI), `again` by one process
    again = generate_dataset(tmp_path / "again", tiny(workers=1))
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate_dataset(tmp_path / "other", tiny(seed=1, patients=1))
    rel = Path("MR") / str(MR_IDS[0]) / "T2SPIR" / "Ground"
    assert not np.array_equal(read_ground(root / rel)[:5], read_ground(other / rel)[:5]) or \
        len(list((root / rel).glob("*.png"))) != len(list((other / rel).glob("*.png")))


def test_ct_liver_is_enhanced_and_overlaps_other_tissue_in_hu(root):
    for ct in (root / "CT").iterdir():
        hu, _ = read_volume(ct / "DICOM_anon")
        liver = read_ground(ct / "Ground").astype(bool)
        inner = liver & np.roll(liver, 2, 2) & np.roll(liver, -2, 2)  # away from partial-volume edges
        assert 40 < np.median(hu[inner]) < 160
        lo, hi = np.percentile(hu[inner], (10, 90))
        outside = hu[~liver]
        # Tissue outside the liver (spleen, bowel, muscle) falls inside the liver's HU range.
        assert ((outside > lo) & (outside < hi)).sum() > 0.3 * inner.sum()


def test_mr_contrast_follows_the_sequences(root):
    for mr in (root / "MR").iterdir():
        t2, _ = read_volume(mr / "T2SPIR" / "DICOM_anon")
        g2 = read_ground(mr / "T2SPIR" / "Ground")
        assert np.median(t2[g2 == 63]) < np.median(t2[g2 == 252]), "T2: liver darker than spleen"
        t1_in, _ = read_volume(mr / "T1DUAL" / "DICOM_anon" / "InPhase")
        t1_out, _ = read_volume(mr / "T1DUAL" / "DICOM_anon" / "OutPhase")
        g1 = read_ground(mr / "T1DUAL" / "Ground")
        assert np.median(t1_in[g1 == 63]) > np.median(t1_in[g1 == 252]), "T1: liver brighter than spleen"
        # Opposed phase cancels signal in voxels that mix fat and water: the body gets darker.
        body = t1_in > np.percentile(t1_in, 60)
        assert np.mean(t1_out[body]) < np.mean(t1_in[body])
        assert not np.array_equal(t1_in, t1_out)


def test_invalid_sizes_raise_a_pipeline_error_naming_the_key(tmp_path):
    with pytest.raises(PipelineError, match="synth.mr_slices"):
        generate_dataset(tmp_path, tiny(mr_slices=[9, 3]))
    with pytest.raises(PipelineError, match="synth.patients"):
        generate_dataset(tmp_path, tiny(patients=0))
    with pytest.raises(PipelineError, match="synth.workers"):
        generate_dataset(tmp_path, tiny(workers=-1))
    assert not (tmp_path / "Train_Sets").exists()


@pytest.mark.slow
def test_cli_synth_writes_the_requested_number_of_patients(tmp_path):
    from run import main

    overrides = [f"synth.{k}={v}" for k, v in TINY.items()]
    argv = ["synth", "--out", str(tmp_path), "--patients", "1", "--seed", "3", "-q"]
    assert main(argv + [a for o in overrides for a in ("--set", o.replace(" ", ""))]) == 0
    assert [p.name for p in (tmp_path / "Train_Sets" / "CT").iterdir()] == [str(CT_IDS[0])]
    assert [p.name for p in (tmp_path / "Train_Sets" / "MR").iterdir()] == [str(MR_IDS[0])]


def test_an_interrupted_run_leaves_only_complete_patients(tmp_path, monkeypatch):
    import pipeline.datasets.synthetic.generate as synth

    calls = {"n": 0}
    real = synth.write_series

    def failing_write_series(folder, volume, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second series: the first MR patient's in-phase
            raise KeyboardInterrupt
        return real(folder, volume, **kw)

    monkeypatch.setattr(synth, "write_series", failing_write_series)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, tiny(patients=1, workers=1))  # in-process: the patch must reach the writer
    root = tmp_path / "Train_Sets"
    assert [p.name for p in (root / "CT").iterdir()] == [str(CT_IDS[0])]
    assert not (root / "MR").exists(), "a half-written MR patient was left in Train_Sets"
    assert not list(tmp_path.glob(".synth-partial*"))


def test_montage_shows_four_sequences_as_a_png(root, tmp_path):
    from pipeline.datasets.synthetic.generate import save_montage

    out = save_montage(root, tmp_path / "montage.png")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > img.size[1] > 100  # 4 columns x 2 rows


def test_ivc_lies_in_a_groove_behind_the_liver_never_inside_it():
    from pipeline.datasets.synthetic.anatomy import IVC, IVC_DY, IVC_RADII, IVC_X, LIVER, VESSEL, Anatomy

    hits = 0
    for seed in range(4):
        anat = Anatomy(np.random.default_rng(seed))
        yv = 0.9 * anat.b - 62
        # an axial grid (1 mm) around the IVC over the liver's height
        x, y, z = np.meshgrid(np.arange(-60.0, 12.0), np.arange(yv - 70, yv - 5), np.arange(-150.0, 0.0, 10.0),
                              indexing="ij")
        t = anat.tissues(np.stack([x, y, z]))
        liver = np.isin(t, (LIVER, VESSEL))
        behind = (np.abs(x - IVC_X) < IVC_RADII[0]) & (y > yv + IVC_DY)
        assert not (liver & behind).any()  # open posteriorly: nothing of the liver behind the IVC
        for k in range(t.shape[2]):
            ivc = t[:, :, k] == IVC
            if ivc.any() and liver[:, :, k].any():
                hits += 1
                cols = np.nonzero(ivc.any(axis=0))[0]  # y indices of the IVC in this slice
                assert not liver[:, cols.max() + 1:, k][ivc.any(axis=1)].any()
    assert hits > 0  # the check saw slices where liver and IVC meet


@pytest.mark.slow
def test_gallbladder_sits_in_a_fossa_open_in_front():
    from scipy import ndimage

    from pipeline.datasets.synthetic.anatomy import GALL, LIVER, VESSEL, Anatomy

    for seed in range(3):
        anat = Anatomy(np.random.default_rng(seed))
        x, y, z = np.meshgrid(np.arange(-110.0, 30.0, 2), np.arange(-130.0, 40.0, 2), np.arange(-180.0, 0.0, 2),
                              indexing="ij")
        t = anat.tissues(np.stack([x, y, z]))
        gall, liver = t == GALL, np.isin(t, (LIVER, VESSEL))
        assert gall.any()
        shell = ndimage.binary_dilation(gall) & ~gall
        assert 0.2 < liver[shell].mean() < 0.8  # in contact with the liver, but not wrapped in it
        for k in np.nonzero(gall.any(axis=(0, 1)))[0]:  # no axial slice where liver closes round it
            ring = ndimage.binary_dilation(gall[:, :, k]) & ~gall[:, :, k]
            assert liver[:, :, k][ring].mean() < 0.9
