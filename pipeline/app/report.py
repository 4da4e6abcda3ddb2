"""One self-contained HTML page per training run: `python run.py report --run RUN_DIR`.

Reads only what the other stages leave on disk (stages meet through files):

- RUN_DIR/config.yaml (else fold_<k>/config.yaml), RUN_DIR/cv_summary.csv (fold, patient, dice, ...)
- RUN_DIR/fold_<k>/metrics.csv (one row per epoch), curves.png, split.json and the artefact list
- optionally an evaluate folder (metrics.csv, one row per case) and infer montages (*_montage.png)
  from the evaluate folder, its parent, RUN_DIR/infer*/ or an explicit `montage_dir`.

Every optional artefact that is missing or unreadable shows as "not available" with the reason;
only a missing run folder (or one with neither config nor folds) is an error. The page needs no
network: images are base64 data URIs and the CSS is inline, so it can be archived or mailed as one
file. Every string taken from a file (case ids, config values, CSV cells) is HTML-escaped.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from pipeline.app.report_html import (CSS, NOT_AVAILABLE, ArtefactUnavailable, Table, esc, fmt_cell, html_table, img,
                                      mean_std, number, png_data_uri, read_csv_table, read_json, read_yaml, unavailable)
from pipeline.core import results, runs
from pipeline.core.console import progress
from pipeline.core.errors import PipelineError
from pipeline.core.figures import figure_data_uri, new_figure
from pipeline.core.files import atomic_path

log = logging.getLogger(__name__)


REPORT_NAME = runs.REPORT


_SUMMARY_LABELS = {"mean", "std", "overall", "all", "summary", "median"}


_FOLD_ARTEFACTS = (runs.CONFIG, runs.SPLIT,
                   *(runs.checkpoint_path("", c).name for c in runs.CHECKPOINTS), runs.TRAIN_LOG, runs.METRICS,
                   runs.CURVES)


def _get(cfg: dict, dotted: str) -> str:
    """The config value at `dotted` as display text (lists comma-joined), or "not available"."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return NOT_AVAILABLE
        node = node[part]
    if isinstance(node, list):
        return "[" + ", ".join(map(str, node)) + "]"
    return str(node)


def _load_config(run_dir: Path, folds: list[tuple[int, Path]]) -> tuple[dict, Path]:
    candidates = [run_dir / runs.CONFIG, *(p / runs.CONFIG for _, p in folds)]
    for path in candidates:
        if path.is_file():
            return read_yaml(path), path
    raise ArtefactUnavailable(f"no config.yaml in {run_dir} or its fold folders")


def _summary_section(run_dir: Path, folds: list[tuple[int, Path]]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [("run", run_dir.name), ("folder", str(run_dir)), ("report written", now)]
    try:
        cfg, cfg_path = _load_config(run_dir, folds)
    except ArtefactUnavailable as exc:
        log.warning("report: %s", exc)
        rows.append(("folds found", ", ".join(str(k) for k, _ in folds) or "none"))
        return ('<section id="summary"><h2>Run summary</h2>'
                + html_table(["item", "value"], rows, "summary-table", numeric=False)
                + unavailable("configuration", str(exc))
                + "</section>")
    run_date = dt.datetime.fromtimestamp(cfg_path.stat().st_mtime, dt.timezone.utc)
    roi_text = _get(cfg, "train.roi_size").strip("[]").replace(", ", " × ")
    rows += [
        ("run started (config written)", run_date.strftime("%Y-%m-%d %H:%M UTC")),
        ("model", f"2D UNet, channels {_get(cfg, 'model.channels')}, strides {_get(cfg, 'model.strides')}, "
                  f"{_get(cfg, 'model.num_res_units')} residual units, {_get(cfg, 'model.norm')} norm, "
                  f"dropout {_get(cfg, 'model.dropout')}"),
        ("input size (roi)", roi_text),
        ("epochs", _get(cfg, "train.epochs")),
        ("batch size", _get(cfg, "train.batch_size")),
        ("loss", _get(cfg, "train.loss")),
        ("optimiser", f"AdamW, lr {_get(cfg, 'train.lr')}, weight decay {_get(cfg, 'train.weight_decay')}, "
                      f"{_get(cfg, 'train.warmup_epochs')} warm-up epochs then {_get(cfg, 'train.schedule')}"),
        ("precision / device", f"amp {_get(cfg, 'train.amp')}, device {_get(cfg, 'train.device')}"),
        # The fold count comes from the folders: the config's prepare section may not be the one
        # the data set was prepared with (train never re-reads it).
        ("folds trained", f"{len(folds)}: {', '.join(str(k) for k, _ in folds) or 'none'}"),
        ("seed", _get(cfg, "train.seed")),
    ]
    full = yaml.safe_dump(cfg, sort_keys=False)
    return ('<section id="summary"><h2>Run summary</h2>'
            + html_table(["item", "value"], rows, "summary-table", numeric=False)
            + f"<details><summary>resolved configuration ({esc(cfg_path.relative_to(run_dir))})</summary>"
            + f"<pre>{esc(full)}</pre></details></section>")


def _best_epoch_dice(metrics: Table) -> tuple[dict[str, str], dict[str, float]]:
    """The row of the best mean validation Dice and its per-patient Dice (from val_dice_<patient>)."""
    best = runs.best_row(metrics.rows)
    if best is None:
        raise ArtefactUnavailable("metrics.csv has no epoch with a val_dice_mean value")
    per_patient = {c[len("val_dice_"):]: number(best[c]) for c in metrics.columns
                   if c.startswith("val_dice_") and c != "val_dice_mean"}
    return best, per_patient


def _cv_table(run_dir: Path, folds: list[tuple[int, Path]]) -> tuple[Table, str]:
    """Per-patient CV Dice: cv_summary.csv, else each fold's best epoch in metrics.csv."""
    path = run_dir / runs.CV_SUMMARY
    if path.is_file():
        table = read_csv_table(path)
        missing = [c for c in ("fold", "patient", "dice") if c not in table.columns]
        if missing:
            raise ArtefactUnavailable(f"{path}: missing column(s) {', '.join(missing)}")
        rows = [r for r in table.rows if r["fold"].strip().lower() not in _SUMMARY_LABELS]
        return Table(table.columns, rows), "cv_summary.csv"
    rows = []
    for k, fold_dir in folds:
        try:
            _, per_patient = _best_epoch_dice(read_csv_table(fold_dir / runs.METRICS))
        except ArtefactUnavailable as exc:
            log.warning("report: fold %d: %s", k, exc)
            continue
        rows += [{"fold": str(k), "patient": p, "dice": repr(d)} for p, d in per_patient.items()]
    if not rows:
        raise ArtefactUnavailable("no cv_summary.csv and no fold with per-patient validation Dice")
    return Table(["fold", "patient", "dice"], rows), "best epoch of each fold's metrics.csv (no cv_summary.csv)"


def _cv_section(run_dir: Path, folds: list[tuple[int, Path]]) -> str:
    head = '<section id="cv"><h2>Cross-validation</h2>'
    try:
        table, source = _cv_table(run_dir, folds)
    except ArtefactUnavailable as exc:
        log.warning("report: %s", exc)
        return head + unavailable("cross-validation summary", str(exc)) + "</section>"
    by_fold: dict[str, list[float]] = {}
    for r in table.rows:
        by_fold.setdefault(r["fold"], []).append(number(r["dice"]))
    fold_rows = [(f, str(len(v)), mean_std(v), fmt_cell("dice", str(min(v))))
                 for f, v in sorted(by_fold.items(), key=lambda kv: number(kv[0]))]
    all_dice = [number(r["dice"]) for r in table.rows]
    overall = mean_std(all_dice)
    foot = [("all", str(len(all_dice)), overall, fmt_cell("dice", str(min(all_dice))))]
    patient_rows = [table.cells(r) for r in table.rows]
    return (head + f'<p class="headline">mean Dice over {len(all_dice)} patients: <b>{esc(overall)}</b> '
            f'(mean ± std)</p><p class="src">source: {esc(source)}</p>'
            + "<h3>Per fold</h3>"
            + html_table(["fold", "patients", "Dice mean ± std", "Dice min"], fold_rows, "cv-folds", foot)
            + "<h3>Per patient</h3>" + html_table(table.columns, patient_rows, "cv-patients") + "</section>")


def _draw_curves(metrics: Table, title: str) -> str:
    """Loss, Dice and LR panels drawn from metrics.csv when train left no curves.png."""
    from matplotlib.ticker import MaxNLocator

    epochs = [number(r.get("epoch")) for r in metrics.rows]
    fig = new_figure(figsize=(12, 3.4), dpi=90, layout="constrained")
    panels = [("loss", ["train_loss", "val_loss"]), ("Dice", ["val_dice_mean"]), ("learning rate", ["lr"])]
    for ax, (name, cols) in zip(fig.subplots(1, 3), panels):
        for col in cols:
            if col in metrics.columns:
                pts = [(e, number(r.get(col))) for e, r in zip(epochs, metrics.rows)]
                pts = [(e, v) for e, v in pts if math.isfinite(e) and math.isfinite(v)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=col)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return figure_data_uri(fig)


def _split_html(fold_dir: Path) -> str:
    try:
        split = runs.read_split(fold_dir)
    except PipelineError as exc:
        return unavailable("split", str(exc))
    if split is None:
        return unavailable("split", f"{fold_dir / runs.SPLIT}: not found")
    items = []
    for key, value in split.items():
        if isinstance(value, dict):  # {"patients": [...], "cases": [...]}
            value = value.get("patients", value.get("cases", []))
        if isinstance(value, list):
            items.append(f"<li><b>{esc(key)}</b> ({len(value)}): {esc(', '.join(map(str, value)))}</li>")
    return f'<ul class="split">{"".join(items)}</ul>' if items else unavailable("split", "no patient lists")


def _fold_section(k: int, fold_dir: Path) -> str:
    parts = [f'<section class="fold" id="fold-{k}"><h3>Fold {k}</h3>', _split_html(fold_dir)]
    present = [name for name in _FOLD_ARTEFACTS if (fold_dir / name).is_file()]
    missing = [name for name in _FOLD_ARTEFACTS if name not in present]
    parts.append(f'<p class="src">artefacts: {esc(", ".join(present) or "none")}'
                 + (f'; {NOT_AVAILABLE}: {esc(", ".join(missing))}' if missing else "") + "</p>")
    try:
        metrics = read_csv_table(fold_dir / runs.METRICS)
    except ArtefactUnavailable as exc:
        metrics = None
        metrics_error = str(exc)
    try:
        parts.append(img(png_data_uri(fold_dir / runs.CURVES), f"training curves of fold {k}", "curves"))
    except ArtefactUnavailable as exc:
        if metrics is not None and metrics.rows:
            log.info("report: fold %d: %s; drawing curves from metrics.csv", k, exc)
            parts.append(img(_draw_curves(metrics, f"fold {k}"), f"training curves of fold {k}", "curves"))
            parts.append(f'<p class="src">curves drawn from metrics.csv ({esc(exc)})</p>')
        else:
            parts.append(unavailable("training curves", str(exc)))
    if metrics is None:
        parts.append(unavailable("epoch metrics", metrics_error))
    elif not metrics.rows:
        parts.append(unavailable("epoch metrics", "metrics.csv has no epochs"))
    else:
        rows = []
        try:
            best, _ = _best_epoch_dice(metrics)
            rows.append(["best", *metrics.cells(best)])
        except ArtefactUnavailable as exc:
            parts.append(unavailable("best epoch", str(exc)))
        rows.append(["final", *metrics.cells(metrics.rows[-1])])
        times = [number(r.get("epoch_time_s")) for r in metrics.rows]
        if any(math.isfinite(t) for t in times):
            total = sum(t for t in times if math.isfinite(t))
            parts.append(f'<p class="src">{len(metrics.rows)} epochs, {total / 60:.1f} min of training</p>')
        parts.append(html_table(["", *metrics.columns], rows, f"fold-{k}-epochs"))
    parts.append("</section>")
    return "".join(parts)


def _training_section(folds: list[tuple[int, Path]]) -> str:
    head = '<section id="training"><h2>Training per fold</h2>'
    if not folds:
        return head + unavailable("folds", "no fold_<k> folder in the run") + "</section>"
    return head + "".join(_fold_section(k, p) for k, p in folds) + "</section>"


def _compare_section(compare_dir: Path | None) -> str:
    """The leaderboard of `run.py compare` (its CSV and box plot), when --compare names one."""
    if compare_dir is None:
        return ""
    from pipeline.app.compare import BOXPLOT, LEADERBOARD

    head = '<section id="compare"><h2>Comparison of configurations</h2>'
    try:
        table = read_csv_table(compare_dir / LEADERBOARD)
    except ArtefactUnavailable as exc:
        return head + unavailable("comparison", str(exc)) + "</section>"
    parts = [head, f'<p class="src">source: {esc(compare_dir / LEADERBOARD)}; every configuration trained on the '
             "same folds and scored on each fold's validation patients with its last checkpoint.</p>",
             html_table(table.columns, [table.cells(r, table.columns) for r in table.rows], "compare")]
    try:
        parts.append(img(png_data_uri(compare_dir / BOXPLOT), "Dice per patient by configuration", "curves"))
    except ArtefactUnavailable as exc:
        parts.append(unavailable("box plot", str(exc)))
    return "".join(parts) + "</section>"


def _eval_section(eval_dir: Path | None, table: Table | None, reason: str) -> str:
    head = '<section id="evaluation"><h2>Evaluation</h2>'
    if table is None:
        return head + unavailable("evaluation", reason) + "</section>"
    key = table.columns[0]
    # Paths make the table unreadably wide; the source folder is named above the table instead.
    columns = [c for c in table.columns if not c.endswith("_file")]
    is_summary = [r.get(key, "").strip().lower() in _SUMMARY_LABELS for r in table.rows]
    cases = [r for r, s in zip(table.rows, is_summary) if not s]
    body = [table.cells(r, columns) for r in cases]
    foot = [table.cells(r, columns) for r, s in zip(table.rows, is_summary) if s]
    if cases and not foot:
        # Population std, as evaluate's metrics.json summary.
        stats = {"mean": statistics.fmean, "std": statistics.pstdev}
        for name, fn in stats.items():
            row = [f"{name} ({len(cases)} cases)" if name == "mean" else name]
            for c in columns[1:]:
                finite = [v for v in (number(r.get(c)) for r in cases) if math.isfinite(v)]
                row.append(fmt_cell(c, repr(fn(finite))) if finite else "–")
            foot.append(row)
    return (head + f'<p class="src">source: {esc(eval_dir / "metrics.csv")}. CHAOS points: Dice &lt; 0.8, '
            "RAVD &gt; 5 %, ASSD &gt; 15 mm or MSSD &gt; 60 mm score 0 for that metric; the score is the mean "
            "of the four points.</p>" + html_table(columns, body, "eval-cases", foot) + "</section>")


def _eval_pred_dirs(eval_dir: Path) -> list[Path]:
    """The prediction folder that evaluate scored (metrics.json "pred"): infer writes montages there."""
    try:
        pred = read_json(eval_dir / "metrics.json").get("pred")
    except (ArtefactUnavailable, AttributeError) as exc:
        log.info("report: no prediction folder from %s (%s)", eval_dir / "metrics.json", exc)
        return []
    if not isinstance(pred, str) or not pred:
        return []
    # evaluate stores the path as given on its command line, so it may be relative to any cwd.
    return [Path(pred), eval_dir.parent / pred]


def _find_montages(run_dir: Path, eval_dir: Path | None, montage_dir: Path | None) -> list[Path]:
    """*_montage.png in montage_dir, evaluate's prediction folder, next to it, and infer*/ folders."""
    folders = [montage_dir] if montage_dir is not None else []
    if eval_dir is not None:
        folders += [*_eval_pred_dirs(eval_dir), eval_dir, eval_dir.parent, *sorted(eval_dir.parent.glob("infer*"))]
    folders += [*sorted(run_dir.glob("infer*")), *sorted(run_dir.parent.glob("infer*"))]
    seen: dict[Path, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*" + results.MONTAGE_SUFFIX)):
                seen.setdefault(path.resolve(), path)
    return list(seen.values())


@functools.lru_cache(maxsize=32)
def _qc_flags(infer_dir: Path) -> dict[str, list[str]]:
    """{case: infer's quality-control flags} from infer_dir/inference.json ({} when absent)."""
    try:
        cases = results.read_summary(infer_dir / results.SUMMARY)["cases"]
    except PipelineError:
        return {}
    return {str(c.get("case")): [str(f) for f in c.get("qc") or []] for c in cases if isinstance(c, dict)}


def _montage_section(paths: list[Path], evaluation: Table | None) -> str:
    head = '<section id="montages"><h2>Per-patient overlays</h2>'
    scores = {}
    if evaluation is not None:
        key = evaluation.columns[0]
        shown = [c for c in ("dice", "score") if c in evaluation.columns]
        scores = {r.get(key, ""): ", ".join(f"{c} {t}" for c, t in zip(shown, evaluation.cells(r, shown)))
                  for r in evaluation.rows}
    if not paths:
        return head + unavailable("montages", "no *_montage.png found (run infer with montages)") + "</section>"
    figures = []
    for path in progress(paths, desc="montages", unit="image", leave=False):
        case = results.case_of(path.name, results.MONTAGE_SUFFIX)
        flags = _qc_flags(path.parent).get(case, [])
        try:
            figures.append(f"<figure>{img(png_data_uri(path), f'overlay montage of {case}', 'montage')}"
                           f"<figcaption>{esc(case)}"
                           + (f" · {esc(scores[case])}" if scores.get(case) else "")
                           + "".join(f'<br><span class="qc">check: {esc(f)}</span>' for f in flags)
                           + "</figcaption></figure>")
        except ArtefactUnavailable as exc:
            log.warning("report: %s", exc)
            figures.append(f"<figure>{unavailable(case, str(exc))}</figure>")
    return head + "".join(figures) + "</section>"


def write_report(run_dir: str | Path, eval_dir: str | Path | None = None,
                 montage_dir: str | Path | None = None, compare_dir: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (atomically) and return its path.

    `eval_dir` is an evaluate output folder (metrics.csv); `montage_dir` an extra folder of infer
    ``*_montage.png``. Raises PipelineError when `run_dir` is not a run folder (neither
    config.yaml nor fold_<k>/) or `eval_dir`/`montage_dir` is given but does not exist.
    """
    run_dir = Path(run_dir).resolve()  # so the page names the run even for `--run .`
    _qc_flags.cache_clear()  # inference.json files may have changed since an earlier report
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: run folder not found")
    folds = runs.fold_dirs(run_dir)
    if not folds and not (run_dir / runs.CONFIG).is_file():
        raise PipelineError(f"{run_dir}: not a run folder (no config.yaml and no fold_<k>/ inside)")
    eval_path = Path(eval_dir) if eval_dir is not None else None
    if eval_path is not None and not eval_path.is_dir():
        raise PipelineError(f"{eval_path}: evaluate folder not found")
    compare_path = Path(compare_dir) if compare_dir is not None else None
    if compare_path is not None and not compare_path.is_dir():
        raise PipelineError(f"{compare_path}: comparison folder not found")
    montage_path = Path(montage_dir) if montage_dir is not None else None
    if montage_path is not None and not montage_path.is_dir():
        raise PipelineError(f"{montage_path}: montage folder not found")

    evaluation, eval_reason = None, "no evaluate folder given (run.py report --eval DIR)"
    if eval_path is not None:
        try:
            evaluation = read_csv_table(eval_path / "metrics.csv")
        except ArtefactUnavailable as exc:
            log.warning("report: %s", exc)
            eval_reason = str(exc)
    montages = _find_montages(run_dir, eval_path, montage_path)
    log.info("report: run %s, %d fold(s), evaluation %s, %d montage(s)", run_dir, len(folds),
             eval_path or "none", len(montages))
    title = f"CHAOS liver segmentation: run {run_dir.name}"
    nav = ('<nav><a href="#summary">summary</a><a href="#cv">cross-validation</a><a href="#training">training</a>'
           '<a href="#evaluation">evaluation</a><a href="#montages">overlays</a></nav>')
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>", nav,
        _summary_section(run_dir, folds), _cv_section(run_dir, folds), _training_section(folds),
        _eval_section(eval_path, evaluation, eval_reason), _compare_section(compare_path),
        _montage_section(montages, evaluation),
        "</body></html>\n",
    ])
    out = run_dir / REPORT_NAME
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report: wrote %s (%.1f kB)", out, out.stat().st_size / 1024)
    return out
