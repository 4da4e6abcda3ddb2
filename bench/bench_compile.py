#!/usr/bin/env python
"""Training epochs of a compiled network (train.compile) against the eager one, side by side.

    python bench/bench_compile.py --data /tmp/real_prep [--fold 0] [--epochs 10] [--set KEY=VALUE ...]

Builds the fold's loaders and two training states with the same initial weights, as the trainer
does (train.build_loaders, make_state, compile_network, train_one_epoch), compiles one of them
(its time printed: the first compile on a machine, or seconds from inductor's on-disk cache), and
then alternates whole training epochs of the two, so that both see the same machine load. Prints
every epoch's slices/s, the medians and their ratio (an epoch's smaller last batch runs uncompiled
in both, as in training).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from pipeline.datasets.datalist import read_datalist
from pipeline.model.networks import build_loss
from pipeline.train.budget import compile_network
from pipeline.train.distributed import Dist
from pipeline.train.epochs import train_one_epoch
from pipeline.train.fold import build_loaders
from pipeline.train.state import make_state

from timing import training_bench_setup


def main() -> int:
    args, cfg, device = training_bench_setup(__doc__, 10, "timed epochs of each, alternating")
    train, val = read_datalist(args.data).split(args.fold)
    loss_fn = build_loss(cfg.train)
    runs = {}
    for name in ("eager", "compiled"):
        _, loader, _, _, _, _ = build_loaders(cfg, train, val, Dist())
        state = make_state(cfg, device, Dist(), len(loader))
        runs[name] = [state, loader, []]
    t0 = time.perf_counter()
    compile_network(runs["compiled"][0], cfg, device, args.fold)
    compile_s = time.perf_counter() - t0
    if runs["compiled"][0].compiled is None:
        print("torch.compile failed on this machine (see the warning above)")
        return 1

    def epoch(name: str) -> float:
        state, loader, _ = runs[name]
        t = time.perf_counter()
        train_one_epoch(state, loader, loss_fn, device, cfg.train.amp, torch.amp.GradScaler(enabled=False), name, False)
        seconds = time.perf_counter() - t
        return len(loader.dataset) * cfg.train.slices_per_volume / seconds

    for name in runs:  # warm-up: allocator, oneDNN kernels
        epoch(name)
    for _ in range(args.epochs):
        for name in runs:
            runs[name][2].append(epoch(name))
    t = cfg.train
    print(f"device {device}, threads {torch.get_num_threads()}, amp {t.amp}, roi {t.roi_size}, batch {t.batch_size}, "
          f"model {cfg.model.name} channels {cfg.model.channels}; fold {args.fold}: {len(train)} training volumes")
    print(f"compile (trial batch, forward and backward): {compile_s:.1f} s")
    for name, (_, loader, rates) in runs.items():
        print(f"{name:9} {len(loader)} steps/epoch, slices/s median {statistics.median(rates):6.1f}  "
              f"runs {' '.join(f'{r:.1f}' for r in rates)}")
    ratio = statistics.median(runs["compiled"][2]) / statistics.median(runs["eager"][2])
    print(f"ratio compiled / eager (median slices/s): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
