#!/usr/bin/env python
"""PyTorch (bf16 and float32) against ONNX Runtime for the fold ensemble's forward passes, on real
CHAOS series, measured side by side in one run.

    python bench/bench_onnx.py --run-dir RUN_DIR [--data ../shared/data/chaos-real] [--repeats 5] [--max-mr 3]

Per series: the run's networks (every fold) over the series' preprocessed slices, in batches of
infer.batch_size, with (a) PyTorch under bf16 autocast, (b) PyTorch in float32, (c) ONNX Runtime
(CPU provider, as many threads as torch uses) on the networks `run.py export --format onnx` writes.
The three are alternated within each repeat; medians, and every run's ratio, are printed. The masks:
the ensemble's liver probability >= 0.5 on the model's grid from each engine, Dice against float32
PyTorch, so "same masks" is a number.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.device import autocast_context
from pipeline.core.labels import LIVER
from pipeline.datasets.chaos import find_cases
from pipeline.evaluate.metrics import dice
from pipeline.infer.inputs import chaos_case
from pipeline.infer.loaded import load_run
from pipeline.infer.segment import preprocess_case
from pipeline.model.predict import as_slices
from pipeline.outputs.export import export_run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chaos-real"


def torch_probs(models, slices: torch.Tensor, bs: int, amp: str) -> np.ndarray:
    total = torch.zeros(slices.shape[0], *slices.shape[2:])
    with torch.inference_mode(), autocast_context(torch.device("cpu"), amp):
        for model in models:
            for i in range(0, slices.shape[0], bs):
                logits = model(slices[i:i + bs]).float()
                total[i:i + bs] += torch.sigmoid(logits[:, LIVER] - logits[:, 0])
    return (total / len(models)).numpy()


def ort_probs(sessions, slices: np.ndarray, bs: int) -> np.ndarray:
    total = np.zeros((slices.shape[0], *slices.shape[2:]), np.float32)
    for session in sessions:
        for i in range(0, slices.shape[0], bs):
            logits = session.run(None, {"image": slices[i:i + bs]})[0]
            total[i:i + bs] += 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, LIVER]))
    return total / len(sessions)


def main() -> None:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-mr", type=int, default=3)
    args = ap.parse_args()

    run = load_run(args.run, None, ["infer.montage=false"])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        out = export_run(args.run, Path(tmp) / "onnx", "onnx", which=run.cfg.infer.checkpoint)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions = [onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for p in sorted(out.glob("fold_*.onnx"))]
    cases = [chaos_case(s) for s in find_cases(args.data)]
    cases = [c for c in cases if c.modality == "CT"] + [c for c in cases if c.modality == "MR"][:args.max_mr]
    bs = run.cfg.infer.batch_size
    print(f"{len(run.models)} model(s), batch {bs}, {threads} threads, onnxruntime {onnxruntime.__version__}, "
          f"{args.repeats} repeats (medians; every repeat's ratio listed)")
    print(f"{'case':<16}{'slices':>7}{'torch bf16 s':>13}{'torch fp32 s':>13}{'ort s':>8}"
          f"{'ort/bf16':>9}{'ort/fp32':>9}{'Dice bf16':>10}{'Dice ort':>9}   ort/bf16 per repeat")
    summary = {"CT": [], "MR": []}
    for case in cases:
        vol = case.load()
        _, image = preprocess_case(run, vol.array, vol.affine, vol.modality)
        slices = as_slices(image)
        slices_np = slices.numpy()
        times = {"bf16": [], "fp32": [], "ort": []}
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                if name == "ort":
                    probs_ort = ort_probs(sessions, slices_np, bs)
                else:
                    probs = torch_probs(run.models, slices, bs, "bf16" if name == "bf16" else "off")
                    if name == "bf16":
                        probs_bf16 = probs
                    else:
                        probs_fp32 = probs
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = probs_fp32 >= 0.5
        per_repeat = " ".join(f"{o / b:.2f}" for o, b in zip(times["ort"], times["bf16"]))
        print(f"{case.case:<16}{slices.shape[0]:>7}{med['bf16']:>13.3f}{med['fp32']:>13.3f}{med['ort']:>8.3f}"
              f"{med['ort'] / med['bf16']:>9.2f}{med['ort'] / med['fp32']:>9.2f}"
              f"{dice(probs_bf16 >= 0.5, ref):>10.4f}{dice(probs_ort >= 0.5, ref):>9.4f}   {per_repeat}")
        summary[vol.modality].append((med["ort"] / med["bf16"], med["ort"] / med["fp32"]))
    for modality, rows in summary.items():
        if rows:
            print(f"{modality}: median ort/bf16 {statistics.median(r[0] for r in rows):.2f}, "
                  f"ort/fp32 {statistics.median(r[1] for r in rows):.2f}")


if __name__ == "__main__":
    main()
