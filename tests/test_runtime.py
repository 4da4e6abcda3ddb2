"""Process-wide settings: glibc malloc keeps freed memory, long-lived objects leave the collector's sight."""
import gc
import sys

import pytest

from pipeline import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_malloc_settings_are_accepted_once():
    assert runtime.keep_freed_memory() is True
    assert runtime.keep_freed_memory() is True  # idempotent
    assert runtime._done is True


def test_loading_a_run_freezes_the_objects_alive(tmp_path):
    from tests.test_infer import make_run

    from pipeline.infer import load_run

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    run = load_run(make_run(tmp_path / "run"), None)
    assert run.models and gc.get_freeze_count() > 1000  # modules, torch and MONAI internals
    gc.unfreeze()
