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


def test_freezing_takes_the_objects_alive_out_of_the_collectors_sight():
    gc.unfreeze()
    runtime.freeze_long_lived_objects()
    try:
        assert gc.get_freeze_count() > 1000  # modules, torch and MONAI internals
    finally:
        gc.unfreeze()


def test_the_infer_command_tunes_the_process_once_the_run_is_loaded(tmp_path, monkeypatch):
    import pipeline.infer.inference as inference

    from conftest import run_main
    from helpers import ellipsoid_volume, write_tiny

    events = []
    load_runs = inference.load_runs
    monkeypatch.setattr(inference, "load_runs", lambda *a, **k: events.append("loaded") or load_runs(*a, **k))
    monkeypatch.setattr(runtime, "freeze_long_lived_objects", lambda: events.append("frozen"))
    write_tiny(tmp_path / "s", ellipsoid_volume())
    res = run_main("infer", "--run-dir", str(make_run(tmp_path / "run")), "--input", str(tmp_path / "s"),
                   "--out", str(tmp_path / "out"), "-q", "--set", "infer.montage=false")
    assert res.returncode == 0, res.stderr
    assert events == ["loaded", "frozen"]
