"""Damaged DICOM files: random byte damage to a real series must give a named, one-line error
(PipelineError) or a result, never an unhandled exception, in `prepare` and in `infer`."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

from helpers import make_run

TRIALS = 30


def damage(path: Path, rng: np.random.Generator) -> str:
    """One seeded kind of damage to `path`; returns what was done (for the failure message)."""
    data = bytearray(path.read_bytes())
    if not data:
        return "already empty"
    kind = rng.integers(0, 4)
    if kind == 0:  # truncated anywhere: in the preamble, the header or the pixels
        cut = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}"
    if kind == 1:  # random bytes flipped in the header (the first kilobytes hold the elements)
        n = int(rng.integers(1, 16))
        where = rng.integers(0, min(len(data), 2048), n)
        for w in where:
            data[w] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        return f"{n} header bytes changed at {sorted(where.tolist())}"
    if kind == 2:  # a run of zeros anywhere
        start = int(rng.integers(0, len(data)))
        end = min(len(data), start + int(rng.integers(1, 4096)))
        data[start:end] = bytes(end - start)
        path.write_bytes(bytes(data))
        return f"zeros at {start}:{end}"
    path.write_bytes(b"")  # an empty file
    return "emptied"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fuzz_run") / "run")


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("trial", range(TRIALS))
def test_damaged_real_series_never_gives_an_unhandled_exception(tmp_path, real_chaos, tiny_run, trial):
    from pipeline.datasets.prepare import prepare_dataset
    from pipeline.infer.inference import run_inference

    rng = np.random.default_rng(trial)
    source = real_chaos / "Train_Sets" / "MR" / "2" / "T2SPIR"
    patient = tmp_path / "chaos" / "Train_Sets" / "MR" / "2" / "T2SPIR"
    shutil.copytree(source / "DICOM_anon", patient / "DICOM_anon")  # a copy: the shared data stays intact
    (patient / "Ground").symlink_to(source / "Ground")
    files = sorted((patient / "DICOM_anon").iterdir())
    done = []
    for _ in range(int(rng.integers(1, 3))):
        victim = files[int(rng.integers(0, len(files)))]
        done.append(f"{victim.name}: {damage(victim, rng)}")
    cfg = load_config(None, ["prepare.sequences=[T2SPIR]"])
    for step in ("prepare", "infer"):
        try:
            if step == "prepare":
                prepare_dataset(tmp_path / "chaos", tmp_path / "prep", cfg)
            else:
                run_inference(tiny_run, patient / "DICOM_anon", tmp_path / "out", ["infer.montage=false"])
        except PipelineError as exc:
            message = str(exc)
            assert "\n" not in message and message, (step, done, message)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{step} raised {type(exc).__name__}: {exc} after damage {done}")
