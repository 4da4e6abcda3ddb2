#!/usr/bin/env python
"""Patient-wise cross-validation on the real CHAOS MR T2-SPIR patients, with timings.

    python run.py prepare --data ../shared/data/chaos-real --out /tmp/real_prep --sequences T2SPIR
    python bench/train_real_cv.py --data /tmp/real_prep --run-dir /tmp/real_cv [--folds 0,1] [--set key=value ...]

Trains the listed folds one after the other with the default config (plus overrides) and prints,
per fold, the mean and minimum 3D liver Dice over its validation patients (best checkpoint and
last epoch) and the wall-clock minutes of training (validation included). Target: mean >= 0.90
for every fold within 10 minutes per fold on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.datasets.datalist import read_datalist
from pipeline.train.cv import run_training


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="prepared real MR folder (datalist.json)")
    ap.add_argument("--run-dir", "--run", dest="run", type=Path, required=True, help="run folder to create")
    ap.add_argument("--folds", default="all", help="comma-separated fold numbers or 'all'")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = load_config(None, args.overrides)
    num_folds = read_datalist(args.data).num_folds
    folds = range(num_folds) if args.folds == "all" else [int(f) for f in args.folds.split(",")]
    results = [run_training(args.data, args.run, str(k), cfg)[0] for k in folds]

    print(f"\n{'fold':>4}  {'patients':<22}  {'Dice best':>9}  {'min':>6}  {'Dice last':>9}  "
          f"{'best ep':>7}  {'minutes':>7}")
    best_all, last_all = [], []
    for r in results:
        best, last = list(r.dice_best.values()), list(r.dice_last.values())
        best_all += best
        last_all += last
        print(f"{r.fold:>4}  {','.join(sorted(r.dice_best)):<22}  {statistics.mean(best):9.4f}  {min(best):6.4f}  "
              f"{statistics.mean(last):9.4f}  {r.best_epoch:>7}  {r.minutes:7.1f}")
    sd = statistics.stdev(best_all) if len(best_all) > 1 else 0.0
    print(f"patients: {len(best_all)}; Dice (best checkpoint) {statistics.mean(best_all):.4f} ± {sd:.4f}; "
          f"Dice (last epoch) {statistics.mean(last_all):.4f}")
    print(f"peak resident memory (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
