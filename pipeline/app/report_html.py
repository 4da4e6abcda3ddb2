"""The report's building blocks: artefacts read as tables, escaped HTML cells, tables, images, the page style.

Every string taken from a file (case ids, config values, CSV cells) is HTML-escaped here.
"""
from __future__ import annotations

import base64
import csv
import functools
import html
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from pipeline.core.errors import PipelineError

NOT_AVAILABLE = "not available"


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_INTEGER = re.compile(r"[+-]?\d+")


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
        return [fmt_cell(c, row.get(c, ""), c in self.integer_columns) for c in (columns or self.columns)]


def read_csv_table(path: Path) -> Table:
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


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ArtefactUnavailable(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtefactUnavailable(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ArtefactUnavailable(f"{path.name} not found in {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactUnavailable(f"{path}: cannot be read as JSON ({exc})") from exc


def png_data_uri(path: Path) -> str:
    """The PNG at `path` as a data URI; checks the signature so a broken file is reported, not embedded."""
    if not path.is_file():
        raise ArtefactUnavailable(f"{path.name} not found in {path.parent}")
    data = path.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ArtefactUnavailable(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def number(text: Any) -> float:
    """`text` as a float, NaN when blank or not a number (epochs without validation leave blanks)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt_cell(column: str, text: str, integer: bool = False) -> str:
    """Readable text for one CSV cell: integers as is, Dice to 4 decimals, lr in e-notation."""
    value = number(text)
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


def html_table(columns: Sequence[str], rows: Iterable[Sequence[str]], table_id: str,
           foot: Iterable[Sequence[str]] = (), numeric: bool = True) -> str:
    """An HTML table; `rows` and `foot` hold plain cell texts, escaped here.

    With `numeric`, cells holding a number are right-aligned so that decimals line up.
    """
    def cells(tag: str, values: Sequence[str]) -> str:
        out = []
        for value in values:
            is_num = numeric and (not math.isnan(number(value)) or value == "–")
            cls = ' class="num"' if is_num else ""
            out.append(f"<{tag}{cls}>{esc(value)}</{tag}>")
        return "".join(out)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    foot_html = "\n".join(f"<tr>{cells('th', r)}</tr>" for r in foot)
    tfoot = f"<tfoot>{foot_html}</tfoot>" if foot_html else ""
    return (f'<div class="scroll"><table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody>{tfoot}</table></div>")


def unavailable(what: str, reason: str) -> str:
    return f'<p class="na">{esc(what)}: {NOT_AVAILABLE} ({esc(reason)})</p>'


def img(uri: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{esc(alt)}">'


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    # Sample std (n - 1), as train's printed cross-validation table, so the two agree.
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


CSS = """
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
