"""CamDataset: shapes, normalization, crops, channel subsets, validation at construction."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from climseg.data.dataset import CamDataset
from climseg.data.format import DataError, read_sample
from climseg.data.partition import list_files, rank_partition
from climseg.data.stats import normalization, read_stats


def test_items_are_normalized_hwc_and_int64(tiny_root):
    files = list_files(tiny_root / "train")
    stats = read_stats(tiny_root / "stats.h5")
    ds = CamDataset(files, normalization=normalization(stats))
    assert len(ds) == len(files)
    x, y = ds[0]
    assert x.shape == (64, 96, 16) and x.dtype == torch.float32
    assert y.shape == (64, 96) and y.dtype == torch.int64
    data, labels = read_sample(files[0])
    shift, scale = normalization(stats)
    np.testing.assert_allclose(x.numpy(), (data - shift) * scale, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert 0.0 <= x.min() and x.max() <= 1.0          # train files under their own min-max


def test_center_crop_and_channels(tiny_root):
    files = list_files(tiny_root / "validation")
    ds = CamDataset(files, channels=[0, "PSL"], crop=(32, 48))
    x, y = ds[1]
    data, labels = read_sample(files[1])
    assert x.shape == (32, 48, 2) and y.shape == (32, 48)
    np.testing.assert_array_equal(x.numpy(), data[16:48, 24:72][..., [0, 7]])
    np.testing.assert_array_equal(y.numpy(), labels[16:48, 24:72])
    with pytest.raises(DataError, match="crop 65x48 does not fit"):
        CamDataset(files, crop=(65, 48))
    with pytest.raises(DataError, match="normalization has 16 shifts"):
        CamDataset(files, channels=[0], normalization=(np.zeros(16), np.ones(16)))


def test_bad_file_fails_at_construction(tiny_root, tmp_path):
    files = [shutil.copy(f, tmp_path) for f in list_files(tiny_root / "train")[:3]]
    with open(files[2], "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=f"{files[2]}"):
        CamDataset(files)
    with pytest.raises(DataError, match="empty"):
        CamDataset([])


def test_works_with_a_torch_dataloader_over_a_rank_partition(tiny_root):
    files = rank_partition(list_files(tiny_root / "train"), 1, 2)
    loader = torch.utils.data.DataLoader(CamDataset(files), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 64, 96, 16) and y.shape == (4, 64, 96)
    nchw = x.permute(0, 3, 1, 2)
    assert nchw.is_contiguous(memory_format=torch.channels_last)
