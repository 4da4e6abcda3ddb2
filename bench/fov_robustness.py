#!/usr/bin/env python
"""Field-of-view robustness: cross-validation models scored on their own validation patients as a
scanner with a wider field of view would show them, beside the unperturbed score.

    python bench/fov_robustness.py --run-dir RUN --data PREPARED [--factors 1,1.25,1.5] [--set KEY=VALUE]

RUN is a run folder with fold_<k>/ trained on PREPARED's folds (e.g. one configuration's folder of
`run.py compare`). Each validation patient's image is padded in-plane with its lowest intensity to
FACTOR times its field of view (same pixel spacing, same anatomy: the body smaller in the picture,
as on a scanner set to a wider field of view), its affine moved with it, segmented by its own fold's
model (the checkpoint that was not chosen on it: last, by default) through infer's own steps, and
scored against the prepared label, padded alike (largest component kept, as infer does). "cut-edge
flags": cases wider than the network's view at the run's pixel spacing whose liver reaches the cut
edge (infer's QC flag). The CHAOS paper gives 1.36-1.89 mm pixels on 256 matrices for its MR (about
350-480 mm across); the shared 12 were resampled to 320 mm, so factors 1.1-1.5 are what the
original scans and other scanners give.

`--set train.pixel_spacing=2.0` (any config key) changes how RUN's models are fed: e.g. a run trained
with slices resized to the roi, fed resampled to its training scale instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runs  # noqa: E402
from pipeline.datalist import read_datalist  # noqa: E402
from pipeline.infer import (Stages, cropped_liver, liver_on_source_grid, load_run, network_probs,  # noqa: E402
                            preprocess_case)
from pipeline.labels import LIVER  # noqa: E402
from pipeline.metrics import dice  # noqa: E402
from pipeline.postprocess import postprocess  # noqa: E402
from pipeline.volume import read_nifti  # noqa: E402


def widen(volume: np.ndarray, affine: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The volume padded on both in-plane axes to `factor` times their size, the affine moved so that
    every voxel keeps its position in the patient; returns (volume, affine, pad per side)."""
    pad = int(round(max(volume.shape[0], volume.shape[1]) * (factor - 1) / 2))
    wide = np.pad(volume, ((pad, pad), (pad, pad), (0, 0)), constant_values=float(volume.min()))
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([-pad, -pad, 0.0]) + affine[:3, 3]
    return wide, moved, pad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared folder the run was trained on")
    ap.add_argument("--checkpoint", default="last", choices=["best", "last"])
    ap.add_argument("--factors", default="1,1.25,1.5", help="fields of view, as multiples of the original's")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    if any(f < 1 for f in factors):
        ap.error("--factors: each factor must be >= 1 (a wider field of view)")
    datalist = read_datalist(args.data)
    scores: dict[float, dict[str, float]] = {f: {} for f in factors}
    flagged: dict[float, list[str]] = {f: [] for f in factors}  # infer's QC: liver at the cut edge of the view
    for fold, _ in runs.fold_dirs(args.run):
        run = load_run(args.run, str(fold), [f"infer.checkpoint={args.checkpoint}", "infer.amp=off", *args.overrides])
        _, val = datalist.split(fold)
        for entry in val:
            image, label = read_nifti(entry["image"]), read_nifti(entry["label"], dtype=None).array
            array = image.array.astype(np.float32)
            for factor in factors:
                volume, affine, pad = widen(array, image.affine, factor)
                with torch.inference_mode():  # infer's own steps
                    pre, model_input = preprocess_case(run, volume, affine, entry["modality"])
                    model_probs = network_probs(run, model_input, Stages())
                    probs = liver_on_source_grid(model_probs, model_input, pre, volume.shape, Stages())
                if cropped_liver(run, model_probs, volume.shape, affine):
                    flagged[factor].append(entry["patient"])
                mask = postprocess(probs >= 0.5, run.cfg.infer.largest_component, run.cfg.infer.fill_holes)
                truth = np.pad(label == LIVER, ((pad, pad), (pad, pad), (0, 0)))  # liver in the padding: false
                scores[factor][entry["patient"]] = float(dice(mask > 0, truth))
    base = statistics.mean(scores[factors[0]].values())
    print(f"{'field of view':<16}{'mean Dice':>10}{'vs ' + format(factors[0], 'g') + 'x':>9}{'min':>8}"
          f"{'cut-edge flags':>16}  per patient")
    for factor, per in scores.items():
        values = list(per.values())
        print(f"{format(factor, 'g') + 'x':<16}{statistics.mean(values):>10.4f}{statistics.mean(values) - base:>+9.4f}"
              f"{min(values):>8.4f}{len(flagged[factor]):>16}  " + " ".join(f"{p} {d:.3f}" for p, d in per.items())
              + (f"  (flagged: {', '.join(flagged[factor])})" if flagged[factor] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
