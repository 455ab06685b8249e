"""CamDataset: a map-style torch Dataset over a list of sample files.

It knows nothing of ranks: the caller passes the files this rank reads
(``rank_partition(list_files(split_dir), rank, size)``). Samples keep the on-disk (H, W, C)
layout; ``x.permute(2, 0, 1)`` (or ``(0, 3, 1, 2)`` on a batch) gives the (C, H, W) view with
channels_last strides, without a copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from climseg.data.format import DataError, read_sample, validate_file
from climseg.data.stats import channel_indices


def center_crop_box(height: int, width: int, crop: tuple[int, int] | None,
                    where: str = "crop") -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a centred crop; the full frame when None."""
    if crop is None:
        return 0, 0, height, width
    ch, cw = (int(c) for c in crop)
    if not (0 < ch <= height and 0 < cw <= width):
        raise DataError(f"{where}: crop {ch}x{cw} does not fit in the {height}x{width} samples")
    return (height - ch) // 2, (width - cw) // 2, ch, cw


class CamDataset(Dataset):
    """Samples ``(x float32 (H, W, C') normalized, y int64 (H, W))`` from ``files``.

    ``channels``: indices or names of the channels to keep (None: all 16).
    ``crop``: (height, width) of a centred crop (None: the full frame).
    ``normalization``: a ``(shift, scale)`` pair for the kept channels, from
    ``climseg.data.stats.normalization``; x = (data - shift) * scale. None leaves raw values.
    ``validate``: check every file's header now, so that a bad file fails at start.
    """

    def __init__(self, files: list[str | os.PathLike], *, channels=None,
                 crop: tuple[int, int] | None = None, normalization=None,
                 validate: bool = True):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise DataError("CamDataset: the file list is empty")
        self.channels = channel_indices(channels)
        self._all_channels = channels is None
        self.shape = None
        if validate:
            for path in self.files:
                shape = validate_file(path)
                if self.shape is not None and shape != self.shape:
                    raise DataError(f"{path}: shape {shape} differs from {self.shape} of "
                                    f"{self.files[0]}")
                self.shape = shape
        else:
            self.shape = validate_file(self.files[0])
        self.crop = crop
        self._box = center_crop_box(self.shape[0], self.shape[1], crop,
                                    where=str(self.files[0].parent))
        self.shift = self.scale = None
        if normalization is not None:
            shift, scale = (np.asarray(a, np.float32).reshape(-1) for a in normalization)
            if shift.shape != (len(self.channels),) or scale.shape != shift.shape:
                raise DataError(f"normalization has {shift.size} shifts and {scale.size} "
                                f"scales for {len(self.channels)} channels")
            self.shift, self.scale = shift, scale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        data, labels = read_sample(path, window=self._box, expect_shape=self.shape)
        if not self._all_channels:
            data = data[..., self.channels]
        if self.shift is not None:
            data = (data - self.shift) * self.scale
        x = torch.from_numpy(np.ascontiguousarray(data, np.float32))
        y = torch.from_numpy(labels.astype(np.int64))
        return x, y
