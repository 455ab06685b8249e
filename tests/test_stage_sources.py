"""A staged folder belongs to one source: another source is refused (or, with --force,
replaces it), never merged; a killed copy's temporaries go; an unfinished stage is not
trained on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from climseg.data.format import DataError
from climseg.data.partition import INDEX_NAME, RECORD_NAME, list_files
from climseg.data.stage import stage_dataset
from climseg.data.stats import STATS_NAME
from climseg.data.summarize import summarize_split
from climseg.data.synthetic import generate_dataset
from climseg.data.split import split_dataset

SPLITS = ("train", "validation")


@pytest.fixture(scope="module")
def other_root(tmp_path_factory) -> Path:
    """A second small data set, different files from tiny_root's."""
    base = tmp_path_factory.mktemp("other")
    generate_dataset(base / "raw", 12, 99, height=32, width=48, progress=False)
    split_dataset(base / "raw", base / "root")
    summarize_split(base / "root", "train", progress=False)
    return base / "root"


def contents(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file()}


def stage_cli(source, dest, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "climseg", "stage", "--data", str(source),
                           "--output", str(dest), "--quiet", *extra],
                          capture_output=True, text=True, timeout=300)


def test_another_source_is_refused_and_changes_nothing(tiny_root, other_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, progress=False)
    before = contents(dest)
    with pytest.raises(DataError) as err:
        stage_dataset(other_root, dest, SPLITS, progress=False)
    assert str(err.value) == (f"{dest}: staged from {tiny_root.resolve()}, whose stats.h5 and "
                              f"train and validation differ from {other_root}'s; stage into "
                              "another folder, or pass --force to empty this one first")
    assert contents(dest) == before


def test_force_replaces_the_old_source_whole(tiny_root, other_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS + ("test",), progress=False)
    stage_dataset(other_root, dest, SPLITS, progress=False, force=True)
    assert (dest / STATS_NAME).read_bytes() == (other_root / STATS_NAME).read_bytes()
    for split in SPLITS:
        assert [p.name for p in list_files(dest / split)] == \
            [p.name for p in list_files(other_root / split)]
        assert sorted(p.name for p in (dest / split).glob("data-*.h5")) == \
            [p.name for p in list_files(other_root / split)]
    assert not (dest / "test").exists()  # nothing of the old source is left
    assert json.loads((dest / RECORD_NAME).read_text())["source"] == str(other_root.resolve())


def test_the_same_data_under_another_path_and_more_splits_are_accepted(tiny_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, progress=False)
    again = stage_dataset(copy, dest, SPLITS, progress=False)  # a restaged copy: same data
    staged = 1 + sum(len(list_files(copy / s)) for s in SPLITS)
    assert (again.copied, again.skipped) == (0, staged)   # copytree kept sizes and mtimes
    stage_dataset(tiny_root, dest, ("test",), progress=False)
    record = json.loads((dest / RECORD_NAME).read_text())
    assert set(record["fingerprint"]) == {STATS_NAME, "train", "validation", "test"}


def test_a_folder_no_stage_recorded_is_refused_unless_forced(tiny_root, tmp_path):
    dest = tmp_path / "node"
    dest.mkdir()
    (dest / "mine.txt").write_text("someone's file")
    with pytest.raises(DataError, match="holds files that no stage recorded; stage into an "
                                        "empty folder, or pass --force"):
        stage_dataset(tiny_root, dest, SPLITS, progress=False)
    assert (dest / "mine.txt").exists()
    stage_dataset(tiny_root, dest, SPLITS, progress=False, force=True)
    assert not (dest / "mine.txt").exists()


def test_temporaries_of_a_killed_copy_are_removed(tiny_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)   # exited: its PID names no live process
    name = list_files(tiny_root / "train")[0].name
    stale = dest / "train" / f".{name}.tmp{dead_pid}-140000"
    stale.write_bytes(b"\0" * 4096)
    live = dest / "train" / f".{name}.tmp{__import__('os').getpid()}-140000"
    live.write_bytes(b"\0")       # a copy still running (this process) is left alone
    stage_dataset(tiny_root, dest, SPLITS, progress=False)
    assert not stale.exists() and live.exists()


def test_an_unfinished_stage_is_not_trained_on(tiny_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, progress=False)
    (dest / "validation" / INDEX_NAME).unlink()   # as a stage killed before its last step
    with pytest.raises(DataError) as err:
        list_files(dest / "validation")
    assert str(err.value) == (f"{dest / 'validation'}: its staging did not finish (no "
                              "index.txt); run climseg stage again (it skips the files already "
                              "copied)")
    assert len(list_files(dest / "train")) == len(list_files(tiny_root / "train"))


def test_two_stages_at_once_from_two_sources_do_not_mix(tiny_root, other_root, tmp_path):
    dest = tmp_path / "node"
    procs = [subprocess.Popen([sys.executable, "-m", "climseg", "stage", "--data", str(src),
                               "--output", str(dest), "--quiet"], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True)
             for src in (tiny_root, other_root)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = (tiny_root, other_root)[[code for code, _ in results].index(0)]
    (err,) = [e for code, e in results if code == 2]
    assert err.count("\n") == 1 and f"{dest}: staged from {winner.resolve()}" in err
    assert (dest / STATS_NAME).read_bytes() == (winner / STATS_NAME).read_bytes()
    for split in SPLITS:
        assert sorted(p.name for p in (dest / split).glob("data-*.h5")) == \
            [p.name for p in list_files(winner / split)]


def test_the_command_refuses_in_one_line(tiny_root, other_root, tmp_path):
    dest = tmp_path / "node"
    assert stage_cli(tiny_root, dest).returncode == 0
    out = stage_cli(other_root, dest)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"climseg stage: error: rank 0: {dest}: staged from ")
    assert stage_cli(other_root, dest, "--force").returncode == 0
