"""list_files, the rank partition, epoch order, and staged splits (index.txt)."""

from __future__ import annotations

import numpy as np
import pytest

from climseg.data.format import DataError
from climseg.data.partition import INDEX_NAME, epoch_order, list_files, rank_partition


def make_split(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in reversed(range(n)):
        (folder / f"data-2100-01-{i + 1:02d}-00-1.h5").write_bytes(b"x")
    (folder / "notes.txt").write_text("ignored")
    (folder / ".data-2100-01-01-00-1.h5.tmp1").write_text("a temp file, ignored")
    return folder


def test_list_files_sorted_and_filtered(tmp_path):
    files = list_files(make_split(tmp_path / "train", 5))
    assert [p.name for p in files] == sorted(p.name for p in files)
    assert len(files) == 5 and all(p.name.startswith("data-") for p in files)


def test_list_files_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        list_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no data-\*\.h5 files"):
        list_files(tmp_path / "empty")


@pytest.mark.parametrize("n_files, size", [(10, 1), (10, 3), (7, 7), (5, 8), (100, 6)])
def test_partition_covers_every_file_once(n_files, size):
    files = [f"f{i:03d}" for i in range(n_files)]
    parts = [rank_partition(files, r, size) for r in range(size)]
    assert sorted(x for p in parts for x in p) == files
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for r, p in enumerate(parts):
        assert p == files[r::size]


def test_partition_rejects_bad_rank():
    with pytest.raises(ValueError):
        rank_partition(["a"], 2, 2)
    with pytest.raises(ValueError):
        rank_partition(["a"], 0, 0)


def test_epoch_order_depends_only_on_arguments():
    a = epoch_order(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, 3, 1))
    assert not np.array_equal(a, epoch_order(50, 3, 2))
    assert not np.array_equal(a, epoch_order(50, 4, 1))
    assert len(epoch_order(0, 1, 1)) == 0


def test_staged_split_uses_the_index(tmp_path):
    source = list_files(make_split(tmp_path / "src", 10))
    staged = tmp_path / "node0"
    staged.mkdir()
    mine = rank_partition(source, 1, 3)
    for path in mine:
        (staged / path.name).write_bytes(b"x")
    (staged / INDEX_NAME).write_text("".join(p.name + "\n" for p in source))

    files = list_files(staged)
    assert [p.name for p in files] == [p.name for p in source]
    assert all(p.parent == staged for p in files)
    assert [p.name for p in rank_partition(files, 1, 3)] == [p.name for p in mine]
    # The same node read with another rank layout needs files that are not there.
    with pytest.raises(DataError, match="not staged here.*different number of ranks"):
        rank_partition(files, 0, 3)
    with pytest.raises(DataError, match="not staged here"):
        rank_partition(files, 1, 2)


def test_bad_index_rejected(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    (split / INDEX_NAME).write_text("../etc/passwd\n")
    with pytest.raises(DataError, match="index.txt: bad entry"):
        list_files(split)
    (split / INDEX_NAME).write_text("")
    with pytest.raises(DataError, match="lists no files"):
        list_files(split)
