#!/usr/bin/env python
"""What each random training transform costs per slice, on the cached volumes of one fold.

    python bench/augmentation_cost.py --data PREPARED [--fold 0] [--repeats 6] [--set train.pixel_spacing=2.0]

The deterministic chain runs once per volume (as CacheDataset does); the random chain is then timed
transform by transform over every volume `--repeats` times, with metadata tracking off as in training.
"""
import argparse
import collections
import time
from pathlib import Path

from monai.transforms import Compose

from pipeline.core.config import load_config
from pipeline.datasets.datalist import read_datalist
from pipeline.model.transforms import deterministic_transforms, random_transforms, without_metadata

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--data", type=Path, required=True)
ap.add_argument("--fold", type=int, default=0)
ap.add_argument("--repeats", type=int, default=6)
ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
args = ap.parse_args()
cfg = load_config(None, args.overrides)
if cfg.train.pixel_spacing == "auto":
    ap.error("give the run's spacing, e.g. --set train.pixel_spacing=2.0 (auto is resolved by training)")
train, _ = read_datalist(args.data).split(args.fold)
det = Compose(deterministic_transforms(cfg.train, with_indices=True, keep_organs=cfg.train.organ_intensity_prob > 0))
vols = [det(e) for e in train]
chain = random_transforms(cfg.train, modality_channel=cfg.model.modality_channel, organs=False)
for i, t in enumerate(chain):
    if hasattr(t, "set_random_state"): t.set_random_state(seed=i)
cost = collections.defaultdict(float); slices = 0
with without_metadata():
    for rep in range(args.repeats):
        for v in vols:
            d = dict(v)
            for t in chain:
                t0 = time.perf_counter()
                d = t(d) if not isinstance(d, list) else [t(x) for x in d]
                cost[type(t).__name__] += time.perf_counter() - t0
            slices += len(d) if isinstance(d, list) else 1
total = sum(cost.values())
print(f"{slices} slices, {1000 * total / slices:.2f} ms per slice")
for name, c in sorted(cost.items(), key=lambda kv: -kv[1]):
    print(f"{name:32s} {1000 * c / slices:7.3f} ms  {100 * c / total:5.1f}%")
