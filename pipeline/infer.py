"""Inference: DICOM series (or prepared NIfTI) -> one NIfTI liver mask per case on the source grid.

The mask has exactly the shape and affine of the image NIfTI that `prepare` (and dcm2niix) writes
for the same series: both come from `pipeline.dicom.read_series`. The model sees the volume through
the run's own deterministic transforms (orientation, normalisation, in-plane resize); MONAI's
`Invertd` undoes orientation and resize on the probabilities before the argmax, so nothing is
resampled twice and labels are never interpolated.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from pipeline import runs
from pipeline.chaos import CHAOS_PNG_LIVER
from pipeline.config import Config, apply_overrides, load_config, pixel_spacing_mm
from pipeline.console import progress
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, safe_name, write_json, write_text
from pipeline.labels import LIVER, LIVER_RGB
from pipeline.postprocess import postprocess
from pipeline.volume import Volume, read_dicom_series, read_nifti, write_nifti

log = logging.getLogger(__name__)


@dataclass
class InferCase:
    """One volume to segment.

    load() -> the Volume (float32, NIfTI voxel order, with its affine; DICOM geometry when read from DICOM);
    truth(volume) -> boolean liver mask on the same grid, when ground truth is known.
    """

    case: str
    modality: str  # "CT" | "MR" | "" (read from the DICOM header)
    load: Callable[[], Volume]
    truth: Callable[[Volume], np.ndarray] | None = None
    skip_on_error: bool = False  # one series of a study folder: a bad one is skipped with a warning


def _chaos_case(source) -> InferCase:
    from pipeline.chaos import read_ground

    def truth(volume: Volume) -> np.ndarray:
        return read_ground(source, volume.geometry) == LIVER

    return InferCase(case=source.case, modality=source.modality, load=lambda: read_dicom_series(source.dicom_dir),
                     truth=truth if source.ground_dir is not None else None)


def _prepared_cases(datalist: Path, patients: set[str] | None, sequences: set[str] | None) -> list[InferCase]:
    from pipeline.datalist import read_datalist

    cases = []
    for e in read_datalist(datalist).select(patients, sequences):
        def truth(_volume: Volume, label=e["label"]) -> np.ndarray:
            return read_nifti(label, dtype=None).array == LIVER

        cases.append(InferCase(case=e["case"], modality=e["modality"], load=lambda image=e["image"]: read_nifti(image),
                               truth=truth))
    return cases


def collect_cases(input_path: Path, patients: Iterable[str] | None = None, sequences: Iterable[str] | None = None,
                  series_uid: str | None = None) -> list[InferCase]:
    """Find what to segment: a prepared folder/datalist, a CHAOS root, a study folder tree or one
    DICOM series folder."""
    return collect_inputs(input_path, patients, sequences, series_uid)[0]


def _study_cases(root: Path, series_uid: str | None) -> tuple[list[InferCase], list[tuple[str, str]]]:
    from pipeline.study import scan_study

    scan = scan_study(root)
    found = scan.series
    if series_uid is not None:  # a SeriesInstanceUID (all its stacks) or the name of one found series
        found = [s for s in found if series_uid in (s.series_uid, s.name)]
        if not found:
            listing = "; ".join(f"{s.name} {s.series_uid}" for s in scan.series) or "none"
            raise PipelineError(f"{root}: no image series with SeriesInstanceUID or name {series_uid} "
                                f"(found: {listing})")
    if not found:
        why = "; ".join(f"{what}: {reason}" for what, reason in scan.skipped[:3])
        raise PipelineError(f"{root}: no CT or MR image series found in this folder tree"
                            + (f" (skipped {len(scan.skipped)} file(s), e.g. {why})" if why else " (it is empty)"))
    cases = [InferCase(case=s.name, modality=s.modality, skip_on_error=True,
                       load=lambda files=tuple(s.files), stack=s.stack: read_dicom_series(list(files), stack=stack))
             for s in found]
    return cases, scan.skipped


def collect_inputs(input_path: Path, patients: Iterable[str] | None = None, sequences: Iterable[str] | None = None,
                   series_uid: str | None = None) -> tuple[list[InferCase], list[tuple[str, str]]]:
    """collect_cases, and what a study folder holds that is not segmented: [(file or series, why)]."""
    from pipeline.chaos import find_cases, is_chaos_root
    from pipeline.datalist import FILE_NAME as DATALIST
    from pipeline.study import is_study_tree

    input_path = Path(input_path)
    pset = set(patients) if patients else None
    sset = set(sequences) if sequences else None
    if not input_path.exists():
        raise PipelineError(f"{input_path}: input not found")
    if input_path.is_file() and input_path.suffix == ".json":
        return _prepared_cases(input_path, pset, sset), []
    if not input_path.is_dir():
        raise PipelineError(f"{input_path}: expected a folder or a datalist.json")
    if (input_path / DATALIST).exists():
        return _prepared_cases(input_path / DATALIST, pset, sset), []
    if is_chaos_root(input_path):
        sources = find_cases(input_path, sequences=sorted(sset) if sset else None,
                             patients=sorted(pset) if pset else None)
        return [_chaos_case(s) for s in sources], []
    # A PACS export or study folder: every image series (every stack of a multi-frame file) under it.
    cases, skipped = _study_cases(input_path, series_uid)
    if len(cases) == 1 and not is_study_tree(input_path):
        # a plain series folder: the case keeps the folder's name, and its errors stop the run
        cases[0].case, cases[0].skip_on_error = safe_name(input_path.name, "folder name"), False
    return cases, skipped


# --------------------------------------------------------------------------- the run folder
@dataclass
class LoadedRun:
    cfg: Config
    models: list
    folds: list[str]
    device: object  # torch.device
    name: str = ""  # the run folder's name (recorded in DICOM outputs)
    min_confidence: float = 0.0  # the quality check's confidence threshold (qc_confidence_threshold)


def load_run(run_dir: Path, fold: str | None, overrides: Iterable[str] = (),
             config_path: Path | None = None) -> LoadedRun:
    """Read config and checkpoints (infer.checkpoint: best or last) of a run folder; one fold or all."""
    from pipeline.device import inference_amp, resolve_device
    from pipeline.model import load_trained_model
    from pipeline.runtime import freeze_long_lived_objects, keep_freed_memory

    keep_freed_memory()  # page faults on fresh mappings were a large part of inference (pipeline/runtime.py)
    original = run_dir
    run_dir = runs.open_run(run_dir)  # a run folder, or a zip of one (run.py export)
    cfg = runs.read_config(run_dir)
    if config_path is not None:
        # A user's config may only tune inference; the model and its preprocessing stay the run's.
        cfg.infer = load_config(config_path).infer
    apply_overrides(cfg, overrides)
    device = resolve_device(cfg.infer.device)
    cfg.infer.amp = inference_amp(cfg.infer.amp, device)
    chosen = str(fold) if fold is not None else cfg.infer.folds  # --fold wins over infer.folds
    ckpts = runs.select_checkpoints(run_dir, chosen, cfg.infer.checkpoint)
    states = {ck: runs.load_checkpoint(ck) for ck in ckpts}
    models = [load_trained_model(cfg, ck, states[ck]).to(device) for ck in ckpts]
    log.info("loaded %d checkpoint(s): %s", len(ckpts), ", ".join(str(c.relative_to(run_dir)) for c in ckpts))
    # the confidence the run's models had on their own validation patients: every fold's, even when
    # one fold predicts (two or three patients per fold are too few to set a level on)
    try:
        every = runs.select_checkpoints(run_dir, "all", cfg.infer.checkpoint) if chosen != "all" else ckpts
    except PipelineError:  # another fold without this checkpoint (still training): the chosen ones alone
        every = ckpts
    reference = validation_confidence([states[ck] if ck in states else runs.load_checkpoint(ck) for ck in every])
    freeze_long_lived_objects()  # full garbage collections had cost time at random points (pipeline/runtime.py)
    name = Path(original).name.removesuffix(".zip") if str(original).endswith(".zip") else run_dir.resolve().name
    return LoadedRun(cfg=cfg, models=models, folds=[c.parent.name for c in ckpts], device=device, name=name,
                     min_confidence=qc_confidence_threshold(cfg.infer, reference))


def validation_confidence(checkpoints: list[dict]) -> float | None:
    """The lowest confidence (predict.mask_confidence) the checkpoints' models had on their own
    validation patients, at the validation of the epoch each was saved at; None when a checkpoint
    does not record it (runs trained before it was recorded)."""
    values = [(ck.get("history") or [{}])[-1].get("val_confidence_min") for ck in checkpoints]
    return None if not values or any(v is None for v in values) else float(min(values))


def qc_confidence_threshold(cfg, reference: float | None) -> float:
    """infer.qc_min_confidence, raised to the run's own validation level less infer.qc_confidence_margin
    when that is higher: models trained longer are surer of every mask, their failures included
    (README, session 13), so one fixed level would let those through."""
    if reference is None:
        return cfg.qc_min_confidence
    return max(cfg.qc_min_confidence, reference - cfg.qc_confidence_margin)


# --------------------------------------------------------------------------- prediction
class Stages:
    """Seconds spent per stage of one case (reported in inference.json and by bench_infer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


@dataclass
class PreparedCase:
    """A case read from disk and put through the run's deterministic transforms."""

    case: InferCase
    volume: Volume  # float32 (X, Y, Z) on the source grid, with its affine (and DICOM geometry)
    transform: object  # the Compose that made `image` (Invertd needs this very instance)
    image: object  # MetaTensor (C, H, W, Z) on the model's grid
    stages: Stages
    started: float  # perf_counter when reading began


def preprocess_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str):
    """(Compose, image MetaTensor) of `volume` through the run's deterministic image transforms."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.transforms import flips_only, image_transforms

    pre = Compose(image_transforms(run.cfg.train, load=False, context=run.cfg.model.context_slices,
                                   modality_channel=run.cfg.model.modality_channel,
                                   orient_last=pixel_spacing_mm(run.cfg.train) <= 0 and flips_only(affine)))
    image = MetaTensor(torch.as_tensor(volume[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    return pre, pre({"image": image, "modality": modality})["image"]


def read_case(run: LoadedRun, case: InferCase) -> PreparedCase:
    """Stage 1 of a case: read the series (or NIfTI) and preprocess it."""
    started, stage = time.perf_counter(), Stages()
    with stage("read"):
        volume = case.load()
    modality = case.modality or volume.modality
    if modality not in ("CT", "MR"):
        raise PipelineError(f"{volume.source}: modality {modality!r} is neither CT nor MR")
    with stage("preprocess"):
        pre, image = preprocess_case(run, volume.array, volume.affine, modality)
    return PreparedCase(case, volume, pre, image, stage, started)


def network_probs(run: LoadedRun, image, stages: Stages, model_masks: list | None = None,
                  model_confidences: list | None = None):
    """Stage 2: fold-ensemble liver probability (1, H, W, Z) on the model's grid, smoothed through the
    slices (infer.slice_smoothing); each model's own mask appended to `model_masks` when given, for
    the fold agreement, and its confidence to `model_confidences` (both before the smoothing)."""
    from pipeline.predict import predict_volume, smooth_through_slices

    with stages("network"):
        probs = predict_volume(run.models, image, batch_size=run.cfg.infer.batch_size, device=run.device,
                               amp=run.cfg.infer.amp, model_masks=model_masks, model_confidences=model_confidences,
                               scales=run.cfg.infer.tta_scales)
        return smooth_through_slices(probs, run.cfg.infer.slice_smoothing)


def checked_network_probs(run: LoadedRun, image, stages: Stages) -> tuple:
    """network_probs with what the quality check needs from the fold models: (probabilities, fold
    agreement (predict.fold_agreement), their mean confidence (predict.ensemble_confidence))."""
    from pipeline.predict import ensemble_confidence, fold_agreement

    masks: list = []
    confidences: list = []
    probs = network_probs(run, image, stages, masks, confidences)
    return probs, fold_agreement(masks, probs), ensemble_confidence(confidences)


def flag_mask(run: LoadedRun, name: str, liver_ml: float, agreement: float | None, confidence: float | None,
              probs, shape: Sequence[int], affine: np.ndarray) -> list[str]:
    """quality_flags of the mask of `name`, and cropped_liver's flag (`probs` on the model grid, the
    source's `shape` and `affine`), with a warning line naming it when there is any."""
    flags = quality_flags(liver_ml, agreement, run.cfg.infer, confidence, run.min_confidence)
    cropped = cropped_liver(run, probs, shape, affine)
    if cropped:
        flags.append(cropped)
    if flags:
        log.warning("%s: check this mask before using it: %s", name, "; ".join(flags))
    return flags


def quality_flags(liver_ml: float, agreement: float | None, cfg, confidence: float | None = None,
                  min_confidence: float | None = None) -> list[str]:
    """Why a mask should not be trusted without a look (empty when nothing is wrong): no liver, a
    liver volume outside infer.qc_liver_ml, fold models that disagree (infer.qc_min_agreement), or a
    network unsure of its own mask (predict.mask_confidence below `min_confidence`, the run's
    qc_confidence_threshold; infer.qc_min_confidence when not given)."""
    if min_confidence is None:
        min_confidence = cfg.qc_min_confidence
    flags = []
    low, high = cfg.qc_liver_ml
    if liver_ml == 0:
        flags.append("empty: no liver found")
    elif not low <= liver_ml <= high:
        flags.append(f"liver volume {liver_ml:.0f} ml outside {low:g}-{high:g} ml")
    if agreement is not None and agreement < cfg.qc_min_agreement:
        flags.append(f"fold models disagree (lowest Dice with the ensemble {agreement:.2f} < {cfg.qc_min_agreement:g})")
    if liver_ml > 0 and confidence is not None and confidence < min_confidence:
        flags.append(f"low confidence ({confidence:.3f} < {min_confidence:.3f})")
    return flags


def cropped_liver(run: LoadedRun, probs, shape: Sequence[int], affine: np.ndarray) -> str | None:
    """A QC flag when the network saw a crop of the scan (its field of view wider than roi_size at the
    run's train.pixel_spacing, cropped about the centre) and the liver it found (`probs`, the model
    grid's (1, H, W, D)) reaches the cut edge: part of the liver may lie outside what it saw."""
    from pipeline.transforms import in_plane_fov_mm

    spacing = pixel_spacing_mm(run.cfg.train)
    if spacing <= 0:
        return None  # resized to the roi: nothing is cut
    fov, roi = in_plane_fov_mm(shape, affine), run.cfg.train.roi_size
    liver = probs[0] >= 0.5
    liver = liver.cpu().numpy() if hasattr(liver, "cpu") else np.asarray(liver)
    cut_and_reached = [axis for axis in (0, 1) if fov[axis] / spacing > roi[axis] + 0.5
                       and np.take(liver, [0, liver.shape[axis] - 1], axis=axis).any()]
    if not cut_and_reached:
        return None
    return (f"the liver reaches the edge of the network's view ({fov[0]:.0f} x {fov[1]:.0f} mm cropped to "
            f"{roi[0] * spacing:.0f} x {roi[1] * spacing:.0f} mm at train.pixel_spacing {spacing:g} mm): "
            f"part of it may be missing")


def liver_on_source_grid(probs, image, transform, shape: tuple[int, ...], stages: Stages) -> np.ndarray:
    """Liver probability (X, Y, Z float32) on the source grid: MONAI Invertd through `transform`,
    the Compose that made `image`."""
    from pipeline.predict import source_grid_inverter, to_source_grid

    with stages("invert"):
        inv = to_source_grid(probs, image, source_grid_inverter(transform))
        liver = np.asarray(inv[0], dtype=np.float32)
    if liver.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {liver.shape} != image {tuple(shape)}")
    return liver


def liver_mask_on_source_grid(probs, image, transform, shape: tuple[int, ...], stages: Stages) -> np.ndarray:
    """Boolean liver mask (X, Y, Z), liver probability >= 0.5 on the source grid.

    When the in-plane resize was the first spatial step (preprocess_case's chain for axial series),
    the steps after it are undone with MONAI's Invertd on the model's grid and the resize by
    `InPlaneResize.inverse_mask`, which interpolates only the liver's box (equal to thresholding the
    full inversion up to float32 rounding at 0.5; tests/test_infer.py). Otherwise: the full
    inversion, then the threshold.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from pipeline.predict import source_grid_inverter
    from pipeline.transforms import InPlaneResized

    steps = list(transform.transforms)
    resize = [i for i, t in enumerate(steps) if isinstance(t, InPlaneResized)]
    ops = [op["class"] for op in image.applied_operations]
    if not resize or not ops or ops[0] != "InPlaneResize":
        return liver_on_source_grid(probs, image, transform, shape, stages) >= 0.5
    with stages("invert"):
        pred = MetaTensor(probs, meta=image.meta, applied_operations=list(image.applied_operations))
        later = steps[resize[0] + 1:]
        if len(ops) > 1:
            pred = source_grid_inverter(Compose(later))({"pred": pred, "image": image})["pred"]
        mask = steps[resize[0]].resizer.inverse_mask(pred, 0.5)
    if mask.shape != tuple(shape):
        raise RuntimeError(f"inverted prediction {mask.shape} != image {tuple(shape)}")
    return mask


def predict_case(run: LoadedRun, volume: np.ndarray, affine: np.ndarray, modality: str,
                 stages: Stages | None = None) -> np.ndarray:
    """Liver probability (X, Y, Z, float32) on the grid of `volume` (fold ensemble average)."""
    stage = stages or Stages()
    with stage("preprocess"):
        pre, image = preprocess_case(run, volume, affine, modality)
    return liver_on_source_grid(network_probs(run, image, stage), image, pre, volume.shape, stage)


# --------------------------------------------------------------------------- outputs
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
    folder = out_dir / f"{case}_png"
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


def write_case(run: LoadedRun, prepared: PreparedCase, probs, out_dir: Path, fmt: str = "nifti",
               agreement: float | None = None, confidence: float | None = None) -> dict:
    """Stage 3 of a case: invert, post-process, write its outputs; returns its summary row, with
    "qc" (quality_flags; `agreement` from predict.fold_agreement, `confidence` the fold models' mean
    predict.mask_confidence)."""
    from pipeline.metrics import dice
    from pipeline.visualize import montage

    case, stage = prepared.case, prepared.stages
    volume, affine, geom = prepared.volume.array, prepared.volume.affine, prepared.volume.geometry
    raw = liver_mask_on_source_grid(probs, prepared.image, prepared.transform, volume.shape, stage)
    with stage("postprocess"):
        mask = postprocess(raw, run.cfg.infer.largest_component, run.cfg.infer.fill_holes)
    with stage("write"):
        mask_path = write_nifti(out_dir / f"{case.case}_liver.nii.gz", mask, affine, np.uint8)
        if run.cfg.infer.save_image:
            write_nifti(out_dir / f"{case.case}_image.nii.gz", volume, affine, np.float32)
        formats = parse_formats(fmt)
        if "chaos-png" in formats:
            write_chaos_png(out_dir, case.case, mask, geom)
    for name, suffix in (("dicom-seg", "seg"), ("rtstruct", "rtstruct")):
        if name not in formats:
            continue
        with stage(name):
            if geom is None:
                raise PipelineError(f"{case.case}: --format {name} needs DICOM input (NIfTI input has no DICOM files)")
            from pipeline.dicom_out import write_rtstruct, write_seg

            writer = write_seg if name == "dicom-seg" else write_rtstruct
            writer(out_dir / f"{case.case}_liver.{suffix}.dcm", mask, geom, case=case.case, run_name=run.name)
    mask_seconds = time.perf_counter() - prepared.started  # DICOM read -> mask NIfTI written
    with stage("truth"):  # scoring and figures, not part of producing the mask
        truth = case.truth(prepared.volume) if case.truth is not None else None
    if run.cfg.infer.montage:
        with stage("montage"):
            montage(out_dir / f"{case.case}_montage.png", volume, affine, mask, truth,
                    title=f"{case.case}  ({'+'.join(run.folds)})")
    row = {"case": case.case, "mask": mask_path.name, "slices": int(volume.shape[2]),
           "liver_ml": float(mask.sum() * prepared.volume.voxel_ml)}
    if truth is not None:
        row["dice"] = float(dice(mask > 0, truth > 0))
    row["fold_agreement"] = None if agreement is None else round(agreement, 4)
    row["confidence"] = None if confidence is None else round(confidence, 4)
    row["qc"] = flag_mask(run, case.case, row["liver_ml"], agreement, confidence, probs, volume.shape, affine)
    row["seconds"] = round(mask_seconds, 3)
    row["total_seconds"] = round(time.perf_counter() - prepared.started, 3)
    row["stage_seconds"] = stage.rounded()
    return row


def segment_case(run: LoadedRun, case: InferCase, out_dir: Path, fmt: str = "nifti") -> dict:
    """Read one case, predict, post-process and write its outputs; returns its summary row."""
    prepared = read_case(run, case)
    probs, agreement, confidence = checked_network_probs(run, prepared.image, prepared.stages)
    return write_case(run, prepared, probs, out_dir, fmt, agreement, confidence)


def segment_cases(run: LoadedRun, cases: list[InferCase], out_dir: Path, fmt: str = "nifti", desc: str = "infer",
                  shared_files: bool = True, on_case: Callable[[int, InferCase], None] | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """segment_case for each case in turn (run_inference's loop, and the viewer's): (rows, skipped).

    A case marked skip_on_error (one series of a study folder) that fails its checks is skipped with
    its one-line reason; any other error stops. `shared_files`: write config.yaml and the label
    descriptions with the first mask. `on_case(i, case)` is called before each case (progress).
    """
    import torch

    from pipeline.config import save_config

    rows, skipped = [], []
    # One case after the other on purpose: reading the next case and writing the previous one in
    # threads while the network ran was no faster on a small CPU. The serial run already keeps the
    # cores busy (torch's OpenMP threads spin between kernels) and the threads slowed the network;
    # OMP_WAIT_POLICY=PASSIVE lost more.
    with torch.inference_mode():
        for i, case in enumerate(progress(cases, desc=desc, unit="case")):
            if on_case is not None:
                on_case(i, case)
            try:
                row = segment_case(run, case, out_dir, fmt)
            except PipelineError as exc:
                if not case.skip_on_error:
                    raise
                log.warning("%s: skipped, %s", case.case, exc)  # one bad series of a study does not stop the rest
                skipped.append({"input": case.case, "reason": str(exc)})
                continue
            if not rows and shared_files:  # the folder's shared files, once there is a first mask to describe
                save_config(run.cfg, out_dir / "config.yaml")
                write_label_descriptions(out_dir)
            rows.append(row)
            log.info("%s: %d slices, liver %.0f ml%s, %.1f s", case.case, row["slices"], row["liver_ml"],
                     f", Dice {row['dice']:.4f}" if "dice" in row else "", row["seconds"])
    return rows, skipped


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (0 <= K < N) -> (K, N); PipelineError otherwise."""
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise PipelineError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shard K of N, counted from 0)") from None
    if not (n >= 1 and 0 <= k < n):
        raise PipelineError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def _torchrun_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) under torchrun with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


SHARDS_DIR = "shards"  # out_dir/shards/inference.<K>-of-<N>.json: each shard's rows until they are merged


def run_inference(run_dir: Path, input_path: Path, out_dir: Path, overrides: Iterable[str] = (),
                  config_path: Path | None = None, fold: str | None = None, patients: str | None = None,
                  sequences: str | None = None, series: str | None = None, fmt: str = "nifti",
                  shard: str | None = None) -> list[dict]:
    """Segment every selected case of `input_path` with the run's model(s); returns one row per case.

    shard "K/N": only every N-th case from the K-th (for a scheduler's array jobs); under torchrun
    with several processes each rank takes its share the same way. Each shard writes its rows to
    out_dir/shards/; whoever finishes last (rank 0 under torchrun) merges them into inference.json.
    Returns this process's rows.
    """
    out_dir = Path(out_dir)
    parse_formats(fmt)  # a typo fails before any case is read
    under_torchrun = shard is None and _torchrun_shard() is not None
    k, n = parse_shard(shard) if shard is not None else (_torchrun_shard() or (0, 1))
    all_cases, skipped_inputs = collect_inputs(input_path, _split(patients), _split(sequences), series)
    if not all_cases:
        raise PipelineError(f"{input_path}: no cases selected")
    cases = all_cases[k::n]
    skipped = []
    if k == 0:  # what the scan skipped is the same for every shard: shard 0 reports it
        for what, why in skipped_inputs:
            log.warning("%s: skipped, %s", what, why)
        skipped = [{"input": what, "reason": why} for what, why in skipped_inputs]
    run = load_run(run_dir, fold, overrides, config_path)
    rows, failed = segment_cases(run, cases, out_dir, fmt, desc="infer" if n == 1 else f"infer {k}/{n}",
                                 shared_files=k == 0)
    skipped += failed
    head = {"run": str(run_dir), "input": str(Path(input_path).resolve()), "folds": run.folds}
    if n == 1:
        if not rows:
            raise PipelineError(f"{input_path}: no series could be segmented ({len(skipped)} skipped, listed above)")
        write_json(out_dir / "inference.json", {**head, "cases": rows, "skipped": skipped})
        return rows
    write_json(out_dir / SHARDS_DIR / f"inference.{k}-of-{n}.json", {**head, "cases": rows, "skipped": skipped})
    if under_torchrun:
        import torch.distributed as dist

        started = not dist.is_initialized()
        if started:
            dist.init_process_group("gloo")
        dist.barrier()  # every rank's part is written
        if k == 0:
            _merge_shards(out_dir, n, [c.case for c in all_cases], run)
        dist.barrier()
        if started:
            dist.destroy_process_group()
    elif all((out_dir / SHARDS_DIR / f"inference.{i}-of-{n}.json").exists() for i in range(n)):
        _merge_shards(out_dir, n, [c.case for c in all_cases], run)  # the last shard to finish
    return rows


def _merge_shards(out_dir: Path, n: int, order: list[str], run: LoadedRun) -> None:
    """inference.json from the N shards' parts, cases in the order of a single-process run."""
    import json

    from pipeline.config import save_config

    parts = [json.loads((out_dir / SHARDS_DIR / f"inference.{i}-of-{n}.json").read_text()) for i in range(n)]
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted((r for p in parts for r in p["cases"]), key=lambda r: rank.get(r["case"], len(rank)))
    skipped = [s for p in parts for s in p["skipped"]]
    if not rows:
        raise PipelineError(f"{out_dir}: no series could be segmented by any of the {n} shards")
    if not (out_dir / "config.yaml").exists():  # shard 0 had no case to write it with
        save_config(run.cfg, out_dir / "config.yaml")
        write_label_descriptions(out_dir)
    write_json(out_dir / "inference.json", {**{k: parts[0][k] for k in ("run", "input", "folds") if k in parts[0]},
                                             "cases": rows,
                                             "skipped": skipped, "shards": n})


def format_inference_table(summary: dict) -> str:
    """inference.json's content as the table `run.py infer` prints: what was segmented, what was skipped."""
    lines = [f"{'case':<32}{'slices':>7}{'liver ml':>10}{'Dice':>8}{'confidence':>11}{'seconds':>9}  qc"]
    for row in summary.get("cases", []):
        dice_text = f"{row['dice']:.4f}" if row.get("dice") is not None else "-"
        sure = f"{row['confidence']:.3f}" if row.get("confidence") is not None else "-"  # older runs lack it
        lines.append(f"{row['case']:<32}{row['slices']:>7}{row['liver_ml']:>10.0f}{dice_text:>8}{sure:>11}"
                     f"{row['seconds']:>9.2f}  {'; '.join(row.get('qc') or []) or 'ok'}")
    for item in summary.get("skipped", []):
        lines.append(f"{item['input']:<32}{'skipped':>7}  {item['reason']}")
    return "\n".join(lines)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
