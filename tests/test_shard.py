"""Inference split over processes: --shard K/N (array jobs) and torchrun ranks give the single
process's outputs, each case written by one process only, the summary merged once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.infer.shards import parse_shard

from helpers import make_chaos_tree, make_run

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "total_seconds", "stage_seconds"}


def _infer(out: Path, data: Path, run: Path, *extra: str, runner: list[str] | None = None, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = (runner or [sys.executable]) + ["run.py", "infer", "--run-dir", str(run), "--input", str(data),
                                          "--out", str(out), "--set", "infer.montage=false", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


def _cases(out: Path) -> list[dict]:
    summary = json.loads((out / "inference.json").read_text())
    return [{k: v for k, v in row.items() if k not in TIMING} for row in summary["cases"]]


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_liver.nii.gz"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    make_chaos_tree(root / "chaos")
    run = make_run(root / "run")
    _, err, rc = _infer(root / "single", root / "chaos", run)
    assert rc == 0, err
    return root, run


@pytest.mark.slow
def test_two_array_jobs_give_the_single_process_outputs(single):
    root, run = single
    out = root / "sharded"
    procs = [_infer(out, root / "chaos", run, "--shard", f"{k}/2", wait=False) for k in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _masks(out) == _masks(root / "single")  # byte-identical masks, nothing missing or extra
    assert _cases(out) == _cases(root / "single")  # merged in the single run's order
    parts = [json.loads((out / "shards" / f"inference.{k}-of-2.json").read_text()) for k in (0, 1)]
    names = [row["case"] for part in parts for row in part["cases"]]
    assert len(names) == len(set(names)) and all(part["cases"] for part in parts)  # each case by one shard
    assert (out / "config.yaml").exists() and (out / "labels.itksnap.txt").exists()


@pytest.mark.slow
def test_torchrun_ranks_share_the_cases(single):
    root, run = single
    out = root / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    _, err, rc = _infer(out, root / "chaos", run, runner=[str(torchrun), "--nproc_per_node=2", "--standalone"])
    assert rc == 0, err[-3000:]
    assert _masks(out) == _masks(root / "single")
    assert _cases(out) == _cases(root / "single")
    assert json.loads((out / "inference.json").read_text())["shards"] == 2


def test_bad_shard_values_fail_with_one_line():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(PipelineError, match="--shard"):
            parse_shard(bad)
