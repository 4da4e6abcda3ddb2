"""Liver masks as DICOM objects that file into the source study: DICOM SEG (highdicom), RTSTRUCT.

The SEG references every source image by SOP Instance UID, shares the source's Frame of
Reference, and copies its patient and study modules (highdicom does that from the source
headers), so a PACS files it with the series and OHIF, 3D Slicer (QuantitativeReporting) or a
PACS viewer overlays it.

Stripped sources (research exports, anonymisers) lack what the objects must copy or reference. One
behaviour per attribute (`source_headers`; the notes go to a warning line and the case's row of
inference.json):
- SOPClassUID, SOPInstanceUID missing, empty or not a valid UID in a file: taken from its file meta; where that lacks
  them too, the format is refused for the case (one line naming the file), the NIfTI mask stays.
- StudyInstanceUID, SeriesInstanceUID missing, empty or not a valid UID: generated, the same for the SEG and the
  RTSTRUCT of one case (derived from the source files' paths), and noted: the objects then reference
  the images under that UID, so a PACS files them together only if the images are stored with it.
- FrameOfReferenceUID missing, empty or not a valid UID: the format is refused (an object in another frame of
  reference than its images would be overlaid nowhere, or wrongly).
- Type-2 patient and study attributes (PatientName, PatientID, birth date, sex, StudyDate, ...)
  missing: present and empty in the objects, which is valid; noted.
Every object is checked before it is written (`check_references`): its own and its referenced UIDs
are present and valid DICOM UIDs, or the format is refused for the case.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path
from pipeline.dicom.geometry import SeriesGeometry, from_nifti_slice

SOFTWARE = "chaos-liver"  # setup.cfg's name: Manufacturer and algorithm name of what we write
SEG_SERIES_OFFSET = 1000  # SEG series number = the source's + this, RTSTRUCT's + 1 (listed next to the source)


def _series_number(source, offset: int) -> int:
    """The source's SeriesNumber (0 when it has none) + offset."""
    number = source.get("SeriesNumber")
    return (int(number) if number not in (None, "") else 0) + offset


def source_frames(mask: np.ndarray, geometry: SeriesGeometry) -> np.ndarray:
    """Mask in NIfTI order (X, Y, Z) -> (slices, rows, cols), slice k as the source image (or frame)
    `geometry.files[k]` / `geometry.headers[k]` stores its pixels."""
    mask = np.asarray(mask)
    if mask.shape != tuple(geometry.shape):
        raise ValueError(f"mask {mask.shape} does not match the series {tuple(geometry.shape)}")
    return np.stack([from_nifti_slice(mask[:, :, k]) for k in range(mask.shape[2])])


def _slice_planes(geometry: SeriesGeometry) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Per slice: (ImagePositionPatient, ImageOrientationPatient, row spacing, column spacing), LPS mm.
    A single-frame image's own header; a frame of a multi-frame image from the stack's affine (its
    frames were checked to lie on it)."""
    if not geometry.frame_numbers:
        return [(np.array([float(v) for v in h.ImagePositionPatient]),
                 np.array([float(v) for v in h.ImageOrientationPatient]),
                 *(float(v) for v in h.PixelSpacing)) for h in geometry.headers]
    lps = np.diag([-1.0, -1.0, 1.0]) @ geometry.affine[:3]  # RAS -> LPS
    dc, dr, _ = geometry.spacing
    row_dir, col_dir = lps[:, 0] / dc, -lps[:, 1] / dr
    orientation = np.concatenate([row_dir, col_dir])
    # stored pixel (row 0, column 0) of slice k is voxel (0, rows - 1, k)
    return [(lps @ np.array([0.0, geometry.rows - 1, k, 1.0]), orientation, dr, dc) for k in range(geometry.shape[2])]


# Type-2 attributes of the patient and study modules that a SEG copies from its source: anonymised
# exports often drop them, and highdicom needs them present (empty is valid for type 2).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters
# (checked here rather than by pydicom's UID, which warns on every invalid value it is given)
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(value) -> bool:
    text = str(value or "").strip("\0 ")
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def _unusable(ds, keyword: str) -> bool:
    """A UID element missing, empty, or damaged into something that is not a UID."""
    from pipeline.dicom.headers import lenient_values

    with lenient_values():
        value = ds.get(keyword, "") if ds is not None else ""
    return not valid_uid(value)


def source_headers(geometry: SeriesGeometry, case: str) -> tuple[list, list[str]]:
    """(the source headers as the DICOM outputs copy and reference them, notes on what was filled in);
    see the module doc for the behaviour per attribute. The geometry's own headers stay as they are
    (copies are changed). PipelineError, one line, where the format must be refused."""
    if not geometry.headers or len(geometry.headers) != len(geometry.files):
        raise PipelineError(f"{case}: DICOM output needs the source series' headers (DICOM input)")
    headers, notes = list(geometry.headers), []
    if _unusable(headers[0], "FrameOfReferenceUID"):
        raise PipelineError(f"{case}: the source series has no FrameOfReferenceUID; a DICOM SEG or RTSTRUCT "
                            f"must share its images' frame of reference (NIfTI mask written)")
    fixes: dict[int, dict[str, str]] = {}
    for i, (path, ds) in enumerate(zip(geometry.files, headers)):
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if _unusable(ds, keyword):
                value = "" if meta is None or _unusable(meta, meta_keyword) else str(meta[meta_keyword].value).strip()
                if not value:
                    raise PipelineError(f"{case}: {path}: no valid {keyword}, neither in the data set nor in its file meta; "
                                        f"a DICOM output must reference each image by it (NIfTI mask written)")
                fixes.setdefault(i, {})[keyword] = value
    taken = {k for f in fixes.values() for k in f}
    if taken:
        notes.append(f"{' and '.join(sorted(taken))} taken from the file meta of {len(fixes)} source file(s)")
    from pydicom.uid import generate_uid

    sources = [str(Path(f).resolve()) for f in geometry.files]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(_unusable(ds, keyword) for ds in headers):
            uid = generate_uid(entropy_srcs=[SOFTWARE, keyword, *sources])  # the same for every output of the case
            for i in range(len(headers)):
                fixes.setdefault(i, {})[keyword] = uid
            notes.append(f"the source has no valid {keyword}: generated {uid} (the SEG and RTSTRUCT reference "
                         f"the images under it)")
    missing = [k for k in TYPE2_COPIED if k not in headers[0]]
    if missing:
        fixes.setdefault(0, {}).update({k: "" for k in missing})
        notes.append(f"absent from the source, written empty: {', '.join(missing)}")
    from pipeline.dicom.headers import lenient_values

    with lenient_values():  # the copy re-reads the damaged values being replaced
        for i, values in fixes.items():
            ds = copy.deepcopy(headers[i])
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            headers[i] = ds
    return headers, notes


def check_references(ds, case: str, what: str) -> None:
    """The object `ds` (a SEG or an RTSTRUCT) refers to itself and to its sources with valid UIDs:
    checked before it is written, rather than trusting what was copied. PipelineError naming the attribute."""
    def walk(item, where: str):
        for tag in list(item.keys()):
            if item.get_item(tag).VR not in ("UI", "SQ"):  # raw contour data stays unconverted
                continue
            element = item[tag]
            if element.VR == "SQ":
                for child in element.value:
                    walk(child, f"{where}{element.keyword} > ")
                continue
            values = element.value if isinstance(element.value, (list, tuple)) else [element.value]
            for value in values:
                if not valid_uid(value):
                    raise PipelineError(f"{case}: {what} not written: {where}{element.keyword} is "
                                        f"{str(value)!r}, not a valid UID (NIfTI mask written)")

    walk(ds, "")


def write_seg(path: Path, mask: np.ndarray, geometry: SeriesGeometry, *, case: str, run_name: str,
              headers: list | None = None) -> Path:
    """Write the liver mask (X, Y, Z, NIfTI order, liver > 0) as a BINARY DICOM SEG of the source series.

    Frames without liver are left out (highdicom's default; the SEG still references every source
    image in its Referenced Series Sequence); a mask without any liver keeps one empty frame.
    `headers`: source_headers(geometry, case)'s, when the caller has them already.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    headers = headers if headers is not None else source_headers(geometry, case)[0]
    frames = (source_frames(mask, geometry) > 0).astype(np.uint8)
    if geometry.frame_numbers:  # a multi-frame source: one SEG frame per source frame, the stack's filled
        if len(set(geometry.files)) > 1:
            raise PipelineError(f"{case}: a DICOM SEG can reference one multi-frame source file; this stack "
                                f"spreads over {len(set(geometry.files))}")
        full = np.zeros((int(headers[0].NumberOfFrames), geometry.rows, geometry.cols), np.uint8)
        full[np.asarray(geometry.frame_numbers) - 1] = frames
        frames, headers = full, headers[:1]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE, version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters={"run": run_name[:64]})
    liver = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_id="liver", tracking_uid=hd.UID())
    # highdicom checks the person names it copies; a source's single-word PatientName (common in
    # anonymised exports) is valid DICOM and nothing the user can change
    quiet = warnings.catch_warnings()
    try:
        with quiet:
            warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended "
                                    r"person name", category=UserWarning, module="highdicom")
            seg = hd.seg.Segmentation(
                source_images=headers, pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[liver],
                series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), instance_number=1,
                series_number=_series_number(headers[0], SEG_SERIES_OFFSET),
                series_description="Liver segmentation", content_label="LIVER",
                content_description=f"Liver mask from {SOFTWARE} run {run_name}"[:64],
                manufacturer=SOFTWARE, manufacturer_model_name="liver segmentation",
                software_versions=__version__, device_serial_number="0")
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom names the attribute it could not use (e.g. a source without ImagePositionPatient)
        raise PipelineError(f"{case}: cannot build a DICOM SEG for this series ({exc})") from None
    check_references(seg, case, "DICOM SEG")
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- RTSTRUCT
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RT Referenced Study Sequence items name (PS3.3 C.8.8.5)


def _decimal_strings(values: np.ndarray) -> bytes:
    """A DS multi-value, encoded: each number with 3 decimals (micrometres; at most 16 characters,
    the DS limit that rt-utils' long values break), backslash-separated, padded to even length."""
    text = "\\".join(f"{v:.3f}" for v in np.asarray(values, dtype=np.float64).ravel())
    return (text + " " * (len(text) % 2)).encode("ascii")


def _raw_ds(keyword: str, encoded: bytes):
    """A DS element given as its encoded value (pydicom would otherwise make one Python object per
    coordinate: tens of thousands per series)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    return tag, RawDataElement(tag, "DS", len(encoded), encoded, 0, True, True)


def slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours (each (N, 2) as (row, col) pixel coordinates, not repeating its first point) on
    the iso-line half-way between inside and outside pixel centres of a 2D binary `plane`: outer
    boundaries and hole boundaries alike (a hole is a contour inside another; the even-odd rule, which
    radiotherapy systems, 3D Slicer and plastimatch apply to contours of one plane, gives back the mask).

    scikit-image's marching squares (find_contours) on the plane padded with background, so every
    contour closes; the points in the middle of straight runs are dropped (exactly collinear:
    marching squares' half-pixel coordinates are exact), which halves the points and changes nothing.
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(plane, dtype=np.float32), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        ring = contour[:-1] - 1.0  # closed: the last point repeats the first; back to the plane's indices
        if len(ring) < 3:
            continue
        before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
        turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        # scikit-image's approximate_polygon(tolerance=0) drops the same points, one Python step per point
        out.append(ring[turn != 0])
    return out


def write_rtstruct(path: Path, mask: np.ndarray, geometry: SeriesGeometry, *, case: str, run_name: str,
                   headers: list | None = None) -> Path:
    """Write the liver mask (X, Y, Z, NIfTI order) as an RT Structure Set with one ROI "Liver": closed
    planar contours per source image, in patient coordinates (mm), each referencing its image.

    Written with pydicom: highdicom has no RT Structure Set writer, and rt-utils (the usual choice)
    writes contour coordinates longer than a DS value may be. The patient and study modules are
    copied from the source (type-2 attributes present, empty when the source lacks them).
    `headers`: source_headers(geometry, case)'s, when the caller has them already.
    """
    import datetime

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from pipeline.core.labels import LIVER_RGB

    headers = headers if headers is not None else source_headers(geometry, case)[0]
    first = headers[0]
    frame_of_reference = str(first.get("FrameOfReferenceUID", "") or "")
    now = datetime.datetime.now()
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in TYPE2_COPIED + ("StudyInstanceUID",):
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _series_number(first, SEG_SERIES_OFFSET + 1)
    ds.SeriesDescription = "Liver contours"
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = SOFTWARE, "liver segmentation", __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "LIVER"
    ds.StructureSetName = f"{SOFTWARE} {run_name}"[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = frame_of_reference  # the Frame of Reference module, the source's
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")

    def image_ref(src, frame: int | None = None) -> pydicom.Dataset:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        if frame is not None:
            item.ReferencedFrameNumber = frame
        return item

    frame_numbers = geometry.frame_numbers or [None] * len(headers)
    series_ref = pydicom.Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([image_ref(h, f) for h, f in zip(headers, frame_numbers)])
    study_ref = pydicom.Dataset()
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = STUDY_COMPONENT_SOP_CLASS, ds.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = pydicom.Dataset()
    frame_ref.FrameOfReferenceUID = frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi = pydicom.Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = 1, frame_of_reference, "Liver"
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{SOFTWARE} {__version__}, run {run_name}"[:64]
    ds.StructureSetROISequence = DicomSequence([roi])

    contours = []
    planes = source_frames(mask, geometry) > 0
    for src, frame, plane, (origin, iop, dr, dc) in zip(headers, frame_numbers, planes, _slice_planes(geometry)):
        if not plane.any():
            continue
        for rc in slice_contours(plane):
            # column index runs along the first orientation vector, row index along the second
            xyz = origin + np.outer(rc[:, 1] * dc, iop[:3]) + np.outer(rc[:, 0] * dr, iop[3:])
            item = pydicom.Dataset()
            item.ContourImageSequence = DicomSequence([image_ref(src, frame)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(xyz)
            tag, element = _raw_ds("ContourData", _decimal_strings(xyz))
            item[tag] = element
            contours.append(item)
    roi_contour = pydicom.Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = list(LIVER_RGB)
    if contours:  # type 2 in the standard's sense: an empty mask has an ROI without contours
        roi_contour.ContourSequence = DicomSequence(contours)
    ds.ROIContourSequence = DicomSequence([roi_contour])

    observation = pydicom.Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    # Implicit VR: a contour's coordinates may exceed the 64 KiB an explicit-VR DS value can hold.
    # The writer decodes raw DS values before writing them; as numpy arrays that costs a few ms a
    # series instead of a Python object per number (pydicom.config.use_DS_numpy, restored after).
    check_references(ds, case, "RTSTRUCT")
    from pydicom import config as pydicom_config

    numpy_ds = pydicom_config.use_DS_numpy
    try:
        pydicom_config.use_DS_numpy = True
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    finally:
        pydicom_config.use_DS_numpy = numpy_ds
    return path
