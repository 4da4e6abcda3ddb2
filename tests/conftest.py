"""Shared fixtures: the real-data location (defined once), tiny training configs, the realdata marker.

Every test that reads the real CHAOS data carries `@pytest.mark.realdata` (or a module-level
`pytestmark`) and takes the `real_chaos` fixture; both skip it, with the reason, where the data
is absent (../shared/data/chaos-real beside the repository).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CHAOS = ROOT.parent / "shared" / "data" / "chaos-real"
_REAL_MISSING = f"real CHAOS data not found at {REAL_CHAOS}"

# The real default config shrunk for tests (model-zoo CI style): seconds per fold on a CPU.
TINY_TRAIN = ["model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=0", "model.dropout=0.0",
              "train.roi_size=[32,32]", "train.slices_per_volume=4", "train.batch_size=4", "train.lr=0.01",
              "train.warmup_epochs=1", "train.epochs=3", "train.val_every=1"]


def _real_present() -> bool:
    return (REAL_CHAOS / "Train_Sets").is_dir()


def pytest_runtest_setup(item):
    if item.get_closest_marker("realdata") is not None and not _real_present():
        pytest.skip(_REAL_MISSING)


@pytest.fixture(scope="session")
def real_chaos() -> Path:
    """The real CHAOS root (holding Train_Sets/); skips the test where it is absent."""
    if not _real_present():
        pytest.skip(_REAL_MISSING)
    return REAL_CHAOS


@pytest.fixture(scope="session")
def tiny_train_overrides() -> list[str]:
    return list(TINY_TRAIN)


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(*extra_overrides) -> the default config shrunk to TINY_TRAIN plus `extra_overrides`."""
    from pipeline.core.config import load_config

    return lambda *extra: load_config(None, [*TINY_TRAIN, *extra])


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`python run.py ARGS` inside this process: run.main's exit code and what it printed.

    For the tests of a bad input's one-line error: the same main(), PipelineError handling and exit
    code as the command line, without starting an interpreter that imports torch and MONAI again
    (about 10 s per call on a 2-core CI machine). An exception main() does not turn into an error line
    fails the test as a traceback would. Commands whose log output a test reads run as subprocesses.
    """
    import contextlib
    import io

    import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run.main(list(args))  # console.command_output leaves the logging set-up as it found it
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------- a headless browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} missing (apt-get install chromium chromium-driver)")
    # Selenium Manager must never try to download a browser or driver: both are given explicitly.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
