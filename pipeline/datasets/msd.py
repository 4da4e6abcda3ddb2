"""Medical Segmentation Decathlon / nnU-Net style NIfTI data sets as `prepare` input.

    DIR/dataset.json   "labels" ({"0": "background", "1": "liver", "2": "cancer"} as MSD writes it, or
                       {"background": 0, "liver": 1} as nnU-Net v2 does), "modality" (MSD) or
                       "channel_names" (nnU-Net v2), optionally "training" (MSD's image/label pairs)
    DIR/imagesTr/<case>.nii.gz or <case>_0000.nii.gz, DIR/labelsTr/<case>.nii.gz

Which label values are liver comes from their names (a name with "liver"; a tumour / cancer /
lesion label counts as liver tissue when a liver label exists, as in MSD Task03 and LiTS), or
from `prepare.liver_labels`. The prepared label is 1 on the liver, 0 elsewhere.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name
from pipeline.dicom.volume import is_nifti, nifti_stem, on_image_grid, read_nifti

DATASET_JSON = "dataset.json"
_TUMOUR = re.compile(r"tumou?r|cancer|lesion|metasta", re.IGNORECASE)
_MR = re.compile(r"\b(mri?|t1|t2|flair|dwi|adc|spir|dixon)", re.IGNORECASE)


def is_msd_root(path: Path) -> bool:
    path = Path(path)
    return (path / DATASET_JSON).is_file() and (path / "imagesTr").is_dir()


@dataclass
class MsdCase:
    case: str  # also the patient id: <modality>_<name>
    patient: str
    modality: str
    image: Path
    label: Path


def _read_json(root: Path) -> dict:
    path = root / DATASET_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise PipelineError(f"{path}: no \"labels\" mapping")
    return meta


def declared_labels(meta: dict, where: Path) -> dict[int, str]:
    """{value: name} from MSD's {"1": "liver"} or nnU-Net v2's {"liver": 1}."""
    out = {}
    for key, value in meta["labels"].items():
        try:
            if str(key).lstrip("-").isdigit():
                out[int(key)] = str(value)
            else:
                out[int(value)] = str(key)
        except (TypeError, ValueError):
            raise PipelineError(f"{where}: label {key!r}: {value!r} is not a value and a name") from None
    return out


def liver_values(labels: dict[int, str], configured: list[int], where: Path) -> list[int]:
    if configured:
        unknown = [v for v in configured if v not in labels]
        if unknown:
            raise PipelineError(f"{where}: prepare.liver_labels {unknown} are not among its labels {sorted(labels)}")
        return sorted(configured)
    liver = [v for v, name in labels.items() if "liver" in name.lower() and not _TUMOUR.search(name)]
    if not liver:
        raise PipelineError(f"{where}: no label named liver in {labels}; set prepare.liver_labels")
    tumour = [v for v, name in labels.items() if v not in liver and v != 0 and _TUMOUR.search(name)]
    return sorted(liver + tumour)


def modality_of(meta: dict, where: Path) -> str:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if not isinstance(channels, dict) or len(channels) != 1:
        raise PipelineError(f"{where}: one image channel expected (\"modality\" / \"channel_names\"), got {channels}")
    name = str(next(iter(channels.values())))
    if name.strip().upper() == "CT":
        return "CT"
    if _MR.search(name):
        return "MR"
    raise PipelineError(f"{where}: channel {name!r} is neither CT nor an MR sequence")


def find_msd_cases(root: Path) -> tuple[list[MsdCase], dict]:
    """The image/label pairs of the data set, and its dataset.json."""
    root = Path(root)
    meta = _read_json(root)
    modality = modality_of(meta, root / DATASET_JSON)
    pairs = []
    if isinstance(meta.get("training"), list) and meta["training"]:
        for item in meta["training"]:
            try:
                pairs.append((root / item["image"], root / item["label"]))
            except (TypeError, KeyError):
                raise PipelineError(f"{root / DATASET_JSON}: a training entry without image and label: {item}") from None
    else:  # nnU-Net v2: imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz
        for label in sorted((root / "labelsTr").iterdir()) if (root / "labelsTr").is_dir() else []:
            if is_nifti(label):
                stem = nifti_stem(label)
                suffix = label.name[len(stem):]
                pairs.append((root / "imagesTr" / f"{stem}_0000{suffix}", label))
    if not pairs:
        raise PipelineError(f"{root}: no training image/label pairs (dataset.json \"training\" or labelsTr/)")
    cases = []
    for image, label in pairs:
        if not image.is_file():
            alt = image.with_name(image.name.replace(".nii", "_0000.nii", 1))  # MSD lists names without the channel
            image = alt if alt.is_file() else image
        for path in (image, label):
            if not path.is_file():
                raise PipelineError(f"{path}: listed in {root.name} but not found")
        name = safe_name(re.sub(r"_0000$", "", nifti_stem(image)), "case name")
        patient = f"{modality}_{name}"
        cases.append(MsdCase(case=patient, patient=patient, modality=modality, image=image, label=label))
    return cases, meta


def read_pair(case: MsdCase, liver: list[int], declared: dict[int, str]) -> tuple:
    """(image Volume float32, liver label uint8) after the integrity checks, each naming the file(s)."""
    image = read_nifti(case.image)
    label = read_nifti(case.label, dtype=None)
    if image.array.ndim != 3:
        raise PipelineError(f"{case.image}: a 3-D single-channel image expected, got shape {image.array.shape}")
    if image.array.size == 0 or not np.all(np.isfinite(image.array)):
        raise PipelineError(f"{case.image}: image is empty or holds NaN / infinite values")
    return image, liver_mask(on_image_grid(label, image), liver, declared, case.label)


def liver_mask(labels: np.ndarray, liver: list[int], declared, where: Path) -> np.ndarray:
    """uint8 (1 = liver) from a label map whose values must all be declared (integers)."""
    values = np.unique(np.asarray(labels))
    if not np.all(np.equal(np.mod(values, 1), 0)) or not set(values.astype(int).tolist()) <= set(declared):
        raise PipelineError(f"{where}: label values {values.tolist()} outside the declared {sorted(declared)}")
    return np.isin(np.asarray(labels).astype(np.int64), liver).astype(np.uint8)
