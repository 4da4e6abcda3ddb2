"""`run.py infer`: every selected case of an input -> its mask, outputs and row in inference.json."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.core import results
from pipeline.core.console import format_table, progress
from pipeline.core.errors import PipelineError
from pipeline.dicom.volume import Volume, write_nifti
from pipeline.infer.inputs import InferCase, collect_inputs
from pipeline.infer.loaded import LoadedRun, load_runs
from pipeline.infer.segment import Segmentation, Stages, segment_volume
from pipeline.infer.shards import merge_shards, parse_shard, torchrun_shard
from pipeline.infer.writers import parse_formats, write_chaos_png, write_label_descriptions

log = logging.getLogger(__name__)


def write_case(run: LoadedRun, case: InferCase, volume: Volume, seg: Segmentation, out_dir: Path,
               fmt: str, stages: Stages, started: float) -> dict:
    """A case's outputs (mask NIfTI, the formats asked for, montage) and its summary row, with "qc"
    (the Segmentation's flags); `started`: perf_counter when its reading began."""
    from pipeline.evaluate.metrics import dice
    from pipeline.infer.montage import montage

    array, affine, geom = volume.array, volume.affine, volume.geometry
    with stages("write"):
        mask_path = write_nifti(out_dir / results.mask_name(case.case), seg.mask, affine, np.uint8)
        if run.cfg.infer.save_image:
            write_nifti(out_dir / results.image_name(case.case), array, affine, np.float32)
        formats = parse_formats(fmt)
        if "chaos-png" in formats:
            write_chaos_png(out_dir, case.case, seg.mask, geom)
    dicom_notes = _write_dicom(run, case, seg, geom, out_dir, formats, stages)
    mask_seconds = time.perf_counter() - started  # DICOM read -> mask NIfTI written
    with stages("truth"):  # scoring and figures, not part of producing the mask
        truth = case.truth(volume) if case.truth is not None else None
    if run.cfg.infer.montage:
        with stages("montage"):
            montage(out_dir / results.montage_name(case.case), array, affine, seg.mask, truth,
                    title=f"{case.case}  ({'+'.join(run.folds)})")
    row = {"case": case.case, "mask": mask_path.name, "slices": int(array.shape[2]), "liver_ml": seg.liver_ml}
    if truth is not None:
        row["dice"] = float(dice(seg.mask > 0, truth > 0))
    row["fold_agreement"] = None if seg.agreement is None else round(seg.agreement, 4)
    row["confidence"] = None if seg.confidence is None else round(seg.confidence, 4)
    if seg.member_agreement is not None:  # a multi-planar run, or fused runs
        row["member_agreement"] = round(seg.member_agreement, 4)
    row["qc"] = seg.flags
    if dicom_notes is not None:
        row["dicom_notes"] = dicom_notes  # what a stripped source lacked, and any format refused
    row["seconds"] = round(mask_seconds, 3)
    row["total_seconds"] = round(time.perf_counter() - started, 3)
    row["stage_seconds"] = stages.rounded()
    return row


def _write_dicom(run: LoadedRun, case: InferCase, seg: Segmentation, geom, out_dir: Path, formats: tuple,
                 stages: Stages) -> list[str] | None:
    """The DICOM outputs asked for (SEG, RTSTRUCT) beside the NIfTI mask; None when none was asked.
    What the source lacked is noted (pipeline.outputs.dicom_objects explains each attribute); a format
    the source cannot give a valid object for is refused with one warning line, the case goes on.
    Returns the notes (one line each) for the case's row."""
    asked = [name for name in results.DICOM_ENDINGS if name in formats]
    if not asked:
        return None
    if geom is None:
        raise PipelineError(f"{case.case}: --format {asked[0]} needs DICOM input (NIfTI input has no DICOM files)")
    from pipeline.outputs.dicom_objects import source_headers, write_rtstruct, write_seg

    try:
        headers, notes = source_headers(geom, case.case)  # once for both objects
    except PipelineError as exc:  # nothing valid can reference this source: every DICOM format refused
        log.warning("%s", exc)
        return [str(exc)]
    for note in notes:
        log.warning("%s: DICOM outputs: %s", case.case, note)
    for name in asked:
        writer = write_seg if name == "dicom-seg" else write_rtstruct
        with stages(name):
            try:
                writer(out_dir / results.dicom_name(case.case, name), seg.mask, geom, case=case.case, run_name=run.name,
                       headers=headers)
            except PipelineError as exc:
                log.warning("%s", exc)
                notes.append(str(exc))
    return notes


def segment_case(run: LoadedRun, case: InferCase, out_dir: Path, fmt: str = "nifti") -> dict:
    """Read one case, segment it (segment_volume) and write its outputs; returns its summary row."""
    started, stages = time.perf_counter(), Stages()
    with stages("read"):
        volume = case.load()
    modality = case.modality or volume.modality
    if modality not in ("CT", "MR"):
        raise PipelineError(f"{volume.source}: modality {modality!r} is neither CT nor MR")
    seg = segment_volume(run, volume, modality, case.case, stages)
    return write_case(run, case, volume, seg, out_dir, fmt, stages, started)


def segment_cases(run: LoadedRun, cases: list[InferCase], out_dir: Path, fmt: str = "nifti", desc: str = "infer",
                  shared_files: bool = True, on_case: Callable[[int, InferCase], None] | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """segment_case for each case in turn (run_inference's loop, and the viewer's): (rows, skipped).

    A case marked skip_on_error (one series of a study folder) that fails its checks is skipped with
    its one-line reason; any other error stops. `shared_files`: write config.yaml and the label
    descriptions with the first mask. `on_case(i, case)` is called before each case (progress).
    """
    import torch

    from pipeline.core.config import save_config

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


def run_inference(run_dir: Path | Sequence[Path], input_path: Path, out_dir: Path, overrides: Iterable[str] = (),
                  config_path: Path | None = None, fold: str | None = None, patients: str | None = None,
                  sequences: str | None = None, series: str | None = None, fmt: str = "nifti",
                  shard: str | None = None, on_loaded: Callable[[LoadedRun], None] | None = None) -> list[dict]:
    """Segment every selected case of `input_path` with the run's model(s); returns one row per case.
    Several run folders are fused (loaded.load_runs): their probabilities averaged on the source grid.
    `on_loaded(run)` is called once the run's models are loaded, before the first case.

    shard "K/N": only every N-th case from the K-th (for a scheduler's array jobs); under torchrun
    with several processes each rank takes its share the same way. Each shard writes its rows to
    out_dir/shards/; whoever finishes last (rank 0 under torchrun) merges them into inference.json.
    Returns this process's rows.
    """
    out_dir = Path(out_dir)
    parse_formats(fmt)  # a typo fails before any case is read
    under_torchrun = shard is None and torchrun_shard() is not None
    k, n = parse_shard(shard) if shard is not None else (torchrun_shard() or (0, 1))
    all_cases, skipped_inputs = collect_inputs(input_path, _split(patients), _split(sequences), series)
    if not all_cases:
        raise PipelineError(f"{input_path}: no cases selected")
    cases = all_cases[k::n]
    skipped = []
    if k == 0:  # what the scan skipped is the same for every shard: shard 0 reports it
        for what, why in skipped_inputs:
            log.warning("%s: skipped, %s", what, why)
        skipped = [{"input": what, "reason": why} for what, why in skipped_inputs]
    run = load_runs(run_dir, fold, overrides, config_path)
    if on_loaded is not None:
        on_loaded(run)
    rows, failed = segment_cases(run, cases, out_dir, fmt, desc="infer" if n == 1 else f"infer {k}/{n}",
                                 shared_files=k == 0)
    skipped += failed
    run_dirs = [str(d) for d in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    head = {"run": run_dirs[0] if len(run_dirs) == 1 else run_dirs, "input": str(Path(input_path).resolve()), "folds": run.folds}
    if n == 1:
        if not rows:
            raise PipelineError(f"{input_path}: no series could be segmented ({len(skipped)} skipped, listed above)")
        results.write_summary(out_dir / results.SUMMARY, head, rows, skipped)
        return rows
    results.write_summary(results.shard_part(out_dir, k, n), head, rows, skipped)
    if under_torchrun:
        import torch.distributed as dist

        started = not dist.is_initialized()
        if started:
            dist.init_process_group("gloo")
        dist.barrier()  # every rank's part is written
        if k == 0:
            merge_shards(out_dir, n, [c.case for c in all_cases], run)
        dist.barrier()
        if started:
            dist.destroy_process_group()
    elif all(results.shard_part(out_dir, i, n).exists() for i in range(n)):
        merge_shards(out_dir, n, [c.case for c in all_cases], run)  # the last shard to finish
    return rows


def format_inference_table(summary: dict) -> str:
    """inference.json's content as the table `run.py infer` prints: what was segmented, what was skipped."""
    rows = []
    for row in summary.get("cases", []):
        dice_text = f"{row['dice']:.4f}" if row.get("dice") is not None else "-"
        sure = f"{row['confidence']:.3f}" if row.get("confidence") is not None else "-"  # older runs lack it
        rows.append([row["case"], row["slices"], f"{row['liver_ml']:.0f}", dice_text, sure, f"{row['seconds']:.2f}",
                     "; ".join(row.get("qc") or []) or "ok"])
    skipped = [[item["input"], "skipped", "", "", "", "", item["reason"]] for item in summary.get("skipped", [])]
    return format_table(["case", "slices", "liver ml", "Dice", "confidence", "seconds", "qc"], rows, skipped)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
