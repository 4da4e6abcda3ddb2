"""The prepared data set's datalist.json: read and checked in one place, split by fold.

Written by `prepare` in MONAI's decathlon format: {"labels", "numFolds", "training": [{"image",
"label", "case", "patient", "modality", "sequence", "fold"}, ...]} with paths relative to the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError

FILE_NAME = "datalist.json"
REQUIRED = ("image", "label", "case", "patient", "modality", "fold")
MODALITIES = ("CT", "MR")


@dataclass
class Datalist:
    path: Path  # the datalist.json read
    entries: list[dict]  # "image" and "label" as absolute paths
    labels: dict  # {"0": "background", "1": "liver", ...}
    num_folds: int

    @property
    def folder(self) -> Path:
        return self.path.parent

    def select(self, patients=None, sequences=None) -> list[dict]:
        """Entries of the given patients and sequences (None: all)."""
        return [e for e in self.entries if (not patients or e["patient"] in patients)
                and (not sequences or e.get("sequence") in sequences)]

    def split(self, fold: int) -> tuple[list[dict], list[dict]]:
        """(training, validation) entries of `fold`: whole patients, as prepare assigned them."""
        train = [e for e in self.entries if int(e["fold"]) != fold]
        val = [e for e in self.entries if int(e["fold"]) == fold]
        if not train or not val:
            raise PipelineError(f"{self.path}: fold {fold} leaves {len(train)} training and {len(val)} "
                                "validation cases; both must be non-empty")
        return train, val

    def patients(self, fold: int) -> list[str]:
        """The patients of `fold`, sorted."""
        return sorted({e["patient"] for e in self.entries if int(e["fold"]) == fold})

    def parse_folds(self, fold: str | int) -> list[int]:
        """"all" -> every fold; "k" or "j,k" -> those folds, checked against numFolds."""
        if str(fold) == "all":
            return list(range(self.num_folds))
        try:
            chosen = [int(k) for k in str(fold).split(",")]
        except ValueError:
            raise PipelineError(f"--fold: expected a fold number or 'all', got {fold!r}") from None
        for k in chosen:
            if not 0 <= k < self.num_folds:
                raise PipelineError(f"--fold {k}: {self.path} has folds 0..{self.num_folds - 1}")
        return chosen


def read_datalist(path: str | Path) -> Datalist:
    """datalist.json (or the prepared folder holding it), checked: every entry has the keys train
    and infer use, a known modality, and image and label files that exist."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run `python run.py prepare` first)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list) or not raw["training"]:
        raise PipelineError(f"{path}: not a datalist with a non-empty 'training' list")
    for e in raw["training"]:
        missing = [k for k in REQUIRED if not isinstance(e, dict) or k not in e]
        if missing:
            name = e.get("case", e.get("image")) if isinstance(e, dict) else e
            raise PipelineError(f"{path}: entry {name!r} lacks {missing}")
        if e["modality"] not in MODALITIES:
            raise PipelineError(f"{path}: entry {e['case']!r} has modality {e['modality']!r}, expected CT or MR")
        if not isinstance(e["fold"], int) or isinstance(e["fold"], bool) or e["fold"] < 0:
            raise PipelineError(f"{path}: entry {e['case']!r} has fold {e['fold']!r}, expected a number >= 0")
    entries = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training", base_dir=path.parent)
    for e in entries:
        for key in ("image", "label"):
            if not Path(e[key]).is_file():
                raise PipelineError(f"{e[key]}: listed in {path} but not found")
    num_folds = int(raw.get("numFolds", max(e["fold"] for e in entries) + 1))
    return Datalist(path, entries, raw.get("labels", {}), num_folds)
