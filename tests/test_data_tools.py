"""The five data tools through their tools/*.py aliases and older flag spellings (as the
Makefile's demo still runs them): --help, the documented pipeline, clean errors. The same
tools as `climseg` subcommands with the common flags: tests/test_cli.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from climseg.data.format import read_sample
from climseg.data.partition import list_files
from climseg.data.stats import read_stats
from conftest import HUNG_S

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("make_synthetic", "split_data", "summarize_data", "stage_data", "check_data")


def tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=HUNG_S, cwd=cwd)


@pytest.mark.parametrize("name", TOOLS)
def test_help(name):
    out = tool(name, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout


def test_pipeline(tmp_path):
    raw, root, dest = tmp_path / "raw", tmp_path / "cam", tmp_path / "local"
    out = tool("make_synthetic", "--out", raw, "--samples", 10, "--seed", 4, "--height", 32,
               "--width", 48, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote 10 samples" in out.stderr and "MB/s" in out.stderr
    assert read_sample(sorted(raw.iterdir())[0])[0].shape == (32, 48, 16)

    out = tool("split_data", "--input", raw, "--output", root)
    assert out.returncode == 0, out.stderr
    assert "train 8, validation 1, test 1" in out.stderr
    again = tool("split_data", "--input", raw, "--output", root)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr

    out = tool("summarize_data", "--data", root)
    assert out.returncode == 0, out.stderr
    assert "written to" in out.stdout and "mean" in out.stdout.splitlines()[0]
    stats = read_stats(root / "stats.h5")
    data = np.stack([read_sample(f)[0] for f in list_files(root / "train")]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, data.mean(axis=(0, 1, 2)), rtol=1e-6)

    assert tool("check_data", root, "--quiet").returncode == 0
    out = tool("stage_data", "--source", root, "--dest", dest, "--splits", "train", "test")
    assert out.returncode == 0, out.stderr
    assert "rank 0/1: copied 10 files" in out.stdout        # 8 + 1 + stats.h5
    assert sorted(p.name for p in (dest / "train").glob("data-*")) == \
        [p.name for p in list_files(root / "train")]


@pytest.mark.parametrize("name, args, message", [
    ("make_synthetic", ["--out", "{tmp}/x", "--samples", "0"], "must be positive"),
    ("split_data", ["--input", "{tmp}/none", "--output", "{tmp}/out"], "folder not found"),
    ("summarize_data", ["--data", "{tmp}"], "train: folder not found"),
    ("stage_data", ["--source", "{tmp}", "--dest", "{tmp}/d"], "stats.h5: stats file not found"),
    ("check_data", ["{tmp}/none"], "no such file or folder"),
])
def test_bad_input_is_one_clear_line(tmp_path, name, args, message):
    out = tool(name, *[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
