"""Helpers the tests share: tiny DICOM series and prepared data sets, run folders, CLI calls, DICOM checks.

Tiny DICOM series are written through pipeline.datasets.synthetic.dicom_writer.write_series. Prepared
volumes are (X, Y, Z) with Z the slice axis and a non-identity affine (LPS-like flips, anisotropic
spacing) so that reorientation is exercised; MR label maps carry all four organs (1 liver,
2 right kidney, 3 left kidney, 4 spleen), CT label maps only liver (0/1), as in CHAOS.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.core.config import load_config
from pipeline.datasets.synthetic.dicom_writer import write_series
from pipeline.dicom.series import read_series

from conftest import ROOT, run_main

MSD_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


# --------------------------------------------------------------------------- DICOM series
# An oblique orientation (rotated ~20 degrees about two axes): catches any code that assumes axial.
_a, _b = np.deg2rad(20.0), np.deg2rad(10.0)
OBLIQUE_ROW = np.array([np.cos(_a), np.sin(_a), 0.0])
_c = np.array([-np.sin(_a) * np.cos(_b), np.cos(_a) * np.cos(_b), np.sin(_b)])
OBLIQUE_COL = _c / np.linalg.norm(_c)


def ramp_volume(n=5, rows=12, cols=10, seed=0) -> np.ndarray:
    """(n, rows, cols) int-valued volume in which every voxel value is unique (shows any flip)."""
    rng = np.random.default_rng(seed)
    return (np.arange(n * rows * cols).reshape(n, rows, cols) * 3 + rng.integers(0, 3, (n, rows, cols))).astype(np.float64)


def shuffled_names(n, seed=0, pattern="IMG-0001-{:05d}.dcm") -> list[str]:
    """File names whose natural order does NOT follow the slice order."""
    order = np.random.default_rng(seed).permutation(n)
    while n > 1 and np.array_equal(order, np.arange(n)):
        order = np.random.default_rng(seed := seed + 1).permutation(n)
    return [pattern.format(int(i) + 1) for i in order]


def write_tiny(folder: Path, volume=None, **kw) -> list[Path]:
    """write_series with axial HFS defaults; keywords override any of them."""
    volume = ramp_volume() if volume is None else volume
    args = dict(spacing=(0.8, 0.7, 2.5), origin=(-10.0, -20.0, 30.0), row_dir=(1, 0, 0),
                col_dir=(0, 1, 0), modality="MR")
    args.update(kw)
    return write_series(folder, volume, **args)


# ---------------------------------------------------------------------------------------------
# A tiny CHAOS Train_Sets tree: CT_1 (FFS, files head -> feet) and MR_2 (T1DUAL in/out + T2SPIR)
# ---------------------------------------------------------------------------------------------
MR_GREY = {1: 63, 2: 126, 3: 189, 4: 252}


def organ_masks(n, rows, cols, seed) -> np.ndarray:
    """(n, rows, cols) labels 0..4: a liver blob on most slices, kidneys and spleen on some."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, rows, cols), np.uint8)
    for k in range(1, n):  # slice 0 has no organ
        r0, c0 = rng.integers(1, 4, 2)
        labels[k, r0:r0 + rows // 2, c0:c0 + cols // 2] = 1
        labels[k, -3:-1, 1:3] = 2 + (k % 3)  # kidney/spleen patches
    return labels


def _save_png(path: Path, arr: np.ndarray, one_bit: bool) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((arr > 0) if one_bit else arr.astype(np.uint8))
    img.save(path)


def make_chaos_tree(root: Path, rows=16, cols=14) -> dict:
    """Write a CHAOS Train_Sets tree under root; return {case: {dicom file: labels rows x cols}}."""
    train = root / "Train_Sets"
    truth: dict[str, dict[Path, np.ndarray]] = {}

    # CT_1: like the real CT: FFS, z descending in file order, 1-bit liver PNGs by file order.
    n = 6
    labels = organ_masks(n, rows, cols, seed=1)
    liver = (labels == 1).astype(np.uint8)
    hu = np.where(liver, 140.0, -50.0) + ramp_volume(n, rows, cols) % 7
    names = [f"i{k:04d},0000b.dcm" for k in range(n)]
    paths = write_series(train / "CT/1/DICOM_anon", hu, spacing=(0.7, 0.7, -2.0), origin=(-90, -80, 1690.5),
                         row_dir=(1, 0, 0), col_dir=(0, 1, 0), modality="CT", file_names=names,
                         rescale_intercept=-1000.0, patient_position="FFS", patient_id="ct1")
    for k in range(n):
        _save_png(train / f"CT/1/Ground/liver_GT_{k:03d}.png", liver[k], one_bit=True)
    truth["CT_1"] = dict(zip(paths, liver))

    # MR_2 T1DUAL: OutPhase odd file numbers, InPhase even ones, shared Ground with InPhase stems.
    n = 5
    labels = organ_masks(n, rows, cols, seed=2)
    base = ramp_volume(n, rows, cols, seed=3)
    geo = dict(spacing=(1.5, 1.4, 6.0), origin=(-100, -110, -40), row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL,
               modality="MR", patient_id="mr2")
    t1 = train / "MR/2/T1DUAL"
    in_names = [f"IMG-0004-{2 * k + 2:05d}.dcm" for k in range(n)]
    out_names = [f"IMG-0004-{2 * k + 1:05d}.dcm" for k in range(n)]
    in_paths = write_series(t1 / "DICOM_anon/InPhase", base, file_names=in_names, series_description="in",
                            extra_tags={"EchoTime": 4.6}, **geo)
    out_paths = write_series(t1 / "DICOM_anon/OutPhase", base * 0.5, file_names=out_names,
                             series_description="out", extra_tags={"EchoTime": 2.3}, **geo)
    for k in range(n):
        grey = np.vectorize(lambda v: MR_GREY.get(int(v), 0))(labels[k])
        _save_png(t1 / f"Ground/{Path(in_names[k]).stem}.png", grey, one_bit=False)
    truth["MR_2_T1DUAL_InPhase"] = dict(zip(in_paths, labels))
    truth["MR_2_T1DUAL_OutPhase"] = dict(zip(out_paths, labels))

    # MR_2 T2SPIR: positions descending in file order, file names shuffled against slice order.
    n = 4
    labels = organ_masks(n, rows, cols, seed=4)
    names = shuffled_names(n, pattern="IMG-0002-{:05d}.dcm")
    paths = write_series(train / "MR/2/T2SPIR/DICOM_anon", ramp_volume(n, rows, cols, seed=5),
                         spacing=(1.2, 1.2, -7.0), origin=(-100, -110, 30), row_dir=(1, 0, 0), col_dir=(0, 1, 0),
                         modality="MR", file_names=names, patient_id="mr2", series_description="t2")
    for k in range(n):
        grey = np.vectorize(lambda v: MR_GREY.get(int(v), 0))(labels[k])
        _save_png(train / f"MR/2/T2SPIR/Ground/{Path(names[k]).stem}.png", grey, one_bit=False)
    truth["MR_2_T2SPIR"] = dict(zip(paths, labels))
    return truth


# --------------------------------------------------------------------------- prepared data sets
ORGAN_LABELS = {"0": "background", "1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def organ_volume(shape, rng, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of one synthetic abdomen; liver off-centre so flips matter."""
    x, y, z = shape
    label = np.zeros(shape, np.uint8)
    jitter = rng.uniform(-1.5, 1.5, 3)
    label[ellipsoid(shape, (0.35 * x + jitter[0], 0.45 * y + jitter[1], 0.5 * z), (0.22 * x, 0.25 * y, 0.35 * z))] = 1
    if modality == "MR":
        label[ellipsoid(shape, (0.3 * x, 0.8 * y, 0.5 * z), (0.08 * x, 0.08 * y, 0.2 * z))] = 2
        label[ellipsoid(shape, (0.72 * x, 0.8 * y, 0.5 * z), (0.08 * x, 0.08 * y, 0.2 * z))] = 3
        label[ellipsoid(shape, (0.75 * x, 0.45 * y, 0.5 * z), (0.1 * x, 0.12 * y, 0.2 * z))] = 4
        values = {0: 120.0, 1: 420.0, 2: 260.0, 3: 260.0, 4: 330.0}
        noise = 25.0
    else:
        values = {0: -80.0, 1: 110.0}
        noise = 15.0
    image = np.zeros(shape, np.float32)
    for k, v in values.items():
        image[label == k] = v
    image += rng.normal(0.0, noise, shape).astype(np.float32)
    return image, label


def make_prepared_dataset(root: Path, n_mr: int = 3, n_ct: int = 3, shape=(40, 36, 10), folds: int = 2,
                          seed: int = 0) -> Path:
    """Write root/imagesTr, root/labelsTr and root/datalist.json; return root."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])
    affine[:3, 3] = [30.0, 25.0, -40.0]
    entries = []
    patients = [("MR", i) for i in range(1, n_mr + 1)] + [("CT", i) for i in range(1, n_ct + 1)]
    for index, (modality, number) in enumerate(patients):
        patient = f"{modality}_{number}"
        case = patient if modality == "CT" else f"{patient}_T2SPIR"
        image, label = organ_volume(shape, rng, modality)
        for sub, arr in (("imagesTr", image), ("labelsTr", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(arr, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, root / sub / f"{case}.nii.gz")
        entries.append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "case": case,
                        "patient": patient, "modality": modality,
                        "sequence": "CT" if modality == "CT" else "T2SPIR", "fold": index % folds})
    (root / "datalist.json").write_text(json.dumps(
        {"training": entries, "labels": ORGAN_LABELS, "numFolds": folds}, indent=2))
    return root


# --------------------------------------------------------------------------- runs, the CLI, DICOM outputs
TINY = ["model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=0", "train.roi_size=[16,16]",
        "infer.amp=off", "infer.device=cpu", "infer.montage=false"]


_TRAINED_RUN: list[Path] = []  # trained once per test session, copied for each test that asks


def make_run(run_dir: Path, folds=(0,)) -> Path:
    """A run folder made by the real training path (`run_training`): two folds of a tiny UNet trained for
    one epoch on a tiny prepared set. Geometry and output tests need a model that went through training's
    own checkpoints and config, not a good one. The folds asked for are copied into `run_dir`."""
    import atexit
    import shutil
    import tempfile

    from pipeline.train.cv import run_training

    if not _TRAINED_RUN:
        root = Path(tempfile.mkdtemp(prefix="tiny-run-"))
        atexit.register(shutil.rmtree, root, True)
        data = make_prepared_dataset(root / "prepared", n_mr=2, n_ct=2, folds=2)
        cfg = load_config(None, [*TINY, "model.dropout=0.0", "train.slices_per_volume=4", "train.batch_size=4",
                                 "train.epochs=1", "train.warmup_epochs=0", "train.val_every=1", "train.tensorboard=false",
                                 "train.compile=off", "train.pixel_spacing=0"])
        run_training(data, root / "run", "all", cfg)
        _TRAINED_RUN.append(root / "run")
    source = _TRAINED_RUN[0]
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "config.yaml", run_dir / "config.yaml")
    for k in folds:
        shutil.copytree(source / f"fold_{k}", run_dir / f"fold_{k}", dirs_exist_ok=True)
    return run_dir


def two_fold_case(tmp_path: Path):
    """A tiny ellipsoid MR series written as DICOM under tmp_path and read back, and the two-fold tiny run
    (make_run): (run_dir, volume, geometry), for the tests of what infer does with a fold ensemble."""
    series = tmp_path / "s"
    write_tiny(series, ellipsoid_volume())
    run_dir = make_run(tmp_path / "run", folds=(0, 1))
    volume, geom = read_series(series)
    return run_dir, volume, geom


def ellipsoid_volume(n=6, rows=24, cols=20):
    z, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    inside = ((r - rows / 2) / (rows / 3)) ** 2 + ((c - cols / 2) / (cols / 3)) ** 2 + ((z - n / 2) / (n / 2)) ** 2 < 1
    return np.where(inside, 800.0, 100.0) + r * 2.0


def cli_infer(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "infer", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def infer_in_process(*args):
    """`run.py infer ARGS` in this process, for the tests of bad input (conftest.run_main)."""
    return run_main("infer", *args)


def assert_one_line_error(res, *words):
    assert res.returncode != 0
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], errors[0]


def make_msd(root: Path, n=4, style="msd", modality="CT") -> Path:
    """MSD Task03 style (labels 1 liver, 2 cancer; "training" list; no channel suffix) or nnU-Net v2
    style (labels by name; imagesTr/<case>_0000.nii.gz; no list)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        image, organs = organ_volume((24, 20, 6), rng, "CT")
        label = organs.copy()
        label[10:12, 8:10, 2:4] *= 2  # a tumour inside the liver
        name = f"liver_{i}"
        image_name = f"{name}.nii.gz" if style == "msd" else f"{name}_0000.nii.gz"
        nib.save(nib.Nifti1Image(image, MSD_AFFINE), str(root / "imagesTr" / image_name))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), MSD_AFFINE), str(root / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    if style == "msd":
        meta = {"name": "Task03_Liver", "modality": {"0": modality},
                "labels": {"0": "background", "1": "liver", "2": "cancer"}, "training": training}
    else:
        meta = {"name": "Dataset003", "channel_names": {"0": modality}, "labels": {"background": 0, "liver": 1, "tumor": 2},
                "file_ending": ".nii.gz", "numTraining": n}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


GEOMETRIES = {
    "axial_hfs": dict(row_dir=(1, 0, 0), col_dir=(0, 1, 0), spacing=(0.8, 0.7, 2.5)),
    "axial_reversed": dict(row_dir=(1, 0, 0), col_dir=(0, 1, 0), spacing=(0.8, 0.7, -2.5)),
    "oblique": dict(row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, spacing=(0.8, 0.7, 3.0)),
    "oblique_reversed": dict(row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, spacing=(0.9, 0.6, -3.0)),
    "ffs_flipped_rows": dict(row_dir=(-1, 0, 0), col_dir=(0, 1, 0), spacing=(0.8, 0.8, -2.0),
                             patient_position="FFS"),
    "coronal": dict(row_dir=(1, 0, 0), col_dir=(0, 0, -1), spacing=(1.0, 0.7, 4.0)),
}


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
    import highdicom as hd

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
    from pipeline.evaluate.metrics import dice

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
