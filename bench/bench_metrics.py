#!/usr/bin/env python
"""Time the CHAOS surface metrics on a CT-sized volume (512x512x100) against MONAI's own calls.

Prints seconds per call (median of repeats) for pipeline.evaluate.metrics.chaos_metrics (all metrics,
one distance computation) and for MONAI compute_average_surface_distance +
compute_hausdorff_distance (x2: max and 95th percentile) on the same masks, and their ratio.
Run from the repository root: `python bench/bench_metrics.py` (after `pip install -e .`).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluate.metrics import chaos_metrics

from timing import median_time


def ellipsoid(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0




def main() -> None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    shape, spacing = (512, 512, 100), (0.7, 0.7, 2.0)
    ref = ellipsoid(shape, (250, 220, 50), (140, 110, 35))  # liver-sized: ~ 200 x 150 x 140 mm
    pred = ellipsoid(shape, (254, 218, 51), (136, 114, 33))
    ours = median_time(lambda: chaos_metrics(pred, ref, spacing))
    p, r = torch.as_tensor(pred)[None, None], torch.as_tensor(ref)[None, None]
    kw = dict(include_background=True, spacing=spacing)

    def monai_all():
        compute_average_surface_distance(p, r, symmetric=True, **kw)
        compute_hausdorff_distance(p, r, **kw)
        compute_hausdorff_distance(p, r, percentile=95, **kw)

    theirs = median_time(monai_all)
    m = chaos_metrics(pred, ref, spacing)
    print(f"volume {shape}, liver-like ellipsoid {ref.sum() * np.prod(spacing) / 1000:.0f} ml")
    print(f"metrics: dice {m['dice']:.4f} assd {m['assd_mm']:.3f} mm mssd {m['mssd_mm']:.3f} mm score {m['score']:.2f}")
    print(f"pipeline.evaluate.metrics.chaos_metrics: {ours:.2f} s")
    print(f"MONAI ASSD + HD + HD95:         {theirs:.2f} s")
    print(f"ratio ours / MONAI:             {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
