#!/usr/bin/env python
"""Training-loop speed vs the bare model step, side by side, on prepared (real) data.

    python bench/bench_train.py --data /tmp/real_prep [--fold 0] [--epochs 8] [--set train.amp=bf16 ...]

Alternates one training epoch as the trainer runs it (batches from the cached MONAI dataset
through the random transforms, prepared by the loader's background thread, then forward/backward/
AdamW) with as many bare steps (the same model, loss and optimizer on a batch made once), so that
both see the same machine load, and prints the median slices/s of each and their ratio (target
>= 0.9). Also times the bare step under every amp mode and prints the peak
resident memory (ru_maxrss) of a fold's cached training + validation volumes plus training.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from pipeline.core.device import autocast_context
from pipeline.datasets.datalist import read_datalist
from pipeline.model.networks import build_loss, build_model
from pipeline.model.predict import plain
from pipeline.model.transforms import without_metadata
from pipeline.train.distributed import Dist
from pipeline.train.fold import build_loaders

from timing import training_bench_setup


def step(model, optimizer, loss_fn, image, label, device, amp) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, amp):
        loss = loss_fn(model(image), label)
    loss.backward()
    optimizer.step()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    args, cfg, device = training_bench_setup(__doc__, 8, "timed epochs (and as many bare steps each)")
    torch.manual_seed(0)

    train, val = read_datalist(args.data).split(args.fold)
    t0 = time.perf_counter()
    _, loader, _, _, _, _ = build_loaders(cfg, train, val, Dist())
    cache_s = time.perf_counter() - t0
    model = build_model(cfg.model, cfg.train.roi_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    loss_fn = build_loss(cfg.train)

    first = next(iter(loader))
    fixed_image, fixed_label = plain(first["image"]).to(device), plain(first["label"]).to(device)
    n = fixed_image.shape[0]

    def loop_epoch() -> tuple[int, int]:
        """One epoch as train_one_epoch runs it (a fresh iterator, so the loader's background
        thread only gets the time of the loop itself); returns (slices, steps)."""
        slices = steps = 0
        with without_metadata():
            for batch in loader:
                image, label = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
                step(model, optimizer, loss_fn, image, label, device, cfg.train.amp)
                slices, steps = slices + image.shape[0], steps + 1
        return slices, steps

    def bare_steps(k: int) -> None:
        for _ in range(k):
            step(model, optimizer, loss_fn, fixed_image, fixed_label, device, cfg.train.amp)

    def loader_epoch() -> int:
        """The data alone: cached volumes through the random transforms into batches, no step."""
        slices = 0
        with without_metadata():
            for batch in loader:
                slices += plain(batch["image"]).shape[0]
        return slices

    loop_epoch()  # warm-up: allocator, oneDNN kernels
    bare_steps(3)
    loop_rate, bare_rate = [], []
    for _ in range(args.epochs):  # whole epochs and as many bare steps, alternating
        t = time.perf_counter()
        slices, steps = loop_epoch()
        loop_rate.append(slices / (time.perf_counter() - t))
        bare_rate.append(steps * n / timed(lambda: bare_steps(steps)))
    loader_rate = []
    for _ in range(max(2, args.epochs // 2)):
        t = time.perf_counter()
        loader_rate.append(loader_epoch() / (time.perf_counter() - t))
    amp_rates = {}
    for amp in ("off", "bf16"):
        times = [timed(lambda: step(model, optimizer, loss_fn, fixed_image, fixed_label, device, amp))
                 for _ in range(10)]
        amp_rates[amp] = n / statistics.median(times)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t = cfg.train
    print(f"device {device}, threads {torch.get_num_threads()}, amp {t.amp}, roi {t.roi_size}, batch {n} slices, "
          f"model channels {cfg.model.channels} res_units {cfg.model.num_res_units}")
    print(f"fold {args.fold}: {len(train)} training + {len(val)} validation volumes cached in {cache_s:.1f} s")
    print(f"{'':24}{'median slices/s':>16}{'min':>8}{'max':>8}")
    for name, rates in (("training loop", loop_rate), ("bare model step", bare_rate)):
        print(f"{name:24}{statistics.median(rates):16.1f}{min(rates):8.1f}{max(rates):8.1f}")
    print(f"ratio loop / bare: {statistics.median(loop_rate) / statistics.median(bare_rate):.3f}  (target >= 0.95)")
    per_slice_ms = 1000.0 / statistics.median(loader_rate)
    print(f"the data alone (random transforms, batching): {statistics.median(loader_rate):.1f} slices/s, "
          f"{per_slice_ms:.2f} ms per slice = {per_slice_ms * statistics.median(bare_rate) / 10:.1f}% of a bare "
          f"step's time per slice; epochs {', '.join(f'{r:.0f}' for r in loader_rate)} slices/s")
    print("loop epochs: " + ", ".join(f"{r:.1f}" for r in loop_rate) + " slices/s; bare: "
          + ", ".join(f"{r:.1f}" for r in bare_rate))
    print("bare step by amp: " + ", ".join(f"{k} {v:.1f} slices/s" for k, v in amp_rates.items())
          + f"  (bf16/off = {amp_rates['bf16'] / amp_rates['off']:.2f})")
    print(f"peak resident memory (ru_maxrss): {maxrss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
