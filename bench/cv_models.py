"""What the robustness benches share: a cross-validation run's models, each on its own fold's
validation patients, through infer's own steps.

    from cv_models import add_run_arguments, segment, validation_cases

`add_run_arguments` gives a bench --run-dir, --data, --checkpoint (last by default: the checkpoint
that was not chosen on the validation patients) and --set; `validation_cases(args)` yields each
validation patient with its fold's loaded run; `segment` is infer's preprocessing, network and
segmentation (segment_volume) of a volume the bench has changed (padded, remapped).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.core import runs
from pipeline.core.labels import LIVER
from pipeline.datasets.datalist import read_datalist
from pipeline.dicom.volume import Volume, read_nifti
from pipeline.infer.loaded import LoadedRun, load_runs
from pipeline.infer.segment import Segmentation, segment_volume


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True, action="append",
                    help="a cross-validation run folder; repeat it to fuse runs trained on the same folds")
    ap.add_argument("--data", type=Path, required=True, help="prepared folder the run was trained on")
    ap.add_argument("--checkpoint", default="last", choices=["best", "last"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


@dataclass
class Case:
    run: LoadedRun  # the fold's model(s), with the bench's --set overrides
    entry: dict  # the datalist entry (case, patient, modality, image, label)
    image: Volume  # the prepared image
    label: np.ndarray  # the prepared organ map

    @property
    def liver(self) -> np.ndarray:
        return self.label == LIVER


def validation_cases(args: argparse.Namespace) -> Iterator[Case]:
    """Every validation patient of every fold of args.run (one run folder, or several fused: their
    folds must hold the same patients), with its own fold's loaded run(s)."""
    datalist = read_datalist(args.data)
    for fold, _ in runs.fold_dirs(args.run[0]):
        run = load_runs(args.run, str(fold), [f"infer.checkpoint={args.checkpoint}", "infer.amp=off", *args.overrides])
        _, val = datalist.split(fold)
        for entry in val:
            yield Case(run, entry, read_nifti(entry["image"]), read_nifti(entry["label"], dtype=None).array)


def segment(case: Case, volume: np.ndarray, affine: np.ndarray) -> Segmentation:
    """`volume` (the case's image changed by the bench: padded, remapped) on `affine`'s grid through
    infer's own path (segment_volume) with the case's fold run: the mask, its probabilities on the
    model grid and infer's quality check."""
    return segment_volume(case.run, Volume(volume.astype(np.float32), affine, Path(case.entry["image"])),
                          case.entry["modality"], case.entry["case"])
