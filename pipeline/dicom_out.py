"""Liver masks as DICOM objects that file into the source study: DICOM SEG (highdicom).

The SEG references every source image by SOP Instance UID, shares the source's Frame of
Reference, and copies its patient and study modules (highdicom does that from the source
headers), so a PACS files it with the series and OHIF, 3D Slicer (QuantitativeReporting) or a
PACS viewer overlays it. Anonymised sources that lack type-2 attributes (birth date, sex, study
date, accession number) give a SEG with those attributes present and empty, which is valid.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.dicom import SeriesGeometry
from pipeline.errors import PipelineError
from pipeline.io import atomic_path

SOFTWARE = "chaos-liver"  # setup.cfg's name: Manufacturer and algorithm name of what we write
SEG_SERIES_OFFSET = 1000  # SEG series number = the source's + this (viewers list it next to the source)


def source_frames(mask: np.ndarray, geometry: SeriesGeometry) -> np.ndarray:
    """Mask in NIfTI order (X, Y, Z) -> (frames, rows, cols), one frame per source file, in the order
    of `geometry.files` / `geometry.headers`, each as the source stores its pixels."""
    planes = geometry.unstack(mask)
    return np.stack([planes[Path(f)] for f in geometry.files])


# Type-2 attributes of the patient and study modules that a SEG copies from its source: anonymised
# exports often drop them, and highdicom needs them present (empty is valid for type 2).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_headers(geometry: SeriesGeometry, case: str) -> list:
    """The source headers, the first a copy with any missing type-2 attribute added empty (highdicom
    copies the patient and study modules from the first source image); the geometry's stay as they are."""
    if not geometry.headers or len(geometry.headers) != len(geometry.files):
        raise PipelineError(f"{case}: DICOM output needs the source series' headers (DICOM input)")
    first, rest = geometry.headers[0], list(geometry.headers[1:])
    missing = [k for k in TYPE2_COPIED if k not in first]
    if missing:
        first = copy.deepcopy(first)
        for keyword in missing:
            setattr(first, keyword, "")
    return [first, *rest]


def write_seg(path: Path, mask: np.ndarray, geometry: SeriesGeometry, *, case: str, run_name: str) -> Path:
    """Write the liver mask (X, Y, Z, NIfTI order, liver > 0) as a BINARY DICOM SEG of the source series.

    Frames without liver are left out (highdicom's default; the SEG still references every source
    image in its Referenced Series Sequence); a mask without any liver keeps one empty frame.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    headers = _source_headers(geometry, case)
    frames = (source_frames(mask, geometry) > 0).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE, version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters={"run": run_name[:64]})
    liver = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_id="liver", tracking_uid=hd.UID())
    source_number = headers[0].get("SeriesNumber")
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
                series_number=(int(source_number) if source_number not in (None, "") else 0) + SEG_SERIES_OFFSET,
                series_description="Liver segmentation", content_label="LIVER",
                content_description=f"Liver mask from {SOFTWARE} run {run_name}"[:64],
                manufacturer=SOFTWARE, manufacturer_model_name="liver segmentation",
                software_versions=__version__, device_serial_number="0")
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom names the attribute it could not use (e.g. a source without ImagePositionPatient)
        raise PipelineError(f"{case}: cannot build a DICOM SEG for this series ({exc})") from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
