"""`run.py compare`: configurations trained and scored on the same folds, a leaderboard, resumable."""
import csv
import json

import pytest
import yaml

from pipeline.app.compare import BOXPLOT, LEADERBOARD, PER_PATIENT, leaderboard_table, run_comparison
from pipeline.app.report import write_report

from helpers import make_prepared_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = make_prepared_dataset(root / "prepared", n_mr=2, n_ct=2, folds=2)
    small = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0, "dropout": 0.0}
    train = {"roi_size": [32, 32], "slices_per_volume": 4, "batch_size": 4, "epochs": 2, "val_every": 1,
             "warmup_epochs": 1}
    configs = []
    for name, model in (("plain_unet", {"name": "unet"}), ("nnunet_like", {"name": "dynunet", "deep_supervision": True,
                                                                           "deep_supervision_levels": 1})):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": {**small, **model}, "train": train}))
        configs.append(path)
    return data, configs, root / "out"


@pytest.mark.slow
def test_every_configuration_is_scored_on_the_same_patients_and_ranked(setup, capfd):
    data, configs, out = setup
    rows = run_comparison(data, configs, out, folds="0,1", jobs=2)
    # the workers (their stderr is this process's) draw no bars over each other's line
    assert "epoch" not in capfd.readouterr().err
    assert sorted(r["config"] for r in rows) == ["nnunet_like", "plain_unet"]
    assert rows[0]["dice_mean"] >= rows[1]["dice_mean"]  # best first
    with open(out / PER_PATIENT, newline="") as f:
        per_patient = list(csv.DictReader(f))
    patients = {c: sorted(p["patient"] for p in per_patient if p["config"] == c) for c in ("plain_unet", "nnunet_like")}
    assert patients["plain_unet"] == patients["nnunet_like"] == ["CT_1", "CT_2", "MR_1", "MR_2"]
    for r in rows:
        mine = [float(p["dice"]) for p in per_patient if p["config"] == r["config"]]
        assert r["dice_mean"] == pytest.approx(sum(mine) / len(mine), abs=1e-5)
        assert r["model"] in ("unet", "dynunet") and r["parameters"] > 0 and r["epochs_per_fold"] == 2
    # each fold's patients were segmented with that fold's LAST checkpoint
    inference = json.loads((out / "plain_unet" / "fold_0" / "val_last" / "inference.json").read_text())
    assert inference["folds"] == ["fold_0"] and {c["case"] for c in inference["cases"]} == {"CT_1", "MR_1_T2SPIR"}
    assert (out / BOXPLOT).read_bytes().startswith(b"\x89PNG") and (out / LEADERBOARD).is_file()
    assert "nnunet_like" in leaderboard_table(rows) and "dynunet" in leaderboard_table(rows)


@pytest.mark.slow
def test_a_rerun_resumes_from_the_finished_folds(setup, monkeypatch):
    data, configs, out = setup
    before = (out / LEADERBOARD).read_text()
    import pipeline.train.cv

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(pipeline.train.cv, "run_training", no_training)
    from concurrent.futures import Future

    import pipeline.app.compare

    order, pools = [], []

    class RecordingPool:
        """The process pool of --jobs N, run in this process: records what it is given, in order."""

        def __init__(self, jobs, **kwargs):
            pools.append(jobs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *task):
            order.append((task[2], task[4]))  # (configuration, fold)
            future = Future()
            future.set_result(fn(*task))
            return future

    monkeypatch.setattr(pipeline.app.compare, "ProcessPoolExecutor", RecordingPool)
    run_comparison(data, configs, out, folds="0,1", jobs=2)
    assert (out / LEADERBOARD).read_text() == before
    # fold by fold: a pool of two workers takes both configurations of fold 0 first, so they train side
    # by side at the same speed of the hour
    assert pools == [2]
    assert order == [("plain_unet", 0), ("nnunet_like", 0), ("plain_unet", 1), ("nnunet_like", 1)]


@pytest.mark.slow
def test_the_report_shows_the_leaderboard(setup):
    data, configs, out = setup
    page = write_report(out / "plain_unet", compare_dir=out).read_text()
    assert 'id="compare"' in page and "nnunet_like" in page and "data:image/png;base64," in page


@pytest.mark.slow
def test_workers_stop_when_the_comparison_is_killed(tmp_path):
    """A killed `compare --jobs 2` leaves no worker training on beside the rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, TINY_TRAIN

    data = make_prepared_dataset(tmp_path / "prepared", n_mr=2, n_ct=2, folds=2)
    # would run for minutes; uncompiled (500 epochs would make train.compile=auto compile each worker first)
    (tmp_path / "long.yaml").write_text("train: {epochs: 500, compile: 'off'}\n")
    sets = [a for s in TINY_TRAIN if not s.startswith("train.epochs") for a in ("--set", s)]
    parent = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "compare", "--data", str(data), "--configs",
                               str(tmp_path / "long.yaml"), "--out", str(tmp_path / "cmp"), "--jobs", "2", "-q", *sets],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and open(f"/proc/{pid}/stat").read().split(") ")[1].split()[1] == str(parent.pid):
                    if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read():
                        found.append(int(pid))
            except (OSError, IndexError):
                continue
        return found

    deadline = time.time() + 60
    while len(workers()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    started = workers()
    assert len(started) == 2, "the comparison should have started two workers"
    while not list((tmp_path / "cmp").rglob("last.pt")) and time.time() < deadline:  # training is under way
        time.sleep(0.5)
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.time() + 20
    alive = started
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in started if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split(") ")[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} still running after the comparison was killed"


@pytest.mark.slow
def test_fused_runs_are_scored_on_the_same_patients_as_a_configuration_of_their_own(setup, monkeypatch):
    from pipeline.core.errors import PipelineError

    data, configs, out = setup
    import pipeline.train.cv

    monkeypatch.setattr(pipeline.train.cv, "run_training", lambda *a, **k: pytest.fail("fusion trained a fold"))
    rows = run_comparison(data, configs, out, folds="0,1", fuse=[["plain_unet", "nnunet_like"]])
    by_name = {r["config"]: r for r in rows}
    fused = by_name["plain_unet+nnunet_like"]
    assert fused["patients"] == by_name["plain_unet"]["patients"] == 4
    assert fused["train_minutes_per_fold"] == pytest.approx(by_name["plain_unet"]["train_minutes_per_fold"]
                                                            + by_name["nnunet_like"]["train_minutes_per_fold"])
    inference = json.loads((out / "plain_unet+nnunet_like" / "fold_1" / "val_last" / "inference.json").read_text())
    assert inference["run"] == [str(out / "plain_unet"), str(out / "nnunet_like")]
    assert {c["case"] for c in inference["cases"]} == {"CT_2", "MR_2_T2SPIR"}
    with pytest.raises(PipelineError, match="--fuse plain_unet\\+unknown"):
        run_comparison(data, configs, out, folds="0,1", fuse=[["plain_unet", "unknown"]])


@pytest.mark.slow
def test_a_fold_scored_again_keeps_the_minutes_its_training_took(setup):
    """A fold whose training finished but whose scoring did not (compare.json missing) is resumed:
    nothing trains again, and its minutes are its epochs' times from metrics.csv, not the resume's."""
    from pipeline.core import runs

    data, configs, out = setup
    done = out / "plain_unet" / "fold_0" / "compare.json"
    before = json.loads(done.read_text())
    done.unlink()
    run_comparison(data, configs, out, folds="0,1")
    after = json.loads(done.read_text())
    epochs = runs.read_metrics(out / "plain_unet" / "fold_0")
    assert after["minutes"] == pytest.approx(sum(r["epoch_time_s"] for r in epochs) / 60)
    assert after["minutes"] > 0.5 * before["minutes"] and after["cases"] == before["cases"]
