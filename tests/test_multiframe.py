"""Enhanced / Legacy Converted Enhanced multi-frame input: the same voxels and affine as the
single-frame series it holds (and as dcm2niix), stacks split, frames spread over files."""
from __future__ import annotations

import copy
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.core.errors import PipelineError
from pipeline.dicom.series import read_series
from pipeline.dicom.study import scan_study

from helpers import GEOMETRIES, ramp_volume, shuffled_names, write_tiny

hd = pytest.importorskip("highdicom")
DCM2NIIX = shutil.which("dcm2niix")


def legacy_convert(series_folder: Path, out: Path, frames: slice = slice(None)) -> Path:
    """The single-frame series as one Legacy Converted Enhanced file (highdicom), optionally only
    some of its frames (a series spread over several multi-frame files)."""
    datasets = [pydicom.dcmread(f) for f in sorted(series_folder.iterdir())]
    modality = datasets[0].Modality
    cls = hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    with warnings.catch_warnings():  # highdicom's advice on the fixtures' one-word patient name
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent", category=UserWarning)
        mf = cls(legacy_datasets=datasets[frames], series_instance_uid=datasets[0].SeriesInstanceUID,
                 series_number=int(datasets[0].get("SeriesNumber", 1) or 1), sop_instance_uid=hd.UID(),
                 instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(out)
    return out


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_multiframe_reads_as_its_single_frame_series(tmp_path, name):
    kw = GEOMETRIES[name]
    write_tiny(tmp_path / "single", ramp_volume(5, 12, 10), file_names=shuffled_names(5), modality="CT",
               rescale_intercept=-1024.0, **kw)
    mf = legacy_convert(tmp_path / "single", tmp_path / "multi" / "mf.dcm")
    v1, g1 = read_series(tmp_path / "single")
    v2, g2 = read_series(tmp_path / "multi")
    np.testing.assert_array_equal(v2, v1)
    np.testing.assert_allclose(g2.affine, g1.affine, atol=1e-6)
    assert g2.shape == g1.shape and g2.modality == "CT" and g2.files == [mf] * 5


def test_frames_spread_over_several_files_make_one_volume(tmp_path):
    write_tiny(tmp_path / "single", ramp_volume(6, 12, 10), file_names=shuffled_names(6))
    legacy_convert(tmp_path / "single", tmp_path / "multi" / "a.dcm", slice(0, 3))
    legacy_convert(tmp_path / "single", tmp_path / "multi" / "b.dcm", slice(3, 6))
    v1, g1 = read_series(tmp_path / "single")
    v2, g2 = read_series(tmp_path / "multi")
    np.testing.assert_array_equal(v2, v1)
    np.testing.assert_allclose(g2.affine, g1.affine, atol=1e-6)


def test_a_file_with_two_stacks_is_split_and_each_is_a_series_in_a_study(tmp_path):
    """Magnitude and phase in one file: frames told apart by their frame type."""
    write_tiny(tmp_path / "single", ramp_volume(4, 12, 10), series_description="dual")
    mf_path = legacy_convert(tmp_path / "single", tmp_path / "tmp.dcm")
    ds = pydicom.dcmread(mf_path)
    n = int(ds.NumberOfFrames)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    phase_items = []
    for item in items:  # a second set of frames at the same positions: the phase images
        phase = copy.deepcopy(item)
        frame_type = pydicom.Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "PHASE", "NONE"]
        phase.MRImageFrameTypeSequence = [frame_type]
        magnitude = pydicom.Dataset()
        magnitude.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        item.MRImageFrameTypeSequence = [magnitude]
        phase_items.append(phase)
    ds.PerFrameFunctionalGroupsSequence = items + phase_items
    pixels = ds.pixel_array
    ds.PixelData = np.concatenate([pixels, (4095 - pixels).astype(pixels.dtype)]).tobytes()
    ds.NumberOfFrames = 2 * n
    (tmp_path / "study" / "s").mkdir(parents=True)
    ds.save_as(tmp_path / "study" / "s" / "dual.dcm")
    with pytest.raises(PipelineError, match="holds 2 stacks"):
        read_series(tmp_path / "study" / "s")
    v1, _ = read_series(tmp_path / "single")
    mag, g_mag = read_series(tmp_path / "study" / "s", stack=0)
    pha, g_pha = read_series(tmp_path / "study" / "s", stack=1)
    np.testing.assert_array_equal(mag, v1)
    np.testing.assert_array_equal(pha, 4095 - v1)
    np.testing.assert_array_equal(g_mag.affine, g_pha.affine)
    scan = scan_study(tmp_path / "study")
    names = [s.name for s in scan.series]  # highdicom's conversion adds to the description
    assert len(names) == 2 and names[0].startswith("1_dual") and [n[-7:] for n in names] == ["_stack1", "_stack2"]
    from pipeline.infer.inputs import collect_cases

    cases = collect_cases(tmp_path / "study")
    np.testing.assert_array_equal(cases[1].load().array, 4095 - v1)


def test_missing_plane_position_is_named(tmp_path):
    write_tiny(tmp_path / "single", ramp_volume(3, 12, 10))
    path = legacy_convert(tmp_path / "single", tmp_path / "multi" / "mf.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(path)
    with pytest.raises(PipelineError, match=r"mf.dcm\[frame 2\]: missing or invalid ImagePositionPatient"):
        read_series(tmp_path / "multi")


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("series", ["CT/3/DICOM_anon", "MR/1/T2SPIR/DICOM_anon"])
def test_real_series_as_multiframe_reads_the_same_and_matches_dcm2niix(tmp_path, real_chaos, series):
    folder = real_chaos / "Train_Sets" / series
    legacy_convert(folder, tmp_path / "multi" / "mf.dcm")
    v1, g1 = read_series(folder)
    v2, g2 = read_series(tmp_path / "multi")
    np.testing.assert_array_equal(v2, v1)
    np.testing.assert_allclose(g2.affine, g1.affine, atol=1e-6)
    if DCM2NIIX is None:
        pytest.skip("dcm2niix binary not found on PATH")
    (tmp_path / "nii").mkdir()
    subprocess.run([DCM2NIIX, "-z", "y", "-b", "n", "-f", "%s", "-o", str(tmp_path / "nii"), str(tmp_path / "multi")],
                   check=True, capture_output=True)
    (nii,) = (tmp_path / "nii").glob("*.nii.gz")
    ref = nib.load(nii)
    np.testing.assert_allclose(g2.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(v2, ref.get_fdata(dtype=np.float32))


def _frame_plane(mf: pydicom.Dataset, frame: int):
    """(IPP, IOP, dr, dc) of a frame, straight from the file's functional groups (not the pipeline's)."""
    item, shared = mf.PerFrameFunctionalGroupsSequence[frame - 1], mf.SharedFunctionalGroupsSequence[0]

    def group(seq, key):
        return (item if seq in item else shared)[seq][0][key]
    ipp = np.array([float(v) for v in group("PlanePositionSequence", "ImagePositionPatient")])
    iop = np.array([float(v) for v in group("PlaneOrientationSequence", "ImageOrientationPatient")])
    dr, dc = (float(v) for v in group("PixelMeasuresSequence", "PixelSpacing"))
    return ipp, iop, dr, dc


@pytest.mark.slow
@pytest.mark.realdata
def test_seg_and_rtstruct_of_a_real_multiframe_series_reference_its_frames(tmp_path, real_chaos):
    from skimage.draw import polygon2mask

    from pipeline.datasets.chaos import png_stack_liver
    from pipeline.outputs.dicom_objects import write_rtstruct, write_seg

    from helpers import dciodvfy_errors, file_planes

    patient = real_chaos / "Train_Sets" / "MR" / "1" / "T2SPIR"
    _, single = read_series(patient / "DICOM_anon", pixels=False)
    mask = png_stack_liver({Path(f): patient / "Ground" / f"{Path(f).stem}.png" for f in single.files},
                           single).astype(np.uint8)
    mf_path = legacy_convert(patient / "DICOM_anon", tmp_path / "multi" / "mf.dcm")
    _, geom = read_series(tmp_path / "multi", pixels=False)
    mf = pydicom.dcmread(mf_path, stop_before_pixels=True)
    # the expected plane of each frame, independently of the pipeline's frame order: the frame's
    # source image (highdicom's Conversion Source Attributes) and that file's plane of the mask
    by_file = dict(zip((str(h.SOPInstanceUID) for h in single.headers), file_planes(mask, single)))
    by_frame = {i + 1: by_file[str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
                for i, item in enumerate(mf.PerFrameFunctionalGroupsSequence)}
    planes = [by_frame[f] for f in geom.frame_numbers]

    seg_path = write_seg(tmp_path / "mf.seg.dcm", mask, geom, case="mf", run_name="run")
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    present = sorted(int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                     for item in seg.PerFrameFunctionalGroupsSequence)
    got = seg.get_pixels_by_source_frame(str(mf.SOPInstanceUID), present, segment_numbers=[1])[..., 0]
    for frame, plane in zip(present, got):
        np.testing.assert_array_equal(plane > 0, by_frame[frame])
    assert sum(p.any() for p in planes) == len(present)

    rt_path = write_rtstruct(tmp_path / "mf.rtstruct.dcm", mask, geom, case="mf", run_name="run")
    assert dciodvfy_errors(rt_path) == []
    rt = pydicom.dcmread(rt_path)
    back = {f: np.zeros((geom.rows, geom.cols), bool) for f in geom.frame_numbers}
    for item in rt.ROIContourSequence[0].ContourSequence:
        ref = item.ContourImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        ipp, iop, dr, dc = _frame_plane(mf, int(ref.ReferencedFrameNumber))
        d = np.array([float(v) for v in item.ContourData]).reshape(-1, 3) - ipp
        assert np.abs(d @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # on that frame's plane
        rc = np.stack([d @ iop[3:] / dr, d @ iop[:3] / dc], axis=1)
        back[int(ref.ReferencedFrameNumber)] ^= polygon2mask((geom.rows, geom.cols), rc)
    for frame, plane in zip(geom.frame_numbers, planes):
        np.testing.assert_array_equal(back[frame], plane)
