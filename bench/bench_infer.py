#!/usr/bin/env python
"""Inference cost and quality on real CHAOS series, measured side by side in one run.

    python bench/bench_infer.py --run-dir RUN_DIR [--data ../shared/data/chaos-real] [--repeats 3]

Speed (the issue's target: end-to-end <= 1.3x the bare model forward):
  e2e   = segment_case: DICOM read -> transforms -> fold-ensemble prediction -> inversion ->
          post-processing -> mask NIfTI written (montage off; reading the Ground for the Dice
          comes after and is not counted), median seconds over repeats,
          with the median seconds of each stage beside it;
  bare  = the same models' forward passes alone over the same preprocessed slices, in batches of
          infer.batch_size, same autocast, tensors already in memory;
  ratio = e2e / bare. Peak RSS of the process is printed at the end.
Throughput: every series of the data as one `infer` run (segment_case in turn), alternated with the bare
forward passes of all of them; seconds per series = wall time / series.
Quality (when the run has fold_<k>/split.json): every validation patient is segmented by its own
fold's model, and Dice is reported with/without post-processing and with amp off vs bf16, so the
defaults (infer.largest_component, infer.fill_holes, infer.amp) can be checked on held-out data.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core import runs
from pipeline.core.device import autocast_context
from pipeline.core.labels import LIVER
from pipeline.datasets.chaos import find_cases
from pipeline.evaluate.metrics import dice
from pipeline.infer.inference import segment_case
from pipeline.infer.inputs import chaos_case
from pipeline.infer.loaded import load_run
from pipeline.infer.segment import predict_case, preprocess_case
from pipeline.model.postprocess import postprocess
from pipeline.model.predict import as_slices

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chaos-real"


def bare_forward(run, volume: np.ndarray, affine: np.ndarray, modality: str) -> float:
    """Seconds for the models' forward passes over every slice (preprocessing done beforehand)."""
    _, img = preprocess_case(run, volume, affine, modality)
    slices = as_slices(img).to(run.device)  # (D, C, H, W), as predict_volume batches them
    bs = run.cfg.infer.batch_size
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast_context(run.device, run.cfg.infer.amp):
        for model in run.models:
            for i in range(0, slices.shape[0], bs):
                model(slices[i:i + bs])
    return time.perf_counter() - t0


def speed(run, cases, repeats: int) -> None:
    print(f"\nspeed ({len(run.models)} model(s), batch {run.cfg.infer.batch_size}, amp {run.cfg.infer.amp}, "
          f"{torch.get_num_threads()} threads)")
    stages = ("read", "preprocess", "network", "invert", "postprocess", "write")
    print(f"{'case':<16}{'slices':>7}{'e2e s':>9}{'bare s':>9}{'ratio':>8}   " + " ".join(f"{s:>11}" for s in stages))
    ratios = {"CT": [], "MR": []}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for case in cases:
            vol = case.load()
            volume, affine, geom = vol.array, vol.affine, vol.geometry
            e2e, bare, parts = [], [], []
            for _ in range(repeats):  # interleaved, so both see the same machine state
                row = segment_case(run, case, Path(tmp))
                e2e.append(row["seconds"])
                parts.append(row["stage_seconds"])
                bare.append(bare_forward(run, volume, affine, geom.modality))
            e2e_s, bare_s = statistics.median(e2e), statistics.median(bare)
            ratios[geom.modality].append((e2e_s, e2e_s / bare_s))
            med = {s: statistics.median(p.get(s, 0.0) for p in parts) for s in stages}
            print(f"{case.case:<16}{volume.shape[2]:>7}{e2e_s:>9.2f}{bare_s:>9.2f}{e2e_s / bare_s:>8.2f}   "
                  + " ".join(f"{med[s]:>11.3f}" for s in stages))
    for modality, rows in ratios.items():
        if rows:
            print(f"{modality}: median {statistics.median(r[0] for r in rows):.2f} s per series, "
                  f"median ratio e2e/bare {statistics.median(r[1] for r in rows):.2f}")


def throughput(run, cases, repeats: int) -> None:
    cases = [dataclasses.replace(c, truth=None) for c in cases]  # masks only: no Ground to read and score
    loaded = [case.load() for case in cases]
    n_ct = sum(v.modality == "CT" for v in loaded)
    print(f"\nthroughput: {len(cases)} series ({n_ct} CT) as one infer run, {repeats} repeats, medians")
    walls, bare = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for case in cases:  # as run_inference does
                segment_case(run, case, Path(tmp))
            walls.append(time.perf_counter() - t0)
            bare.append(sum(bare_forward(run, v.array, v.affine, v.modality) for v in loaded))
    bare_s, infer_s = statistics.median(bare) / len(cases), statistics.median(walls) / len(cases)
    print(f"s per series: infer {infer_s:.3f}, bare forward {bare_s:.3f}, ratio {infer_s / bare_s:.2f}")


def quality(run_dir: Path, data: Path) -> None:
    splits = [(str(k), split) for k, d in runs.fold_dirs(run_dir) if (split := runs.read_split(d)) is not None]
    if not splits:
        print("\nquality: no fold_<k>/split.json in the run, skipped")
        return
    print("\nquality on held-out patients (each by its own fold's model), Dice")
    variants = [("fp32 raw", "off", False, False), ("fp32 +lcc", "off", True, False),
                ("fp32 +lcc+fill", "off", True, True), ("bf16 +lcc+fill", "bf16", True, True)]
    print(f"{'case':<16}" + "".join(f"{v[0]:>16}" for v in variants))
    table = {v[0]: [] for v in variants}
    loaded = {}
    for fold, split in splits:
        val_cases = set(split["val"]["cases"])
        sources = [s for s in find_cases(data) if s.case in val_cases]
        for src in sources:
            case = chaos_case(src)
            vol = case.load()
            volume, affine, geom = vol.array, vol.affine, vol.geometry
            truth = case.truth(vol)
            row = []
            probs = {}
            for name, amp, lcc, fill in variants:
                if amp not in probs:
                    if (fold, amp) not in loaded:  # one checkpoint load per fold and precision
                        loaded[(fold, amp)] = load_run(run_dir, fold, [f"infer.amp={amp}"])
                    run = loaded[(fold, amp)]
                    with torch.inference_mode():
                        probs[amp] = predict_case(run, volume, affine, geom.modality)
                mask = postprocess(probs[amp] >= 0.5, lcc, fill)
                d = dice(mask == LIVER, truth)
                table[name].append(d)
                row.append(d)
            print(f"{case.case:<16}" + "".join(f"{d:>16.4f}" for d in row))
    print(f"{'mean':<16}" + "".join(f"{np.mean(table[v[0]]):>16.4f}" for v in variants))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True, help="trained run folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CHAOS root with real series")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-mr", type=int, default=4, help="MR series in the speed table")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the speed part, e.g. infer.amp=bf16")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"error: {args.data}: real CHAOS data not found")
    run = load_run(args.run, None, ["infer.montage=false", *args.overrides])
    sources = find_cases(args.data)
    picked = [s for s in sources if s.modality == "CT"] + [s for s in sources if s.modality == "MR"][: args.max_mr]
    speed(run, [chaos_case(s) for s in picked], args.repeats)
    if not args.no_throughput:
        throughput(run, [chaos_case(s) for s in sources], args.repeats)
    if not args.no_quality:
        quality(args.run, args.data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
