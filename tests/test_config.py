"""Config: YAML then dotted overrides, typed, validated once, errors that name the key."""

from pathlib import Path

import pytest
import yaml

from climseg.config import Config, ConfigError, config_from_dict, load_config, save_config

REPO = Path(__file__).resolve().parent.parent
ROOT = ["data.root=/tmp/cam"]


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  lr: 0.5\n  name: adam\ndata:\n  root: /from/yaml\n")
    cfg = load_config(f, ["optimizer.lr=0.002", "data.crop=[96, 144]", "train.max_steps=null"])
    assert cfg.optimizer.lr == 0.002          # the command line wins
    assert cfg.optimizer.name == "adam"       # the file beats the default
    assert cfg.optimizer.eps == 1e-6          # the default fills the rest
    assert cfg.data.root == "/from/yaml"
    assert cfg.data.crop == [96, 144]
    assert cfg.train.max_steps is None
    assert isinstance(cfg.optimizer.lr, float)


def test_in_channels_follows_channel_subset():
    cfg = load_config(None, ROOT + ["data.channels=[0, 3, 5]"])
    assert cfg.model.in_channels == 3
    assert load_config(None, ROOT).model.in_channels == 16


@pytest.mark.parametrize("override, message", [
    # Values the builders used to reject only later, with a traceback.
    ("loss.class_frequencies=[2,1,1]", "loss.class_frequencies: every frequency must be in (0, 1]"),
    ("loss.weight_pow=.nan", "loss.weight_pow: must be a finite number"),
    ("optimizer.lr=.inf", "optimizer.lr: must be a finite number"),
    ("scheduler.eta_min=-1", "scheduler.eta_min: must be non-negative"),
    ("scheduler.milestones=[-5]", "scheduler.milestones: must be strictly increasing step numbers"),
    ("model.num_classes=4", "model.class_names: must name the 4 classes"),
    ("model.name=unet", "model.name: 'unet' is not one of"),
    ("optimizer.lrr=1", "optimizer.lrr: unknown key"),
    ("bogus=1", "bogus: unknown key"),
    ("optimizer.lr=fast", "optimizer.lr: must be a number"),
    ("optimizer.lr=-1", "optimizer.lr: must be positive"),
    ("optimizer.name=rmsprop", "optimizer.name: 'rmsprop' is not one of"),
    ("train.local_batch_size=0", "train.local_batch_size: must be at least 1"),
    ("train.local_batch_size=2.5", "train.local_batch_size: must be an integer"),
    ("train.compile=yes please", "train.compile: must be true or false"),
    ("data.crop=[100, 144]", "data.crop: both sides must be positive multiples of 16"),
    ("data.validation_crop=[64]", "data.validation_crop: must be [height, width]"),
    ("data.validation_tile=[96, 100]", "data.validation_tile: both sides must be positive "
                                       "multiples of 16"),
    ("data.channels=[0, 16]", "data.channels: indices must be in 0..15"),
    ("data.normalization=l2", "data.normalization: 'l2' is not one of"),
    ("scheduler.type=cosine", "scheduler.t_max: must be a positive number"),
    ("scheduler.type=multistep", "scheduler.milestones: must list at least one"),
    ("scheduler.milestones=[800, 400]", "scheduler.milestones: must be strictly increasing"),
    ("scheduler.warmup_factor=0.5", "scheduler.warmup_factor: must be at least 1"),
    ("model.in_channels=4", "model.in_channels: is 4 but data.channels selects 16"),
    ("loss.class_frequencies=[0.5, 0.5]", "loss.class_frequencies: has 2 values for 3 classes"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("optimizer=3", "optimizer: must be a mapping"),
    ("noequals", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, ROOT + [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overwrite_and_resume_auto_contradict():
    with pytest.raises(ConfigError) as err:
        load_config(None, ROOT + ["overwrite=true", "resume=auto"])
    assert str(err.value) == ("overwrite: true starts over and resume=auto continues the run in "
                              "output_dir: give one")
    assert load_config(None, ROOT + ["overwrite=true"]).overwrite is True


def test_train_force_is_overwrite():
    from climseg.train_cli import parse_args

    assert parse_args(["--config", "ci", "--force"]).overrides == ["overwrite=true"]


def test_missing_root_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="data.root: is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_global_batch_check():
    cfg = load_config(REPO / "yaml" / "gbs2048.yaml", ROOT)
    assert cfg.global_batch(256) == 2048
    with pytest.raises(ConfigError, match="train.global_batch_size: is 2048 but 4 ranks"):
        cfg.global_batch(4)
    cfg = load_config(REPO / "yaml" / "gbs128.yaml", ROOT + ["train.gradient_accumulation=4"])
    assert cfg.global_batch(4) == 128


@pytest.mark.parametrize("name", ["gbs2048", "gbs128", "workstation", "demo", "ci"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "yaml" / f"{name}.yaml", ROOT)
    assert isinstance(cfg, Config)


def test_mlperf_reference_points():
    big = load_config(REPO / "yaml" / "gbs2048.yaml", ROOT)
    assert (big.optimizer.name, big.optimizer.lr, big.optimizer.eps) == ("lamb", 0.0055, 1e-6)
    assert (big.optimizer.weight_decay, big.optimizer.max_grad_norm) == (0.01, 1.0)
    assert (big.scheduler.type, big.scheduler.warmup_steps, big.scheduler.milestones,
            big.scheduler.decay_rate) == ("multistep", 400, [800], 0.1)
    small = load_config(REPO / "yaml" / "gbs128.yaml", ROOT)
    assert (small.optimizer.lr, small.scheduler.type, small.scheduler.t_max,
            small.scheduler.warmup_steps) == (0.00155, "cosine", 9000, 0)


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(REPO / "yaml" / "demo.yaml", ["train.max_steps=7"])
    assert config_from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


def _keys(cls, prefix=""):
    """Every leaf key of a config dataclass, dotted."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_docs_config_md_documents_every_config_key():
    page = (REPO / "docs" / "config.md").read_text()
    keys = list(_keys(Config))
    assert len(keys) > 40
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, f"docs/config.md does not document {missing}: run `make docs`"


def test_class_names_follow_num_classes():
    assert load_config(None, ROOT).model.class_names == [
        "background", "tropical_cyclone", "atmospheric_river"]
    cfg = load_config(None, ROOT + ["model.num_classes=4", "model.class_names=[a, b, c, d]",
                                    "loss.class_frequencies=[0.7, 0.1, 0.1, 0.1]"])
    assert cfg.model.class_names == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="model.class_names: has 2 names"):
        load_config(None, ROOT + ["model.class_names=[a, b]"])


def test_config_output_stride_matches_the_model():
    from climseg.config import OUTPUT_STRIDE
    from climseg.model.deeplab import OUTPUT_STRIDE as MODEL_STRIDE

    assert OUTPUT_STRIDE == MODEL_STRIDE


def test_loading_a_config_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from climseg.config import load_config; "
            "load_config('yaml/demo.yaml', ['data.root=/x']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("global_batch, ranks, local, hint", [
    (8, 2, 2, "set train.gradient_accumulation=2"),
    (6, 2, 2, "on these ranks, local_batch_size x gradient_accumulation must be 3: 1 x 3, 3 x 1"),
    (6, 4, 1, "6 is not a multiple of 4 ranks; with local_batch_size 1 it fits on 1, 2, 3, 6 "
              "ranks"),
])
def test_a_global_batch_that_does_not_fit_says_what_would(global_batch, ranks, local, hint):
    cfg = load_config(None, ROOT + [f"train.global_batch_size={global_batch}",
                                    f"train.local_batch_size={local}"])
    with pytest.raises(ConfigError) as err:
        cfg.global_batch(ranks)
    assert str(err.value).endswith(hint)
