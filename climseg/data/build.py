"""The loaders of a training run: each rank's share of the train and validation splits, with
the normalization of the split's statistics, checked before the first step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from climseg.config import ConfigError
from climseg.data.format import DataError, validate_file
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files, rank_partition
from climseg.data.stats import normalization, read_stats

if TYPE_CHECKING:
    from climseg.plan import RunPlan


@dataclass
class Data:
    train: BatchLoader
    validation: BatchLoader
    train_samples: int        # whole split, all ranks
    validation_samples: int   # what one validation scores, all ranks
    shift: np.ndarray
    scale: np.ndarray


def build_data(plan: RunPlan, rank: int, device: torch.device) -> Data:
    """Each rank's loaders over its strided partition of the train and validation splits (in
    elastic runs, over its share of each global batch of one global order)."""
    cfg, size = plan.config, plan.world_size
    d, t = cfg.data, cfg.train
    shift, scale = normalization(read_stats(d.stats_path), d.normalization, d.channels)
    root = Path(d.root)
    train_files = list_files(root / d.train_split)
    val_files = list_files(root / d.validation_split)
    if len(train_files) < plan.global_batch:
        raise DataError(f"{root / d.train_split}: {len(train_files)} training files are fewer "
                        f"than one global batch ({plan.global_batch})")
    share = None
    if t.elastic:
        # A rank's share changes with the rank count: every rank must see every file.
        missing = [f for f in train_files if not Path(f).exists()]
        if missing:
            raise DataError(f"{root / d.train_split}: {len(missing)} of {len(train_files)} "
                            f"files are not here (e.g. {missing[0]}): it was staged for its "
                            "node's ranks only, and train.elastic needs every file on every "
                            "node; read the shared file system, or stage the whole split on "
                            "each node (climseg stage --per-node)")
        share = (rank, size, plan.global_batch)
    if d.max_validation_samples is not None:
        val_files = val_files[:d.max_validation_samples]
    if len(val_files) < size:
        raise DataError(f"{root / d.validation_split}: {len(val_files)} validation files "
                        f"for {size} ranks; every rank needs at least one")
    my_train = rank_partition(train_files, rank, size)
    my_val = rank_partition(val_files, rank, size)
    for path in my_train + my_val:   # fail now on a bad file, not at step 10,000
        validate_file(path)
    common = dict(shift=shift, scale=scale, channels=d.channels, num_threads=d.loader_threads,
                  prefetch=d.prefetch, device=device, seed=cfg.seed)
    try:
        train = BatchLoader(train_files if share else my_train, t.local_batch_size,
                            crop=d.crop, random_crop=d.crop is not None, shuffle=d.shuffle,
                            drop_last=True, samples_per_epoch=len(train_files) // size,
                            share=share, **common)
    except ValueError as err:  # the only ValueError the loader raises is a crop that does not fit
        raise ConfigError(f"data.crop: {err}") from None
    # A model trained on crops is scored at that size by default: its image-pooling branch
    # averages over the whole input, so a larger field shifts what it sees.
    val_crop = d.validation_crop if d.validation_crop is not None else d.crop
    try:
        validation = BatchLoader(my_val, t.local_batch_size, crop=val_crop,
                                 random_crop=False, shuffle=False, drop_last=False, **common)
    except ValueError as err:
        key = "data.validation_crop" if d.validation_crop is not None else "data.crop"
        raise ConfigError(f"{key}: {err}") from None
    return Data(train, validation, len(train_files), len(val_files), shift, scale)
