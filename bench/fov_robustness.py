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
original scans and other scanners give. `--off-centre` puts all the padding before the image on both
in-plane axes, so the patient lies at one corner of the wider picture (a patient off the scanner's
centre, or a field of view moved aside).

`--set train.pixel_spacing=2.0` (any config key) changes how RUN's models are fed: e.g. a run trained
with slices resized to the roi, fed resampled to its training scale instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from pipeline.evaluate.metrics import dice
from pipeline.infer.qc import cropped_liver

from cv_models import add_run_arguments, segment, validation_cases  # beside this file


def widen(volume: np.ndarray, affine: np.ndarray, factor: float, off_centre: bool = False
          ) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The volume padded on both in-plane axes to `factor` times their size (half before and half after
    the image, or all of it before with `off_centre`), the affine moved so that every voxel keeps its
    position in the patient; returns (volume, affine, the np.pad widths)."""
    pad = int(round(max(volume.shape[0], volume.shape[1]) * (factor - 1) / 2))
    side = (2 * pad, 0) if off_centre else (pad, pad)
    widths = (side, side, (0, 0))
    wide = np.pad(volume, widths, constant_values=float(volume.min()))
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([-side[0], -side[0], 0.0]) + affine[:3, 3]
    return wide, moved, widths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--factors", default="1,1.25,1.5", help="fields of view, as multiples of the original's")
    ap.add_argument("--off-centre", action="store_true", help="the padding all on one side: the patient at a corner")
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    if any(f < 1 for f in factors):
        ap.error("--factors: each factor must be >= 1 (a wider field of view)")
    scores: dict[float, dict[str, float]] = {f: {} for f in factors}
    flagged: dict[float, list[str]] = {f: [] for f in factors}  # infer's QC: liver at the cut edge of the view
    for case in validation_cases(args):
        patient = case.entry["patient"]
        for factor in factors:
            volume, affine, widths = widen(case.image.array, case.image.affine, factor, args.off_centre)
            seg = segment(case, volume, affine)
            if cropped_liver(case.run, seg.probs, volume.shape, affine):
                flagged[factor].append(patient)
            scores[factor][patient] = float(dice(seg.mask > 0, np.pad(case.liver, widths)))  # liver in the padding: false
    base = statistics.mean(scores[factors[0]].values())
    print(f"{'field of view':<16}{'mean Dice':>10}{'vs ' + format(factors[0], 'g') + 'x':>9}{'min':>8}"
          f"{'cut-edge flags':>16}  per patient" + ("  (off centre)" if args.off_centre else ""))
    for factor, per in scores.items():
        values = list(per.values())
        print(f"{format(factor, 'g') + 'x':<16}{statistics.mean(values):>10.4f}{statistics.mean(values) - base:>+9.4f}"
              f"{min(values):>8.4f}{len(flagged[factor]):>16}  " + " ".join(f"{p} {d:.3f}" for p, d in per.items())
              + (f"  (flagged: {', '.join(flagged[factor])})" if flagged[factor] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
