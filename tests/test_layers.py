"""The shape of the house: stage packages that import only downward (.importlinter), modules a reader
can take in at once."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT

MAX_MODULE_LINES = 450


def test_stage_packages_import_only_downward_and_without_cycles():
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    res = subprocess.run(["lint-imports", "--config", str(ROOT / ".importlinter")], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_no_module_is_longer_than_a_reader_takes_in_at_once():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pipeline").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_every_stage_package_says_what_lives_there():
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        text = init.read_text().strip()
        assert text.startswith('"""') and len(text) > 20, f"{init.relative_to(ROOT)}: a one-line docstring saying what lives there"
