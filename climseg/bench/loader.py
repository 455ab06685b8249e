"""``climseg bench loader``: climseg's BatchLoader against a reference-style DataLoader."""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch

from climseg.bench.common import (CHANNELS_LAST, MB, Result, log, peak_memory_gib, pick_device,
                                  reset_peak_memory, synchronize)
from climseg.data.format import DATA_KEY, FILE_GLOB, LABEL_KEY, DataError
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files
from climseg.data.stats import channel_indices, normalization, read_stats
from climseg.engine import Precision


class ReferenceDataset(torch.utils.data.Dataset):
    """The MLPerf DeepCAM reference's way to read a sample, kept as the baseline.

    h5py reads the (crop of the) sample into a fresh array, it is transposed to CHW and
    normalized in numpy, and the DataLoader pickles it to the main process through shared
    memory and collates. (The reference indexes channels inside h5py,
    ``f["climate/data"][..., channels]``, which is slower still; this baseline reads whole
    rows and selects channels in numpy.)
    """

    def __init__(self, files, shift, scale, channels, crop, full_shape):
        self.files = list(files)
        self.shift = np.asarray(shift, np.float32)[:, None, None]
        self.scale = np.asarray(scale, np.float32)[:, None, None]
        self.channels = channels
        height, width = full_shape[:2]
        ch, cw = crop or (height, width)
        top, left = (height - ch) // 2, (width - cw) // 2
        self.rows, self.cols = slice(top, top + ch), slice(left, left + cw)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with h5py.File(self.files[index], "r") as f:
            data = f[DATA_KEY][self.rows, self.cols]
            label = f[LABEL_KEY][self.rows, self.cols]
        if self.channels is not None:
            data = data[..., self.channels]
        data = np.transpose(data, (2, 0, 1))
        data = (data - self.shift) * self.scale
        return torch.from_numpy(data), torch.from_numpy(label.astype(np.int64))


def evict_from_page_cache(files) -> None:
    """Drop the files' pages from the page cache (only theirs: other users keep their cache)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_batches(make_epoch: Callable[[int], Iterator], warmup: int, steps: int,
                 device: torch.device,
                 prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> float:
    """Seconds for ``steps`` batches after ``warmup`` ones (timed from the first measured ask).

    Epochs follow one another as in training; each batch is moved to ``device`` (a no-op for
    BatchLoader, which yields there), put in the layout the trainer gives the model
    (``prepare``: :meth:`climseg.engine.Precision.prepare`) and, on CUDA, waited for, so both
    paths pay for the copy and for any change of layout the trainer would make.
    """
    seen, start, epoch = 0, None, 0
    while seen < warmup + steps:
        batches = make_epoch(epoch)
        if start is None and warmup == 0:
            start = time.perf_counter()
        for x, y in batches:
            x = prepare(x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            synchronize(device)
            seen += 1
            if seen == warmup:
                start = time.perf_counter()
            if seen >= warmup + steps:
                break
        if hasattr(batches, "close"):
            batches.close()
        epoch += 1
    return time.perf_counter() - start


def loader_mode(args) -> tuple[list[Result], dict[str, Any]]:
    device = pick_device(args.device)
    # The layout the trainer hands the model (train.precision and train.channels_last), so
    # that a loader's lead is not counted when the trainer would spend it re-laying out.
    prec = Precision.build(device, args.precision, CHANNELS_LAST[args.channels_last])
    args.data = split_folder(args.data, args.split)
    files = list_files(args.data)
    channels = None if args.channels is None else channel_indices(args.channels)
    shift, scale, norm_note = bench_normalization(args, channels)
    with h5py.File(files[0], "r") as f:
        full_shape = f[DATA_KEY].shape
    crop = tuple(args.crop) if args.crop else tuple(full_shape[:2])
    bs = args.batch_size
    if len(files) < bs:
        raise DataError(f"{args.data}: {len(files)} files, fewer than one batch of {bs}")
    per_epoch = len(files) // bs
    if args.cold:
        warmup, steps = 0, per_epoch   # one pass over files just evicted from the page cache
    else:
        warmup = per_epoch if args.warmup is None else args.warmup
        steps = args.steps
    sample_mb = crop[0] * crop[1] * full_shape[2] * 4 / MB
    log.info("loader: %d files of %s, batch %d, crop %s, channels %s, %s; %d warm-up + %d "
             "measured batches per run, %d repeats%s; model input %s on %s",
             len(files), "x".join(map(str, full_shape)), bs, "x".join(map(str, crop)),
             "all" if channels is None else channels, norm_note, warmup, steps, args.repeats,
             ", cold page cache" if args.cold else "",
             "channels_last" if prec.channels_last else "NCHW", device)

    def ours(threads: int, repeat: int):
        loader = BatchLoader(files, bs, shift=shift, scale=scale, channels=channels, crop=crop,
                             shuffle=True, seed=repeat, num_threads=threads,
                             prefetch=args.prefetch, device=device)
        return loader.epoch

    # Trying more workers than cores is the point of the worker sweep; torch warns about it.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    def reference(workers: int, repeat: int):
        dataset = ReferenceDataset(files, shift, scale, channels, crop, full_shape)
        generator = torch.Generator().manual_seed(repeat)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=generator)
        return lambda epoch: iter(loader)

    configs = [(f"climseg BatchLoader, {t} threads", ours, t) for t in args.workers]
    if not args.no_reference:
        configs += [(f"reference DataLoader, {w} workers", reference, w)
                    for w in args.ref_workers]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in configs}
    for repeat in range(args.repeats):
        for name, make, count in configs:   # interleaved, so drifting load hits all alike
            if args.cold:
                evict_from_page_cache(files)
            reset_peak_memory(device)
            seconds = time_batches(make(count, repeat), warmup, steps, device, prec.prepare)
            runs[name].append((steps * bs / seconds, peak_memory_gib(device)))
            log.info("  %-36s run %d: %8.1f samples/s", name, repeat + 1,
                     steps * bs / seconds)

    results, ranking = _rank(configs, runs, bs, steps, sample_mb)
    summary = {"files": len(files), "sample_shape": list(full_shape), "crop": list(crop),
               "channels": channels, "normalization": norm_note, "cold_cache": args.cold,
               "sample_mb": sample_mb, "device": str(device),
               "model_input": "channels_last" if prec.channels_last else "NCHW", **ranking}
    return results, summary


def split_folder(data: str, split: str | None) -> Path:
    """``--data ROOT [--split NAME]``: ROOT/NAME (train by default), as every command reads a
    data-set root; ``--data`` naming a split folder itself (the older spelling) still works."""
    root = Path(data)
    if split is None and not (root / "train").is_dir() and any(root.glob(FILE_GLOB)):
        return root
    return root / (split or "train")


def bench_normalization(args, channels):
    """(shift, scale, how) from --stats, or DATA/stats.h5 or DATA/../stats.h5 if present."""
    candidates = [Path(args.stats)] if args.stats else [Path(args.data) / "stats.h5",
                                                          Path(args.data).parent / "stats.h5"]
    for path in candidates:
        if path.exists() or args.stats:
            shift, scale = normalization(read_stats(path), "minmax", channels)
            return shift, scale, f"minmax from {path}"
    n = 16 if channels is None else len(channels)
    # Normalizing costs the same whatever the values; without stats use the identity.
    return np.zeros(n, np.float32), np.ones(n, np.float32), "identity (no stats.h5 found)"


def _rank(configs, runs, bs: int, steps: int, sample_mb: float):
    """One Result per loader (the median of its repeats) and which one won, by how much."""
    results = []
    for name, _, count in configs:
        rates = [r for r, _ in runs[name]]
        rate = statistics.median(rates)
        results.append(Result(
            name=name, samples_per_s=rate, ms_per_step=1e3 * bs / rate, batch_size=bs,
            steps=steps, mb_per_s=rate * sample_mb, peak_memory_gib=max(m for _, m in runs[name]),
            runs=rates, extra={"kind": "climseg" if name.startswith("climseg") else "reference",
                               "threads_or_workers": count}))
    ours_best = max((r for r in results if r.extra["kind"] == "climseg"),
                    key=lambda r: r.samples_per_s)
    ranking = {"climseg_best": ours_best.name}
    refs = [r for r in results if r.extra["kind"] == "reference"]
    if refs:
        ref_best = max(refs, key=lambda r: r.samples_per_s)
        ranking["reference_best"] = ref_best.name
        ranking["speedup"] = ours_best.samples_per_s / ref_best.samples_per_s
        # The same ratio within each repeat (best of each side in that repeat): its spread
        # shows how much the machine's load moved between repeats.
        repeats = len(runs[ours_best.name])
        ranking["speedup_per_repeat"] = [
            max(runs[r.name][i][0] for r in results if r.extra["kind"] == "climseg")
            / max(runs[r.name][i][0] for r in refs) for i in range(repeats)]
    return results, ranking
