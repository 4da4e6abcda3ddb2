"""Training: the real default config with shrunk overrides on a tiny prepared data set."""
import csv
import logging

import numpy as np
import pytest
import torch
import yaml

import pipeline.train.fold as fold_mod
from pipeline.core import runs
from pipeline.core.errors import PipelineError
from pipeline.datasets.datalist import read_datalist
from pipeline.model.networks import build_model
from pipeline.train import budget, cv, distributed, epochs, records
from pipeline.train import state as state_mod
from pipeline.train.cv import run_training

from helpers import make_prepared_dataset

ARTEFACTS = ["config.yaml", "split.json", "best.pt", "last.pt", "train.log",
             "metrics.csv", "curves.png"]


def interrupt_after(monkeypatch, epoch):
    """Training stops like Ctrl-C (or a kill) right after `epoch` is saved; returns the undo."""
    finish = fold_mod.finish_epoch

    def killed(fold_dir, state, *args):
        finish(fold_dir, state, *args)
        if state.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(fold_mod, "finish_epoch", killed)
    return lambda: monkeypatch.setattr(fold_mod, "finish_epoch", finish)


def read_metrics(fold_dir):
    with open(fold_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_times(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), n_mr=3, n_ct=3, folds=2)


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory, tiny_config):
    """One uninterrupted 3-epoch run of fold 0, shared by several tests."""
    run = tmp_path_factory.mktemp("run")
    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.setLevel(logging.INFO)  # as run.py configures it; train.log records what the logger emits
    try:
        results = run_training(data_dir, run, "0", tiny_config())
    finally:
        logger.setLevel(level)
    return run, results


def test_auto_pixel_spacing_fits_the_median_field_of_view_whatever_the_stored_axis_order(tmp_path, tiny_config):
    import nibabel as nib

    from pipeline.train.cv import auto_pixel_spacing

    def volume(name, shape, affine):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), str(path))
        return {"image": str(path)}

    # fields of view (R x A, mm) 64 x 64, 96 x 96, 80 x 60; roi 32 x 32 needs 2.0, 3.0 and 2.5 mm
    entries = [volume("a", (64, 64, 5), np.diag([1.0, 1.0, 4.0, 1.0])),
               volume("b", (64, 64, 5), np.diag([-1.5, -1.5, 4.0, 1.0])),
               # stored sagittal-first: voxel axis 0 runs along S, so the in-plane axes are voxel 1 and 2
               volume("c", (5, 80, 60), np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]]))]
    cfg = tiny_config()
    assert cfg.train.pixel_spacing == "auto" and cfg.train.roi_size == [32, 32]
    resolved = auto_pixel_spacing(cfg, entries)
    assert resolved.train.pixel_spacing == 2.5  # the median
    assert cfg.train.pixel_spacing == "auto"  # the caller's config is left as it was
    fixed = tiny_config("train.pixel_spacing=1.25")
    assert auto_pixel_spacing(fixed, entries) is fixed and fixed.train.pixel_spacing == 1.25


@pytest.mark.slow
def test_a_run_trained_with_auto_spacing_saves_the_number_and_infer_resamples_to_it(straight_run, data_dir):
    from pipeline.dicom.volume import read_nifti
    from pipeline.infer.loaded import load_run
    from pipeline.infer.segment import preprocess_case

    run, _ = straight_run
    # make_prepared_dataset: 40 x 36 voxels of 1.5 mm (60 x 54 mm) into a 32 x 32 roi: 1.875 mm, as saved
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]["pixel_spacing"]
    assert saved == 1.88 and yaml.safe_load((run / "fold_0" / "config.yaml").read_text())["train"]["pixel_spacing"] == 1.88
    loaded = load_run(run, "0")
    assert loaded.cfg.train.pixel_spacing == 1.88
    image = read_nifti(data_dir / "imagesTr" / "MR_1_T2SPIR.nii.gz")
    _, model_input = preprocess_case(loaded, image.array.astype(np.float32), image.affine, "MR")
    assert tuple(model_input.shape[1:3]) == (32, 32)
    assert np.allclose(np.linalg.norm(np.asarray(model_input.affine)[:3, :2], axis=0), 1.88, atol=1e-3)


def test_tiny_run_decreases_the_loss_and_writes_every_artefact(straight_run):
    run, results = straight_run
    fold_dir = run / "fold_0"
    for name in ARTEFACTS:
        assert (fold_dir / name).stat().st_size > 0, name
    # the config states the normalisation and the labels: no file beside it that nothing reads
    assert not (fold_dir / "labels.json").exists() and not (fold_dir / "normalisation.json").exists()
    assert (run / "config.yaml").is_file()
    assert not list(run.rglob(".partial-*"))
    rows = read_metrics(fold_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert {"val_loss", "val_dice_mean", "val_raw_dice_mean", "val_dice_MR_1", "val_dice_CT_2", "lr", "epoch_time_s"} <= set(rows[0])
    # the fold's result is the validation row of the best epoch, and that epoch has the highest mean Dice
    validated = [r for r in rows if r["val_dice_mean"]]
    best = max(validated, key=lambda r: float(r["val_dice_mean"]))
    assert results[0].best_epoch == int(best["epoch"]) == runs.best_row(runs.read_metrics(fold_dir))["epoch"]
    assert results[0].dice_best == {p: pytest.approx(float(best[f"val_dice_{p}"])) for p in ("CT_2", "MR_1", "MR_3")}
    assert torch.load(fold_dir / "best.pt", weights_only=True)["best_dice"] == pytest.approx(float(best["val_dice_mean"]))
    log_text = (fold_dir / "train.log").read_text()
    assert "AdamW" in log_text and log_text.count("train loss") == 3


def test_split_holds_whole_patients_apart(straight_run):
    import json

    split = json.loads((straight_run[0] / "fold_0" / "split.json").read_text())
    assert not set(split["train"]["patients"]) & set(split["val"]["patients"])
    assert sorted(split["val"]["patients"]) == ["CT_2", "MR_1", "MR_3"]


def test_checkpoints_load_with_weights_only_and_restore_the_model(straight_run, tiny_config):
    run, _ = straight_run
    cfg = tiny_config()
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / "fold_0" / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "best_dice", "rng", "config"} <= set(ckpt)
        model = build_model(cfg.model)
        model.load_state_dict(ckpt["model"])
        assert ckpt["config"]["train"]["roi_size"] == [32, 32]
    assert torch.load(run / "fold_0" / "last.pt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_same_seed_and_config_give_the_same_metrics(straight_run, data_dir, tmp_path, tiny_config):
    run, _ = straight_run
    run_training(data_dir, tmp_path, "0", tiny_config())
    assert without_times(read_metrics(tmp_path / "fold_0")) == without_times(read_metrics(run / "fold_0"))


@pytest.mark.slow
def test_resume_after_an_interruption_continues_exactly(straight_run, data_dir, tmp_path, monkeypatch, tiny_config):
    resume_normally = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_training(data_dir, tmp_path, "0", tiny_config())
    assert len(read_metrics(tmp_path / "fold_0")) == 2
    resume_normally()
    run_training(data_dir, tmp_path, "0", tiny_config(), resume=True)
    resumed = without_times(read_metrics(tmp_path / "fold_0"))
    assert [int(r["epoch"]) for r in resumed] == [1, 2, 3]
    assert resumed == without_times(read_metrics(straight_run[0] / "fold_0"))


@pytest.mark.slow
def test_resume_keeps_the_pixel_spacing_the_run_was_trained_at(data_dir, tmp_path, monkeypatch, tiny_config):
    """A run begun with slices resized (pixel_spacing 0, as every run before "auto") and resumed with
    the default config goes on resized: its models must be fed as they were trained."""
    resume_normally = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_training(data_dir, tmp_path, "0", tiny_config("train.pixel_spacing=0", "train.epochs=2"))
    resume_normally()
    run_training(data_dir, tmp_path, "0", tiny_config("train.epochs=2"), resume=True)  # auto
    for config in (tmp_path / "config.yaml", tmp_path / "fold_0" / "config.yaml"):
        assert yaml.safe_load(config.read_text())["train"]["pixel_spacing"] == 0.0
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "fold_0")] == [1, 2]


@pytest.mark.slow
def test_training_again_into_a_used_fold_needs_resume(straight_run, data_dir, tiny_config):
    with pytest.raises(PipelineError, match="last.pt.*--resume"):
        run_training(data_dir, straight_run[0], "0", tiny_config())


@pytest.mark.slow
def test_fold_all_trains_every_fold_and_writes_the_cv_summary(data_dir, tmp_path, capsys, tiny_config):
    results = run_training(data_dir, tmp_path, "all", tiny_config("train.epochs=1"))
    with open(tmp_path / "cv_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in rows) == ["CT_1", "CT_2", "CT_3", "MR_1", "MR_2", "MR_3"]
    assert {r["fold"] for r in rows} == {"0", "1"}
    table = cv.format_cv_summary(results)
    last = [r.dice_last[p] for r in results for p in r.dice_last]
    assert f"all folds, last checkpoint: Dice {sum(last) / len(last):.4f}" in table
    assert "all folds, best checkpoint: Dice" in table and "mean ± std over 6 patients" in table
    assert capsys.readouterr().out == ""  # the API returns results; run.py prints the table
    assert (tmp_path / "fold_1" / "best.pt").is_file()


@pytest.mark.parametrize("fold,match", [("2", "folds 0..1"), ("x", "fold number or 'all'")])
def test_a_bad_fold_is_an_error(data_dir, tmp_path, fold, match, tiny_config):
    with pytest.raises(PipelineError, match=match):
        run_training(data_dir, tmp_path, fold, tiny_config())


def test_a_missing_datalist_is_an_error_naming_it(tmp_path, tiny_config):
    with pytest.raises(PipelineError, match="datalist.json: not found"):
        run_training(tmp_path, tmp_path / "run", "0", tiny_config())


def test_batch_size_must_hold_whole_volume_draws(data_dir, tmp_path, tiny_config):
    with pytest.raises(PipelineError, match="train.batch_size"):
        run_training(data_dir, tmp_path, "0", tiny_config("train.batch_size=6"))


class _BlockAndIsland(torch.nn.Module):
    """Liver logits high in a central block and in a small corner island, on every slice."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 0] = 10.0  # background everywhere else
        logits[:, 1, 8:24, 8:24] = 20.0
        logits[:, 1, 0:3, 0:3] = 20.0
        return logits


@pytest.mark.parametrize("cleaned", [True, False])
def test_validation_scores_the_mask_that_infer_would_write(data_dir, cleaned, tiny_config):
    from pipeline.model.networks import build_loss

    flags = "true" if cleaned else "false"
    cfg = tiny_config(f"infer.largest_component={flags}", f"infer.fill_holes={flags}")
    train, val = read_datalist(data_dir).split(0)
    *_, val_items, refs, val_tf = fold_mod.build_loaders(cfg, train, val, distributed.Dist())
    _, dice, raw = epochs.validate(_BlockAndIsland(), val_items, refs, val_tf, build_loss(cfg.train), cfg,
                                      torch.device("cpu"))
    assert set(dice) == set(raw) == {"CT_2", "MR_1", "MR_3"}
    for patient in dice:
        assert 0.0 < raw[patient] < 1.0
        if cleaned:  # the corner island is a false positive that the largest component drops
            assert dice[patient] > raw[patient]
        else:
            assert dice[patient] == raw[patient]


@pytest.mark.slow
def test_weight_average_is_validated_saved_and_resumed_exactly(data_dir, tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config("train.ema_decay=0.9")
    straight = tmp_path / "straight"
    run_training(data_dir, straight, "0", cfg)
    last = torch.load(straight / "fold_0" / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "train_model", "ema"} <= set(last)
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(averaged) == set(last["model"])
    assert all(torch.equal(averaged[k], last["model"][k]) for k in averaged)  # "model" is the average
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])

    resume_normally = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_training(data_dir, tmp_path / "resumed", "0", cfg)
    resume_normally()
    run_training(data_dir, tmp_path / "resumed", "0", cfg, resume=True)
    assert without_times(read_metrics(tmp_path / "resumed" / "fold_0")) == without_times(
        read_metrics(straight / "fold_0"))


@pytest.mark.parametrize("native, warned", [(False, True), (True, False)])
def test_bf16_training_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, caplog, tmp_path, native, warned, tiny_config):
    from types import SimpleNamespace

    monkeypatch.setattr(records, "cpu_has_native_bf16", lambda: native)
    cfg = tiny_config("train.amp=bf16")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.records"):
        records.log_settings(cfg, 0, [], [], torch.device("cpu"), SimpleNamespace(world=1), 1, tmp_path, tmp_path)
    assert any("emulated" in r.getMessage() for r in caplog.records) == warned


@pytest.mark.slow
def test_a_model_with_the_modality_channel_trains_validates_and_segments(data_dir, tmp_path, tiny_config):
    import json

    import numpy as np

    from pipeline.infer.inference import run_inference

    results = run_training(data_dir, tmp_path / "run", "0", tiny_config("model.modality_channel=true",
                                                                          "train.epochs=2"))
    state = torch.load(tmp_path / "run" / "fold_0" / "best.pt", weights_only=True)
    first_conv = next(v for k, v in state["model"].items() if v.ndim == 4)
    assert first_conv.shape[1] == 2  # image + modality channel
    # infer rebuilds the two-channel model from the run alone and scores CT_2 as validation did
    rows = run_inference(tmp_path / "run", data_dir, tmp_path / "out", patients="CT_2,MR_1", fold="0",
                         overrides=["infer.amp=off", "infer.crf_weight=0"])  # validation skips the CRF
    assert {r["case"] for r in rows} == {"CT_2", "MR_1_T2SPIR"} and all(np.isfinite(r["dice"]) for r in rows)
    ct = next(r for r in rows if r["case"] == "CT_2")
    assert ct["dice"] == pytest.approx(results[0].dice_best["CT_2"], abs=1e-3)
    assert json.loads((tmp_path / "out" / "inference.json").read_text())["cases"]


@pytest.mark.slow
def test_a_time_budget_fixes_the_epochs_saves_them_and_resume_keeps_them(data_dir, tmp_path, monkeypatch,
                                                                          tiny_config):
    import yaml

    # 7 s for a fold whose epochs take a fraction of that (even on a loaded machine): the budget, not
    # train.epochs=200, decides
    cfg = tiny_config("train.epochs=200", "train.budget_minutes=0.12", "train.val_every=2")
    # measured right after the warm-up here (when 5% of the budget has passed is a time, not an epoch:
    # test_the_budget_is_measured_over_its_first_twentieth_after_the_warm_up tests that rule)
    monkeypatch.setattr(budget, "CALIBRATION_SHARE", 0.0)
    resume_normally = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_training(data_dir, tmp_path, "0", cfg)
    fold_dir = tmp_path / "fold_0"
    saved = yaml.safe_load((fold_dir / "config.yaml").read_text())["train"]
    fixed = torch.load(fold_dir / "last.pt", weights_only=True)["budget_epochs"]
    assert fixed > 2 and fixed != 200  # measured after the one warm-up epoch (validated then, to time validation too)
    assert saved["epochs"] == fixed and saved["budget_minutes"] == 0.0  # rerunning this config repeats it
    assert read_metrics(fold_dir)[0]["val_dice_mean"] != ""

    resume_normally()
    results = run_training(data_dir, tmp_path, "0", cfg, resume=True)  # the same command line: no new measurement
    rows = read_metrics(fold_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, fixed + 1))
    assert torch.load(fold_dir / "last.pt", weights_only=True)["budget_epochs"] == fixed
    assert float(rows[-1]["lr"]) < 1e-6 * float(rows[0]["lr"]) + 1e-12  # the schedule ends at zero
    assert results[0].dice_last and cfg.train.epochs == 200  # the caller's config is left as it was


@pytest.mark.slow
def test_sgd_is_nnunets_nesterov_momentum_and_is_resumed_with_its_state(data_dir, tmp_path, tiny_config):
    cfg = tiny_config("train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.01", "train.schedule=poly",
                      "train.epochs=2")
    state = state_mod.make_state(cfg, torch.device("cpu"), distributed.Dist(), steps_per_epoch=3)
    assert isinstance(state.optimizer, torch.optim.SGD)
    group = state.optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["lr"] == pytest.approx(0.01 / 3)  # warm-up
    run_training(data_dir, tmp_path, "0", cfg)
    ckpt = torch.load(tmp_path / "fold_0" / "last.pt", weights_only=True)
    assert all("momentum_buffer" in s for s in ckpt["optimizer"]["state"].values())
    assert ckpt["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # poly ends at zero


def test_tensorboard_events_hold_the_metrics_and_overlays(straight_run):
    """`tensorboard --logdir RUN` reads what metrics.csv holds, plus overlay images of validation patients."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = straight_run
    fold_dir = run / "fold_0"
    assert list(fold_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(fold_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    rows = read_metrics(fold_dir)
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [int(r["epoch"]) for r in rows]
    assert [e.value for e in losses] == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-6)
    dice = events.Scalars("val_dice/MR_1")
    assert [e.value for e in dice] == pytest.approx([float(r["val_dice_MR_1"]) for r in rows if r["val_dice_MR_1"]],
                                                    rel=1e-6)
    overlays = [t for t in events.Tags()["images"] if t.startswith("overlay/")]
    assert sorted(overlays) == ["overlay/CT_2", "overlay/MR_1", "overlay/MR_3"]
    image = events.Images("overlay/MR_1")[-1]
    assert (image.width, image.height) == (32, 32)  # the tiny config's roi


def test_overlay_marks_the_prediction_red_and_the_reference_outline_green():
    import numpy as np

    from pipeline.train.tracking import overlay

    image = np.full((9, 9), 0.5, np.float32)
    truth = np.zeros((9, 9), bool)
    truth[2:7, 2:7] = True
    pred = np.zeros((9, 9), bool)
    pred[0, 0] = True
    rgb = overlay(image, truth, pred)
    assert rgb.shape == (9, 9, 3)
    assert rgb[0, 0, 0] > rgb[0, 0, 1]  # predicted: reddish
    assert rgb[2, 2, 1] == pytest.approx(1.0) and rgb[4, 4].tolist() == pytest.approx([0.5, 0.5, 0.5])  # outline only
    assert rgb[8, 8].tolist() == pytest.approx([0.5, 0.5, 0.5])


@pytest.mark.slow
def test_without_tensorboard_the_run_says_so_once_and_writes_no_events(data_dir, tmp_path, monkeypatch, caplog,
                                                                       tiny_config):
    import pipeline.train.tracking as tracking

    monkeypatch.setattr(tracking, "_summary_writer", lambda: None)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_training(data_dir, tmp_path / "run", "0", tiny_config("train.epochs=1"))
    assert sum("pip install tensorboard" in r.getMessage() for r in caplog.records) == 1
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
    run_training(data_dir, tmp_path / "off", "0", tiny_config("train.epochs=1", "train.tensorboard=false"))
    assert not list((tmp_path / "off").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("native", [False, True])
def test_native_bf16_is_bf16_only_where_the_cpu_has_it(monkeypatch, caplog, tmp_path, native, tiny_config):
    from types import SimpleNamespace

    import pipeline.core.device

    monkeypatch.setattr(pipeline.core.device, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert pipeline.core.device.amp_dtype(cpu, "native_bf16") == (torch.bfloat16 if native else None)
    assert pipeline.core.device.amp_dtype(torch.device("cuda"), "native_bf16") == torch.float16  # as "auto" on a GPU
    with caplog.at_level(logging.INFO, logger="pipeline.train.records"):
        records.log_settings(tiny_config("train.amp=native_bf16"), 0, [], [], cpu, SimpleNamespace(world=1), 1,
                             tmp_path, tmp_path)
    assert any(f"amp native_bf16 ({'bfloat16' if native else 'float32'})" in r.getMessage() for r in caplog.records)
    assert not any("emulated" in r.getMessage() for r in caplog.records)


def test_the_budget_is_measured_over_its_first_twentieth_after_the_warm_up(tiny_config):
    from types import SimpleNamespace

    cfg = tiny_config("train.budget_minutes=10", "train.warmup_epochs=2", "train.epochs=280")
    fresh, fixed = SimpleNamespace(budget_epochs=None), SimpleNamespace(budget_epochs=150)
    calibrates = budget.budget_calibrates_now
    assert not calibrates(cfg, fresh, 1, 100.0)  # still warming up
    assert not calibrates(cfg, fresh, 2, 8.0)  # warm-up over, but 8 s of 600 is too short a sample
    assert calibrates(cfg, fresh, 9, 30.0)  # 5% of ten minutes
    assert calibrates(cfg, fresh, 279, 20.0)  # train.epochs would end the run before
    assert not calibrates(cfg, fixed, 9, 30.0)  # fixed once, kept (resume)
    assert not calibrates(tiny_config("train.budget_minutes=0"), fresh, 9, 30.0)


def test_auto_compiles_only_where_the_compile_pays_back(tiny_config, monkeypatch):
    cpu, compiles = torch.device("cpu"), budget.compiles
    monkeypatch.setattr(budget.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compiles(tiny_config("train.budget_minutes=10"), cpu, 10)
    assert not compiles(tiny_config("train.budget_minutes=1"), cpu, 10)
    # 10 steps per epoch
    assert compiles(tiny_config("train.epochs=100"), cpu, 10)
    assert not compiles(tiny_config("train.epochs=99"), cpu, 10)
    assert compiles(tiny_config("train.compile=on"), cpu, 1)
    assert not compiles(tiny_config("train.compile=off", "train.budget_minutes=10"), cpu, 10)
    monkeypatch.setattr(budget.shutil, "which", lambda name: None)  # no C++ compiler for inductor
    assert not compiles(tiny_config("train.budget_minutes=10"), cpu, 10)


@pytest.mark.slow
def test_a_compiled_fold_trains_as_the_eager_one_saves_plain_weights_and_resumes(data_dir, tmp_path, monkeypatch,
                                                                                caplog, tiny_config):
    # dynamo + AOTAutograd as under inductor (graph capture, buffer updates, the backward), without
    # inductor's C++ code generation: a minute of the suite's time on a fresh machine; the real
    # compile is bench/bench_compile.py's, and a compile that fails is the next test's
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    eager, compiled = tiny_config(), tiny_config("train.compile=on")
    run_training(data_dir, tmp_path / "eager", "0", eager)
    resume_normally = interrupt_after(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(KeyboardInterrupt):
        run_training(data_dir, tmp_path / "compiled", "0", compiled)
    assert any("network compiled" in r.getMessage() for r in caplog.records)
    resume_normally()
    run_training(data_dir, tmp_path / "compiled", "0", compiled, resume=True)
    a, b = read_metrics(tmp_path / "eager" / "fold_0"), read_metrics(tmp_path / "compiled" / "fold_0")
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b):  # the same batches and draws; only the kernels' rounding differs
        for key in ("train_loss", "val_loss", "val_dice_mean"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), abs=2e-3), (ra["epoch"], key)
    weights = torch.load(tmp_path / "compiled" / "fold_0" / "last.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod") for k in weights)  # loads into the plain network, as infer builds it
    build_model(compiled.model, compiled.train.roi_size).load_state_dict(weights)


@pytest.mark.slow
def test_a_compile_that_fails_leaves_one_warning_and_trains_uncompiled(data_dir, tmp_path, monkeypatch, caplog,
                                                                       tiny_config):
    def broken(model, **kwargs):
        def call(*args):
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        run_training(data_dir, tmp_path, "0", tiny_config("train.compile=on", "train.epochs=1"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["fold 0: torch.compile failed (InductorError: no working C++ compiler); training uncompiled "
                        "(train.compile=off avoids trying)"]
    assert len(read_metrics(tmp_path / "fold_0")) == 1


def test_the_compiles_trial_batch_leaves_weights_statistics_gradients_and_draws_as_they_were(tiny_config, monkeypatch):
    # dynamo's eager backend: the trial batch runs as under inductor (traced, forward and backward)
    # without generating code, which the compiled-fold test above does once already
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    cfg, cpu = tiny_config("model.norm=batch", "train.compile=on"), torch.device("cpu")
    state = state_mod.make_state(cfg, cpu, distributed.Dist(), steps_per_epoch=3)
    before, rng = {k: v.clone() for k, v in state.module.state_dict().items()}, torch.get_rng_state()
    budget.compile_network(state, cfg, cpu, fold=0)
    assert state.compiled is not None
    after = state.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch norm's running statistics too
    assert all(p.grad is None for p in state.module.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_epochs_smaller_last_batch_runs_uncompiled_instead_of_compiling_again(tiny_config):
    from pipeline.model.networks import build_loss

    cfg = tiny_config()
    state = state_mod.make_state(cfg, torch.device("cpu"), distributed.Dist(), steps_per_epoch=2)
    calls = []

    class Recording(torch.nn.Module):  # stands for torch.compile's module: same parameters, counted calls
        def forward(self, x):
            calls.append(len(x))
            return state.model(x)

    state.compiled, state.compiled_batch = Recording(), 8
    loader = [{"image": torch.rand(n, 1, 32, 32), "label": (torch.rand(n, 1, 32, 32) > 0.5).float()} for n in (8, 8, 4)]
    epochs.train_one_epoch(state, loader, build_loss(cfg.train), torch.device("cpu"), "off",
                              torch.amp.GradScaler("cpu", enabled=False), "epoch", False)
    assert calls == [8, 8]  # the batch of 4 went to the plain network
    assert state.scheduler.last_epoch == 3  # and was trained on all the same


@pytest.mark.slow
def test_patches_train_on_random_crops_while_validation_and_infer_see_the_whole_roi(data_dir, tmp_path, tiny_config):
    from monai.networks.nets import UNet

    from pipeline.infer.inference import run_inference

    seen = []

    def record(module, args):
        if isinstance(module, UNet):
            seen.append((module.training, tuple(args[0].shape[-2:])))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        results = run_training(data_dir, tmp_path / "run", "0",
                               tiny_config("train.patch_size=[16,24]", "train.epochs=2", "train.compile=off"))
        rows = run_inference(tmp_path / "run", data_dir, tmp_path / "out", patients="MR_1", fold="0",
                             overrides=["infer.amp=off", "infer.checkpoint=best",
                                        "infer.crf_weight=0"])  # validation skips the CRF
    finally:
        hook.remove()
    assert {shape for training, shape in seen if training} == {(16, 24)}
    assert {shape for training, shape in seen if not training} == {(32, 32)}  # validation and infer
    assert rows[0]["dice"] == pytest.approx(results[0].dice_best["MR_1"], abs=1e-3)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["patch_size"] == [16, 24] and saved["roi_size"] == [32, 32]
