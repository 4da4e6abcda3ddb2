"""The command line: instant help, one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["synth", "prepare", "train", "infer", "evaluate", "report", "demo"]


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
