"""Small file-system helpers shared by every stage: atomic writes and safe names."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.core.errors import PipelineError

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the file's endings (``.nii.gz``), so writers that pick a format
    from the name (nibabel, PIL, matplotlib) still work. An interrupted write leaves at most a
    hidden ``.partial-*`` file, never a half-written output under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def safe_name(text: str, what: str = "name") -> str:
    """A file-name-safe version of `text` (from a folder name or a DICOM tag).

    Anything outside [A-Za-z0-9._-] becomes '_'; leading dots are removed so a name can never
    be '.', '..' or hidden. Raises PipelineError if nothing usable is left.
    """
    cleaned = _SAFE_NAME.sub("_", str(text)).strip("_").lstrip(".")
    if not cleaned:
        raise PipelineError(f"cannot build a safe file name from {what} {text!r}")
    return cleaned[:128]


def write_csv(path: str | Path, rows: Iterable[dict], columns: list[str]) -> Path:
    """The pipeline's one CSV writer: a header of `columns`, one line per row (other keys ignored, a
    missing or None value left empty, floats to 10 significant digits), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else f"{row[k]:.10g}" if isinstance(row[k], float) else row[k]
                         for k in columns})
    return write_text(path, buf.getvalue())


def is_zip_link(member) -> bool:
    """A zipfile.ZipInfo that stores a symbolic link (Unix mode in its external attributes): never unpacked."""
    return (member.external_attr >> 16) & 0o170000 == 0o120000
