"""A trained run loaded for inference: its config, fold models, device and quality-check level."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.core import runs
from pipeline.core.config import Config, apply_overrides, load_config
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    cfg: Config
    models: list
    folds: list[str]
    device: object  # torch.device
    name: str = ""  # the run folder's name (recorded in DICOM outputs)
    min_confidence: float = 0.0  # the quality check's confidence threshold (qc_confidence_threshold)
    # further runs fused with this one (infer --run-dir A --run-dir B): their probabilities averaged with
    # this run's on the source grid; this run's infer section post-processes and checks the fused mask
    others: list = field(default_factory=list)

    @property
    def members(self) -> list["LoadedRun"]:
        return [self, *self.others]


def load_run(run_dir: Path, fold: str | None, overrides: Iterable[str] = (),
             config_path: Path | None = None) -> LoadedRun:
    """Read config and checkpoints (infer.checkpoint: best or last) of a run folder; one fold or all."""
    from pipeline.core.device import inference_amp, resolve_device
    from pipeline.model.networks import load_trained_model
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
    name = Path(original).name.removesuffix(".zip") if str(original).endswith(".zip") else run_dir.resolve().name
    return LoadedRun(cfg=cfg, models=models, folds=[c.parent.name for c in ckpts], device=device, name=name,
                     min_confidence=qc_confidence_threshold(cfg.infer, reference))


def load_runs(run_dirs: Path | Sequence[Path], fold: str | None, overrides: Iterable[str] = (),
              config_path: Path | None = None) -> LoadedRun:
    """load_run of one run folder, or of several to fuse (the first carries the others in `others`);
    the same --fold, overrides and config for each. Runs of any kind fuse (axial, multi-planar), as
    long as every one of them finds the liver in the same images: CT and MR alike, or MR alone."""
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise PipelineError("infer: no --run-dir given")
    if len(set(d.resolve() for d in dirs)) < len(dirs):
        raise PipelineError(f"--run-dir: the same run given twice ({', '.join(map(str, dirs))})")
    first, *others = [load_run(d, fold, overrides, config_path) for d in dirs]
    first.others = others
    return first


def validation_confidence(checkpoints: list[dict]) -> float | None:
    """The lowest confidence (predict.mask_confidence) the checkpoints' models had on their own
    validation patients, at the validation of the epoch each was saved at; None when a checkpoint
    does not record it (runs trained before it was recorded)."""
    values = [(ck.get("history") or [{}])[-1].get("val_confidence_min") for ck in checkpoints]
    return None if not values or any(v is None for v in values) else float(min(values))


def qc_confidence_threshold(cfg, reference: float | None) -> float:
    """infer.qc_min_confidence, raised to the run's own validation level less infer.qc_confidence_margin
    when that is higher: models trained longer are surer of every mask, their failures included
    (docs/decisions.md#confidence-margin), so one fixed level would let those through."""
    if reference is None:
        return cfg.qc_min_confidence
    return max(cfg.qc_min_confidence, reference - cfg.qc_confidence_margin)
