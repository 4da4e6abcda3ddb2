"""The README's main job: synth -> prepare -> train -> infer -> evaluate on synthetic CHAOS data.

Each stage is called through its public function, exactly as the CLI would, and meets the next
only through files on disk. Fold 0 is trained; its held-out patients are segmented from their raw
DICOM series and scored against the prepared labels, so the Dice printed at the end is an honest
held-out number.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.core.config import Config

log = logging.getLogger(__name__)

DEMO_FOLD = 0
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def run_demo(out: str | Path, cfg: Config) -> dict:
    from pipeline.app.report import write_report
    from pipeline.datasets.datalist import read_datalist
    from pipeline.datasets.prepare import prepare_dataset
    from pipeline.datasets.synthetic.generate import generate_dataset
    from pipeline.evaluate.evaluation import run_evaluation
    from pipeline.infer.inference import run_inference
    from pipeline.train.cv import run_training

    out = Path(out)
    timings = {}
    t0 = time.perf_counter()
    raw = generate_dataset(out / "raw", cfg.synth)
    timings["synth"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = out / "prepared"
    prepare_dataset(raw, prepared, cfg)
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = out / "run"
    run_training(data_dir=prepared, run_dir=run_dir, fold=str(DEMO_FOLD), cfg=cfg, resume=False)
    timings["train"] = time.perf_counter() - t0

    held_out = read_datalist(prepared).patients(DEMO_FOLD)
    t0 = time.perf_counter()
    infer_dir = out / "infer"
    run_inference(run_dir=run_dir, input_path=raw, out_dir=infer_dir, fold=str(DEMO_FOLD),
                  patients=",".join(held_out))
    timings["infer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg.evaluate.missing = "skip"  # only the held-out patients were segmented
    result = run_evaluation(pred=infer_dir, ref=prepared / "labelsTr", out_dir=out / "evaluate", cfg=cfg)
    timings["evaluate"] = time.perf_counter() - t0

    report = write_report(run_dir, eval_dir=out / "evaluate")
    summary = "\n".join([
        result["table"],
        "", "demo timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        f"held-out patients (fold {DEMO_FOLD}): {', '.join(held_out)}",
        f"masks: {infer_dir}   metrics: {out / 'evaluate'}   report: {report}",
        f"look at them in the browser: python run.py view --run {run_dir} --results {infer_dir}",
    ])
    return {"timings": timings, "held_out": held_out, "evaluation": result, "report": report, "table": summary}
