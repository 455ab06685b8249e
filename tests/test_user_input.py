"""What a user types, read as meant: YAML files that say one thing, built-in configs by name,
and a suggestion for a mistyped command, flag or config key. Each mistake is one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from climseg.config import ConfigError, builtin_configs, load_config

REPO = Path(__file__).resolve().parent.parent
ROOT = ["data.root=/tmp/cam"]


def error_of(path, overrides=ROOT) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_key_given_twice_names_both_lines(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("train:\n  max_steps: 3\ndata:\n  root: /x\ntrain:\n  local_batch_size: 2\n")
    assert error_of(f) == f"{f}: key 'train' appears twice, on lines 1 and 5; keep one"
    f.write_text("optimizer:\n  lr: 0.1\n  name: adamw\n  lr: 0.2\n")
    assert error_of(f) == f"{f}: key 'lr' appears twice, on lines 2 and 4; keep one"


def test_an_empty_config_file_is_an_error(tmp_path):
    for text in ("", "# only a comment\n", "---\n"):
        f = tmp_path / "empty.yaml"
        f.write_text(text)
        assert error_of(f).startswith(f"{f}: the config file is empty")


def test_a_directory_is_not_a_config_file(tmp_path):
    assert error_of(tmp_path).startswith(f"{tmp_path}: is a directory, not a config file")


def test_built_in_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert builtin_configs() == sorted(p.stem for p in (REPO / "yaml").glob("*.yaml"))
    for name in ("demo", "ci"):
        by_name = load_config(name, ROOT)
        by_path = load_config(REPO / "yaml" / f"{name}.yaml", ROOT)
        assert by_name == by_path
    # A file in the current folder wins over a built-in of the same name.
    (tmp_path / "demo").write_text("data:\n  root: /mine\n")
    assert load_config("demo").data.root == "/mine"


def test_a_mistyped_config_name_gets_a_suggestion(tmp_path):
    assert error_of("dmeo") == "dmeo: config file not found (did you mean demo?)"
    message = error_of(tmp_path / "zzz.yaml")
    assert message.startswith(f"{tmp_path / 'zzz.yaml'}: config file not found (built-in "
                              "configs: ci, demo")


def test_a_mistyped_key_gets_a_suggestion():
    message = error_of(None, ROOT + ["optimizer.lrr=1"])
    assert message.startswith("optimizer.lrr: unknown key (did you mean optimizer.lr? known:")
    message = error_of(None, ROOT + ["trian.max_steps=1"])
    assert message.startswith("trian: unknown key (did you mean train? known:")
    # Nothing close: no suggestion, only the list.
    assert error_of(None, ROOT + ["zzzz=1"]).startswith("zzzz: unknown key (known:")


def climseg(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "climseg", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, line", [
    (["trian"], "climseg: error: unknown command 'trian'; did you mean train? one of: train,"),
    (["evaluate", "--checkpoint", "a.pt", "--dta", "x"],
     "climseg evaluate: error: unrecognized arguments: --dta x; did you mean --data? "
     "(see climseg evaluate --help)"),
    (["train", "--config", "dmeo"],
     "error: dmeo: config file not found (did you mean demo?)"),
])
def test_typos_on_the_command_line_get_a_suggestion(args, line):
    out = climseg(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], out.stderr


@pytest.mark.parametrize("args, line", [
    (["evaluate", "--checkpoint", "a.pt", "--data", "x", "--batch-size", "0"],
     "climseg evaluate: error: argument --batch-size: must be at least 1, got 0 "
     "(see climseg evaluate --help)"),
    (["check", "--data", "x", "--workers", "0"],
     "climseg check: error: argument --workers: must be at least 1, got 0 "
     "(see climseg check --help)"),
    (["check", "--data", "x", "--workers", "-1"],
     "climseg check: error: argument --workers: must be at least 1, got -1 "
     "(see climseg check --help)"),
    (["stage", "--data", "x", "--output", "y", "--workers", "two"],
     "climseg stage: error: argument --workers: must be a whole number, got 'two' "
     "(see climseg stage --help)"),
    (["train", "--config", "ci", "--workers", "0"],
     "climseg train: error: argument --workers: must be at least 1, got 0 "
     "(see climseg train --help)"),
    (["train", "--config", "ci", "--ouput", "runs/x"],
     "climseg train: error: unrecognized arguments: --ouput; did you mean --output? "
     "(see climseg train --help)"),
])
def test_impossible_numbers_and_unknown_flags_are_one_exact_line(args, line):
    out = climseg(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [line]


def test_train_flags_are_the_config_keys_they_name():
    from climseg.train_cli import parse_args

    args = parse_args(["--config", "ci", "train.max_steps=3", "--data", "2024", "--output",
                       "runs/x", "--workers", "3", "--quiet"])
    cfg = load_config(args.config, args.overrides)
    assert (cfg.data.root, cfg.output_dir, cfg.data.loader_threads) == ("2024", "runs/x", 3)
    assert cfg.train.max_steps == 3 and args.quiet
    # The flag is the last word: it wins over the same key given as an override.
    args = parse_args(["--config", "ci", "--data", "/a", "data.root=/b"])
    assert load_config(args.config, args.overrides).data.root == "/a"


def test_usage_shows_required_flags_without_brackets():
    from climseg.cli import ArgumentParser

    p = ArgumentParser("split")
    p.add_option("--data", "--input", required=True)
    p.add_option("--output", required=False)
    usage = p.format_usage()
    assert "climseg split" in usage and " --data DATA " in usage
    assert "[--output OUTPUT]" in usage and "--input" not in usage
