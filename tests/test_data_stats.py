"""stats.h5: accumulation (1 and 2 ranks) equal to numpy, read/write, normalization, bad files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from climseg.data.format import CHANNELS, NUM_CHANNELS, DataError, read_sample
from climseg.data.partition import list_files
from climseg.data.stats import (STATS_NAME, Stats, StatsAccumulator, normalization, read_stats,
                                write_stats)
from climseg.data.summarize import summarize_split
from conftest import HUNG_S

REPO = Path(__file__).resolve().parents[1]


def numpy_stats(files):
    data = np.stack([read_sample(f)[0] for f in files]).astype(np.float64)
    return dict(count=len(files), mean=data.mean(axis=(0, 1, 2)),
                sqmean=(data ** 2).mean(axis=(0, 1, 2)), minval=data.min(axis=(0, 1, 2)),
                maxval=data.max(axis=(0, 1, 2)))


def assert_equals_numpy(stats, expected):
    assert stats.count == expected["count"]
    for key in ("mean", "sqmean", "minval", "maxval"):
        np.testing.assert_allclose(getattr(stats, key), expected[key], rtol=1e-6, atol=0,
                                   err_msg=key)


def make_stats(**over):
    values = dict(count=4, mean=np.arange(16.0), sqmean=np.arange(16.0) ** 2 + 4.0,
                  minval=np.arange(16.0) - 5, maxval=np.arange(16.0) + 5)
    values.update(over)
    return Stats(**values)


def test_accumulator_merge_equals_single_pass():
    rng = np.random.default_rng(0)
    samples = [rng.normal(100, 5, (13, 7, NUM_CHANNELS)).astype(np.float32) for _ in range(5)]
    one = StatsAccumulator()
    for s in samples:
        one.add(s, rows_per_block=4)
    a, b = StatsAccumulator(), StatsAccumulator()
    for s in samples[:2]:
        a.add(s)
    for s in samples[2:]:
        b.add(s)
    a.merge(b)
    ref = np.stack(samples).astype(np.float64)
    for acc in (one, a):
        st = acc.result()
        assert st.count == 5
        np.testing.assert_allclose(st.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
        np.testing.assert_allclose(st.sqmean, (ref ** 2).mean(axis=(0, 1, 2)), rtol=1e-12)
        np.testing.assert_array_equal(st.minval, ref.min(axis=(0, 1, 2)))
        np.testing.assert_array_equal(st.maxval, ref.max(axis=(0, 1, 2)))


def test_write_read_round_trip_uses_reference_keys(tmp_path):
    path = tmp_path / STATS_NAME
    write_stats(path, make_stats())
    with h5py.File(path) as f:
        assert sorted(f["climate"].keys()) == ["count", "maxval", "mean", "minval", "sqmean"]
        assert f["climate/count"].shape == () and f["climate/mean"].shape == (16,)
    got, want = read_stats(path), make_stats()
    assert got.count == want.count and got.path == str(path)
    for key in ("mean", "sqmean", "minval", "maxval"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert [p.name for p in tmp_path.iterdir()] == [STATS_NAME]


def test_normalization_minmax_zscore_and_channels():
    st = make_stats()
    shift, scale = normalization(st)
    assert shift.dtype == scale.dtype == np.float32 and shift.shape == (16,)
    np.testing.assert_allclose(shift, st.minval)
    np.testing.assert_allclose(scale, 1 / 10.0)
    shift, scale = normalization(st, "zscore", [0, "PSL"])
    np.testing.assert_allclose(shift, [0.0, 7.0])
    np.testing.assert_allclose(scale, [0.5, 0.5])
    with pytest.raises(DataError, match="unknown normalization mode"):
        normalization(st, "robust")
    with pytest.raises(DataError, match="unknown channel 'XYZ'"):
        normalization(st, channels=["XYZ"])
    with pytest.raises(DataError, match="bad channel 16"):
        normalization(st, channels=[16])


def test_zero_range_channel_names_file_and_channel(tmp_path):
    path = tmp_path / STATS_NAME
    maxval = np.arange(16.0) + 5
    maxval[CHANNELS.index("T200")] = CHANNELS.index("T200") - 5   # max == min
    write_stats(path, make_stats(maxval=maxval))
    st = read_stats(path)
    with pytest.raises(DataError, match=f"{path}: channel T200 has zero range"):
        normalization(st)
    normalization(st, channels=[0, 1])          # the other channels still normalize


def test_zero_std_of_a_large_constant_channel(tmp_path):
    """A constant channel near 1e5 (PS) has sqmean - mean^2 of rounding size, not exactly 0."""
    acc = StatsAccumulator()
    data = np.random.default_rng(0).normal(size=(32, 32, NUM_CHANNELS)).astype(np.float32)
    data[..., CHANNELS.index("PS")] = 101325.0
    acc.add(data)
    st = acc.result()
    st.path = "stats.h5"
    with pytest.raises(DataError, match="channel PS has zero standard deviation"):
        normalization(st, "zscore")


def _write_float32_stats(path, mean, sqmean):
    """A stats.h5 as the reference writes it: float32 arrays."""
    with h5py.File(path, "w") as f:
        f["climate/count"] = np.int64(8)
        f["climate/mean"] = np.asarray(mean, np.float32)
        f["climate/sqmean"] = np.asarray(sqmean, np.float32)
        f["climate/minval"] = np.asarray(mean, np.float32) - 10
        f["climate/maxval"] = np.asarray(mean, np.float32) + 10


def test_zscore_with_float32_reference_stats(tmp_path):
    """float32 sums: T200 (mean ~220 K, std ~2.5 K, var 3e-4 of sqmean) still normalizes; a
    variance lost to cancellation is reported as that, not as a constant channel."""
    t200 = CHANNELS.index("T200")
    mean = np.full(NUM_CHANNELS, 10.0)
    sqmean = mean ** 2 + 4.0
    mean[t200], sqmean[t200] = 220.0, 220.0 ** 2 + 2.5 ** 2
    path = tmp_path / STATS_NAME
    _write_float32_stats(path, mean, sqmean)
    st = read_stats(path)
    assert st.float32
    shift, scale = normalization(st, "zscore")
    assert abs(1 / scale[t200] - 2.5) < 0.05 and abs(shift[t200] - 220.0) < 1e-3
    # Accumulated in float32 by the reference, sqmean came out slightly below mean^2.
    sqmean[t200] = 220.0 ** 2 * (1 - 3e-7)
    _write_float32_stats(path, mean, sqmean)
    with pytest.raises(DataError, match=(f"{path}: channel T200: sqmean - mean\\^2 = .* float32 "
                                         "rounding .* rewrite it with tools/summarize_data.py")):
        normalization(read_stats(path), "zscore")
    normalization(read_stats(path), "zscore", channels=[0, "PSL"])   # other channels are fine
    normalization(read_stats(path), "minmax")
    write_stats(path, read_stats(path))      # climseg writes float64: nothing is lost
    assert not read_stats(path).float32


def test_read_stats_errors(tmp_path):
    with pytest.raises(DataError,
                       match="stats file not found .create it with climseg summarize --data "):
        read_stats(tmp_path / STATS_NAME)
    junk = tmp_path / "junk.h5"
    junk.write_text("junk")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        read_stats(junk)
    path = tmp_path / STATS_NAME
    write_stats(path, make_stats())
    with h5py.File(path, "a") as f:
        del f["climate/sqmean"]
    with pytest.raises(DataError, match="missing dataset 'climate/sqmean'"):
        read_stats(path)
    write_stats(path, make_stats(mean=np.zeros(8)))
    with pytest.raises(DataError, match=r"'climate/mean' has shape \(8,\)"):
        read_stats(path)


def test_summarize_equals_numpy_one_rank(tiny_root):
    files = list_files(tiny_root / "train")
    stats = read_stats(tiny_root / STATS_NAME)     # written by the fixture
    assert_equals_numpy(stats, numpy_stats(files))


def test_summarize_in_process_ranks_agree(tiny_root):
    """Two ranks simulated in one process: each partition accumulated, then merged."""
    from climseg.data.partition import rank_partition
    from climseg.data.summarize import accumulate_files

    files = list_files(tiny_root / "train")
    merged = StatsAccumulator()
    for r in range(2):
        merged.merge(accumulate_files(rank_partition(files, r, 2)))
    assert_equals_numpy(merged.result(), numpy_stats(files))


def test_summarize_tool_two_ranks_equals_numpy(mpiexec, tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, symlinks=True)
    (root / STATS_NAME).unlink()
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, str(REPO / "tools/summarize_data.py"),
                          "--data", str(root), "--quiet"], capture_output=True, text=True,
                         timeout=HUNG_S)
    assert out.returncode == 0, out.stderr
    assert "(2 rank(s))" in out.stdout + out.stderr
    two = read_stats(root / STATS_NAME)
    assert_equals_numpy(two, numpy_stats(list_files(root / "train")))
    one = read_stats(tiny_root / STATS_NAME)
    for key in ("mean", "sqmean", "minval", "maxval"):
        np.testing.assert_allclose(getattr(two, key), getattr(one, key), rtol=1e-12)


def test_summarize_rejects_nan_file(tiny_root, tmp_path):
    from climseg.data.format import write_sample

    split = tmp_path / "root" / "train"
    split.mkdir(parents=True)
    good = list_files(tiny_root / "train")[0]
    data, labels = read_sample(good)
    data[3, 4, CHANNELS.index("PRECT")] = np.nan
    write_sample(split / good.name, data, labels)
    with pytest.raises(DataError, match=f"{split / good.name}: .*NaN or inf"):
        summarize_split(tmp_path / "root", progress=False)
    assert not (tmp_path / "root" / STATS_NAME).exists()
