"""Your own scans as `prepare` input: DICOM series (or NIfTI images) with their liver masks as NIfTI
or DICOM SEG files.

Paired by a CSV (any file and folder names):

    pairs.csv    image,label,patient[,modality]
                 image: a DICOM series folder or a NIfTI file; label: a NIfTI or DICOM SEG file;
                 paths relative to the CSV. modality (CT / MR) is read from the DICOM header, so the
                 column is needed only for NIfTI images.

or by name, in a folder holding

    images/<case>/                       one DICOM series folder per case (patient = case)
    labels/<case>.nii.gz | <case>.nii | <case>.seg.dcm | <case>.dcm

A NIfTI mask must lie on its image's grid (the same affine, its axes possibly in another order:
reordered exactly; pipeline.dicom.volume.on_image_grid); its values must be 0 and the liver value(s)
`prepare.liver_labels` (default 1). A DICOM SEG must reference the image series (its instances and
Frame of Reference); its liver is the segment(s) labelled liver or coded SNOMED CT 10200004 Liver
(or the segment numbers in `prepare.liver_labels`).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name
from pipeline.dicom.volume import Volume, is_nifti, nifti_stem, on_image_grid, read_dicom_series, read_nifti

log = logging.getLogger(__name__)

PAIRS_COLUMNS = ("image", "label", "patient")
LIVER_CODE = "10200004"  # SNOMED CT Liver, as pipeline.outputs.dicom_objects writes it
_LABEL_SUFFIXES = (".nii.gz", ".nii", ".seg.dcm", ".dcm")


@dataclass
class PairCase:
    case: str
    patient: str
    image: Path  # DICOM series folder or NIfTI file
    label: Path  # NIfTI or DICOM SEG file
    modality: str = ""  # from the CSV; "" = from the DICOM header
    where: str = ""  # the CSV line or folder that listed it (for errors)


def is_pairs_source(path: Path) -> bool:
    """A pairs CSV, or a folder with images/ and labels/ (and no dataset.json: that is pipeline.datasets.msd)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return (path / "images").is_dir() and (path / "labels").is_dir() and not (path / "dataset.json").exists()


def find_pairs(source: Path) -> list[PairCase]:
    source = Path(source)
    found = _from_csv(source) if source.is_file() else _by_name(source)
    if not found:
        raise PipelineError(f"{source}: no image / label pairs listed")
    counts: dict[str, int] = {}
    for c in found:
        counts[c.patient] = counts.get(c.patient, 0) + 1
    seen: set[str] = set()
    for c in found:  # one case per patient keeps the patient's name; several get the image's name too
        if counts[c.patient] > 1:
            c.case = safe_name(f"{c.patient}_{nifti_stem(c.image)}", "case name")
        if c.case in seen:
            raise PipelineError(f"{c.where}: case {c.case} is listed twice")
        seen.add(c.case)
    return found


def _from_csv(path: Path) -> list[PairCase]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: cannot read the pairs CSV ({exc})") from None
    header = set(rows[0]) if rows else set()
    missing = [c for c in PAIRS_COLUMNS if c not in header]
    if missing:
        raise PipelineError(f"{path}: columns {', '.join(PAIRS_COLUMNS)} needed (missing {', '.join(missing)})")
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line}"
        if not all((row.get(c) or "").strip() for c in PAIRS_COLUMNS):
            raise PipelineError(f"{where}: image, label and patient must all be given")
        image, label = (path.parent / row[c].strip() for c in ("image", "label"))
        for what, p in (("image", image), ("label", label)):
            if not p.exists():
                raise PipelineError(f"{where}: {what} {p} not found")
        modality = (row.get("modality") or "").strip().upper()
        if modality not in ("", "CT", "MR"):
            raise PipelineError(f"{where}: modality {row['modality']!r} is neither CT nor MR")
        patient = safe_name(row["patient"].strip(), "patient id")
        out.append(PairCase(case=patient, patient=patient, image=image, label=label, modality=modality, where=where))
    return out


def _by_name(root: Path) -> list[PairCase]:
    out = []
    for folder in sorted(p for p in (root / "images").iterdir() if p.is_dir() and not p.name.startswith(".")):
        labels = [root / "labels" / f"{folder.name}{s}" for s in _LABEL_SUFFIXES]
        found = [p for p in labels if p.is_file()]
        if not found:
            raise PipelineError(f"{folder}: no mask labels/{folder.name}.nii.gz (or .nii, .seg.dcm, .dcm)")
        if len(found) > 1:
            raise PipelineError(f"{folder}: several masks ({', '.join(p.name for p in found)}); keep one")
        name = safe_name(folder.name, "folder name")
        out.append(PairCase(case=name, patient=name, image=folder, label=found[0], where=str(folder)))
    return out


def read_pair(case: PairCase, liver_labels: list[int]) -> tuple[Volume, np.ndarray, str]:
    """(image Volume float32, liver mask uint8 on its grid, modality) after the integrity checks."""
    from pipeline.datasets.msd import liver_mask

    image = read_nifti(case.image) if is_nifti(case.image) else read_dicom_series(case.image)
    modality = case.modality or image.modality
    if modality not in ("CT", "MR"):
        raise PipelineError(f"{case.where}: modality of {case.image} unknown (a NIfTI image needs the CSV's "
                            f"modality column)" if not modality else f"{case.image}: modality {modality} is neither CT nor MR")
    if image.array.ndim != 3 or image.array.size == 0 or not np.all(np.isfinite(image.array)):
        raise PipelineError(f"{case.image}: image is not 3-D, is empty or holds NaN / infinite values")
    if is_nifti(case.label):
        liver = sorted(liver_labels) or [1]
        labels = on_image_grid(read_nifti(case.label, dtype=None), image)
        return image, liver_mask(labels, liver, {0, *liver}, case.label), modality
    return image, _seg_liver(case.label, image, liver_labels), modality


def _seg_liver(path: Path, image: Volume, segment_numbers: list[int]) -> np.ndarray:
    """The liver of a DICOM SEG of the image series, uint8 on the image's grid (highdicom reads it)."""
    import highdicom as hd
    import pydicom

    if image.geometry is None or not image.geometry.headers:
        raise PipelineError(f"{path}: a DICOM SEG mask needs its DICOM image series (got {image.source})")
    try:
        seg = hd.seg.segread(path)
    except (pydicom.errors.InvalidDicomError, ValueError, AttributeError, OSError, EOFError) as exc:
        raise PipelineError(f"{path}: not a readable DICOM Segmentation ({str(exc).splitlines()[0]})") from None
    headers = image.geometry.headers
    first = headers[0]
    referenced = {s.SeriesInstanceUID for s in getattr(seg, "ReferencedSeriesSequence", [])}
    if first.SeriesInstanceUID not in referenced:
        raise PipelineError(f"{path}: does not reference the image series {image.source} "
                            f"(SeriesInstanceUID {first.SeriesInstanceUID})")
    if getattr(seg, "FrameOfReferenceUID", None) != getattr(first, "FrameOfReferenceUID", None):
        raise PipelineError(f"{path}: its Frame of Reference is not that of the image series {image.source}")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    if segment_numbers:
        chosen = [n for n in segment_numbers if n in segments]
        if len(chosen) != len(segment_numbers):
            raise PipelineError(f"{path}: segment numbers {segment_numbers} (prepare.liver_labels) not all among "
                                f"{sorted(segments)}")
    else:
        chosen = [n for n, s in segments.items() if "liver" in str(getattr(s, "SegmentLabel", "")).lower()
                  or any(c.CodeValue == LIVER_CODE for c in getattr(s, "SegmentedPropertyTypeCodeSequence", []))]
        if not chosen:
            names = ", ".join(f"{n} {getattr(s, 'SegmentLabel', '?')}" for n, s in segments.items())
            raise PipelineError(f"{path}: no liver segment ({names}); set prepare.liver_labels to its number(s)")
    frames = image.geometry.frame_numbers
    uids = [h.SOPInstanceUID for h in headers]
    try:
        if frames:  # multi-frame sources: per instance, its frames in slice order
            planes = np.zeros((len(uids), image.geometry.rows, image.geometry.cols, len(chosen)), bool)
            for uid in dict.fromkeys(uids):
                ks = [k for k, u in enumerate(uids) if u == uid]
                planes[ks] = seg.get_pixels_by_source_frame(uid, source_frame_numbers=[int(frames[k]) for k in ks],
                                                            segment_numbers=chosen,
                                                            assert_missing_frames_are_empty=True) > 0
        else:
            planes = seg.get_pixels_by_source_instance(uids, segment_numbers=chosen,
                                                       assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise PipelineError(f"{path}: its frames do not fit the image series {image.source} "
                            f"({str(exc).splitlines()[0]})") from None
    mask = np.asarray(planes).any(axis=-1)  # (slices, rows, cols)
    if mask.shape[1:] != (image.geometry.rows, image.geometry.cols):
        raise PipelineError(f"{path}: frames of {mask.shape[1:]} pixels, the series has "
                            f"{(image.geometry.rows, image.geometry.cols)}")
    from pipeline.dicom.geometry import to_nifti_slice

    out = np.zeros(image.geometry.shape, np.uint8)
    for k in range(mask.shape[0]):
        out[:, :, k] = to_nifti_slice(mask[k])
    return out
