#!/usr/bin/env python
"""Inference cost and quality on real CHAOS series, measured side by side in one run.

    python bench/bench_infer.py --run-dir RUN_DIR [--data ../shared/data/chaos-real] [--repeats 3] [--json OUT.json]

Speed (the issue's target: end-to-end <= 1.3x the bare model forward):
  e2e   = segment_case: DICOM read -> transforms -> fold-ensemble prediction -> inversion ->
          post-processing -> mask NIfTI written (montage off; reading the Ground for the Dice
          comes after and is not counted), median seconds over repeats,
          with the median seconds of each stage beside it;
  bare  = the same models' forward passes alone over the same preprocessed slices, in batches of
          infer.batch_size, same autocast, tensors already in memory;
  ratio = e2e / bare. The header names the run's pixel-spacing mode (the preprocessing path).
Throughput: every series of the data as one `infer` run (segment_case in turn), alternated with the bare
forward passes of all of them; seconds per series = wall time / series.
Masks: every series' mask from infer's path against the reference path (MONAI's Orientationd, Spacingd,
ResizeWithPadOrCropd, then the full Invertd and the threshold): identical voxels, or Dice.
The command: `run.py infer` over every series in a child process: wall seconds and its peak RSS.
The process is tuned as the infer command tunes it (pipeline.app.cli.tune_process_for_inference).
Quality (when the run has fold_<k>/split.json): every validation patient is segmented by its own
fold's model, and Dice is reported with/without post-processing and with amp off vs bf16, so the
defaults (infer.largest_component, infer.fill_holes, infer.amp) can be checked on held-out data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.app.cli import tune_process_for_inference
from pipeline.core import runs
from pipeline.core.config import pixel_spacing_mm
from pipeline.core.device import autocast_context
from pipeline.core.labels import LIVER
from pipeline.datasets.chaos import find_cases
from pipeline.evaluate.metrics import dice
from pipeline.infer.inference import segment_case
from pipeline.infer.inputs import chaos_case
from pipeline.infer.loaded import load_run
from pipeline.infer.segment import Stages, network_probs, predict_case, preprocess_case, segment_volume
from pipeline.model.inversion import liver_on_source_grid
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


def spacing_mode(run) -> str:
    spacing = pixel_spacing_mm(run.cfg.train)
    return f"pixel spacing {spacing:g} mm" if spacing > 0 else f"slices resized to roi {run.cfg.train.roi_size}"


def speed(run, cases, repeats: int, report: dict) -> None:
    print(f"\nspeed ({len(run.models)} model(s), batch {run.cfg.infer.batch_size}, amp {run.cfg.infer.amp}, "
          f"{torch.get_num_threads()} threads, {spacing_mode(run)})")
    stages = ("read", "preprocess", "network", "crf", "invert", "postprocess", "write")
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
            report["speed"].append({"case": case.case, "modality": geom.modality, "slices": int(volume.shape[2]),
                                    "e2e_s": e2e, "bare_s": bare, "ratio": e2e_s / bare_s, "stages_s": med})
            print(f"{case.case:<16}{volume.shape[2]:>7}{e2e_s:>9.2f}{bare_s:>9.2f}{e2e_s / bare_s:>8.2f}   "
                  + " ".join(f"{med[s]:>11.3f}" for s in stages))
    for modality, rows in ratios.items():
        if rows:
            print(f"{modality}: median {statistics.median(r[0] for r in rows):.2f} s per series, "
                  f"median ratio e2e/bare {statistics.median(r[1] for r in rows):.2f}")
            report["summary"][modality] = {"seconds": statistics.median(r[0] for r in rows),
                                           "ratio": statistics.median(r[1] for r in rows)}


def masks(run, cases, report: dict) -> None:
    """infer's mask of every series against the reference path's (MONAI's steps, full Invertd, threshold)."""
    print(f"\nmasks: infer's path against the reference (MONAI steps + full inversion), {len(cases)} series")
    with torch.inference_mode():
        for case in cases:
            vol = case.load()
            seg = segment_volume(run, vol, vol.modality, case.case)
            pre, image = preprocess_case(run, vol.array, vol.affine, vol.modality, reference=True)
            raw = liver_on_source_grid(network_probs(run, image, Stages()), image, pre, vol.array.shape) >= 0.5
            ref = postprocess(raw, run.cfg.infer.largest_component, run.cfg.infer.fill_holes)
            differ = int(np.count_nonzero((seg.mask > 0) != (ref > 0)))
            d = dice(seg.mask > 0, ref > 0)
            report["masks"].append({"case": case.case, "voxels_differ": differ, "liver_voxels": int(np.count_nonzero(ref)),
                                    "dice": d})
            print(f"{case.case:<16} {'identical' if differ == 0 else f'{differ} voxels differ, Dice {d:.6f}'}")


# The child reports its own peak from /proc (VmHWM: the high-water mark of its memory since exec).
# getrusage's ru_maxrss would not do: a child forked from this process carries the parent's resident
# size into it before exec.
_CHILD = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print("VmHWM_kB", hwm[0] if hwm else "nan", file=sys.stderr)
sys.exit(code)
"""


def command(run_dir: Path, data: Path, report: dict) -> None:
    """`run.py infer` over every series of `data` in a child process: its wall time and peak resident memory."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).resolve().parents[1] / "run.py"), "infer",
                              "--run-dir", str(run_dir), "--input", str(data), "--out", tmp, "-q",
                              "--set", "infer.montage=false"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peaks = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("VmHWM_kB")]
    if res.returncode != 0 or not peaks:
        print(f"\ninfer command failed: {res.stderr.strip()[-500:]}")
        return
    peak = float(peaks[-1]) / 1024
    n = len(find_cases(data))
    report["command"] = {"series": n, "wall_s": wall, "peak_rss_mb": peak}
    print(f"\nrun.py infer over {n} series: {wall:.1f} s ({wall / n:.2f} s per series with start-up), peak RSS {peak:.0f} MB")


def throughput(run, cases, repeats: int, report: dict) -> None:
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
    report["throughput"] = {"series": len(cases), "walls_s": walls, "bare_s": bare, "infer_s_per_series": infer_s,
                            "bare_s_per_series": bare_s, "ratio": infer_s / bare_s}


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
    ap.add_argument("--no-masks", action="store_true")
    ap.add_argument("--no-command", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the speed part, e.g. infer.amp=bf16")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"error: {args.data}: real CHAOS data not found")
    run = load_run(args.run, None, ["infer.montage=false", *args.overrides])
    tune_process_for_inference()  # as `run.py infer` does, once the run is loaded
    sources = find_cases(args.data)
    picked = [s for s in sources if s.modality == "CT"] + [s for s in sources if s.modality == "MR"][: args.max_mr]
    report = {"run": str(args.run), "mode": spacing_mode(run), "models": len(run.models), "amp": run.cfg.infer.amp,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "speed": [], "summary": {}, "masks": []}
    speed(run, [chaos_case(s) for s in picked], args.repeats, report)
    if not args.no_throughput:
        throughput(run, [chaos_case(s) for s in sources], args.repeats, report)
    if not args.no_masks:
        masks(run, [chaos_case(s) for s in sources], report)
    if not args.no_quality:
        quality(args.run, args.data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["bench_peak_rss_mb"] = peak
    print(f"\npeak RSS of this bench process {peak:.0f} MB")
    if not args.no_command:
        command(args.run, args.data, report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
