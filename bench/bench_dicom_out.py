#!/usr/bin/env python
"""What writing a DICOM SEG or RTSTRUCT adds to a series' end-to-end inference, side by side.

    python bench/bench_dicom_out.py --run-dir RUN_DIR [--data ../shared/data/chaos-real] [--repeats 5]

For each real series (the CT, and the first MR unless --ct-only), `segment_case` (DICOM read ->
mask NIfTI written; montage off) runs with --format nifti, nifti+dicom-seg and nifti+rtstruct in
turn, `repeats` rounds alternating the three, so that all see the same machine load. Prints the
median seconds of each, every run, the seconds of the SEG / RTSTRUCT stage alone, and the added
fraction (target, issue #13: at most +25% on the real CT series).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.datasets.chaos import find_cases
from pipeline.infer.inference import segment_case
from pipeline.infer.inputs import chaos_case
from pipeline.infer.loaded import load_run

FORMATS = {"nifti": "nifti", "+seg": "nifti,dicom-seg", "+rtstruct": "nifti,rtstruct"}
STAGE = {"+seg": "dicom-seg", "+rtstruct": "rtstruct"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/chaos-real")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ct-only", action="store_true")
    args = ap.parse_args()
    run = load_run(args.run, None, ["infer.montage=false"])
    sources = find_cases(args.data)
    cts = [s for s in sources if s.case.startswith("CT")]
    mrs = [s for s in sources if s.case.startswith("MR")]
    chosen = cts[:1] + ([] if args.ct_only else mrs[:1])
    print(f"{len(run.models)} model(s), amp {run.cfg.infer.amp}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds (formats alternating)")
    print(f"{'case':<16}{'format':<11}{'median s':>9}{'stage s':>9}{'added':>8}   every run (s)")
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        for source in chosen:
            case = chaos_case(source)
            segment_case(run, case, Path(tmp), FORMATS["+seg"])  # warm-up: imports, allocator
            segment_case(run, case, Path(tmp), FORMATS["+rtstruct"])
            seconds = {k: [] for k in FORMATS}
            stage = {k: [] for k in STAGE}
            for _ in range(args.repeats):
                for key, fmt in FORMATS.items():
                    row = segment_case(run, case, Path(tmp), fmt)
                    seconds[key].append(row["seconds"])
                    if key in STAGE:
                        stage[key].append(row["stage_seconds"][STAGE[key]])
            base = statistics.median(seconds["nifti"])
            for key, values in seconds.items():
                med = statistics.median(values)
                st = f"{statistics.median(stage[key]):9.3f}" if key in stage else f"{'':9}"
                added = f"{(med / base - 1) * 100:+7.1f}%" if key != "nifti" else f"{'':8}"
                print(f"{case.case:<16}{key:<11}{med:9.3f}{st}{added}   {' '.join(f'{v:.3f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
