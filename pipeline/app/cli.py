"""The command line: `python run.py COMMAND` or `chaos-liver COMMAND` (the same `main`).

    python run.py synth    --out DIR [--patients N] [--seed S]
    python run.py prepare  --data CHAOS_ROOT --out DIR [--sequences CT,T2SPIR,...]
    python run.py train    --data PREPARED_DIR --run-dir RUN_DIR [--fold K|all] [--resume]
    python run.py infer    --run-dir RUN_DIR --input PATH --out DIR [--format nifti,chaos-png,dicom-seg,rtstruct]
    python run.py evaluate --pred PATH --ref PATH [--dicom DIR] --out DIR
    python run.py report   --run-dir RUN_DIR
    python run.py export   --run-dir RUN_DIR --out RUN.zip [--fold K] [--checkpoint best|last]
    python run.py demo     [--out DIR]     synth -> prepare -> train -> infer -> evaluate

Every command takes --config FILE and --set section.key=value. Each subcommand is a thin
wrapper around one function of the `pipeline` package, which returns its results; tables are
printed here, unless -q. torch and MONAI are imported inside the commands so that `--help` is
instant. `--run-dir` is also spelled `--run`, except under torchrun, which takes `--run` for its
own `--run-path`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("pipeline")


def _show(args, text: str) -> None:
    """Print a command's table or closing line, unless -q (or on a torchrun rank other than 0)."""
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        print(text)


def tune_process_for_inference(*_loaded) -> None:
    """Allocator and garbage-collector settings for a process that segments (pipeline.core.runtime),
    made by the commands that segment (infer, view) once their run is loaded, never by a library call
    (the Python API leaves the caller's process as it is). Freezing before the models and what loading
    them creates would leave those for every full collection to walk again while series are read."""
    from pipeline.core.runtime import freeze_long_lived_objects, keep_freed_memory

    keep_freed_memory()
    freeze_long_lived_objects()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _run_dir(p: argparse.ArgumentParser, help: str, many: bool = False) -> None:
    # --run-dir, not --run: torchrun's parser takes `--run` for its own `--run-path` option and stops
    # ("ambiguous option") when `torchrun run.py train --run ...` is typed without `--`.
    p.add_argument("--run-dir", "--run", dest="run", type=Path, required=True, metavar="RUN_DIR",
                   action="append" if many else "store",
                   help=f"{help} (--run also works outside torchrun)"
                        + ("; repeat it to fuse runs: their probabilities averaged on the source grid" if many else ""))


def _config(args, extra: list[str] | None = None):
    from pipeline.core.config import load_config

    return load_config(args.config, [*(extra or []), *args.overrides])


def cmd_synth(args) -> int:
    extra = []
    if args.patients is not None:
        extra.append(f"synth.patients={args.patients}")
    if args.seed is not None:
        extra.append(f"synth.seed={args.seed}")
    cfg = _config(args, extra)  # before the heavy imports: a config error comes at once
    from pipeline.datasets.synthetic.generate import generate_dataset

    root = generate_dataset(args.out, cfg.synth)
    _show(args, f"synthetic CHAOS data set written to {root}")
    return 0


def cmd_prepare(args) -> int:
    extra = [f"prepare.sequences=[{args.sequences}]"] if args.sequences else []
    cfg = _config(args, extra)
    from pipeline.datasets.prepare import prepare_dataset

    data = args.data[0] if len(args.data) == 1 else args.data
    _show(args, prepare_dataset(data, args.out, cfg)["table"])
    return 0


def cmd_train(args) -> int:
    cfg = _config(args)  # a bad config fails in a fraction of a second, not after torch and MONAI load
    from pipeline.train.cv import format_cv_summary, run_training

    results = run_training(data_dir=args.data, run_dir=args.run, fold=args.fold, cfg=cfg, resume=args.resume)
    if args.fold == "all":
        _show(args, format_cv_summary(results))
    return 0


def cmd_infer(args) -> int:
    import time

    from pipeline.core import results
    from pipeline.infer.inference import format_inference_table, run_inference

    started = time.time()
    run_inference(
        run_dir=args.run, input_path=args.input, out_dir=args.out, overrides=args.overrides,
        config_path=args.config, fold=args.fold, patients=args.patients, sequences=args.sequences,
        series=args.series, fmt=args.format, shard=args.shard, on_loaded=tune_process_for_inference,
    )
    summary = args.out / results.SUMMARY
    if summary.exists() and (args.shard is None or summary.stat().st_mtime >= started):  # merged by this process
        _show(args, format_inference_table(results.read_summary(summary)))
    return 0


def cmd_evaluate(args) -> int:
    cfg = _config(args)
    from pipeline.evaluate.evaluation import run_evaluation

    _show(args, run_evaluation(pred=args.pred, ref=args.ref, out_dir=args.out, dicom=args.dicom, cfg=cfg)["table"])
    return 0


def cmd_report(args) -> int:
    from pipeline.app.report import write_report

    path = write_report(args.run, eval_dir=args.eval, compare_dir=args.compare)
    _show(args, f"report written to {path}")
    return 0


def cmd_export(args) -> int:
    from pipeline.core.errors import PipelineError

    fmt = args.format or ("zip" if args.out.suffix == ".zip" else None)
    if fmt is None:
        raise PipelineError(f"--out {args.out}: say what to write with --format zip|bundle|onnx|torchscript")
    from pipeline.outputs.export import export_run

    path = export_run(args.run, args.out, fmt, fold=args.fold, which=args.checkpoint, modality=args.modality)
    what = {"zip": "infer --run-dir takes it", "bundle": "python -m monai.bundle run --config_file "
            f"{path / 'configs' / 'inference.json'} --dataset_dir IMAGES --output_dir MASKS",
            "onnx": "preprocessing.json beside the networks", "torchscript": "preprocessing.json beside the networks"}
    _show(args, f"run exported to {path} ({what[fmt]})")
    return 0


def cmd_view(args) -> int:
    from pipeline.app.viewer import serve

    def ready(url: str) -> None:  # the run is loaded and the server listens
        tune_process_for_inference()
        _show(args, f"liver viewer at {url} (Ctrl-C stops it)")

    serve(args.run, args.results, args.root or [Path.cwd()], host=args.host, port=args.port,
          max_upload_mb=args.max_upload_mb, ready=ready, token=not args.no_token)
    return 0


def cmd_compare(args) -> int:
    from pipeline.app.compare import leaderboard_table, run_comparison

    configs = [Path(c.strip()) for c in args.configs.split(",") if c.strip()]
    fuse = [[m.strip() for m in group.split("+")] for group in (args.fuse or "").split(",") if group.strip()]
    rows = run_comparison(args.data, configs, args.out, folds=args.folds, overrides=args.overrides, jobs=args.jobs,
                          fuse=fuse)
    _show(args, leaderboard_table(rows))
    return 0


def cmd_demo(args) -> int:
    from pipeline.app.demo import DEMO_CONFIG, run_demo
    from pipeline.core.config import load_config

    # configs/demo.yaml holds only what the demo changes from the defaults; --config replaces it.
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    _show(args, run_demo(args.out, cfg)["table"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CHAOS liver segmentation on MONAI: DICOM -> NIfTI -> 2D UNet -> masks.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic data set in the CHAOS Train_Sets layout")
    p.add_argument("--out", type=Path, required=True, help="output folder (Train_Sets/ is created inside)")
    p.add_argument("--patients", type=int, default=None, help="patients per modality (synth.patients)")
    p.add_argument("--seed", type=int, default=None, help="random seed (synth.seed)")
    _common(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="CHAOS DICOM + Ground PNG -> NIfTI images/labels + datalist with folds")
    p.add_argument("--data", type=Path, required=True, action="append",
                   help="CHAOS root (the folder holding Train_Sets/, or Train_Sets itself), MSD / nnU-Net data set, "
                        "pairs CSV or folder of images/ + labels/; repeat to prepare several into one folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (imagesTr/, labelsTr/, datalist.json)")
    p.add_argument("--sequences", default=None,
                   help="comma-separated subset of CT,T1DUAL_InPhase,T1DUAL_OutPhase,T2SPIR")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train the 2D UNet, one fold or the whole cross-validation")
    p.add_argument("--data", type=Path, required=True, help="prepared folder (holding datalist.json)")
    _run_dir(p, "run folder (fold_<k>/ is created inside)")
    p.add_argument("--fold", default="0", help="fold number or 'all' (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from fold_<k>/last.pt")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("infer", help="DICOM series or prepared NIfTI -> one NIfTI liver mask per case")
    _run_dir(p, "trained run folder (or its zip)", many=True)
    p.add_argument("--input", type=Path, required=True,
                   help="CHAOS root, a single DICOM series folder, or a prepared folder / datalist.json")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--fold", default=None, help="use one fold instead of the fold ensemble")
    p.add_argument("--patients", default=None, help="comma-separated patient ids (e.g. CT_3,MR_1)")
    p.add_argument("--sequences", default=None, help="comma-separated sequences")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to pick when a folder holds several")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="segment only shard K of N (from 0), e.g. one array job each; torchrun shards by rank")
    p.add_argument("--format", default="nifti", metavar="FORMATS",
                   help="comma-separated, beside the NIfTI mask: chaos-png (challenge-style PNG slices), "
                        "dicom-seg (a DICOM SEG of the source series), rtstruct (an RT Structure Set); e.g. nifti,dicom-seg")
    _common(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("evaluate", help="score masks with the CHAOS metrics (Dice, RAVD, ASSD, MSSD, HD95)")
    p.add_argument("--pred", type=Path, required=True, help="predicted mask(s): NIfTI file/folder or PNG folder(s)")
    p.add_argument("--ref", type=Path, required=True, help="reference mask(s): NIfTI, PNG folder(s), or a CHAOS root")
    p.add_argument("--dicom", type=Path, default=None, help="DICOM folder or CHAOS root giving PNG geometry")
    p.add_argument("--out", type=Path, required=True, help="output folder (metrics.csv, metrics.json)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write an offline HTML report of a run")
    _run_dir(p, "run folder")
    p.add_argument("--eval", type=Path, default=None, help="evaluate output folder to include")
    p.add_argument("--compare", type=Path, default=None, help="`run.py compare` output folder to include")
    _common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="a run as one zip, a MONAI bundle, or ONNX / TorchScript networks")
    _run_dir(p, "run folder (or its zip)")
    p.add_argument("--out", type=Path, required=True, help="zip file (zip) or folder (bundle, onnx, torchscript)")
    p.add_argument("--format", choices=["zip", "bundle", "onnx", "torchscript"], default=None,
                   help="zip: what infer needs, one file; bundle: a MONAI bundle of one fold; onnx / torchscript: "
                        "the networks with preprocessing.json (default: zip when --out ends in .zip)")
    p.add_argument("--fold", default="all", help="all (default) or one fold number (a bundle needs one)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint per fold")
    p.add_argument("--modality", choices=["CT", "MR"], default=None,
                   help="bundle: the images it is for (default: what the fold was trained on, if one modality)")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("view", help="a local web viewer: segment a series and look at the liver in the browser")
    _run_dir(p, "run folder (or its zip) whose models segment")
    p.add_argument("--results", type=Path, default=None, help="a `run.py infer` output folder to browse")
    p.add_argument("--root", type=Path, action="append", default=None,
                   help="a folder the page may browse and segment from (repeatable; default: the current folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (default 1024 MB)")
    p.add_argument("--no-token", action="store_true",
                   help="no access token in the URL (only behind your own authentication: any local process could read the scans)")
    _common(p)
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("compare", help="train several configurations on the same folds and rank them")
    p.add_argument("--data", type=Path, required=True, help="prepared folder (holding datalist.json)")
    p.add_argument("--configs", required=True, help="comma-separated YAML configs (each as --config takes it)")
    p.add_argument("--out", type=Path, required=True, help="output folder (one run folder per config, leaderboard)")
    p.add_argument("--folds", default="all", help="fold numbers (e.g. 0,1) or 'all' (default all)")
    p.add_argument("--jobs", type=int, default=1, help="folds trained side by side as processes (default 1)")
    p.add_argument("--fuse", default="", metavar="A+B,...",
                   help="also score these configurations' runs fused (config file stems joined by +; comma-separated)")
    _common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> infer -> evaluate on synthetic data")
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="work folder (default data/demo)")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    from pipeline.core.console import command_output
    from pipeline.core.errors import PipelineError

    try:
        with command_output(level):
            return args.func(args)
    except PipelineError as exc:
        if args.verbose:  # where it was raised, and what caused it, for a bug report
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
