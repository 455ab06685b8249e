"""stage_data: each rank copies exactly its partition, the index keeps the global list."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from climseg.data.format import DataError
from climseg.data.partition import INDEX_NAME, list_files, rank_partition
from climseg.data.stage import stage_dataset
from climseg.data.stats import STATS_NAME
from conftest import HUNG_S

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation")


def staged_names(dest, split):
    return sorted(p.name for p in (dest / split).glob("data-*.h5"))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_each_rank_stages_exactly_its_partition(tiny_root, tmp_path, size):
    for rank in range(size):
        dest = tmp_path / f"node{rank}"
        result = stage_dataset(tiny_root, dest, SPLITS, rank, size, workers=2, progress=False)
        mine = sum(len(rank_partition(list_files(tiny_root / s), rank, size)) for s in SPLITS)
        assert (result.copied, result.skipped) == (1 + mine, 0)          # + stats.h5
        assert result.bytes_copied == result.bytes_total > 0
        assert (dest / STATS_NAME).read_bytes() == (tiny_root / STATS_NAME).read_bytes()
        for split in SPLITS:
            source = list_files(tiny_root / split)
            want = [p.name for p in rank_partition(source, rank, size)]
            assert staged_names(dest, split) == want
            # The trainer's view of the staged split: the global list, its partition present.
            staged = list_files(dest / split)
            assert [p.name for p in staged] == [p.name for p in source]
            mine = rank_partition(staged, rank, size)
            assert [p.name for p in mine] == want and all(p.exists() for p in mine)
            assert not any(p.is_symlink() for p in (dest / split).iterdir())
        assert not list(dest.rglob(".*"))        # no temp files


def test_restage_skips_identical_and_replaces_changed(tiny_root, tmp_path):
    dest = tmp_path / "node"
    first = stage_dataset(tiny_root, dest, SPLITS, 0, 2, progress=False)
    again = stage_dataset(tiny_root, dest, SPLITS, 0, 2, progress=False)
    assert again.copied == 0 and again.skipped == first.copied
    victim = sorted((dest / "train").glob("data-*.h5"))[0]
    victim.write_bytes(b"stale")
    third = stage_dataset(tiny_root, dest, SPLITS, 0, 2, progress=False)
    assert third.copied == 1
    assert victim.stat().st_size == (tiny_root / "train" / victim.name).stat().st_size


def test_wrong_rank_layout_on_a_staged_node(tiny_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, 0, 2, progress=False)
    with pytest.raises(DataError, match="not staged here.*staged for 2 ranks and the run has 4"):
        rank_partition(list_files(dest / "train"), 1, 4)


def test_same_rank_count_placed_differently_names_the_placement(tiny_root, tmp_path):
    # block placement staged ranks 0, 1 of 4 on this node; cyclic puts ranks 0, 2 here
    dest = tmp_path / "node"
    for rank in (0, 1):
        stage_dataset(tiny_root, dest, SPLITS, rank, 4, progress=False)
    assert rank_partition(list_files(dest / "train"), 1, 4)
    with pytest.raises(DataError) as err:
        rank_partition(list_files(dest / "train"), 2, 4)
    message = str(err.value)
    assert "staged for ranks 0, 1 of 4, not rank 2" in message
    assert "placed on the nodes differently" in message and "different number" not in message


def test_whole_split_staging_serves_every_layout(tiny_root, tmp_path):
    dest = tmp_path / "node"
    stage_dataset(tiny_root, dest, SPLITS, 3, 4, progress=False, whole=True)
    for split in SPLITS:
        assert sorted(p.name for p in (dest / split).glob("data-*.h5")) == \
            sorted(p.name for p in (tiny_root / split).glob("data-*.h5"))
    for size in (1, 2, 3):
        for rank in range(size):
            assert rank_partition(list_files(dest / "train"), rank, size)
    assert json.loads((dest / "staged.json").read_text())["layout"] == {"whole": True}


def test_stage_errors(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, symlinks=True)
    (root / STATS_NAME).unlink()
    with pytest.raises(DataError, match="stats.h5: stats file not found"):
        stage_dataset(root, tmp_path / "dest", SPLITS, progress=False)
    with pytest.raises(DataError, match="folder not found"):
        stage_dataset(tiny_root, tmp_path / "dest", ["nosuch"], progress=False)
    staged = tmp_path / "staged"
    stage_dataset(tiny_root, staged, SPLITS, 0, 2, progress=False)
    with pytest.raises(DataError, match="is itself a staged split"):
        stage_dataset(staged, tmp_path / "again", SPLITS, progress=False)


def test_stage_tool_under_mpiexec(mpiexec, tiny_root, tmp_path):
    dest = tmp_path / "node"
    cmd = [mpiexec, "-n", "2", sys.executable, str(REPO / "tools/stage_data.py"),
           "--source", str(tiny_root), "--dest", str(dest), "--workers", "2", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=HUNG_S)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "rank 0/2" in text and "rank 1/2" in text and "aggregate" in text
    # One node holds both ranks' files: the whole split.
    for split in SPLITS:
        assert staged_names(dest, split) == [p.name for p in list_files(tiny_root / split)]
        assert (dest / split / INDEX_NAME).exists()
