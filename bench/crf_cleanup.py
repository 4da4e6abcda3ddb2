#!/usr/bin/env python
"""A 3D clean-up that uses the image, measured: mean-field CRF iterations on the fused liver
probability on the source grid, against the same probability thresholded as infer does.

    python bench/crf_cleanup.py --run-dir RUN [--run-dir RUN2] --data PREPARED [--weights 1,3] [--theta-intensity 0.05,0.1] [--grid model]

Every validation patient of every fold is segmented by its own fold's models (last checkpoint), the
runs' probabilities averaged on the source grid (infer's fusion), then for each (weight, intensity
width) the CRF below runs and the result goes through infer's post-processing (largest component).
`--grid model` refines instead the axial probability on the model's grid with the network's own
input image, before infer's inversion of
the mask (one run of one view only): where an infer option would put it, at a bounded cost.
Printed: Dice per patient for the plain probability and every variant, the mean and how many patients
each variant raises; a JSON line at the end.

The CRF is infer's (pipeline/model/crf.py, `infer.crf_weight`) with the widths and window given here;
on the source grid the intensities are the volume's 1-99 percentile range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from pipeline.evaluate.metrics import dice
from pipeline.infer.segment import Stages, view_parts
from pipeline.model import crf as crf_module
from pipeline.model.crf import crf_refine
from pipeline.model.inversion import probability_on_source_grid, views_mask_on_source_grid
from pipeline.model.postprocess import postprocess

from cv_models import add_run_arguments, validation_cases  # beside this file


def crf(probs: np.ndarray, image: np.ndarray, spacing, weight: float, theta_mm: float, theta_i: float,
        iterations: int, radius: int) -> np.ndarray:
    """pipeline.model.crf.crf_refine (infer's) on numpy arrays."""
    return crf_refine(torch.from_numpy(probs), torch.from_numpy(image.astype(np.float32)), list(spacing), weight,
                      iterations, radius, theta_mm, theta_i).numpy()


def normalised(array: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(array, [1, 99])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(ap)
    ap.add_argument("--weights", default="1,3", help="comma-separated CRF weights (logit units)")
    ap.add_argument("--theta-intensity", default="0.05,0.1", help="comma-separated intensity widths")
    ap.add_argument("--theta-mm", type=float, default=crf_module.THETA_MM, help="spatial width of the kernel (mm)")
    ap.add_argument("--radius", type=int, default=crf_module.RADIUS, help="in-plane window radius (voxels)")
    ap.add_argument("--iterations", type=int, default=crf_module.ITERATIONS)
    ap.add_argument("--grid", choices=["source", "model"], default="source",
                    help="refine on the source grid (fused probability) or on the model's grid (one axial run)")
    args = ap.parse_args()
    args.overrides = ["infer.crf_weight=0", *args.overrides]  # "plain" is the network's; the variants add the CRF
    torch.set_num_threads(1)
    variants = [(float(w), float(t)) for w in args.weights.split(",") for t in args.theta_intensity.split(",")]
    names = ["plain"] + [f"w{w:g} ti{t:g}" for w, t in variants]
    rows, seconds = [], []
    print("patient  " + "  ".join(f"{n:>12}" for n in names), flush=True)
    for case in validation_cases(args):
        shape = case.image.array.shape
        infer = case.run.cfg.infer
        with torch.inference_mode():
            predicted = [view_parts(m, case.image, case.entry["modality"], Stages()) for m in case.run.members]
        if args.grid == "model":
            if len(predicted) != 1 or len(predicted[0][0]) != 1:
                raise SystemExit("--grid model: one run of one view only")
            part = predicted[0][0][0]
            probs = np.asarray(part.probs[0], dtype=np.float32)
            image = np.asarray(part.image[case.run.cfg.model.context_slices], dtype=np.float32)  # as infer's
            spacing = crf_module.grid_spacing(part.image)

            def threshold(refined: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return views_mask_on_source_grid([part._replace(probs=torch.from_numpy(refined)[None])], shape)
        else:
            with torch.inference_mode():
                probs = sum(probability_on_source_grid(parts, shape) for parts, _, _ in predicted) / len(predicted)
            spacing = np.linalg.norm(case.image.affine[:3, :3], axis=0)
            image = normalised(case.image.array)

            def threshold(refined: np.ndarray) -> np.ndarray:
                return refined >= 0.5
        scores = []
        for variant in [None, *variants]:
            t0 = time.perf_counter()
            refined = probs if variant is None else crf(probs, image, spacing, variant[0], args.theta_mm,
                                                        variant[1], args.iterations, args.radius)
            if variant is not None:
                seconds.append(time.perf_counter() - t0)
            mask = postprocess(threshold(refined), infer.largest_component, infer.fill_holes)
            scores.append(float(dice(mask > 0, case.liver)))
        rows.append({"patient": case.entry["case"], "dice": dict(zip(names, scores))})
        print(f"{case.entry['case']:<8} " + "  ".join(f"{s:12.4f}" for s in scores), flush=True)
    print("mean     " + "  ".join(f"{statistics.mean(r['dice'][n] for r in rows):12.4f}" for n in names))
    print("raised   " + "  ".join(f"{sum(r['dice'][n] > r['dice']['plain'] for r in rows):>12}" for n in names))
    print(f"CRF seconds per case and variant (one thread): median {statistics.median(seconds or [0]):.3f}, "
          f"max {max(seconds or [0]):.3f}")
    print(json.dumps({"variants": names, "rows": rows}))


if __name__ == "__main__":
    main()
