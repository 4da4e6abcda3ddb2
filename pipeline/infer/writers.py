"""What infer writes for a case beside the NIfTI mask: label descriptions for viewers, CHAOS PNGs, the format list."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import results
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, write_text
from pipeline.core.labels import LIVER_RGB
from pipeline.datasets.chaos import CHAOS_PNG_LIVER

ITKSNAP_LABELS = """################################################
# ITK-SnAP Label Description File
# Columns: IDX -R- -G- -B- -A-- VIS MSH LABEL
################################################
    0     0    0    0        0  0  0    "Clear Label"
    1   {r}  {g}  {b}        1  1  1    "liver"
"""


# 3D Slicer colour table (File > Add Data > *.ctbl, then pick it as the segmentation's colour node).
SLICER_CTBL = "# Color table file for liver masks\n# index name R G B A\n0 background 0 0 0 0\n1 liver {r} {g} {b} 255\n"


def write_label_descriptions(out_dir: Path) -> None:
    r, g, b = LIVER_RGB
    write_text(out_dir / "labels.itksnap.txt", ITKSNAP_LABELS.format(r=r, g=g, b=b))
    write_text(out_dir / "labels.ctbl", SLICER_CTBL.format(r=r, g=g, b=b))


def write_chaos_png(out_dir: Path, case: str, mask: np.ndarray, geom) -> Path:
    """One 8-bit PNG per DICOM file (same stem), liver = CHAOS_PNG_LIVER (63), as in the challenge's
    sample submission."""
    from PIL import Image

    if geom is None:
        raise PipelineError(f"{case}: --format chaos-png needs DICOM input (NIfTI input has no DICOM files)")
    if len(set(geom.files)) != len(geom.files):
        raise PipelineError(f"{case}: --format chaos-png needs single-frame DICOM files (one PNG per file)")
    folder = out_dir / results.png_folder_name(case)
    folder.mkdir(parents=True, exist_ok=True)
    for src, plane in geom.unstack(mask).items():
        png = (np.asarray(plane) > 0).astype(np.uint8) * CHAOS_PNG_LIVER
        with atomic_path(folder / f"{Path(src).stem}.png") as tmp:
            Image.fromarray(png).save(tmp, format="PNG")
    return folder


FORMATS = ("nifti", "chaos-png", "dicom-seg", "rtstruct")  # the NIfTI mask is always written; the others beside it


def parse_formats(text: str) -> tuple[str, ...]:
    """'nifti,dicom-seg' -> ('nifti', 'dicom-seg'); PipelineError naming an unknown format."""
    formats = tuple(dict.fromkeys(f.strip() for f in str(text).split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise PipelineError(f"--format {text!r}: unknown format {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(FORMATS)} (comma-separated)")
    return formats
