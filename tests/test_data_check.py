"""check_data: every kind of bad file found, one line each, exit codes 0/1/2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from climseg.data.check import check_tree
from climseg.data.format import CHANNELS, DATA_KEY, LABEL_KEY, read_sample, write_sample
from climseg.data.partition import list_files
from climseg.data.stats import STATS_NAME, read_stats, write_stats
from conftest import HUNG_S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bad_root(tiny_root, tmp_path):
    """A copy of tiny_root's train split with one file of each kind of problem."""
    root = tmp_path / "root"
    split = root / "train"
    split.mkdir(parents=True)
    files = list_files(tiny_root / "train")
    for f in files:
        shutil.copy(f, split / f.name)
    shutil.copy(tiny_root / STATS_NAME, root / STATS_NAME)
    names = [f.name for f in files]
    bad = {}

    data, labels = read_sample(split / names[0])
    data[5, 5, CHANNELS.index("TMQ")] = np.inf
    write_sample(split / names[0], data, labels)
    bad[names[0]] = "NaN or inf in channel(s) TMQ"

    data, labels = read_sample(split / names[1])
    with h5py.File(split / names[1], "w") as f:
        f[DATA_KEY] = data
        f[LABEL_KEY] = np.where(labels == 0, 0, 3).astype(np.int32)
    bad[names[1]] = "values outside"

    with open(split / names[2], "r+b") as f:
        f.truncate(5000)
    bad[names[2]] = "truncated"

    (split / names[3]).write_text("hello")
    bad[names[3]] = "not a readable HDF5 file"

    with h5py.File(split / names[4], "a") as f:
        del f[LABEL_KEY]
    bad[names[4]] = "missing dataset 'climate/labels_0'"

    write_sample(split / names[5], np.zeros((32, 96, 16), np.float32), np.zeros((32, 96)))
    bad[names[5]] = "shape (32, 96, 16) differs from (64, 96, 16) of the other files"
    return root, bad


def test_check_finds_each_bad_file_once(bad_root):
    root, bad = bad_root
    checked, problems = check_tree(root, workers=2, progress=False)
    assert checked == 16
    assert len(problems) == len(bad)
    for name, message in bad.items():
        lines = [p for p in problems if name in p]
        assert len(lines) == 1 and message in lines[0], (name, problems)
        assert "\n" not in lines[0]


def test_check_reports_zero_range_stats(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, symlinks=True)
    stats = read_stats(root / STATS_NAME)
    stats.maxval[CHANNELS.index("ZBOT")] = stats.minval[CHANNELS.index("ZBOT")]
    write_stats(root / STATS_NAME, stats)
    _, problems = check_tree(root, workers=1, progress=False)
    assert problems == [f"{root / STATS_NAME}: zero range (maxval == minval) in channel(s) ZBOT"]


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/check_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=HUNG_S)


def test_tool_exit_codes(tiny_root, bad_root, tmp_path):
    good = run_tool(tiny_root, "--quiet")
    assert good.returncode == 0, good.stderr
    assert "checked 20 files" in good.stdout and "all good" in good.stdout
    root, bad = bad_root
    out = run_tool(root, "--quiet", "--workers", "2")
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(bad) + 1 and "6 problem(s)" in lines[-1]
    (tmp_path / "empty").mkdir()
    empty = run_tool(tmp_path / "empty")
    assert empty.returncode == 2 and "no data-*.h5 files" in empty.stderr
    assert "Traceback" not in empty.stderr
