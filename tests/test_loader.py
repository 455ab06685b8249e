"""BatchLoader against a plain h5py reference read, on the tiny synthetic data set."""

from __future__ import annotations

import shutil
import threading

import h5py
import numpy as np
import pytest
import torch

from climseg.data.format import DATA_KEY, LABEL_KEY, DataError, read_sample
from climseg.data.loader import BatchLoader
from climseg.data.partition import epoch_order, list_files
from climseg.data.stats import normalization, read_stats


@pytest.fixture(scope="module")
def files(tiny_root):
    return list_files(tiny_root / "train")


@pytest.fixture(scope="module")
def norm(tiny_root):
    return normalization(read_stats(tiny_root / "stats.h5"), "minmax")


def reference(path, top, left, crop, shift, scale, channels=None):
    """The reference's way: h5py read, transpose to CHW, normalize; labels as int64."""
    data, labels = read_sample(path)
    h, w = crop or data.shape[:2]
    data = data[top:top + h, left:left + w]
    if channels is not None:
        data = data[..., channels]
    x = (np.transpose(data, (2, 0, 1)) - shift[:, None, None]) * scale[:, None, None]
    return x, labels[top:top + h, left:left + w].astype(np.int64)


def collect(loader, epoch=0, start_batch=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_batch)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("crop, random_crop, channels", [
    (None, False, None),
    ((32, 48), False, None),
    ((32, 48), True, None),
    ((16, 96), True, [0, 7, 13]),   # full-width rows: one contiguous read per chunk
    (None, False, [2, 1]),
])
def test_batches_equal_reference(files, norm, crop, random_crop, channels):
    shift, scale = norm
    if channels is not None:
        shift, scale = shift[channels], scale[channels]
    loader = BatchLoader(files, 3, shift=shift, scale=scale, channels=channels, crop=crop,
                         random_crop=random_crop, seed=5, num_threads=3)
    plan = loader.plan(2)
    order = epoch_order(len(files), 5, 2)
    assert [p for p, _, _ in plan] == [files[i] for i in order[:len(plan)]]
    batches = collect(loader, epoch=2)
    assert len(batches) == len(loader) == len(files) // 3
    offsets = set()
    for b, (x, y) in enumerate(batches):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1] == len(shift) and x.is_contiguous(memory_format=torch.channels_last)
        for j in range(x.shape[0]):
            path, top, left = plan[3 * b + j]
            offsets.add((top, left))
            want_x, want_y = reference(path, top, left, crop, shift, scale, channels)
            np.testing.assert_array_equal(x[j].numpy(), want_x)
            np.testing.assert_array_equal(y[j].numpy(), want_y)
    if random_crop:
        assert len(offsets) > 1
    elif crop is not None:
        assert offsets == {((64 - crop[0]) // 2, (96 - crop[1]) // 2)}


def test_normalization_minmax_range(files, norm):
    # stats.h5 covers the train split, so min-max normalized values lie in [0, 1].
    loader = BatchLoader(files, 4, shift=norm[0], scale=norm[1], shuffle=False)
    for x, _ in loader.epoch(0):
        assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6


def test_deterministic_and_epochs_differ(files, norm):
    make = lambda: BatchLoader(files, 2, shift=norm[0], scale=norm[1], crop=(32, 32),  # noqa
                               random_crop=True, seed=11, num_threads=2)
    assert_same_batches(collect(make(), 3), collect(make(), 3))
    a, b = collect(make(), 3), collect(make(), 4)
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def test_start_batch_resumes_identically(files, norm):
    loader = BatchLoader(files, 2, shift=norm[0], scale=norm[1], crop=(32, 48),
                         random_crop=True, seed=1)
    full = collect(loader, 1)
    assert_same_batches(collect(loader, 1, start_batch=3), full[3:])
    assert collect(loader, 1, start_batch=len(loader)) == []


def test_start_batch_does_not_read_skipped_files(files, norm, tmp_path):
    # Skipped batches are not read: a broken file among them goes unnoticed.
    loader = BatchLoader(files, 2, shift=norm[0], scale=norm[1], shuffle=False)
    copies = []
    for i, path in enumerate(files):
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    copies[1].write_bytes(b"broken")
    loader.files = copies
    batches = collect(loader, 0, start_batch=1)
    assert len(batches) == len(files) // 2 - 1


def test_samples_per_epoch_caps_steps(files, norm):
    loader = BatchLoader(files, 3, shift=norm[0], scale=norm[1], samples_per_epoch=7, seed=2)
    assert len(loader) == 2
    batches = collect(loader, 0)
    assert [x.shape[0] for x, _ in batches] == [3, 3]
    order = epoch_order(len(files), 2, 0)
    assert [p for p, _, _ in loader.plan(0)] == [files[i] for i in order[:6]]


def test_last_partial_batch_when_not_dropping(files, norm):
    loader = BatchLoader(files, 3, shift=norm[0], scale=norm[1], drop_last=False,
                         samples_per_epoch=7)
    assert len(loader) == 3
    assert [x.shape[0] for x, _ in loader.epoch(0)] == [3, 3, 1]


def test_held_batches_are_not_overwritten(files, norm):
    # The CPU loader reuses buffers only once the consumer has let go of them.
    loader = BatchLoader(files, 2, shift=norm[0], scale=norm[1], prefetch=1, num_threads=2)
    held = list(loader.epoch(0))
    assert_same_batches(held, collect(loader, 0))
    assert len({x.data_ptr() for x, _ in held}) == len(held)
    # ... and does reuse them when it can: a plain loop allocates only a few buffers.
    ptrs = {x.data_ptr() for x, _ in loader.epoch(1)}
    assert len(ptrs) <= loader.prefetch + 3


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("climseg-loader")]


def test_early_break_leaves_no_threads(files, norm, monkeypatch):
    loads, original = [], BatchLoader._load

    def counted_load(self, batch, i, path, top, left):
        loads.append(path)
        original(self, batch, i, path, top, left)

    monkeypatch.setattr(BatchLoader, "_load", counted_load)
    loader = BatchLoader(files, 2, shift=norm[0], scale=norm[1], prefetch=3, num_threads=4)
    for _ in loader.epoch(0):
        break
    assert loader_threads() == []
    # The break does not wait for the rest of the epoch: at most the prefetched batches
    # (prefetch + the one taken, 2 samples each) were read, of 16 samples.
    assert 2 <= len(loads) <= (3 + 1) * 2 < len(files)
    # Abandoning a half-consumed iterator also shuts it down, when it is closed.
    it = loader.epoch(1)
    next(it)
    it.close()
    assert loader_threads() == []


def test_bad_file_error_names_it(files, norm, tmp_path):
    copies = []
    for path in files[:4]:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    # Cut the third file short: its header is intact, its data is not.
    size = copies[2].stat().st_size
    with open(copies[2], "r+b") as f:
        f.truncate(size // 2)
    loader = BatchLoader(copies, 2, shift=norm[0], scale=norm[1], shuffle=False)
    with pytest.raises(DataError, match=copies[2].name):
        collect(loader, 0)
    assert loader_threads() == []


def test_out_of_range_labels_rejected(files, norm, tmp_path):
    path = tmp_path / files[0].name
    shutil.copy(files[0], path)
    with h5py.File(path, "r+") as f:
        f[LABEL_KEY][0, 0] = 7
    loader = BatchLoader([path], 1, shift=norm[0], scale=norm[1])
    with pytest.raises(DataError, match="outside"):
        collect(loader, 0)


def test_chunked_compressed_float_labels_fall_back_to_h5py(files, norm, tmp_path):
    # Real DeepCAM files may be chunked/compressed and store labels as float: no file offset.
    copies = []
    for path in files[:4]:
        data, labels = read_sample(path)
        copies.append(tmp_path / path.name)
        with h5py.File(copies[-1], "w") as f:
            f.create_dataset(DATA_KEY, data=data, chunks=(16, 32, 16), compression="gzip")
            f.create_dataset(LABEL_KEY, data=labels.astype(np.float32))
            f.create_dataset("climate/labels_1", data=labels)
    kwargs = dict(shift=norm[0], scale=norm[1], crop=(32, 48), random_crop=True, seed=4)
    fast = collect(BatchLoader(files[:4], 2, **kwargs), 0)
    slow = collect(BatchLoader(copies, 2, **kwargs), 0)
    assert_same_batches(fast, slow)
    with_channels = collect(BatchLoader(copies, 2, channels=[3, 4], **{
        **kwargs, "shift": norm[0][[3, 4]], "scale": norm[1][[3, 4]]}), 0)
    for (x, y), (xs, ys) in zip(with_channels, slow):
        assert torch.equal(x, xs[:, [3, 4]]) and torch.equal(y, ys)


def test_bad_arguments(files, norm):
    with pytest.raises(ValueError, match="crop"):
        BatchLoader(files, 2, shift=norm[0], scale=norm[1], crop=(128, 32))
    with pytest.raises(ValueError, match="shift and scale"):
        BatchLoader(files, 2, shift=norm[0][:3], scale=norm[1][:3])
    with pytest.raises(DataError):
        BatchLoader([], 2, shift=norm[0], scale=norm[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(files, norm):
    # Pinned buffers, side-stream copy, channel selection and normalization on the GPU.
    channels = [0, 7, 13]
    kwargs = dict(shift=norm[0][channels], scale=norm[1][channels], channels=channels,
                  crop=(32, 48), random_crop=True, seed=9, num_threads=3)
    cpu = collect(BatchLoader(files, 3, **kwargs), 1)
    gpu = [(x.cpu(), y.cpu()) for x, y in BatchLoader(files, 3, device="cuda", **kwargs).epoch(1)]
    assert_same_batches(cpu, gpu)
    for x, y in BatchLoader(files, 3, device="cuda", **kwargs).epoch(0):
        assert x.is_cuda and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        break
    assert loader_threads() == []
