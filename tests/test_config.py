"""Config loading: strict keys and types, overrides, round trip."""

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import DEFAULT_CONFIG, Config, ConfigError, config_to_dict, load_config, save_config


def test_default_yaml_lists_every_field_with_its_default():
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert data == config_to_dict(Config())


def test_default_yaml_has_a_comment_on_every_key():
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            assert "#" in line, f"no comment on: {line}"


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(p)


def test_wrong_type_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(p)


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=2.5", "train.batch_size"),
    ("model.channels=[8, x]", r"model.channels\[1\]"),
    ("infer.fill_holes=1", "infer.fill_holes"),
    ("infer.slice_smoothing=-1", "infer.slice_smoothing"),
    ("train.gamma_range=[2.0,0.5]", "train.gamma_range"),
    ("train.gamma_range=[0.7]", "train.gamma_range"),
    ("train.organ_intensity_texture=[1.5,0.5]", "train.organ_intensity_texture"),
    ("train.organ_intensity_shared=1.5", "train.organ_intensity_shared"),
    ("nosection.key=1", "nosection"),
    ("train", "section.key=value"),
])
def test_bad_overrides_fail_with_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["train.epochs=3", "train.lr=1e-3", "model.channels=[8,16]", "model.strides=[2]",
                            "prepare.sequences=[CT]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.channels == [8, 16] and cfg.prepare.sequences == ["CT"]
    # an int is accepted where a float is expected, and stored as float
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert not list(tmp_path.glob(".partial-*"))


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_off_is_a_word_for_string_options():
    cfg = load_config(None, ["train.amp=off", "infer.amp=off"])
    assert cfg.train.amp == "off" and cfg.infer.amp == "off"


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "gpu.yaml", "gpu3d.yaml"])
def test_every_shipped_config_loads_and_builds_its_network(name):
    import torch

    from pipeline.core.labels import model_output
    from pipeline.model.networks import build_model, in_channels

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    if cfg.model.dims == 3:  # training sets the spacings from the data: CHAOS MR's here
        cfg.train.pixel_spacing, cfg.train.slice_spacing = 1.5, 7.7
        size = cfg.train.patch_3d
        model = build_model(cfg.model, size, (1.5, 1.5, 7.7)).eval()
    else:
        size = cfg.train.roi_size
        model = build_model(cfg.model, size).eval()
    x = torch.zeros(1, in_channels(cfg.model), *size)
    with torch.inference_mode():
        out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    # one slice (or patch) in, one logit map per class of the model's output at its size
    assert tuple(out.shape) == (1, len(model_output(cfg.model.organs)), *size)
