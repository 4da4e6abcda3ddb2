"""A run folder trained by an earlier version of the pipeline infers the same masks, byte for byte.

`tests/fixtures/run_before_move/` holds a small run (fold 0 of a tiny 2D UNet trained on synthetic
CHAOS data with the default pixel spacing `auto`), one prepared synthetic MR case, and the SHA-256 of
each mask NIfTI (gunzipped) that version wrote, in float32 (`infer.amp=off`: bf16 autocast depends on
the CPU). A refactoring that changes what a saved run infers fails here.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from conftest import REAL_CHAOS, run_main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_before_move"
EXPECTED = json.loads((FIXTURE / "expected_masks.json").read_text())
# the CRF (infer.crf_weight) came after that version: off, to compare with what it wrote
FLOAT32 = ["--set", "infer.amp=off", "--set", "infer.montage=false", "--set", "infer.crf_weight=0", "-q"]


def _digest(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def _infer(out: Path, *args: str) -> None:
    res = run_main("infer", "--run-dir", str(FIXTURE / "run"), "--out", str(out), *args, *FLOAT32)
    assert res.returncode == 0, res.stderr


def test_an_earlier_run_infers_the_same_mask_on_a_prepared_case(tmp_path):
    _infer(tmp_path, "--input", str(FIXTURE / "prepared"))
    name = "MR_1_T2SPIR_liver.nii.gz"
    assert _digest(tmp_path / name) == EXPECTED[name]["sha256"]


@pytest.mark.realdata
@pytest.mark.slow
def test_an_earlier_run_infers_the_same_masks_on_real_dicom_series(tmp_path):
    _infer(tmp_path, "--input", str(REAL_CHAOS / "Train_Sets"), "--patients", "CT_3,MR_2,MR_8")
    for name in ("CT_3_liver.nii.gz", "MR_2_T2SPIR_liver.nii.gz", "MR_8_T2SPIR_liver.nii.gz"):
        assert _digest(tmp_path / name) == EXPECTED[name]["sha256"], name
