"""The `climseg` command as a user runs it: installed, from any folder, every subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from climseg import cli
from conftest import HUNG_S

REPO = Path(__file__).resolve().parents[1]
CLIMSEG = Path(sys.executable).parent / "climseg"   # the console script `make install` makes


def climseg(*args, cwd="/tmp", timeout=HUNG_S):
    if not CLIMSEG.exists():
        pytest.fail(f"{CLIMSEG} not found: climseg is not installed (make install)")
    return subprocess.run([str(CLIMSEG), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_help_from_another_folder_lists_every_subcommand():
    out = climseg("--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    for name in ("train", "evaluate", "predict", "bench", "make-synthetic", "split",
                 "summarize", "check", "stage", "convert-climatenet"):
        assert name in listed


def test_help_needs_no_torch():
    # `climseg --help` imports no subcommand module: fast, and works on a broken torch.
    code = ("import sys; from climseg.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'h5py', 'climseg.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/tmp", timeout=HUNG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow   # a subprocess importing the whole stack: seconds each
@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "convert-climatenet"])
def test_each_subcommand_help_exits_0(name):
    out = climseg(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def test_convert_climatenet_help_or_one_line():
    # Its module may not be in this checkout yet: then one line and status 2, no traceback.
    out = climseg("convert-climatenet", "--help")
    if out.returncode == 0:
        assert out.stdout.startswith("usage:")
    else:
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "climseg convert-climatenet: error: not available: this checkout of climseg has "
            "no climseg.data.climatenet"]


@pytest.mark.slow   # a subprocess importing the whole stack: seconds each
def test_python_dash_m_works_from_another_folder():
    for module in ("climseg", "climseg.train"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, cwd="/tmp", timeout=HUNG_S)
        assert out.returncode == 0, out.stderr
    assert "stage" in out.stdout or "--config" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["nope"], "climseg: error: unknown command 'nope'"),
    (["split", "--output", "{tmp}/o"], "climseg split: error: the following arguments are "
                                       "required: --data"),
    (["split", "--data", "{tmp}/none", "--output", "{tmp}/o"], "none: folder not found"),
    (["make-synthetic", "--output", "{tmp}/x", "--samples", "0"], "must be positive"),
    (["summarize", "--data", "{tmp}"], "train: folder not found"),
    (["check", "--data", "{tmp}/none"], "no such file or folder"),
    (["check"], "the following arguments are required: --data"),
    (["check", "--data", "{tmp}/a", "{tmp}/b"], "two data roots given"),
    (["stage", "--data", "{tmp}", "--output", "{tmp}/d"], "stats.h5: stats file not found"),
    (["evaluate", "--checkpoint", "{tmp}/none.pt", "--data", "{tmp}"], "none.pt"),
    (["predict", "--checkpoint", "{tmp}/none.pt", "--output", "{tmp}/p", "{tmp}/x.h5"],
     "x.h5: file not found"),
    (["train", "--config", "{tmp}/none.yaml"], "none.yaml"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    out = climseg(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_no_command_prints_usage_and_status_2():
    out = climseg()
    assert out.returncode == 2 and "usage: climseg COMMAND" in out.stderr


@pytest.mark.slow   # five climseg commands
def test_data_pipeline_through_climseg_with_the_common_flags(tmp_path):
    raw, root, local = tmp_path / "raw", tmp_path / "cam", tmp_path / "local"
    steps = [
        ["make-synthetic", "--output", raw, "--samples", 10, "--seed", 4, "--height", 32,
         "--width", 48, "--quiet"],
        ["split", "--data", raw, "--output", root, "--quiet"],
        ["summarize", "--data", root, "--quiet"],
        ["check", "--data", root, "--quiet"],
        ["stage", "--data", root, "--output", local, "--splits", "train", "--quiet"],
    ]
    outputs = []
    for step in steps:
        out = climseg(*step)
        assert out.returncode == 0, (step, out.stderr)
        assert out.stderr == "", (step, out.stderr)   # --quiet: nothing but problems on stderr
        outputs.append(out.stdout)
    # results on stdout: the statistics table, the check verdict, what staging copied
    table = outputs[2].splitlines()
    assert table[0].split() == ["channel", "min", "max", "mean", "std"] and len(table) == 18
    assert outputs[3].strip() == f"checked 10 files under {root}: all good"
    assert outputs[4].startswith("rank 0/1: copied 9 files")         # 8 + stats.h5
    assert len(list((local / "train").glob("data-*.h5"))) == 8


@pytest.mark.slow   # climseg commands, each in a subprocess
def test_old_flag_spellings_still_work(tmp_path):
    raw, root, local = tmp_path / "raw", tmp_path / "cam", tmp_path / "local"
    tools = REPO / "tools"
    run = [
        [tools / "make_synthetic.py", "--out", raw, "--samples", 10, "--height", 32,
         "--width", 48],
        [tools / "split_data.py", "--input", raw, "--output", root],
        [tools / "summarize_data.py", "--data", root],
        [tools / "check_data.py", root],
        [tools / "stage_data.py", "--source", root, "--dest", local, "--splits", "test"],
    ]
    for args in run:
        out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                             cwd="/tmp", timeout=HUNG_S)
        assert out.returncode == 0, (args, out.stderr)
    assert (root / "stats.h5").is_file() and (local / "test" / "index.txt").is_file()
    # the new spelling and the old one give the same split
    again = tmp_path / "again"
    assert climseg("split", "--data", raw, "--output", again).returncode == 0
    for split in ("train", "validation", "test"):
        assert sorted(p.name for p in (again / split).iterdir()) == \
            sorted(p.name for p in (root / split).iterdir())


def test_help_shows_new_names_and_hides_old_spellings():
    for name, new, old in [("split", "--data", "--input"), ("stage", "--output", "--dest"),
                           ("make-synthetic", "--output", "--out"),
                           ("evaluate", "--workers", "--threads")]:
        text = climseg(name, "--help").stdout
        assert new in text and old not in text.replace(new, ""), name


def test_tool_alias_works_without_the_installed_package(tiny_root):
    # tools/*.py fall back to the checkout when climseg is not installed (a venv made before
    # `make install` installed it). `python -S` skips site-packages' .pth files, and with
    # them the editable install; PYTHONPATH still gives numpy and h5py.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {"PYTHONPATH": site, "PATH": "/usr/bin:/bin"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import climseg"], env=env, cwd="/tmp",
                           capture_output=True, text=True, timeout=HUNG_S)
    assert probe.returncode != 0, "climseg importable without its install: the test is void"
    out = subprocess.run([sys.executable, "-S", str(REPO / "tools/check_data.py"),
                          str(tiny_root / "test"), "--quiet"], env=env, cwd="/tmp",
                         capture_output=True, text=True, timeout=HUNG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"checked 2 files under {tiny_root / 'test'}: all good"


def test_setup_logging_levels_and_rank_tag(capsys):
    import logging

    from climseg.logs import setup_logging

    log = logging.getLogger("climseg.test")
    try:
        setup_logging(rank=0, size=1)
        log.info("alone")
        setup_logging(rank=0, size=4)          # a second call replaces the handler
        log.info("first")
        setup_logging(rank=3, size=4)
        log.info("hidden off rank 0")
        log.warning("shown")
        setup_logging(rank=0, size=1, quiet=True)
        log.info("quiet")
        log.error("still shown")
    finally:   # leave no handler on this test's captured stderr
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "climseg"]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    out, err = capsys.readouterr()
    lines = [line.split(" ", 1)[1] for line in err.splitlines()]   # drop the time stamp
    assert out == ""
    assert lines == ["alone", "[0] first", "[3] shown", "still shown"]


def _help_flags(command: list[str], capsys, monkeypatch) -> set[str]:
    """The flags ``climseg COMMAND --help`` lists, run in this process."""
    monkeypatch.setattr(sys, "argv", ["climseg"])
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    return set(__import__("re").findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))


def test_the_readme_flag_table_is_what_the_commands_take(capsys, monkeypatch):
    """Each row of README's flag table: every command it names takes the flag (--quiet: all)."""
    import re

    rows = [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| `--")]
    assert [row.split("`")[1].split()[0] for row in rows] == [
        "--data", "--output", "--workers", "--quiet"]
    commands = [[name] for name in cli.COMMANDS if name != "bench"] + [
        ["bench", mode] for mode in ("step", "loader", "train", "allreduce")]
    for row in rows:
        flag, taken_by = row.split("`")[1].split()[0], row.rsplit("|", 2)[1]
        named = [c.split() for c in re.findall(r"`([^`]+)`", taken_by)
                 if c.split()[0] in cli.COMMANDS]
        if flag == "--quiet":
            assert "every command" in taken_by
            named = commands
        assert named, row
        for command in named:
            assert flag in _help_flags(command, capsys, monkeypatch), (flag, command)


@pytest.mark.slow   # a trainer built and stepped in a subprocess
def test_train_takes_the_common_flags(tiny_root, tmp_path):
    out = climseg("train", "--config", "ci", "--data", tiny_root, "--output", tmp_path / "run",
                  "--workers", 1, "--quiet", "train.max_steps=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""   # --quiet: no log lines
    import yaml

    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["data"]["root"], cfg["output_dir"]) == (str(tiny_root), str(tmp_path / "run"))
    assert cfg["data"]["loader_threads"] == 1


def test_no_usage_line_shows_a_required_flag_in_brackets(capsys, monkeypatch):
    commands = [[name] for name in cli.COMMANDS if name != "bench"] + [
        ["bench", mode] for mode in ("step", "loader", "train", "allreduce")]
    for command in commands:
        monkeypatch.setattr(sys, "argv", ["climseg"])
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        text = capsys.readouterr().out
        usage, _, options = text.partition("\n\n")
        assert usage.startswith(f"usage: climseg {' '.join(command)} "), usage
        required = [line.split()[0] for line in options.replace("\n" + " " * 20, " ").splitlines()
                    if "(required)" in line and line.strip().startswith("--")]
        for flag in required:
            assert f"[{flag}" not in usage and f" {flag} " in usage, (command, flag)
