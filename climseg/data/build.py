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
from climseg.grid import grid_record, regular_grid
from climseg.identity import data_fingerprint

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
    fingerprint: dict[str, str]  # what identifies the data wherever they lie (climseg.identity)
    grid: dict[str, list[float]]  # the fields' grid (climseg.grid.grid_record), for checkpoints


# Bad files named in the start-up error; the rest are counted (climseg check lists them all).
NAMED_BAD_FILES = 5


def check_headers(paths: list) -> None:
    """Every file's header, and its field shape against the first file's (headers only, so
    cheap): a field of another size would otherwise fail at its first validation, after hours.
    One DataError naming every bad file (up to NAMED_BAD_FILES, then a count)."""
    reference = None
    bad = []
    for path in paths:
        try:
            shape = validate_file(path, expect_shape=reference)
        except DataError as err:
            bad.append(str(err))
            continue
        reference = reference or shape
    if len(bad) == 1:
        raise DataError(bad[0])
    if bad:
        more = len(bad) - NAMED_BAD_FILES
        raise DataError(f"{len(bad)} of {len(paths)} files fail the start-up check: "
                        + "; ".join(bad[:NAMED_BAD_FILES])
                        + (f"; and {more} more (climseg check --data ROOT lists them)"
                           if more > 0 else ""))


def build_data(plan: RunPlan, rank: int, device: torch.device) -> Data:
    """Each rank's loaders over its strided partition of the train and validation splits (in
    elastic runs, over its share of each global batch of one global order)."""
    cfg, size = plan.config, plan.world_size
    d, t = cfg.data, cfg.train
    root = Path(d.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (it should hold the "
                        f"{d.train_split}/ and {d.validation_split}/ splits and stats.h5)")
    stats = read_stats(d.stats_path)
    shift, scale = normalization(stats, d.normalization, d.channels)
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
    fingerprint = data_fingerprint(stats, train_files, val_files)
    if d.max_validation_samples is not None:
        val_files = val_files[:d.max_validation_samples]
    if len(val_files) < size:
        raise DataError(f"{root / d.validation_split}: {len(val_files)} validation files "
                        f"for {size} ranks; every rank needs at least one")
    my_train = rank_partition(train_files, rank, size)
    my_val = rank_partition(val_files, rank, size)
    check_headers(my_train + my_val)  # fail now on a bad file, not at step 10,000
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
    return Data(train, validation, len(train_files), len(val_files), shift, scale, fingerprint,
                grid_record(regular_grid(*train.full_shape[:2])))
