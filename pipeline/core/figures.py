"""Figures people look at, written one way: matplotlib's object API on the Agg canvas (no pyplot, so no
global state and no display needed), saved atomically as PNG; and the grey-level window they are shown in.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import atomic_path

DISPLAY_PERCENTILES = (1.0, 99.0)  # the grey-level window of a scan without units (MR), or of any picture


def new_figure(**kwargs: Any):
    """A matplotlib Figure (figsize, dpi, layout=... as matplotlib takes them) with the Agg canvas."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(fig, path: str | Path, dpi: float | None = None) -> Path:
    """`fig` as a PNG at `path`, written under a temporary name and renamed when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def figure_data_uri(fig, dpi: float | None = None) -> str:
    """`fig` as a data: URI, for a page that must stand alone (the report)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_window(image: Any, percentiles: tuple[float, float] = DISPLAY_PERCENTILES) -> tuple[float, float]:
    """(low, high) grey levels that show `image` without its outliers: its percentiles."""
    low, high = np.percentile(np.asarray(image), list(percentiles))
    return float(low), float(high)
