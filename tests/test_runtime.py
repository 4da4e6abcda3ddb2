"""Process-wide settings: glibc malloc keeps freed memory, long-lived objects leave the collector's sight;
made by the commands that segment, never by a library call."""
import gc
import sys

import pytest

from pipeline.core import runtime

from helpers import make_run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_glibc_accepts_every_malloc_setting():
    assert runtime.keep_freed_memory() is True  # mallopt returned 1 (accepted) for each of SETTINGS


def test_loading_a_run_leaves_the_garbage_collector_alone(tmp_path):
    from pipeline.infer.loaded import load_run

    gc.unfreeze()
    run = load_run(make_run(tmp_path / "run"), None)
    assert run.models and gc.get_freeze_count() == 0


def test_the_infer_command_freezes_the_objects_alive(monkeypatch):
    from pipeline.app import cli

    gc.unfreeze()
    cli.tune_process_for_inference()
    try:
        assert gc.get_freeze_count() > 1000  # modules, torch and MONAI internals
    finally:
        gc.unfreeze()
