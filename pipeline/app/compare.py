"""Configurations side by side on the same folds: `python run.py compare`.

    python run.py compare --data PREPARED --configs A.yaml,B.yaml,... --out DIR [--folds 0,1|all] [--jobs N]
                          [--fuse A+B,...]

For every configuration (a YAML as --config takes it; named by its file stem) and every fold: train
the fold, segment the fold's validation patients with the LAST checkpoint (the best one is chosen on
those very patients and would flatter them), and score them against the prepared labels with the
CHAOS metrics. Folds run side by side as separate processes with `jobs` > 1 (torch threads split
between them). Each finished fold leaves DIR/<config>/fold_<k>/compare.json, so an interrupted
comparison resumes where it stopped. `--fuse A+B` also scores the trained runs of A and B fused (infer
with both run folders: the mean of their probabilities), as a configuration "A+B" whose minutes are
the sum of its members'.

Outputs (DIR): leaderboard.csv (one row per configuration: Dice mean and std over patients, HD95,
ASSD, minutes of training per fold, parameters, inference seconds per volume), per_patient.csv,
leaderboard.png (Dice per patient, one box per configuration); `leaderboard_table` gives the text
table `run.py` prints; `run.py report --compare DIR` shows them in the HTML report.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.console import format_table, progress
from pipeline.core.errors import PipelineError
from pipeline.core.figures import new_figure, save_png
from pipeline.core.files import safe_name, write_csv, write_json
from pipeline.datasets.datalist import read_datalist

log = logging.getLogger(__name__)

LEADERBOARD = "leaderboard.csv"
PER_PATIENT = "per_patient.csv"
BOXPLOT = "leaderboard.png"
FOLD_RESULT = "compare.json"
COLUMNS = ["config", "model", "patients", "dice_mean", "dice_std", "dice_min", "hd95_mm", "assd_mm",
           "train_minutes_per_fold", "epochs_per_fold", "parameters", "infer_seconds_per_volume"]


def run_comparison(data: str | Path, configs: list[str | Path], out_dir: str | Path, folds: str = "all",
                   overrides: list[str] = (), jobs: int = 1, fuse: list[list[str]] = ()) -> list[dict]:
    """Train and score every configuration on the same folds; returns the leaderboard rows. `fuse`:
    groups of configuration names whose trained runs are also scored fused (infer with several
    --run-dir: the mean of their probabilities), named "A+B", their minutes the sum of the members'."""
    data, out_dir = Path(data), Path(out_dir)
    datalist = read_datalist(data)
    fold_list = datalist.parse_folds(folds)
    names = []
    for path in configs:
        load_config(path, overrides)  # every config is checked before anything trains
        names.append(safe_name(Path(path).stem, "config name"))
    if len(set(names)) != len(names):
        raise PipelineError(f"--configs: two configurations share a file name ({', '.join(names)})")
    for group in fuse:
        unknown = [m for m in group if m not in names]
        if unknown or len(group) < 2 or len(set(group)) < len(group):
            raise PipelineError(f"--fuse {'+'.join(group)}: expected two or more different names of --configs "
                                f"({', '.join(names)})")
    # fold by fold, so that with --jobs N the configurations of one fold train side by side in time
    tasks = [(str(data), str(path), name, list(overrides), k, str(out_dir))
             for k in fold_list for path, name in zip(configs, names)]
    jobs = max(1, min(int(jobs), len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = []
    if jobs == 1:
        for task in progress(tasks, desc="compare", unit="fold"):
            results.append(_fold_task(*task))
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads, os.getpid())) as pool:
            futures = [pool.submit(_fold_task, *task) for task in tasks]
            for future in progress(as_completed(futures), total=len(futures), desc="compare", unit="fold"):
                results.append(future.result())
    fused = ["+".join(group) for group in fuse]
    for k in fold_list:  # the members' folds are trained: inference only, one after the other
        for group in fuse:
            results.append(_fusion_task(str(data), group, k, str(out_dir)))
    names = names + fused
    rows, per_patient = leaderboard(results, names)
    write_csv(out_dir / LEADERBOARD, rows, COLUMNS)
    write_csv(out_dir / PER_PATIENT, per_patient, ["config", "fold", "patient", "dice", "hd95_mm", "assd_mm"])
    plot_leaderboard(per_patient, names, out_dir / BOXPLOT)
    return rows


def _worker_init(threads: int, parent: int) -> None:
    import threading

    import torch

    from pipeline.core.console import hide_progress_bars

    torch.set_num_threads(threads)
    # a fresh interpreter: the pipeline logger's INFO lines reach each fold's train.log (console: warnings
    # only); the epochs' bars stay in the worker, the comparison's own bar counts the folds
    logging.getLogger("pipeline").setLevel(logging.INFO)
    hide_progress_bars()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Stop this worker when the comparison that started it is gone (killed, or stopped with Ctrl-C):
    a worker would otherwise train on, unseen, beside the rerun. Checkpoints are written atomically,
    so the rerun resumes the fold from its last epoch."""
    import time

    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _fold_task(data: str, config: str, name: str, overrides: list[str], fold: int, out_dir: str) -> dict:
    """Train one fold of one configuration, segment its validation patients with the last
    checkpoint and score them; the result is saved so that a rerun skips the fold."""
    from pipeline.core import runs
    from pipeline.infer.inference import run_inference
    from pipeline.model.networks import build_model, count_parameters, network_input
    from pipeline.train.cv import run_training

    run_dir = Path(out_dir) / name
    fold_dir = runs.fold_dir(run_dir, fold)
    done = fold_dir / FOLD_RESULT
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(config, overrides)
    resume = runs.checkpoint_path(fold_dir, "last").is_file()
    result = run_training(data, run_dir, str(fold), cfg, resume=resume)[0]
    datalist = read_datalist(data)
    patients = datalist.patients(fold)
    infer_dir = fold_dir / "val_last"
    rows = run_inference(run_dir, Path(data), infer_dir, fold=str(fold), patients=",".join(patients),
                         overrides=["infer.checkpoint=last", "infer.montage=false"])
    cases = _score(data, datalist, infer_dir, cfg)
    trained = runs.read_config(fold_dir)
    summary = {
        "config": name, "fold": fold, "model": cfg.model.name,
        # a resumed fold (interrupted, or scored again): its epochs' times over every session
        "minutes": sum(r.get("epoch_time_s") or 0.0 for r in runs.read_metrics(fold_dir)) / 60 if resume
        else result.minutes,
        "epochs": trained.train.epochs,  # as the budget fixed them
        # from the fold's own config: training resolved its "auto" spacings (a 3D network's plan needs them)
        "parameters": count_parameters(build_model(trained.model, *network_input(trained))),
        "infer_seconds": statistics.mean(r["seconds"] for r in rows), "cases": cases,
    }
    write_json(done, summary)
    return summary


def _fusion_task(data: str, members: list[str], fold: int, out_dir: str) -> dict:
    """Score the fold's validation patients with the members' trained runs fused (last checkpoints,
    their mean probability on the source grid); saved as a fold of its own, so a rerun skips it."""
    from pipeline.core import runs
    from pipeline.infer.inference import run_inference

    name = "+".join(members)
    fold_dir = runs.fold_dir(Path(out_dir) / name, fold)
    done = fold_dir / FOLD_RESULT
    if done.is_file():
        return json.loads(done.read_text())
    parts = [json.loads((runs.fold_dir(Path(out_dir) / m, fold) / FOLD_RESULT).read_text()) for m in members]
    datalist = read_datalist(data)
    infer_dir = fold_dir / "val_last"
    rows = run_inference([Path(out_dir) / m for m in members], Path(data), infer_dir, fold=str(fold),
                         patients=",".join(datalist.patients(fold)),
                         overrides=["infer.checkpoint=last", "infer.montage=false"])
    summary = {"config": name, "fold": fold, "model": "+".join(p["model"] for p in parts),
               "minutes": sum(p["minutes"] for p in parts), "epochs": None,
               "parameters": sum(p["parameters"] for p in parts),
               "infer_seconds": statistics.mean(r["seconds"] for r in rows),
               "cases": _score(data, datalist, infer_dir, runs.read_config(Path(out_dir) / members[0]))}
    write_json(done, summary)
    return summary


def _score(data: str, datalist, infer_dir: Path, cfg) -> list[dict]:
    """The CHAOS metrics of the masks in `infer_dir` against the prepared labels, one dict per case."""
    from pipeline.evaluate.evaluation import run_evaluation

    cfg.evaluate.missing = "skip"  # only this fold's patients were segmented
    scored = run_evaluation(pred=infer_dir, ref=Path(data) / "labelsTr", out_dir=infer_dir / "evaluate", cfg=cfg)
    patient_of = {e["case"]: e["patient"] for e in datalist.entries}
    return [{"patient": patient_of[c["case"]], "dice": c["dice"], "hd95_mm": c["hd95_mm"], "assd_mm": c["assd_mm"]}
            for c in scored["cases"]]


def leaderboard(results: list[dict], names: list[str]) -> tuple[list[dict], list[dict]]:
    """(one row per configuration, one row per configuration, fold and patient); a patient's value
    is the mean over its cases (sequences)."""
    per_patient, rows = [], []
    for name in names:
        mine = sorted((r for r in results if r["config"] == name), key=lambda r: r["fold"])
        if not mine:
            continue
        patients = []
        for r in mine:
            by_patient: dict[str, list[dict]] = {}
            for c in r["cases"]:
                by_patient.setdefault(c["patient"], []).append(c)
            for patient, cases in sorted(by_patient.items()):
                patients.append({"config": name, "fold": r["fold"], "patient": patient,
                                 **{k: _mean(c[k] for c in cases) for k in ("dice", "hd95_mm", "assd_mm")}})
        per_patient += patients
        dice = [p["dice"] for p in patients]
        rows.append({
            "config": name, "model": mine[0]["model"], "patients": len(patients),
            "dice_mean": _mean(dice), "dice_std": statistics.stdev(dice) if len(dice) > 1 else 0.0,
            "dice_min": min(dice), "hd95_mm": _mean(p["hd95_mm"] for p in patients),
            "assd_mm": _mean(p["assd_mm"] for p in patients),
            "train_minutes_per_fold": _mean(r["minutes"] for r in mine), "epochs_per_fold": _mean(r["epochs"] for r in mine),
            "parameters": mine[0]["parameters"],
            "infer_seconds_per_volume": _mean(r["infer_seconds"] for r in mine),
        })
    rows.sort(key=lambda r: -r["dice_mean"])
    return rows, per_patient


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.mean(values)) if values else float("nan")


def leaderboard_table(rows: list[dict]) -> str:
    """The leaderboard as aligned text, best mean Dice first."""
    return format_table(
        ["config", "model", "patients", "Dice", "min", "HD95 mm", "ASSD mm", "min/fold", "params", "s/volume"],
        [[r["config"], r["model"], r["patients"], f"{r['dice_mean']:.4f} ± {r['dice_std']:.4f}", f"{r['dice_min']:.3f}",
          f"{r['hd95_mm']:.2f}", f"{r['assd_mm']:.2f}", f"{r['train_minutes_per_fold']:.1f}", f"{r['parameters']:,d}",
          f"{r['infer_seconds_per_volume']:.2f}"] for r in rows])


def plot_leaderboard(per_patient: list[dict], names: list[str], path: Path) -> Path:
    """Box plot of the per-patient Dice of each configuration (points on top), best median first."""
    groups = {n: [p["dice"] for p in per_patient if p["config"] == n] for n in names}
    groups = dict(sorted(((n, v) for n, v in groups.items() if v), key=lambda kv: -statistics.median(kv[1])))
    fig = new_figure(figsize=(1.6 + 1.4 * len(groups), 4.2), layout="constrained")
    ax = fig.subplots()
    ax.boxplot(list(groups.values()), showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=20, ha="right")
    for i, values in enumerate(groups.values(), start=1):
        ax.scatter([i] * len(values), values, s=12, alpha=0.6, zorder=3)
    ax.set(ylabel="liver Dice per patient (last checkpoint)", title="Configurations on the same folds")
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path, dpi=120)
