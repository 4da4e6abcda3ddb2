"""What the robustness benches share: a cross-validation run's models, each on its own fold's
validation patients, through infer's own steps.

    from cv_models import add_run_arguments, segment, validation_cases

`add_run_arguments` gives a bench --run-dir, --data, --checkpoint (last by default: the checkpoint
that was not chosen on the validation patients) and --set; `validation_cases(args)` yields each
validation patient with its fold's loaded run; `segment` is infer's preprocessing, network and
inversion for a volume the bench has changed (padded, remapped), post-processed as infer does.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runs  # noqa: E402
from pipeline.datalist import read_datalist  # noqa: E402
from pipeline.infer import (LoadedRun, Stages, liver_on_source_grid, load_run, network_probs,  # noqa: E402
                            preprocess_case)
from pipeline.labels import LIVER  # noqa: E402
from pipeline.postprocess import postprocess  # noqa: E402
from pipeline.volume import Volume, read_nifti  # noqa: E402


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True)
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
    """Every validation patient of every fold of args.run, with its own fold's loaded run."""
    datalist = read_datalist(args.data)
    for fold, _ in runs.fold_dirs(args.run):
        run = load_run(args.run, str(fold), [f"infer.checkpoint={args.checkpoint}", "infer.amp=off", *args.overrides])
        _, val = datalist.split(fold)
        for entry in val:
            yield Case(run, entry, read_nifti(entry["image"]), read_nifti(entry["label"], dtype=None).array)


def segment(case: Case, volume: np.ndarray, affine: np.ndarray, confidences: list | None = None
            ) -> tuple[np.ndarray, object]:
    """(post-processed mask on `volume`'s grid, the network's probabilities on the model grid) of
    `volume` through infer's steps with the case's run; each model's confidence appended to
    `confidences` when given (as infer gathers it)."""
    run = case.run
    with torch.inference_mode():
        pre, model_input = preprocess_case(run, volume.astype(np.float32), affine, case.entry["modality"])
        model_probs = network_probs(run, model_input, Stages(), model_confidences=confidences)
        probs = liver_on_source_grid(model_probs, model_input, pre, volume.shape, Stages())
    return postprocess(probs >= 0.5, run.cfg.infer.largest_component, run.cfg.infer.fill_holes), model_probs
