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

import base64
import csv
import datetime as dt
import functools
import html
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from pipeline import runs
from pipeline.console import progress
from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

REPORT_NAME = runs.REPORT
NOT_AVAILABLE = "not available"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_INTEGER = re.compile(r"[+-]?\d+")
_SUMMARY_LABELS = {"mean", "std", "overall", "all", "summary", "median"}
_FOLD_ARTEFACTS = (runs.CONFIG, runs.SPLIT, runs.LABELS, runs.NORMALISATION,
                   *(runs.checkpoint_path("", c).name for c in runs.CHECKPOINTS), runs.TRAIN_LOG, runs.METRICS,
                   runs.CURVES)


class ArtefactUnavailable(PipelineError):
    """An optional artefact is missing or unreadable; its section shows the reason instead."""


@dataclass
class Table:
    """Columns and rows of cell texts as read from a file (not yet escaped)."""

    columns: list[str]
    rows: list[dict[str, str]]

    @functools.cached_property
    def integer_columns(self) -> set[str]:
        """Columns whose every filled cell is an integer (epoch, fold): printed as is."""
        return {c for c in self.columns
                if any(r.get(c, "").strip() for r in self.rows)
                and all(_INTEGER.fullmatch(r.get(c, "").strip() or "0") for r in self.rows)}

    def cells(self, row: dict[str, str], columns: Sequence[str] | None = None) -> list[str]:
        """Display texts of `row`; a "1" in a float column (evaluate writes %g) reads 1.0000 like its neighbours."""
        return [_fmt(c, row.get(c, ""), c in self.integer_columns) for c in (columns or self.columns)]


# --------------------------------------------------------------------------- reading artefacts

def _read_csv(path: Path) -> Table:
    if not path.is_file():
        raise ArtefactUnavailable(f"{path.name} not found in {path.parent}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArtefactUnavailable(f"{path}: cannot be read as CSV ({exc})") from exc
    if not columns:
        raise ArtefactUnavailable(f"{path}: empty CSV (no header)")
    return Table(columns, rows)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ArtefactUnavailable(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtefactUnavailable(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ArtefactUnavailable(f"{path.name} not found in {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactUnavailable(f"{path}: cannot be read as JSON ({exc})") from exc


def _png_data_uri(path: Path) -> str:
    """The PNG at `path` as a data URI; checks the signature so a broken file is reported, not embedded."""
    if not path.is_file():
        raise ArtefactUnavailable(f"{path.name} not found in {path.parent}")
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ArtefactUnavailable(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _number(text: Any) -> float:
    """`text` as a float, NaN when blank or not a number (epochs without validation leave blanks)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- HTML helpers
# A template engine would be one more dependency for one page; html.escape on every value from a
# file is what keeps hand-built markup safe, so all cell text passes through _esc.

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(column: str, text: str, integer: bool = False) -> str:
    """Readable text for one CSV cell: integers as is, Dice to 4 decimals, lr in e-notation."""
    value = _number(text)
    stripped = str(text).strip()
    if math.isnan(value) or not math.isfinite(value):
        return stripped if stripped else "–"
    if integer and _INTEGER.fullmatch(stripped):
        return stripped
    col = column.lower()
    if col == "lr" or col.endswith("_lr"):
        return f"{value:.2e}"
    if "dice" in col and "points" not in col and abs(value) <= 1:
        return f"{value:.4f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.2f}"


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], table_id: str,
           foot: Iterable[Sequence[str]] = (), numeric: bool = True) -> str:
    """An HTML table; `rows` and `foot` hold plain cell texts, escaped here.

    With `numeric`, cells holding a number are right-aligned so that decimals line up.
    """
    def cells(tag: str, values: Sequence[str]) -> str:
        out = []
        for value in values:
            is_num = numeric and (not math.isnan(_number(value)) or value == "–")
            cls = ' class="num"' if is_num else ""
            out.append(f"<{tag}{cls}>{_esc(value)}</{tag}>")
        return "".join(out)

    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    foot_html = "\n".join(f"<tr>{cells('th', r)}</tr>" for r in foot)
    tfoot = f"<tfoot>{foot_html}</tfoot>" if foot_html else ""
    return (f'<div class="scroll"><table id="{_esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody>{tfoot}</table></div>")


def _unavailable(what: str, reason: str) -> str:
    return f'<p class="na">{_esc(what)}: {NOT_AVAILABLE} ({_esc(reason)})</p>'


def _img(uri: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{_esc(alt)}">'


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    # Sample std (n - 1), as train's printed cross-validation table, so the two agree.
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


# --------------------------------------------------------------------------- sections

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
            return _read_yaml(path), path
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
                + _table(["item", "value"], rows, "summary-table", numeric=False)
                + _unavailable("configuration", str(exc))
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
            + _table(["item", "value"], rows, "summary-table", numeric=False)
            + f"<details><summary>resolved configuration ({_esc(cfg_path.relative_to(run_dir))})</summary>"
            + f"<pre>{_esc(full)}</pre></details></section>")


def _best_epoch_dice(metrics: Table) -> tuple[dict[str, str], dict[str, float]]:
    """The row of the best mean validation Dice and its per-patient Dice (from val_dice_<patient>)."""
    scored = [r for r in metrics.rows if math.isfinite(_number(r.get("val_dice_mean")))]
    if not scored:
        raise ArtefactUnavailable("metrics.csv has no epoch with a val_dice_mean value")
    best = max(scored, key=lambda r: _number(r["val_dice_mean"]))
    per_patient = {c[len("val_dice_"):]: _number(best[c]) for c in metrics.columns
                   if c.startswith("val_dice_") and c != "val_dice_mean"}
    return best, per_patient


def _cv_table(run_dir: Path, folds: list[tuple[int, Path]]) -> tuple[Table, str]:
    """Per-patient CV Dice: cv_summary.csv, else each fold's best epoch in metrics.csv."""
    path = run_dir / runs.CV_SUMMARY
    if path.is_file():
        table = _read_csv(path)
        missing = [c for c in ("fold", "patient", "dice") if c not in table.columns]
        if missing:
            raise ArtefactUnavailable(f"{path}: missing column(s) {', '.join(missing)}")
        rows = [r for r in table.rows if r["fold"].strip().lower() not in _SUMMARY_LABELS]
        return Table(table.columns, rows), "cv_summary.csv"
    rows = []
    for k, fold_dir in folds:
        try:
            _, per_patient = _best_epoch_dice(_read_csv(fold_dir / runs.METRICS))
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
        return head + _unavailable("cross-validation summary", str(exc)) + "</section>"
    by_fold: dict[str, list[float]] = {}
    for r in table.rows:
        by_fold.setdefault(r["fold"], []).append(_number(r["dice"]))
    fold_rows = [(f, str(len(v)), _mean_std(v), _fmt("dice", str(min(v))))
                 for f, v in sorted(by_fold.items(), key=lambda kv: _number(kv[0]))]
    all_dice = [_number(r["dice"]) for r in table.rows]
    overall = _mean_std(all_dice)
    foot = [("all", str(len(all_dice)), overall, _fmt("dice", str(min(all_dice))))]
    patient_rows = [table.cells(r) for r in table.rows]
    return (head + f'<p class="headline">mean Dice over {len(all_dice)} patients: <b>{_esc(overall)}</b> '
            f'(mean ± std)</p><p class="src">source: {_esc(source)}</p>'
            + "<h3>Per fold</h3>"
            + _table(["fold", "patients", "Dice mean ± std", "Dice min"], fold_rows, "cv-folds", foot)
            + "<h3>Per patient</h3>" + _table(table.columns, patient_rows, "cv-patients") + "</section>")


def _draw_curves(metrics: Table, title: str) -> str:
    """Loss, Dice and LR panels drawn from metrics.csv when train left no curves.png."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend needed
    from matplotlib.ticker import MaxNLocator

    epochs = [_number(r.get("epoch")) for r in metrics.rows]
    fig = Figure(figsize=(12, 3.4), dpi=90, layout="constrained")
    panels = [("loss", ["train_loss", "val_loss"]), ("Dice", ["val_dice_mean"]), ("learning rate", ["lr"])]
    for ax, (name, cols) in zip(fig.subplots(1, 3), panels):
        for col in cols:
            if col in metrics.columns:
                pts = [(e, _number(r.get(col))) for e, r in zip(epochs, metrics.rows)]
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _split_html(fold_dir: Path) -> str:
    try:
        split = _read_json(fold_dir / runs.SPLIT)
    except ArtefactUnavailable as exc:
        return _unavailable("split", str(exc))
    if not isinstance(split, dict):
        return _unavailable("split", f"{fold_dir / runs.SPLIT}: expected a mapping")
    items = []
    for key, value in split.items():
        if isinstance(value, dict):  # {"patients": [...], "cases": [...]}
            value = value.get("patients", value.get("cases", []))
        if isinstance(value, list):
            items.append(f"<li><b>{_esc(key)}</b> ({len(value)}): {_esc(', '.join(map(str, value)))}</li>")
    return f'<ul class="split">{"".join(items)}</ul>' if items else _unavailable("split", "no patient lists")


def _fold_section(k: int, fold_dir: Path) -> str:
    parts = [f'<section class="fold" id="fold-{k}"><h3>Fold {k}</h3>', _split_html(fold_dir)]
    present = [name for name in _FOLD_ARTEFACTS if (fold_dir / name).is_file()]
    missing = [name for name in _FOLD_ARTEFACTS if name not in present]
    parts.append(f'<p class="src">artefacts: {_esc(", ".join(present) or "none")}'
                 + (f'; {NOT_AVAILABLE}: {_esc(", ".join(missing))}' if missing else "") + "</p>")
    try:
        metrics = _read_csv(fold_dir / runs.METRICS)
    except ArtefactUnavailable as exc:
        metrics = None
        metrics_error = str(exc)
    try:
        parts.append(_img(_png_data_uri(fold_dir / runs.CURVES), f"training curves of fold {k}", "curves"))
    except ArtefactUnavailable as exc:
        if metrics is not None and metrics.rows:
            log.info("report: fold %d: %s; drawing curves from metrics.csv", k, exc)
            parts.append(_img(_draw_curves(metrics, f"fold {k}"), f"training curves of fold {k}", "curves"))
            parts.append(f'<p class="src">curves drawn from metrics.csv ({_esc(exc)})</p>')
        else:
            parts.append(_unavailable("training curves", str(exc)))
    if metrics is None:
        parts.append(_unavailable("epoch metrics", metrics_error))
    elif not metrics.rows:
        parts.append(_unavailable("epoch metrics", "metrics.csv has no epochs"))
    else:
        rows = []
        try:
            best, _ = _best_epoch_dice(metrics)
            rows.append(["best", *metrics.cells(best)])
        except ArtefactUnavailable as exc:
            parts.append(_unavailable("best epoch", str(exc)))
        rows.append(["final", *metrics.cells(metrics.rows[-1])])
        times = [_number(r.get("epoch_time_s")) for r in metrics.rows]
        if any(math.isfinite(t) for t in times):
            total = sum(t for t in times if math.isfinite(t))
            parts.append(f'<p class="src">{len(metrics.rows)} epochs, {total / 60:.1f} min of training</p>')
        parts.append(_table(["", *metrics.columns], rows, f"fold-{k}-epochs"))
    parts.append("</section>")
    return "".join(parts)


def _training_section(folds: list[tuple[int, Path]]) -> str:
    head = '<section id="training"><h2>Training per fold</h2>'
    if not folds:
        return head + _unavailable("folds", "no fold_<k> folder in the run") + "</section>"
    return head + "".join(_fold_section(k, p) for k, p in folds) + "</section>"


def _compare_section(compare_dir: Path | None) -> str:
    """The leaderboard of `run.py compare` (its CSV and box plot), when --compare names one."""
    if compare_dir is None:
        return ""
    from pipeline.compare import BOXPLOT, LEADERBOARD

    head = '<section id="compare"><h2>Comparison of configurations</h2>'
    try:
        table = _read_csv(compare_dir / LEADERBOARD)
    except ArtefactUnavailable as exc:
        return head + _unavailable("comparison", str(exc)) + "</section>"
    parts = [head, f'<p class="src">source: {_esc(compare_dir / LEADERBOARD)}; every configuration trained on the '
             "same folds and scored on each fold's validation patients with its last checkpoint.</p>",
             _table(table.columns, [table.cells(r, table.columns) for r in table.rows], "compare")]
    try:
        parts.append(_img(_png_data_uri(compare_dir / BOXPLOT), "Dice per patient by configuration", "curves"))
    except ArtefactUnavailable as exc:
        parts.append(_unavailable("box plot", str(exc)))
    return "".join(parts) + "</section>"


def _eval_section(eval_dir: Path | None, table: Table | None, reason: str) -> str:
    head = '<section id="evaluation"><h2>Evaluation</h2>'
    if table is None:
        return head + _unavailable("evaluation", reason) + "</section>"
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
                finite = [v for v in (_number(r.get(c)) for r in cases) if math.isfinite(v)]
                row.append(_fmt(c, repr(fn(finite))) if finite else "–")
            foot.append(row)
    return (head + f'<p class="src">source: {_esc(eval_dir / "metrics.csv")}. CHAOS points: Dice &lt; 0.8, '
            "RAVD &gt; 5 %, ASSD &gt; 15 mm or MSSD &gt; 60 mm score 0 for that metric; the score is the mean "
            "of the four points.</p>" + _table(columns, body, "eval-cases", foot) + "</section>")


def _eval_pred_dirs(eval_dir: Path) -> list[Path]:
    """The prediction folder that evaluate scored (metrics.json "pred"): infer writes montages there."""
    try:
        pred = _read_json(eval_dir / "metrics.json").get("pred")
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
            for path in sorted(folder.glob("*_montage.png")):
                seen.setdefault(path.resolve(), path)
    return list(seen.values())


@functools.lru_cache(maxsize=32)
def _qc_flags(infer_dir: Path) -> dict[str, list[str]]:
    """{case: infer's quality-control flags} from infer_dir/inference.json ({} when absent)."""
    try:
        data = _read_json(infer_dir / "inference.json")
    except ArtefactUnavailable:
        return {}
    cases = data.get("cases", []) if isinstance(data, dict) else []
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
        return head + _unavailable("montages", "no *_montage.png found (run infer with montages)") + "</section>"
    figures = []
    for path in progress(paths, desc="montages", unit="image", leave=False):
        case = path.name[: -len("_montage.png")]
        flags = _qc_flags(path.parent).get(case, [])
        try:
            figures.append(f"<figure>{_img(_png_data_uri(path), f'overlay montage of {case}', 'montage')}"
                           f"<figcaption>{_esc(case)}"
                           + (f" · {_esc(scores[case])}" if scores.get(case) else "")
                           + "".join(f'<br><span class="qc">check: {_esc(f)}</span>' for f in flags)
                           + "</figcaption></figure>")
        except ArtefactUnavailable as exc:
            log.warning("report: %s", exc)
            figures.append(f"<figure>{_unavailable(case, str(exc))}</figure>")
    return head + "".join(figures) + "</section>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5em;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #dde3ec;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #d5dbe5;padding:.28em .6em;text-align:left;vertical-align:top}
thead th{background:#eef2f8}tbody tr:nth-child(even){background:#f8fafc}tfoot th{background:#eef2f8}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}.na{color:#9a3b00;font-style:italic}.src{color:#5b6475;font-size:.88em}
.headline{font-size:1.1em}img{max-width:100%;height:auto}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{text-align:center;color:#5b6475}
.qc{color:#9a3b00;font-weight:600}
pre{background:#f4f6fa;padding:.8em;overflow-x:auto;font-size:.85em}
"""


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
            evaluation = _read_csv(eval_path / "metrics.csv")
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
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>", nav,
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
