"""Two-process DistributedDataParallel training on CPU through torchrun (gloo)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_prepared_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_as_users_type_it_trains_one_fold_on_two_processes(tmp_path, tiny_train_overrides):
    data = make_prepared_dataset(tmp_path / "prepared", n_mr=3, n_ct=3, folds=2)
    run = tmp_path / "run"
    sets = [a for s in [*tiny_train_overrides, "train.epochs=2"] for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    torchrun = Path(sys.executable).with_name("torchrun")
    # The command as users type it: torchrun's console script, no "--" before the script. Our run
    # folder option is --run-dir: torchrun would take a bare --run for its own --run-path.
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--standalone", "run.py", "train", "--data", str(data),
         "--run-dir", str(run), "--fold", "0", *sets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fold_dir = run / "fold_0"
    with open(fold_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r["val_dice_mean"] for r in rows)
    assert not list(run.rglob(".partial-*"))
    # only rank 0 logs to the file: one summary line per epoch, one settings block
    log_text = (fold_dir / "train.log").read_text()
    assert log_text.count("epoch   1/2") == 1 and log_text.count("epoch   2/2") == 1
    assert log_text.count("processes 2") == 1
    ckpt = torch.load(fold_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
