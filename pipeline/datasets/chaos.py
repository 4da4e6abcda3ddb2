"""The CHAOS data-set layout: find patients and sequences, read and pair the Ground PNGs.

Layout (official `CHAOS_Train_Sets.zip`; `Test_Sets` is the same without Ground):
    CT/<n>/DICOM_anon/*.dcm                    CT/<n>/Ground/liver_GT_NNN.png (1-bit, liver only)
    MR/<n>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm   with one shared MR/<n>/T1DUAL/Ground/*.png
    MR/<n>/T2SPIR/DICOM_anon/*.dcm             MR/<n>/T2SPIR/Ground/*.png
Ids carry the modality because CT and MR numbers overlap but are different people:
patient `CT_<n>` / `MR_<n>`; case `CT_<n>`, `MR_<n>_T1DUAL_InPhase`, `MR_<n>_T1DUAL_OutPhase`, `MR_<n>_T2SPIR`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.core.files import safe_name
from pipeline.core.labels import LIVER
from pipeline.dicom.geometry import SeriesGeometry, natural_key
from pipeline.dicom.headers import read_header

log = logging.getLogger(__name__)

SEQUENCES = ("CT", "T1DUAL_InPhase", "T1DUAL_OutPhase", "T2SPIR")
# Official MR Ground grey level of each organ (label in pipeline.core.labels.ORGANS -> grey level); the
# liver's, 63, is also the grey level of the liver in the challenge's submissions.
MR_GREY_LEVELS = {LIVER: 63, 2: 126, 3: 189, 4: 252}
CHAOS_PNG_LIVER = MR_GREY_LEVELS[LIVER]
# The bands the official MR Ground PNGs actually use around those levels: (low, high) inclusive -> label.
MR_GREY_RANGES = ((55, 70, LIVER), (110, 135, 2), (175, 200, 3), (240, 255, 4))
_CT_GROUND = re.compile(r"^liver_GT_(\d+)$")
_DIGITS = re.compile(r"^\d+$")


@dataclass(frozen=True)
class CaseSource:
    """One series to prepare. ground_dir is None when the layout has no Ground (Test_Sets)."""

    case: str
    patient: str
    modality: str  # "CT" or "MR"
    sequence: str  # one of SEQUENCES
    dicom_dir: Path
    ground_dir: Path | None


def find_root(root: str | Path) -> Path | None:
    """The folder holding CT/ and/or MR/: `root` itself, or its Train_Sets/ (else Test_Sets/); None
    when `root` is not a CHAOS root."""
    root = Path(root)
    for candidate in (root, root / "Train_Sets", root / "Test_Sets"):
        if (candidate / "CT").is_dir() or (candidate / "MR").is_dir():
            return candidate
    return None


def is_chaos_root(root: str | Path) -> bool:
    return find_root(root) is not None


def resolve_root(root: str | Path) -> Path:
    """find_root, or an error naming `root`."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: CHAOS root folder not found")
    found = find_root(root)
    if found is None:
        raise PipelineError(f"{root}: not a CHAOS root (expected Train_Sets/, Test_Sets/, or CT/ and MR/ inside)")
    return found


def _patient_dirs(modality_dir: Path) -> list[Path]:
    """Numbered patient folders; a folder with any other name is an error, hidden ones are skipped."""
    if not modality_dir.is_dir():
        return []
    out = []
    for p in sorted(modality_dir.iterdir(), key=lambda p: natural_key(p.name)):
        if not p.is_dir():
            continue
        if p.name.startswith(".") or p.name == "__MACOSX":
            log.warning("%s: hidden folder, skipped", p)
            continue
        # Folder names become file names of the outputs: only plain numbers are accepted.
        if not _DIGITS.match(p.name):
            raise PipelineError(f"{p}: patient folder name must be a number, got {p.name!r}")
        out.append(p)
    return out


def _check_sequences(sequences: Iterable[str] | None) -> list[str]:
    sequences = list(SEQUENCES if sequences is None else sequences)
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown:
        raise PipelineError(f"unknown sequence(s) {', '.join(unknown)} (known: {', '.join(SEQUENCES)})")
    return sequences


def find_cases(
    root: str | Path, sequences: Iterable[str] | None = None, patients: Iterable[str] | None = None
) -> list[CaseSource]:
    """All cases under a CHAOS root, CT first, patients in numeric order.

    sequences: subset of SEQUENCES (default all); patients: subset of patient ids ("CT_3", "MR_1").
    A patient without a requested sequence folder simply has no such case; a sequence folder
    without its DICOM_anon is an error.
    """
    base = resolve_root(root)
    sequences = _check_sequences(sequences)
    wanted = set(patients) if patients is not None else None
    cases: list[CaseSource] = []
    for pdir in _patient_dirs(base / "CT") if "CT" in sequences else []:
        patient = f"CT_{int(pdir.name)}"
        cases.append(_case(patient, "CT", "CT", pdir / "DICOM_anon", pdir / "Ground"))
    for pdir in _patient_dirs(base / "MR"):
        patient = f"MR_{int(pdir.name)}"
        for sequence in sequences:
            if sequence == "CT":
                continue
            folder, _, phase = sequence.partition("_")
            if not (pdir / folder).is_dir():
                log.debug("%s: no %s folder", pdir, folder)
                continue
            dicom = pdir / folder / "DICOM_anon" / phase if phase else pdir / folder / "DICOM_anon"
            cases.append(_case(patient, "MR", sequence, dicom, pdir / folder / "Ground"))
    if wanted is not None:
        unknown = wanted - {c.patient for c in cases}
        if unknown:
            raise PipelineError(f"{base}: patient(s) {', '.join(sorted(unknown))} not found")
        cases = [c for c in cases if c.patient in wanted]
    if not cases:
        raise PipelineError(f"{base}: no CHAOS series found for sequences {', '.join(sequences)}")
    return cases


def _case(patient: str, modality: str, sequence: str, dicom_dir: Path, ground_dir: Path) -> CaseSource:
    if not dicom_dir.is_dir():
        raise PipelineError(f"{dicom_dir}: DICOM folder missing")
    case = safe_name(patient if sequence == "CT" else f"{patient}_{sequence}", "case id")
    return CaseSource(case, patient, modality, sequence, dicom_dir, ground_dir if ground_dir.is_dir() else None)


# ---------------------------------------------------------------------------------------------
# Ground PNGs
# ---------------------------------------------------------------------------------------------
def read_ground(case: CaseSource, geometry: SeriesGeometry) -> np.ndarray:
    """The case's Ground PNGs as a uint8 label volume in NIfTI order (geometry.shape).

    Labels: 0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen (CT: liver only).
    The PNG <-> DICOM pairing follows the data set's rules and is verified (see pair_ground).
    """
    if case.ground_dir is None:
        raise PipelineError(f"{case.dicom_dir.parent}: no Ground folder for case {case.case}")
    pairs = pair_ground(case, geometry.files)
    slices = {}
    for dcm, png in pairs.items():
        slices[dcm] = png_labels(png, case.modality, (geometry.rows, geometry.cols))
    return geometry.stack(slices)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".png" and not path.name.startswith(".")


def list_pngs(folder: Path) -> list[Path]:
    """The visible PNG files of `folder` in natural file-name order (the order CHAOS pairs them in)."""
    return sorted((p for p in Path(folder).iterdir() if _is_png(p)), key=lambda p: natural_key(p.name))


def _pngs(ground_dir: Path) -> list[Path]:
    """A Ground folder's PNGs; other files are skipped with a warning, no PNG at all is an error."""
    out = list_pngs(ground_dir)
    for p in sorted(ground_dir.iterdir()):
        if p.is_file() and not _is_png(p):
            log.warning("%s: not a Ground PNG, skipped", p)
    if not out:
        raise PipelineError(f"{ground_dir}: no Ground PNG files")
    return out


def pair_ground(case: CaseSource, dicom_files: list[Path]) -> dict[Path, Path]:
    """{DICOM file: its Ground PNG} for every file of the series, verified one-to-one.

    CT: liver_GT_NNN belongs to the NNN-th DICOM file (0-based) in natural file-name order.
    MR: same file stem. T1DUAL OutPhase: the shared Ground carries InPhase stems, so the k-th PNG
    pairs with the k-th OutPhase file, verified by equal ImagePositionPatient with the InPhase
    file owning that PNG (copies of the data whose OutPhase stems match pair by stem).
    """
    if case.ground_dir is None:
        raise PipelineError(f"{case.dicom_dir.parent}: no Ground folder for case {case.case}")
    pngs = _pngs(case.ground_dir)
    files = sorted(dicom_files, key=lambda p: natural_key(p.name))
    if case.modality == "CT":
        pairs = _pair_ct(case.ground_dir, pngs, files)
    elif case.sequence == "T1DUAL_OutPhase" and not {f.stem for f in files} <= {p.stem for p in pngs}:
        pairs = _pair_outphase(case, pngs, files)
    else:
        pairs = _pair_by_stem(case, pngs, files)
    return pairs


def _pair_ct(ground_dir: Path, pngs: list[Path], files: list[Path]) -> dict[Path, Path]:
    by_index: dict[int, Path] = {}
    for png in pngs:
        m = _CT_GROUND.match(png.stem)
        if not m:
            raise PipelineError(f"{png}: CT Ground PNG name must be liver_GT_NNN.png")
        index = int(m.group(1))
        if index >= len(files):
            raise PipelineError(f"{png}: extra Ground PNG, the series has only {len(files)} DICOM files")
        by_index[index] = png
    for k, f in enumerate(files):
        if k not in by_index:
            raise PipelineError(f"{f}: no Ground PNG liver_GT_{k:03d}.png in {ground_dir}")
    return {f: by_index[k] for k, f in enumerate(files)}


def _pair_by_stem(case: CaseSource, pngs: list[Path], files: list[Path]) -> dict[Path, Path]:
    by_stem = {p.stem: p for p in pngs}
    for f in files:
        if f.stem not in by_stem:
            raise PipelineError(f"{f}: no Ground PNG {f.stem}.png in {case.ground_dir}")
    owned = {f.stem for f in files}
    if case.sequence.startswith("T1DUAL_"):
        # The T1DUAL Ground is shared: PNGs named after the other phase's files are not extra.
        sibling = case.dicom_dir.parent / ("OutPhase" if case.dicom_dir.name == "InPhase" else "InPhase")
        if sibling.is_dir():
            owned |= {f.stem for f in sibling.iterdir() if f.is_file()}
    extra = [p for p in pngs if p.stem not in owned]
    if extra:
        raise PipelineError(f"{extra[0]}: extra Ground PNG without a DICOM file in {case.dicom_dir}")
    return {f: by_stem[f.stem] for f in files}


def _position(path: Path) -> np.ndarray:
    ds = read_header(path, specific_tags=["ImagePositionPatient"])
    return np.array([float(v) for v in ds.ImagePositionPatient])


def _pair_outphase(case: CaseSource, pngs: list[Path], files: list[Path]) -> dict[Path, Path]:
    if len(pngs) != len(files):
        raise PipelineError(
            f"{case.ground_dir}: {len(pngs)} Ground PNGs for {len(files)} OutPhase files in {case.dicom_dir}"
        )
    inphase = case.dicom_dir.parent / "InPhase"
    pairs = {}
    for png, out_file in zip(pngs, files):
        in_file = inphase / f"{png.stem}.dcm"
        if not in_file.is_file():
            raise PipelineError(f"{png}: no InPhase file {in_file.name} in {inphase} to verify the OutPhase pairing")
        if not np.allclose(_position(in_file), _position(out_file), atol=1e-3):
            raise PipelineError(
                f"{out_file}: ImagePositionPatient differs from {in_file} which owns {png.name}; "
                "OutPhase/Ground pairing failed"
            )
        pairs[out_file] = png
    return pairs


def read_png(png: Path, shape: tuple[int, int]) -> np.ndarray:
    """A greyscale PNG mask as stored (rows x cols), checked against the DICOM slice shape."""
    try:
        with Image.open(png) as im:
            if im.mode not in ("1", "L", "I", "I;16"):
                raise PipelineError(f"{png}: PNG mask has mode {im.mode}, expected greyscale")
            arr = np.asarray(im)
    except OSError as exc:
        raise PipelineError(f"{png}: unreadable PNG ({exc})") from None
    if arr.shape != tuple(shape):
        raise PipelineError(f"{png}: PNG is {arr.shape[0]}x{arr.shape[1]}, DICOM is {shape[0]}x{shape[1]}")
    return arr


def png_labels(png: Path, modality: str, shape: tuple[int, int]) -> np.ndarray:
    """One Ground PNG -> uint8 labels (rows x cols, as stored). CT: non-zero -> liver; MR: grey ranges."""
    arr = read_png(png, shape)
    if modality == "CT":
        return (arr != 0).astype(np.uint8) * np.uint8(LIVER)
    return decode_mr_grey(arr, png)


def decode_mr_grey(arr: np.ndarray, png: Path) -> np.ndarray:
    """MR Ground grey levels -> uint8 organ labels; a value outside every band is an error naming `png`."""
    labels = np.zeros(arr.shape, dtype=np.uint8)
    known = arr == 0
    for low, high, label in MR_GREY_RANGES:
        inside = (arr >= low) & (arr <= high)
        labels[inside] = label
        known |= inside
    if not known.all():
        value = int(arr[~known].flat[0])
        raise PipelineError(f"{png}: grey value {value} is outside the known CHAOS label ranges")
    return labels


def png_stack_liver(pngs_by_file: dict[Path, Path], geometry: SeriesGeometry) -> np.ndarray:
    """{DICOM file: PNG} -> bool liver volume in NIfTI order (geometry.shape), for Ground and
    submission PNGs alike.

    The stack's grey levels decide how to read it: MR Ground (values in the liver band AND other
    non-zero values, i.e. kidneys / spleen) -> the liver band, any value outside the four bands
    being an error; otherwise (CT Ground 0/1, submissions with one grey level such as 63 or 255)
    any non-zero pixel is liver.
    """
    raw = {Path(f): read_png(png, (geometry.rows, geometry.cols)) for f, png in pngs_by_file.items()}
    low, high, _ = next(r for r in MR_GREY_RANGES if r[2] == LIVER)
    in_band = any(np.any((a >= low) & (a <= high)) for a in raw.values())
    outside = any(np.any((a != 0) & ((a < low) | (a > high))) for a in raw.values())
    if not (in_band and outside):
        return geometry.stack({f: a != 0 for f, a in raw.items()})
    return geometry.stack({f: decode_mr_grey(a, pngs_by_file[f]) == LIVER for f, a in raw.items()})
