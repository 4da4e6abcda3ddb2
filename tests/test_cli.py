"""The command line: instant help, one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["synth", "prepare", "train", "infer", "evaluate", "report", "compare", "demo"]


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_every_command():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_subcommand_help_lists_config_and_set(cmd):
    res = _run(cmd, "--help")
    assert res.returncode == 0
    assert "--config" in res.stdout and "--set" in res.stdout


def test_help_does_not_import_torch():
    code = ("import sys, run; sys.argv=['run.py','--help']\n"
            "try:\n    run.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'heavy import at --help'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_bad_override_is_one_line_error_and_nonzero_exit(tmp_path):
    res = _run("synth", "--out", str(tmp_path / "x"), "--set", "synth.patientz=3")
    assert res.returncode != 0
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "synth.patientz" in lines[0]
    assert not (tmp_path / "x").exists()


def test_a_bad_config_choice_stops_before_any_data_is_read(tmp_path):
    # the data folder does not exist: the config error must come first, naming the key and its choices
    res = _run("train", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"),
               "--set", "train.loss=dice_cee")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: config key 'train.loss': expected one of dice_ce | dice_focal | bce, "
                                  "got 'dice_cee'")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from helpers import make_prepared_dataset

    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), n_mr=2, n_ct=2, folds=2)


@pytest.mark.slow
def test_quiet_training_prints_nothing(prepared, tmp_path, tiny_train_overrides):
    sets = [a for s in [*tiny_train_overrides, "train.epochs=1"] for a in ("--set", s)]
    res = _run("train", "--data", str(prepared), "--run-dir", str(tmp_path / "run"), "--fold", "all", "-q", *sets,
               timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    assert (tmp_path / "run" / "cv_summary.csv").is_file()
    # -q quiets the terminal, not the run's record: each fold's train.log has its INFO lines
    for fold in (0, 1):
        log = (tmp_path / "run" / f"fold_{fold}" / "train.log").read_text()
        assert " INFO " in log and "train loss" in log, log[-500:]


@pytest.mark.slow
def test_training_output_has_no_warnings(prepared, tmp_path, tiny_train_overrides):
    sets = [a for s in [*tiny_train_overrides, "train.epochs=2"] for a in ("--set", s)]
    res = _run("train", "--data", str(prepared), "--run", str(tmp_path / "run"), "--fold", "all", *sets, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "warn" not in res.stderr.lower()
    assert " INFO " in res.stderr and "all folds, last checkpoint: Dice" in res.stdout  # the CV table, by run.py


@pytest.mark.slow
def test_per_case_log_lines_never_share_a_line_with_the_progress_bar(prepared, tmp_path):
    import re

    # evaluate logs one INFO line per case while its bar is open: score the labels against themselves
    res = _run("evaluate", "--pred", str(prepared / "labelsTr"), "--ref", str(prepared / "labelsTr"),
               "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr
    stamp = re.compile(r"^\d\d:\d\d:\d\d INFO ")
    logged = [line for line in res.stderr.split("\n") if " INFO " in line and ": Dice 1.0000" in line]
    assert len(logged) == 4
    for line in logged:
        # what a terminal shows of the line: the text after the last carriage return
        assert stamp.match(line.split("\r")[-1]), repr(line[-200:])
