"""The Python entry point: segment a scan with a trained run in three lines.

    from pipeline.api import segment
    mask = segment("scans/patient7/DICOM", run="runs/exp")      # a nibabel image on the scan's grid
    mask.to_filename("patient7_liver.nii.gz")
    mask.extra["qc"]["flags"]                                   # [] unless the mask needs a look

`segment` takes a DICOM series folder, a NIfTI file, or a numpy array with its affine; the run's
models are loaded on the first call and kept for the next ones (`Segmenter` holds them explicitly).
The mask is what `run.py infer` writes for the same input: the same transforms, fold ensemble,
inversion to the source grid and post-processing (pipeline.infer.inference).

The other stages as typed functions with keyword arguments (what `run.py` calls; the config is
`configs/default.yaml` unless `config` names another, with `overrides` as `--set` takes them):

    from pipeline import api
    api.prepare("Train_Sets", "prepared", sequences=["T2SPIR"])
    api.train("prepared", "runs/exp", fold="all", overrides=["train.budget_minutes=10"])
    api.evaluate("infer_out", "prepared/labelsTr", "eval_out")
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from pipeline.core import runs
from pipeline.core.errors import PipelineError
from pipeline.dicom.volume import Volume, is_nifti, read_dicom_series, read_nifti


class Segmenter:
    """A run's fold models, loaded once; call it on each scan."""

    def __init__(self, run: str | Path, fold: str | int | None = None, overrides: Iterable[str] = ()) -> None:
        from pipeline.infer.loaded import load_run

        self.run = load_run(Path(run), None if fold is None else str(fold), list(overrides))

    def __call__(self, scan: str | Path | np.ndarray, affine: np.ndarray | None = None,
                 modality: str | None = None) -> nib.Nifti1Image:
        """Liver mask (uint8, 1 = liver) as a NIfTI image on the grid of `scan`.

        scan: a DICOM series folder (modality from its header), a NIfTI file, or an (X, Y, Z) array in
        NIfTI voxel order with its 4x4 `affine` (voxel -> RAS mm). `modality` ("CT" or "MR") is
        required for NIfTI and arrays, which do not carry it.

        The image's `extra["qc"]` holds infer's quality check for the mask (what inference.json's row
        says): "flags" (empty when nothing is wrong; otherwise a warning is logged too, as infer
        does), "liver_ml", "confidence" and "fold_agreement". Check the flags before using the mask.
        """
        from pipeline.infer.segment import segment_volume

        volume = _volume(scan, affine)
        modality = modality or volume.modality
        if modality not in ("CT", "MR"):
            raise PipelineError(f"{volume.source}: give modality='CT' or 'MR' (the input does not say which)")
        seg = segment_volume(self.run, volume, modality, str(volume.source))
        out = nib.Nifti1Image(seg.mask.astype(np.uint8), volume.affine)
        out.set_sform(volume.affine, code=1)
        out.set_qform(volume.affine, code=1)
        out.extra["qc"] = {"flags": seg.flags, "liver_ml": seg.liver_ml, "confidence": seg.confidence,
                           "fold_agreement": seg.agreement}
        return out


def _volume(scan, affine) -> Volume:
    if isinstance(scan, np.ndarray):
        if affine is None or np.asarray(affine).shape != (4, 4):
            raise PipelineError("an array needs its 4x4 affine (voxel -> RAS mm)")
        if scan.ndim != 3:
            raise PipelineError(f"an array scan must be 3-D (X, Y, Z), got shape {scan.shape}")
        return Volume(np.asarray(scan, dtype=np.float32), np.asarray(affine, dtype=np.float64), Path("<array>"))
    path = Path(scan)
    if not path.exists():
        raise PipelineError(f"{path}: not found")
    if is_nifti(path):
        return read_nifti(path)
    return read_dicom_series(path)


_CACHE: dict[tuple, Segmenter] = {}


def segment(scan: str | Path | np.ndarray, run: str | Path, affine: np.ndarray | None = None,
            modality: str | None = None, fold: str | int | None = None) -> nib.Nifti1Image:
    """`Segmenter(run, fold)(scan, affine, modality)`, the models loaded once per (run, fold) and reused."""
    # keyed by what the run holds now: a run trained or exported again is loaded again
    key = (str(Path(run).resolve()), None if fold is None else str(fold), runs.signature(run))
    if key not in _CACHE:
        for stale in [k for k in _CACHE if k[:2] == key[:2]]:
            del _CACHE[stale]
        _CACHE[key] = Segmenter(run, fold)
    return _CACHE[key](scan, affine, modality)


# --------------------------------------------------------------------------- the other stages
def _config(config: str | Path | None, overrides: Iterable[str]):
    from pipeline.core.config import load_config

    return load_config(None if config is None else Path(config), list(overrides))


def prepare(data: str | Path | list, out: str | Path, *, sequences: Iterable[str] | None = None,
            folds: int | None = None, config: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """`run.py prepare`: a CHAOS root, an MSD / nnU-Net data set, a pairs CSV or a folder of images/
    and labels/ (or a list of several: ids get their source's name in front) -> out/imagesTr,
    labelsTr, datalist.json (patient-level folds). Returns the datalist as written, with "table"."""
    from pipeline.datasets.prepare import prepare_dataset

    extra = [*(([f"prepare.sequences=[{','.join(sequences)}]"]) if sequences else []),
             *([f"prepare.folds={int(folds)}"] if folds is not None else [])]
    data = [Path(d) for d in data] if isinstance(data, (list, tuple)) else Path(data)
    return prepare_dataset(data, Path(out), _config(config, [*extra, *overrides]))


def train(data: str | Path, run: str | Path, *, fold: int | str = "all", resume: bool = False,
          config: str | Path | None = None, overrides: Iterable[str] = ()) -> list:
    """`run.py train`: fold `fold` (or "all") of the prepared data set `data` into the run folder
    `run`. Returns one pipeline.train.cv.FoldResult per fold (best epoch, Dice per validation patient
    with the best and the last checkpoint, minutes)."""
    from pipeline.train.cv import run_training

    return run_training(Path(data), Path(run), str(fold), _config(config, overrides), resume=resume)


def evaluate(pred: str | Path, ref: str | Path, out: str | Path, *, dicom: str | Path | None = None,
             config: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """`run.py evaluate`: the CHAOS metrics of the masks in `pred` against the reference `ref` (a
    folder of masks such as prepare's labelsTr, or a CHAOS root). Returns metrics.json's content: per case
    ("cases": dice, ravd_pct, assd_mm, mssd_mm, hd95_mm, the CHAOS points) and "summary"."""
    from pipeline.evaluate.evaluation import run_evaluation

    return run_evaluation(Path(pred), Path(ref), Path(out), dicom=None if dicom is None else Path(dicom),
                          cfg=_config(config, overrides))
