"""Damaged DICOM files: random byte damage to a real series must give a named, one-line error
(PipelineError) or a result, never an unhandled exception: a few hundred damaged files through the
readers (header and pixels, the study scan), and a series with damaged files through `prepare` and
`infer` with its DICOM SEG and RTSTRUCT writers."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

from helpers import make_run

TRIALS = 40
READER_TRIALS = 400


def _sequence_offsets(data: bytes) -> list[int]:
    """Where items and sequence delimiters of the file's sequences start (their tags' bytes)."""
    out, start = [], 0
    for tag in (b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"):
        while (found := data.find(tag, start)) >= 0:
            out.append(found)
            start = found + 1
        start = 0
    return sorted(out)


def _change_bytes(path: Path, data: bytearray, rng: np.random.Generator, low: int, high: int, most: int,
                  where_name: str) -> str:
    """Up to most - 1 random bytes of data[low:high] set to random values, written to `path`."""
    n = int(rng.integers(1, most))
    where = rng.integers(low, min(len(data), high), n)
    for w in where:
        data[w] = int(rng.integers(0, 256))
    path.write_bytes(bytes(data))
    return f"{n} {where_name} bytes changed at {sorted(where.tolist())}"


def damage(path: Path, rng: np.random.Generator) -> str:
    """One seeded kind of damage to `path`; returns what was done (for the failure message)."""
    data = bytearray(path.read_bytes())
    if not data:
        return "already empty"
    kind = rng.integers(0, 6)
    if kind == 4:  # bytes changed in the file meta (after the 128-byte preamble and "DICM")
        return _change_bytes(path, data, rng, 132, 340, 6, "file-meta")
    if kind == 5:  # bytes changed inside a sequence (an item's or delimiter's tag and length)
        offsets = _sequence_offsets(bytes(data))
        if offsets:
            at = offsets[int(rng.integers(0, len(offsets)))] + int(rng.integers(0, 8))
            data[at] = int(rng.integers(0, 256))
            path.write_bytes(bytes(data))
            return f"sequence byte changed at {at}"
        kind = 1
    if kind == 0:  # truncated anywhere: in the preamble, the header or the pixels
        cut = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}"
    if kind == 1:  # random bytes flipped in the header (the first kilobytes hold the elements)
        return _change_bytes(path, data, rng, 0, 2048, 16, "header")
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
                run_inference(tiny_run, patient / "DICOM_anon", tmp_path / "out", ["infer.montage=false"],
                              fmt="nifti,dicom-seg,rtstruct")
        except PipelineError as exc:
            message = str(exc)
            assert "\n" not in message and message, (step, done, message)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{step} raised {type(exc).__name__}: {exc} after damage {done}")


@pytest.mark.slow
@pytest.mark.realdata
def test_hundreds_of_damaged_files_read_as_a_result_or_one_line(tmp_path, real_chaos):
    """READER_TRIALS damaged files, one at a time in a copy of a real series, through the readers that
    prepare and infer use: the series reader (headers, then pixels) and the study scan."""
    from pipeline.dicom.series import read_series
    from pipeline.dicom.study import scan_study

    source = real_chaos / "Train_Sets" / "MR" / "2" / "T2SPIR" / "DICOM_anon"
    folder = tmp_path / "series"
    shutil.copytree(source, folder)
    files = sorted(folder.iterdir())
    rng = np.random.default_rng(2026)
    outcomes = {"read": 0, "one line": 0}
    for trial in range(READER_TRIALS):
        victim = files[int(rng.integers(0, len(files)))]
        what = damage(victim, rng)
        try:
            for reader in (read_series, scan_study):
                try:
                    reader(folder)
                    outcomes["read"] += 1
                except PipelineError as exc:
                    assert str(exc) and "\n" not in str(exc), (trial, what, str(exc))
                    outcomes["one line"] += 1
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"trial {trial}: {reader.__name__} raised {type(exc).__name__}: {exc} after {victim.name}: {what}")
        finally:
            shutil.copyfile(source / victim.name, victim)
    assert outcomes["read"] and outcomes["one line"]  # both outcomes were met: the damage reached the readers
