"""Sharded inference: shard K of N (array jobs, or one per torchrun rank), and the merge of their rows."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.core import results
from pipeline.core.errors import PipelineError
from pipeline.infer.loaded import LoadedRun
from pipeline.infer.writers import write_label_descriptions


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (0 <= K < N) -> (K, N); PipelineError otherwise."""
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise PipelineError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shard K of N, counted from 0)") from None
    if not (n >= 1 and 0 <= k < n):
        raise PipelineError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def torchrun_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) under torchrun with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


def merge_shards(out_dir: Path, n: int, order: list[str], run: LoadedRun) -> None:
    """inference.json from the N shards' parts, cases in the order of a single-process run."""
    from pipeline.core.config import save_config

    parts = [results.read_summary(results.shard_part(out_dir, i, n)) for i in range(n)]
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted((r for p in parts for r in p["cases"]), key=lambda r: rank.get(r["case"], len(rank)))
    skipped = [s for p in parts for s in p["skipped"]]
    if not rows:
        raise PipelineError(f"{out_dir}: no series could be segmented by any of the {n} shards")
    if not (out_dir / "config.yaml").exists():  # shard 0 had no case to write it with
        save_config(run.cfg, out_dir / "config.yaml")
        write_label_descriptions(out_dir)
    head = {k: parts[0][k] for k in ("run", "input", "folds") if k in parts[0]}
    results.write_summary(out_dir / results.SUMMARY, head, rows, skipped, shards=n)
