"""Shared by the bench scripts: median wall time of repeated calls (machines are noisy), and the
command line of the training benches."""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_bench_setup(description: str, epochs: int, epochs_help: str):
    """(args, config, device) of a training bench: --data PREPARED, --fold, --epochs, --set KEY=VALUE."""
    from pipeline.core.config import load_config
    from pipeline.core.device import resolve_device

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="prepared folder (datalist.json)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(None, args.overrides)
    return args, cfg, resolve_device(cfg.train.device)
