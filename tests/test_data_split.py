"""split_data: the reference's algorithm, counts, determinism, symlinks/copies, --force."""

from __future__ import annotations

import pytest

from climseg.data.format import DataError
from climseg.data.split import SPLITS, split_dataset, split_names


def names(n):
    return [f"data-2100-01-{i // 8 + 1:02d}-{(i % 8) * 3:02d}-1.h5" for i in range(n)]


def test_counts_cover_every_file_once():
    parts = split_names(names(100))
    assert [len(parts[s]) for s in SPLITS] == [80, 10, 10]
    assert sorted(sum(parts.values(), [])) == names(100)
    parts = split_names(names(21), (0.5, 0.25, 0.25))
    assert [len(parts[s]) for s in SPLITS] == [10, 5, 6]


def test_deterministic_for_a_seed_and_input_order():
    a = split_names(names(50), seed=1)
    assert a == split_names(list(reversed(names(50))), seed=1)
    assert a != split_names(names(50), seed=2)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(DataError, match="fractions"):
        split_names(names(10), fractions)


def make_input(folder, n=10):
    folder.mkdir(parents=True)
    for name in names(n):
        (folder / name).write_bytes(name.encode())
    return folder


def test_symlinks_and_copies(tmp_path):
    src = make_input(tmp_path / "raw")
    counts = split_dataset(src, tmp_path / "links")
    assert counts == {"train": 8, "validation": 1, "test": 1}
    for split in SPLITS:
        for p in (tmp_path / "links" / split).iterdir():
            assert p.is_symlink() and p.read_bytes() == p.name.encode()
    split_dataset(src, tmp_path / "copies", copy=True)
    files = [p for s in SPLITS for p in (tmp_path / "copies" / s).iterdir()]
    assert len(files) == 10 and not any(p.is_symlink() for p in files)
    assert not [p for p in tmp_path.glob("*/.*")]            # no temp folders left


def test_refuses_non_empty_unless_force(tmp_path):
    src = make_input(tmp_path / "raw")
    root = tmp_path / "root"
    split_dataset(src, root, seed=1)
    before = sorted(p.name for p in (root / "train").iterdir())
    with pytest.raises(DataError, match="train: folder is not empty; use --force"):
        split_dataset(src, root, seed=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == before
    split_dataset(src, root, seed=2, force=True)
    after = sorted(p.name for p in (root / "train").iterdir())
    assert after == split_names(names(10), seed=2)["train"]
    assert sum(len(list((root / s).iterdir())) for s in SPLITS) == 10


def test_empty_and_missing_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data-"):
        split_dataset(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="folder not found"):
        split_dataset(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
