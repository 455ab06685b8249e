"""The HDF5 sample format: round trip, header validation, raw offsets, and every bad file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from climseg.data.format import (CHANNELS, DATA_KEY, HEIGHT, LABEL_KEY, NUM_CHANNELS,
                                 NUM_CLASSES, WIDTH, DataError, data_byte_offset, read_sample,
                                 validate_file, write_sample)

H, W = 8, 12


def sample(seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((h, w, NUM_CHANNELS)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
    return data, labels


def write_raw(path, data=None, labels=None, **extra):
    """An HDF5 file with exactly the given datasets (None: left out)."""
    with h5py.File(path, "w") as f:
        if data is not None:
            f.create_dataset(DATA_KEY, data=data)
        if labels is not None:
            f.create_dataset(LABEL_KEY, data=labels)
        for key, value in extra.items():
            f.create_dataset(f"climate/{key}", data=value)
    return path


def test_constants():
    assert CHANNELS[0] == "TMQ" and CHANNELS[-1] == "ZBOT" and len(CHANNELS) == 16
    assert (HEIGHT, WIDTH, NUM_CLASSES) == (768, 1152, 3)
    assert (DATA_KEY, LABEL_KEY) == ("climate/data", "climate/labels_0")


def test_round_trip(tmp_path):
    data, labels = sample()
    path = tmp_path / "data-2100-01-01-00-1.h5"
    write_sample(path, data, labels)
    assert validate_file(path) == (H, W, NUM_CHANNELS)
    assert validate_file(path, expect_shape=(H, W, NUM_CHANNELS)) == (H, W, NUM_CHANNELS)
    got_data, got_labels = read_sample(path)
    assert got_data.dtype == np.float32 and got_labels.dtype == np.uint8
    np.testing.assert_array_equal(got_data, data)
    np.testing.assert_array_equal(got_labels, labels)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temp file left


def test_window_read(tmp_path):
    data, labels = sample()
    path = tmp_path / "a.h5"
    write_sample(path, data, labels)
    d, lab = read_sample(path, window=(2, 3, 4, 5))
    np.testing.assert_array_equal(d, data[2:6, 3:8])
    np.testing.assert_array_equal(lab, labels[2:6, 3:8])
    with pytest.raises(DataError, match="window"):
        read_sample(path, window=(6, 0, 4, 4))


def test_raw_offset_gives_the_data_bytes(tmp_path):
    data, labels = sample()
    path = tmp_path / "a.h5"
    write_sample(path, data, labels)
    offset = data_byte_offset(path)
    raw = np.fromfile(path, dtype="<f4", count=data.size, offset=offset)
    np.testing.assert_array_equal(raw.reshape(data.shape), data)


def test_chunked_data_has_no_offset_but_reads(tmp_path):
    data, labels = sample()
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(DATA_KEY, data=data, chunks=(4, 4, NUM_CHANNELS), compression="gzip")
        f.create_dataset(LABEL_KEY, data=labels)
    assert data_byte_offset(path) is None
    np.testing.assert_array_equal(read_sample(path)[0], data)


def test_real_style_labels_and_extras_accepted(tmp_path):
    """Real files may store labels as float and carry labels_1 and data_stats."""
    data, labels = sample()
    path = write_raw(tmp_path / "a.h5", data, labels.astype(np.float32),
                     labels_1=labels.astype(np.float32), data_stats=np.zeros(4))
    assert validate_file(path) == data.shape
    np.testing.assert_array_equal(read_sample(path)[1], labels)


@pytest.mark.parametrize("case, message", [
    ("missing_data", "missing dataset 'climate/data'"),
    ("missing_labels", "missing dataset 'climate/labels_0'"),
    ("data_float64", "dtype float64, expected float32"),
    ("data_2d", "expected \\(height, width, 16\\)"),
    ("data_8_channels", "expected \\(height, width, 16\\)"),
    ("labels_shape", "'climate/labels_0' has shape"),
    ("labels_string", "non-numeric dtype"),
])
def test_bad_header_rejected(tmp_path, case, message):
    data, labels = sample()
    path = tmp_path / f"{case}.h5"
    if case == "missing_data":
        write_raw(path, None, labels)
    elif case == "missing_labels":
        write_raw(path, data, None)
    elif case == "data_float64":
        write_raw(path, data.astype(np.float64), labels)
    elif case == "data_2d":
        write_raw(path, data[..., 0], labels)
    elif case == "data_8_channels":
        write_raw(path, data[..., :8], labels)
    elif case == "labels_shape":
        write_raw(path, data, labels[:-1])
    elif case == "labels_string":
        write_raw(path, data, np.full((H, W), "x", dtype="S1"))
    for check in (validate_file, read_sample):
        with pytest.raises(DataError, match=message) as err:
            check(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_wrong_expected_shape(tmp_path):
    path = tmp_path / "a.h5"
    write_sample(path, *sample())
    with pytest.raises(DataError, match=r"expected \(768, 1152, 16\)"):
        validate_file(path, expect_shape=(768, 1152, 16))


def test_truncated_file(tmp_path):
    path = tmp_path / "a.h5"
    write_sample(path, *sample(h=64, w=64))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match=str(path)) as err:
        validate_file(path)
    assert "truncated" in str(err.value)


def test_non_hdf5_and_missing_file(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5 at all")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        validate_file(junk)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        read_sample(empty)
    with pytest.raises(DataError, match="file not found"):
        validate_file(tmp_path / "nope.h5")


@pytest.mark.parametrize("bad", [3, -1, 255, 1.5, np.nan])
def test_labels_outside_classes(tmp_path, bad):
    data, labels = sample()
    dtype = np.float32 if isinstance(bad, float) else np.int16
    labels = labels.astype(dtype)
    labels[1, 1] = bad
    path = write_raw(tmp_path / "a.h5", data, labels)
    with pytest.raises(DataError, match="climate/labels_0") as err:
        read_sample(path)
    assert str(path) in str(err.value)


def test_write_rejects_bad_arrays(tmp_path):
    data, labels = sample()
    with pytest.raises(DataError, match="expected"):
        write_sample(tmp_path / "a.h5", data[..., :3], labels)
    with pytest.raises(DataError, match="labels"):
        write_sample(tmp_path / "a.h5", data, labels[:2])
    labels[0, 0] = 7
    with pytest.raises(DataError, match="outside"):
        write_sample(tmp_path / "a.h5", data, labels)
    assert list(tmp_path.iterdir()) == []
