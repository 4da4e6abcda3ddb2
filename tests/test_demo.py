"""The README's main job end to end (synth -> prepare -> train -> infer from DICOM -> evaluate ->
report), with the demo config shrunk so it runs in seconds."""
import json

import pytest

from pipeline.app.demo import DEMO_CONFIG, run_demo
from pipeline.core.config import load_config

SHRUNK = ["synth.patients=2", "synth.ct_size=32", "synth.mr_size=32", "synth.ct_slices=[10,12]",
          "synth.mr_slices=[8,10]", "prepare.folds=2", "model.channels=[4,8]", "model.strides=[2]",
          "model.num_res_units=0", "train.roi_size=[32,32]", "train.slices_per_volume=2", "train.batch_size=4",
          "train.epochs=1", "train.val_every=1", "infer.montage=true"]


@pytest.mark.slow
def test_demo_runs_every_stage_and_scores_the_held_out_patients_from_dicom(tmp_path, capsys):
    cfg = load_config(DEMO_CONFIG, SHRUNK)
    result = run_demo(tmp_path, cfg)
    entries = json.loads((tmp_path / "prepared" / "datalist.json").read_text())["training"]
    held_out = sorted({e["patient"] for e in entries if e["fold"] == 0})
    assert result["held_out"] == held_out and held_out
    scored = [row["case"] for row in json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["cases"]]
    expected = sorted(e["case"] for e in entries if e["fold"] == 0)
    assert sorted(scored) == expected
    for case in expected:
        assert (tmp_path / "infer" / f"{case}_liver.nii.gz").exists()
        assert (tmp_path / "infer" / f"{case}_montage.png").exists()
    assert (tmp_path / "run" / "report.html").exists()
    assert "dice" in result["table"] and "held-out patients (fold 0)" in result["table"]
    assert capsys.readouterr().out == ""  # the API returns the table; run.py prints it
