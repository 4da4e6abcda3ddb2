#!/usr/bin/env python
"""Contrast robustness: cross-validation models scored on their own validation patients under
intensity remappings that real scanners and diseases produce, beside the unperturbed score.

    python bench/contrast_robustness.py --run-dir RUN --data PREPARED [--checkpoint last]

RUN is a run folder with fold_<k>/ trained on PREPARED's folds (e.g. one configuration's folder
of `run.py compare`); every validation patient is segmented by its own fold's model (the checkpoint
that was not chosen on it: last, by default) from the prepared image, remapped before the run's
own normalisation, and scored against the prepared label (largest component kept, as infer does).
The remappings (MR intensities have no unit, so each works on the volume's 1-99 percentile range):
  gamma 0.5 / gamma 2      monotone, brightens / darkens the mid-tones
  compressed contrast      the labelled organs pulled 60% of the way to the median of the other
                           body voxels (low organ contrast; not affine, so the scaling keeps it)
  dark liver and spleen    both organs at 35% of their intensity (iron overload; uses the labels)
  strong bias field        a smooth multiplicative ramp from 0.4 to 1.6 across the body
  inverted                 brightest and darkest exchanged
Per remapping: mean and minimum Dice, patients below 0.5, and how many of those infer's QC flags
(empty mask, liver volume outside infer.qc_liver_ml, or the confidence (predict.mask_confidence) below
the run's threshold, infer.load_run's min_confidence: a single fold's model has no fold agreement), and
how many of the patients at or above 0.8 it flags as well (false alarms). `--set infer.qc_min_confidence=X`
or `--set infer.qc_confidence_margin=X` tries a threshold;
the JSON line at the end holds every case's Dice and confidence, to choose one from.
Target (issue #12): mean within 0.03 of the unperturbed score and no patient below 0.5 unflagged.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from pipeline.core.labels import LIVER
from pipeline.evaluate.metrics import dice

from cv_models import add_run_arguments, segment, validation_cases  # beside this file

SPLEEN = 4  # prepared MR label maps: 1 liver, 2 / 3 kidneys, 4 spleen


def _span(v: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def _gamma(g: float):
    def remap(v, label):
        lo, hi = _span(v)
        x = np.clip((v - lo) / (hi - lo), 0, None)
        return lo + (hi - lo) * x ** g
    return remap


def _compressed(v, label):
    body = v > _span(v)[0]
    ref = float(np.median(v[body & (label == 0)])) if (body & (label == 0)).any() else float(np.median(v))
    out = v.copy()
    organs = label > 0
    out[organs] = ref + 0.4 * (v[organs] - ref)
    return out


def _dark_organs(v, label):
    out = v.copy()
    organs = (label == LIVER) | (label == SPLEEN)
    out[organs] *= 0.35
    return out


def _bias_field(v, label):
    ramp = np.linspace(0.4, 1.6, v.shape[1], dtype=np.float32)  # across the second voxel axis
    return v * ramp[None, :, None]


def _inverted(v, label):
    lo, hi = _span(v)
    return lo + hi - v


REMAPS = {"none": lambda v, label: v, "gamma 0.5": _gamma(0.5), "gamma 2": _gamma(2.0),
          "compressed contrast": _compressed, "dark liver and spleen": _dark_organs,
          "strong bias field": _bias_field, "inverted": _inverted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    args = ap.parse_args()
    scores: dict[str, list[tuple[str, float, list[str], float | None]]] = {name: [] for name in REMAPS}
    for case in validation_cases(args):
        for name, remap in REMAPS.items():
            seg = segment(case, remap(case.image.array, case.label), case.image.affine)
            scores[name].append((case.entry["case"], float(dice(seg.mask > 0, case.liver)), seg.flags, seg.confidence))
    base = statistics.mean(r[1] for r in scores["none"])
    print(f"{'remapping':<24}{'mean Dice':>10}{'vs none':>9}{'min':>8}{'< 0.5':>7}{'flagged':>9}"
          f"{'>= 0.8':>8}{'flagged':>9}")
    for name, rows in scores.items():
        values = [r[1] for r in rows]
        low, good = [r for r in rows if r[1] < 0.5], [r for r in rows if r[1] >= 0.8]
        print(f"{name:<24}{statistics.mean(values):>10.4f}{statistics.mean(values) - base:>+9.4f}{min(values):>8.4f}"
              f"{len(low):>7}{sum(1 for r in low if r[2]):>9}{len(good):>8}{sum(1 for r in good if r[2]):>9}")
    print(json.dumps({name: {case: [round(d, 4), None if c is None else round(c, 4)] for case, d, _, c in rows}
                      for name, rows in scores.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
