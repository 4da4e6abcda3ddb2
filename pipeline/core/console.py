"""What a command shows on the terminal: logging set-up, progress bars, known library noise.

Log records and tqdm bars share stderr: records are written through tqdm while bars are open
(`tqdm.contrib.logging.logging_redirect_tqdm`), so an INFO line never breaks a bar. Bars follow
the logging level: `-q` (WARNING) hides them with the INFO lines.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterable, Iterator, Sequence

LOGGER = "pipeline"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# "bars": False in a worker process whose parent shows the bar (hide_progress_bars); "level": the
# terminal's level while a command runs (command_output), which decides the bars: a fold's train.log
# takes INFO lines even under -q, so the "pipeline" logger's own level cannot say what the terminal shows
_terminal: dict = {"bars": True, "level": None}


_NUMBER = re.compile(r"-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( ± [\d.]+)?")


def progress(iterable=None, **kwargs):
    """tqdm, shown only when the terminal shows INFO lines (the command's level; outside a command,
    the "pipeline" logger's)."""
    from tqdm import tqdm

    level = terminal_level()
    shows_info = level <= logging.INFO if level is not None else logging.getLogger(LOGGER).isEnabledFor(logging.INFO)
    if not _terminal["bars"] or not shows_info:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def terminal_level() -> int | None:
    """The level the terminal shows while a command runs (command_output), None outside one (the
    Python API, where the caller's logging set-up decides)."""
    return _terminal["level"]


def hide_progress_bars() -> None:
    """No bars from this process: for workers that log INFO to their own files while the parent
    draws the one bar of the whole job (bars of processes side by side overwrite each other's line)."""
    _terminal["bars"] = False


@contextlib.contextmanager
def command_output(level: int) -> Iterator[None]:
    """Logging at `level` for the duration of a command, routed around the tqdm bars."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
    root = logging.getLogger()
    root_level, previous = root.level, _terminal["level"]
    root.setLevel(level)
    quiet_known_library_noise()
    _terminal["level"] = level
    try:
        with logging_redirect_tqdm():
            levels = [(handler, handler.level) for handler in root.handlers]
            for handler, _ in levels:  # the terminal's: a file handler may take more (train.log)
                handler.setLevel(level)
            try:
                yield
            finally:
                for handler, before in levels:
                    handler.setLevel(before)
    finally:  # as it was: a command run inside another program (the tests' run_main) leaves no trace
        _terminal["level"] = previous
        root.setLevel(root_level)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_known_library_noise() -> None:
    """Silence, precisely, the library messages a normal run would print that are not ours to fix.

    MONAI's LoadImage builds every default reader, whatever reader it is given; building the
    nvImageCodec DICOM reader where nvImageCodec is not installed warns (a UserWarning and a log
    record) each time, although that reader is never used here (NIfTI only). One filter each, on
    that message and module only. Called where this project builds a LoadImage (idempotent).
    """
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register",
                            category=UserWarning, module="monai.data.image_reader")
    # A training volume without liver slices (or with liver on every slice) is legitimate: its draws
    # are then all of one kind, which is what RandCropByPosNegLabeld does, with a warning per draw.
    warnings.filterwarnings("ignore", message=r"Num foregrounds \d+, Num backgrounds \d+, unable to generate class "
                            "balanced samples", category=UserWarning, module="monai.transforms.utils")
    # RandHistogramShift leaves a slice of one grey level (blank slices exist in real series) as it is,
    # which is right, and warns each time.
    warnings.filterwarnings("ignore", message="The image's intensity is a single value", category=UserWarning,
                            module="monai.transforms.intensity.array")
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("nvImageCodec is not available; skipping pydicom decoder plugin registration"))


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]], footer: Iterable[Sequence[object]] = ()) -> str:
    """The pipeline's one console table: each column as wide as its widest cell, two spaces apart,
    a rule under the header and one above the footer (totals, means). A column whose body cells are
    all numbers (or '-') is right-aligned, any other left-aligned."""
    body = [[str(c) for c in r] for r in rows]
    foot = [[str(c) for c in r] for r in footer]
    every = [list(header), *body, *foot]
    n = max(len(r) for r in every)
    every = [r + [""] * (n - len(r)) for r in every]
    widths = [max(len(r[i]) for r in every) for i in range(n)]
    numeric = [bool(body) and all(_NUMBER.fullmatch(r[i]) for r in body if i < len(r)) for i in range(n)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(every[0]), rule, *(line(r) for r in every[1:1 + len(body)])]
    if foot:
        out += [rule, *(line(r) for r in every[1 + len(body):])]
    return "\n".join(out)
