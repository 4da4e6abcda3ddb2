"""Synthetic CHAOS data set: abdominal CT and MR phantoms written in the official Train_Sets layout.

Each patient is an analytic anatomy (body wall, fat, spine, ribs, lungs, liver with vessels and
gallbladder, kidneys, spleen, stomach, bowel, aorta, IVC) defined in a patient "body frame" in mm
(x towards the patient's left, y posterior, z superior, z = 0 near the top of the right
hemidiaphragm). Every series samples that anatomy on its own scanner grid (spacing, origin,
orientation, slice step), so the labels are exact on every grid and the sequences of one MR
patient show the same organs. Intensities come from per-sequence tissue tables chosen so that the
liver overlaps other tissue (spleen in CT, muscle and spleen in MR): a model has to use shape and
position, not a threshold.

Why hand-written: no maintained library generates multi-organ abdominal CT/MR phantoms with
scanner geometry (MONAI's `create_test_image_3d` draws random spheres only).

Layout written under `<out>/Train_Sets` (see ../shared/data/README.md):
    CT/<id>/DICOM_anon/i0000,0000b.dcm ...   (i0000 most superior, z descending)
    CT/<id>/Ground/liver_GT_000.png ...      (1-bit, liver only, NNN-th file)
    MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-0004-NNNNN.dcm  (out odd, in even numbers)
    MR/<id>/T1DUAL/Ground/IMG-0004-NNNNN.png (InPhase stems)
    MR/<id>/T2SPIR/{DICOM_anon,Ground}/IMG-0002-NNNNN.{dcm,png}
Ground PNGs are indexed like the stored pixel array (row, column), no flip.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from pipeline.core.config import SynthConfig
from pipeline.core.console import progress
from pipeline.core.errors import PipelineError
from pipeline.core.figures import display_window, new_figure, save_png
from pipeline.core.files import atomic_path
from pipeline.core.labels import ORGANS
from pipeline.datasets.chaos import CHAOS_PNG_LIVER, MR_GREY_LEVELS
from pipeline.datasets.synthetic.anatomy import Anatomy, Field, body_points, make_grid, organ_labels, rotation
from pipeline.datasets.synthetic.dicom_writer import write_series
from pipeline.datasets.synthetic.render import T1_TE_IN, T1_TE_OUT, T2_TE, bias_field, render_ct, render_mr

log = logging.getLogger(__name__)


# Patient numbers of the official CHAOS training set, so synthetic ids look like real ones.
CT_IDS = [1, 2, 5, 6, 8, 10, 14, 16, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]


MR_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]


# Official MR Ground grey levels, by organ name.
MR_LEVELS = {ORGANS[label]: grey for label, grey in MR_GREY_LEVELS.items()}


def _save_png(path: Path, img: Image.Image) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _patient_rng(seed: int, modality: str, pid: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"CT": 1, "MR": 2}[modality], pid])


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["chaos-synth", *map(str, parts)])


def synth_ct_patient(folder: Path, pid: int, cfg: SynthConfig) -> dict:
    """Write CT/<pid>: DICOM_anon (head to feet) and 1-bit liver Ground PNGs. Returns a summary row."""
    rng = _patient_rng(cfg.seed, "CT", pid)
    anat = Anatomy(rng)
    n = int(rng.integers(cfg.ct_slices[0], cfg.ct_slices[1] + 1))
    step = round(float(rng.uniform(2.0, 3.0)) * 64) / 64
    fov = float(rng.uniform(max(320, 2 * anat.a + 30), 420))
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(900, 1700)])
    body_rot = rotation(rng, 3.0)
    grid = make_grid(rng, cfg.ct_size, n, fov, step, centre, rng.uniform(5, 35), np.eye(3), True)
    p = body_points(grid, centre, body_rot)
    t = anat.tissues(p)
    hu = render_ct(t, anat, rng, grid.spacing[0])
    # Outside the reconstruction circle the scanner stores its minimum, like real CT.
    rr, cc = np.mgrid[: cfg.ct_size, : cfg.ct_size]
    half = (cfg.ct_size - 1) / 2
    hu[:, (rr - half) ** 2 + (cc - half) ** 2 > (half + 0.5) ** 2] = -1000
    liver = organ_labels(t, p)["liver"]

    position = "FFS" if rng.uniform() < 0.7 else "HFS"
    names = [f"i{k:04d},0000b.dcm" for k in range(n)]
    write_series(
        folder / "DICOM_anon", hu, spacing=grid.spacing, origin=grid.origin, row_dir=grid.row_dir,
        col_dir=grid.col_dir, modality="CT", file_names=names, rescale_intercept=-1000.0,
        series_uid=_uid(cfg.seed, "CT", pid, "series"), study_uid=_uid(cfg.seed, "CT", pid, "study"),
        patient_id=f"CHAOS^CT_SET_{pid}", series_description="Abdomen portal venous",
        patient_position=position,
        extra_tags={"SeriesNumber": 4, "KVP": "120", "ConvolutionKernel": "B",
                    "ContrastBolusAgent": "CONTRAST", "WindowCenter": "50", "WindowWidth": "400"},
    )
    for k in range(n):
        _save_png(folder / "Ground" / f"liver_GT_{k:03d}.png", Image.fromarray(liver[k]).convert("1"))
    return {"patient": f"CT_{pid}", "slices": n, "spacing": (*grid.spacing[:2], abs(step)),
            "liver_ml": float(liver.sum() * grid.spacing[0] * grid.spacing[1] * step / 1000)}


def _mr_ground(labels: dict[str, np.ndarray]) -> np.ndarray:
    g = np.zeros(labels["liver"].shape, dtype=np.uint8)
    for organ, level in MR_LEVELS.items():
        g[labels[organ]] = level
    return g


def synth_mr_patient(folder: Path, pid: int, cfg: SynthConfig) -> dict:
    """Write MR/<pid>/T1DUAL (in/out phase, shared Ground) and MR/<pid>/T2SPIR. Returns a summary row."""
    rng = _patient_rng(cfg.seed, "MR", pid)
    anat = Anatomy(rng)
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-30, 10), rng.uniform(-120, 60)])
    body_rot = rotation(rng, 3.0)
    bias_fields = (Field(rng, 220.0), Field(rng, 220.0))
    study = _uid(cfg.seed, "MR", pid, "study")
    common = {"MagneticFieldStrength": "1.5", "Manufacturer": "Philips Medical Systems"}
    row = {"patient": f"MR_{pid}"}
    for seq in ("T1DUAL", "T2SPIR"):
        n = int(rng.integers(cfg.mr_slices[0], cfg.mr_slices[1] + 1))
        step = round(float(rng.uniform(5.5, 9.0)) * 64) / 64
        fov = float(rng.uniform(max(330, 2 * anat.a + 30), 420))
        oblique = rng.uniform() < 0.4
        rot = rotation(rng, 8.0) if oblique else np.eye(3)
        # Like a real abdominal MR stack: centred near the hila, never starting below the dome;
        # +-10 mm breath-hold shift between the two acquisitions.
        top_z = max(10.0, -70.0 + step * (n - 1) / 2) + rng.uniform(-10, 10)
        grid = make_grid(rng, cfg.mr_size, n, fov, step, centre, top_z, rot, False)
        p = body_points(grid, centre, body_rot)
        t = anat.tissues(p)
        ground = _mr_ground(organ_labels(t, p))
        geo = dict(spacing=grid.spacing, origin=grid.origin, row_dir=grid.row_dir, col_dir=grid.col_dir,
                   modality="MR", study_uid=study, patient_id=f"CHAOS^MR_SET_{pid}", patient_position="HFS")
        if seq == "T1DUAL":
            bias = bias_field(bias_fields[0], p, 0.18)
            echo = {"InPhase": (T1_TE_IN, "T1_in", 2), "OutPhase": (T1_TE_OUT, "T1_out", 1)}
            for phase, (te, key, parity) in echo.items():
                numbers = [2 * k + parity for k in range(n)]
                vol = render_mr(t, key, rng, bias, anat.steatosis)
                write_series(
                    folder / "T1DUAL" / "DICOM_anon" / phase, vol, **geo,
                    file_names=[f"IMG-0004-{i:05d}.dcm" for i in numbers], instance_numbers=numbers,
                    series_uid=_uid(cfg.seed, "MR", pid, phase), series_description=f"T1_{phase}",
                    extra_tags={**common, "EchoTime": f"{te}", "RepetitionTime": "150",
                                "SeriesNumber": 4 if phase == "InPhase" else 5, "ProtocolName": "T1DUAL"},
                )
            stems = [f"IMG-0004-{2 * k + 2:05d}" for k in range(n)]
        else:
            vol = render_mr(t, "T2SPIR", rng, bias_field(bias_fields[1], p, 0.2), anat.steatosis)
            stems = [f"IMG-0002-{k + 1:05d}" for k in range(n)]
            write_series(
                folder / "T2SPIR" / "DICOM_anon", vol, **geo, file_names=[s + ".dcm" for s in stems],
                series_uid=_uid(cfg.seed, "MR", pid, "T2SPIR"), series_description="T2SPIR",
                extra_tags={**common, "EchoTime": f"{T2_TE}", "RepetitionTime": "1600",
                            "SeriesNumber": 2, "ProtocolName": "T2SPIR"},
            )
        for k, stem in enumerate(stems):
            _save_png(folder / seq / "Ground" / f"{stem}.png", Image.fromarray(ground[k], mode="L"))
        row[seq] = {"slices": n, "spacing": (*grid.spacing[:2], step), "oblique": oblique,
                    "liver_ml": float((ground == CHAOS_PNG_LIVER).sum() * grid.spacing[0] ** 2 * step / 1000)}
    return row


def _ids(base: list[int], count: int) -> list[int]:
    extra = range(base[-1] + 1, base[-1] + 1 + max(0, count - len(base)))
    return (base + list(extra))[:count]


def _synth_patient(modality: str, pid: int, tmp: Path, cfg: SynthConfig) -> tuple[dict, float]:
    """Write one patient into `tmp` (a scratch folder); returns its summary row and the seconds it took."""
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    make = synth_ct_patient if modality == "CT" else synth_mr_patient
    return make(tmp, pid, cfg), time.perf_counter() - t0


def _workers(requested: int, jobs: int) -> int:
    if requested < 0:
        raise PipelineError(f"synth.workers must be >= 0, got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, jobs))


def generate_dataset(out: str | Path, cfg: SynthConfig) -> Path:
    """Write `cfg.patients` CT and `cfg.patients` MR patients under `out/Train_Sets`; return that path.

    Each patient is generated in a hidden scratch folder beside Train_Sets and renamed into place
    when complete, so an interrupted run never leaves a half patient. Same cfg -> identical bytes,
    whatever `cfg.workers`: every patient draws from its own seeded generator.
    """
    if cfg.patients < 1:
        raise PipelineError(f"synth.patients must be >= 1, got {cfg.patients}")
    for key, lo in (("ct_size", 16), ("mr_size", 16)):
        if getattr(cfg, key) < lo:
            raise PipelineError(f"synth.{key} must be >= {lo}, got {getattr(cfg, key)}")
    for key in ("ct_slices", "mr_slices"):
        v = getattr(cfg, key)
        if len(v) != 2 or not 2 <= v[0] <= v[1]:
            raise PipelineError(f"synth.{key} must be [min, max] with 2 <= min <= max, got {v}")
    root = Path(out) / "Train_Sets"
    scratch = Path(out) / f".synth-partial-{os.getpid()}"
    jobs = [("CT", i) for i in _ids(CT_IDS, cfg.patients)] + [("MR", i) for i in _ids(MR_IDS, cfg.patients)]
    workers = _workers(cfg.workers, len(jobs))
    t0 = time.perf_counter()

    def finish(modality: str, pid: int, row: dict, seconds: float) -> None:
        final = root / modality / str(pid)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)  # a previous synth output of the same patient
        os.replace(scratch / modality / str(pid), final)
        log.info("%s_%d written in %.1f s: %s", modality, pid, seconds, row)

    bar = progress(total=len(jobs), desc="synth patients", unit="patient")
    try:
        if workers == 1:
            for modality, pid in jobs:
                finish(modality, pid, *_synth_patient(modality, pid, scratch / modality / str(pid), cfg))
                bar.update()
        else:
            # Patients are independent and the work is NumPy/SciPy on one core each: one process
            # per core. "spawn" because the caller may have started torch's thread pools already.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_synth_patient, m, i, scratch / m / str(i), cfg): (m, i) for m, i in jobs}
                try:
                    for fut in as_completed(futures):
                        finish(*futures[fut], *fut.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
        if scratch.exists():
            shutil.rmtree(scratch)
    log.info("synthetic data set (%d CT + %d MR patients, %d process%s) in %.1f s: %s", cfg.patients,
             cfg.patients, workers, "es" if workers > 1 else "", time.perf_counter() - t0, root)
    return root


def _read_slice(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def save_montage(train_sets: str | Path, out_png: str | Path, ct_id: int | None = None,
                 mr_id: int | None = None) -> Path:
    """PNG montage: a mid-liver slice of CT, T1 in-phase, T1 opposed-phase and T2SPIR with the Ground outline.

    Reads back the written files (DICOM pixel array as stored, Ground PNG), so it also shows that
    images and masks line up. The first CT and MR patient are used unless ids are given.
    """
    root = Path(train_sets)
    ct_id = ct_id if ct_id is not None else min(int(d.name) for d in (root / "CT").iterdir())
    mr_id = mr_id if mr_id is not None else min(int(d.name) for d in (root / "MR").iterdir())
    ct, mr = root / "CT" / str(ct_id), root / "MR" / str(mr_id)

    def mid_liver(ground: list[Path]) -> int:
        areas = [(np.array(Image.open(g)) > 0).sum() for g in ground]
        return int(np.argmax(areas))

    panels = []
    cg = sorted((ct / "Ground").glob("*.png"))
    k = mid_liver(cg)
    panels.append((f"CT_{ct_id} {sorted((ct / 'DICOM_anon').glob('*.dcm'))[k].name}",
                   _read_slice(sorted((ct / "DICOM_anon").glob("*.dcm"))[k]), np.array(Image.open(cg[k])),
                   (-160, 240)))
    for seq, folder, gfolder in (("T1 in", mr / "T1DUAL/DICOM_anon/InPhase", mr / "T1DUAL/Ground"),
                                 ("T1 out", mr / "T1DUAL/DICOM_anon/OutPhase", mr / "T1DUAL/Ground"),
                                 ("T2SPIR", mr / "T2SPIR/DICOM_anon", mr / "T2SPIR/Ground")):
        g = sorted(gfolder.glob("*.png"))
        k = mid_liver(g)
        img = _read_slice(sorted(folder.glob("*.dcm"))[k])
        panels.append((f"MR_{mr_id} {seq}", img, np.array(Image.open(g[k])), display_window(img, (1.0, 99.5))))
    fig = new_figure(figsize=(12, 6.4), dpi=80)
    axes = fig.subplots(2, 4)
    for col, (title, img, ground, (lo, hi)) in enumerate(panels):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if row == 1:
                colours = ("lime", "orange", "cyan", "magenta")  # liver, right kidney, left kidney, spleen
                for level, color in ((1, "lime"), *zip(MR_GREY_LEVELS.values(), colours)):
                    if np.any(ground == level):
                        ax.contour(ground == level, levels=[0.5], colors=color, linewidths=0.8)
            ax.set_title(title if row == 0 else "Ground outline", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return save_png(fig, out_png)
