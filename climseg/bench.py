"""``python -m climseg.bench {step,loader,train}``: how fast the step, the loader, the trainer run.

* ``step``: forward + backward + optimizer step on a synthetic batch resident on the device
  (bf16 autocast and channels_last on CUDA by default; ``--compile`` reports compile time).
* ``loader``: climseg's :class:`BatchLoader` and the reference-style read path (a torch
  DataLoader whose worker processes do h5py read, transpose to CHW and normalize per sample,
  collated by the default collate) on the same files, side by side and interleaved, several
  thread/worker counts each; the reference is scored by its best worker count.
* ``train``: the real trainer (:func:`climseg.train.train`) for N steps on staged files, with
  the time each step waits on the loader measured from outside.

Each prints one table (samples/s, ms per step, MB/s read, data-wait share, peak memory,
TFLOP/s) and, with ``--json PATH``, writes it as JSON. Tiny sizes run in seconds on a CPU, so
CI smoke-tests every mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch

from climseg.atomic import atomic_path
from climseg.config import PRECISIONS
from climseg.data.format import DATA_KEY, HEIGHT, LABEL_KEY, WIDTH, DataError
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files
from climseg.data.stats import channel_indices, normalization, read_stats
from climseg.train import FULL_SAMPLE_TFLOP

log = logging.getLogger("climseg.bench")

_MB = 1e6
_GIB = 2.0 ** 30


@dataclass
class Result:
    """One row of the table."""

    name: str
    samples_per_s: float
    ms_per_step: float
    batch_size: int
    steps: int
    mb_per_s: float | None = None          # climate/data bytes read per second
    data_wait_share: float | None = None   # of step time, blocked waiting for the next batch
    peak_memory_gib: float | None = None   # CUDA: max allocated; CPU: the process's peak RSS
    tflops: float | None = None
    runs: list[float] = field(default_factory=list)  # samples/s of each repeat (median shown)
    extra: dict[str, Any] = field(default_factory=dict)


def tflop_per_sample(height: int, width: int) -> float:
    """Forward + backward TFLOP of one training sample; a crop costs its share of pixels."""
    return FULL_SAMPLE_TFLOP * height * width / (HEIGHT * WIDTH)


def pick_device(name: str) -> torch.device:
    """--device: auto (this rank's GPU if there is one, else the CPU), cpu, cuda, cuda:N; the
    trainer's, evaluate's and predict's rule (climseg.inference.select_device)."""
    from climseg.inference import select_device
    return select_device(None if name == "auto" else name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: max allocated. CPU: this process's peak resident set (not worker processes')."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / _GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB


# --------------------------------------------------------------------------------- loader
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
    from climseg.engine import Precision

    device = pick_device(args.device)
    # The layout the trainer hands the model (train.precision and train.channels_last), so
    # that a loader's lead is not counted when the trainer would spend it re-laying out.
    prec = Precision.build(device, args.precision, _CHANNELS_LAST[args.channels_last])
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
    sample_mb = crop[0] * crop[1] * full_shape[2] * 4 / _MB
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

    configs = [(f"climseg BatchLoader, {t} threads", ours, t) for t in args.threads]
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

    results = []
    for name, _, count in configs:
        rates = [r for r, _ in runs[name]]
        rate = statistics.median(rates)
        results.append(Result(
            name=name, samples_per_s=rate, ms_per_step=1e3 * bs / rate, batch_size=bs,
            steps=steps, mb_per_s=rate * sample_mb, peak_memory_gib=max(m for _, m in runs[name]),
            runs=rates, extra={"kind": "climseg" if name.startswith("climseg") else "reference",
                               "threads_or_workers": count}))
    summary = {"files": len(files), "sample_shape": list(full_shape), "crop": list(crop),
               "channels": channels, "normalization": norm_note, "cold_cache": args.cold,
               "sample_mb": sample_mb, "device": str(device),
               "model_input": "channels_last" if prec.channels_last else "NCHW"}
    ours_best = max((r for r in results if r.extra["kind"] == "climseg"),
                    key=lambda r: r.samples_per_s)
    summary["climseg_best"] = ours_best.name
    refs = [r for r in results if r.extra["kind"] == "reference"]
    if refs:
        ref_best = max(refs, key=lambda r: r.samples_per_s)
        summary["reference_best"] = ref_best.name
        summary["speedup"] = ours_best.samples_per_s / ref_best.samples_per_s
        # The same ratio within each repeat (best of each side in that repeat): its spread
        # shows how much the machine's load moved between repeats.
        summary["speedup_per_repeat"] = [
            max(runs[r.name][i][0] for r in results if r.extra["kind"] == "climseg")
            / max(runs[r.name][i][0] for r in refs) for i in range(args.repeats)]
    return results, summary


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


# --------------------------------------------------------------------------------- step
def step_mode(args) -> tuple[list[Result], dict[str, Any]]:
    from climseg.engine import Precision, train_step
    from climseg.losses import build_loss
    from climseg.model import build_model
    from climseg.optim import build_optimizer

    device = pick_device(args.device)   # sets the current CUDA device too
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as the trainer: fixed shapes, tuned kernels
    torch.manual_seed(0)
    prec = Precision.build(device, args.precision, _CHANNELS_LAST[args.channels_last])
    model = build_model(in_channels=args.in_channels, num_classes=3).to(device)
    # As the trainer: weights contiguous (Horovod needs them so), the input in prec's layout.
    # --channels-last-weights measures the other choice on one device.
    if args.channels_last_weights:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss().to(device)
    optimizer = build_optimizer(model.parameters(), name=args.optimizer, lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    model.train()

    height, width = args.size
    bs = args.batch_size
    x = torch.randn(bs, height, width, args.in_channels, device=device).permute(0, 3, 1, 2)
    y = torch.randint(0, 3, (bs, height, width), device=device)
    batch = [(x, y)]
    log.info("step: batch %d of %dx%dx%d on %s, %s, channels_last %s, optimizer %s%s",
             bs, height, width, args.in_channels, device, prec.name, prec.channels_last,
             args.optimizer, ", torch.compile" if args.compile else "")

    reset_peak_memory(device)
    synchronize(device)
    first_start = time.perf_counter()
    train_step(step_model, optimizer, loss_fn, batch, prec)
    synchronize(device)
    first_step = time.perf_counter() - first_start
    for _ in range(max(0, args.warmup - 1)):
        train_step(step_model, optimizer, loss_fn, batch, prec)
    synchronize(device)
    step_times = []
    start_all = time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(step_model, optimizer, loss_fn, batch, prec)
        if args.sync_each_step:
            synchronize(device)
            step_times.append(time.perf_counter() - start)
    synchronize(device)
    # Without --sync-each-step the host queues steps ahead of the GPU, as in training.
    total = sum(step_times) if args.sync_each_step else time.perf_counter() - start_all
    seconds_per_step = total / args.steps
    rate = bs / seconds_per_step
    name = f"step {prec.name}{' channels_last' if prec.channels_last else ''}" \
           f"{' CL weights' if args.channels_last_weights else ''}" \
           f"{' compiled' if args.compile else ''}, batch {bs}"
    result = Result(name=name, samples_per_s=rate, ms_per_step=1e3 * seconds_per_step,
                    batch_size=bs, steps=args.steps, data_wait_share=0.0,
                    peak_memory_gib=peak_memory_gib(device),
                    tflops=rate * tflop_per_sample(height, width),
                    extra={"first_step_s": first_step,
                           "compile_s": max(0.0, first_step - seconds_per_step)
                           if args.compile else None})
    summary = {"size": [height, width], "in_channels": args.in_channels,
               "precision": prec.name, "channels_last": prec.channels_last,
               "channels_last_weights": args.channels_last_weights,
               "compile": args.compile, "optimizer": args.optimizer,
               "first_step_s": first_step}
    return [result], summary


# --------------------------------------------------------------------------------- train
class _TimedEpochs:
    """Wraps a BatchLoader so that each epoch's iterator records how long next() blocks."""

    def __init__(self, loader: BatchLoader, record: list):
        self._loader, self._record = loader, record

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def epoch(self, epoch: int, start_batch: int = 0):
        return _TimedIterator(self._loader.epoch(epoch, start_batch), self._record, epoch)


class _TimedIterator:
    def __init__(self, inner, record: list, epoch: int):
        self._inner, self._record, self._epoch = inner, record, epoch

    def __iter__(self):
        return self

    def __next__(self):
        asked = time.perf_counter()
        batch = next(self._inner)
        self._record.append((self._epoch, asked, time.perf_counter()))
        return batch

    def close(self):
        self._inner.close()


def train_mode(args) -> tuple[list[Result], dict[str, Any]]:
    from climseg import dist
    from climseg import train as trainer
    from climseg.config import load_config

    dist.init()
    # A step is timed from asking for its batch to asking for the next one: one extra step.
    total_steps = args.warmup + args.steps + 1
    with contextlib.ExitStack() as stack:
        output_dir = args.output_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="climseg-bench-"))
        overrides = list(args.overrides) + [
            f"output_dir={output_dir}", f"train.max_steps={total_steps}",
            "train.validation_frequency=0", "train.save_frequency=0", "train.target_iou=0.0",
            f"train.log_frequency={total_steps}",
            f"data.max_validation_samples={dist.size()}"]
        cfg = load_config(args.config, overrides)
        record: list[tuple[int, float, float]] = []

        def timed(data):
            data.train = _TimedEpochs(data.train, record)
            return data

        from climseg.inference import select_device
        device = select_device(None, dist.local_rank())   # the one the trainer will pick
        reset_peak_memory(device)
        summary = trainer.train(cfg, on_data=timed)

    # Step k's period runs from asking for batch k to asking for batch k+1 in the same epoch
    # (periods across epoch ends would include validation); its wait is the time in next().
    accum = cfg.train.gradient_accumulation
    periods, waits = [], []
    for i in range(accum * args.warmup, len(record) - 1):
        (epoch, asked, got), (next_epoch, next_asked, _) = record[i], record[i + 1]
        if epoch == next_epoch:
            periods.append(next_asked - asked)
            waits.append(got - asked)
    if not periods:
        raise DataError("train: no steps were measured; raise --steps or check the data root")
    bs = cfg.train.local_batch_size
    seconds = sum(periods) / len(periods) * accum
    rate = bs * accum / seconds * dist.size()
    crop = cfg.data.crop or (HEIGHT, WIDTH)
    result = Result(
        name=f"train {Path(args.config).name}, {dist.size()} rank(s), local batch {bs}",
        samples_per_s=rate, ms_per_step=1e3 * seconds, batch_size=bs * accum * dist.size(),
        steps=len(periods) // accum, data_wait_share=sum(waits) / sum(periods),
        peak_memory_gib=peak_memory_gib(device), tflops=rate * tflop_per_sample(*crop),
        extra={"trainer_summary": {k: summary[k] for k in ("steps", "stop_reason",
                                                             "wall_seconds")}})
    return [result], {"config": args.config, "overrides": args.overrides,
                      "crop": list(crop), "ranks": dist.size()}


# --------------------------------------------------------------------------------- output
def format_table(results: list[Result]) -> str:
    def num(value, fmt):
        width = int(fmt.split(".")[0])
        return f"{'-':>{width}s}" if value is None else format(value, fmt)

    name_width = max([44] + [len(r.name) for r in results])   # one table for all modes
    header = (f"{'what':{name_width}s} {'samples/s':>10s} {'ms/step':>9s} {'MB/s':>9s} "
              f"{'data wait':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s}")
    lines = [header, "-" * len(header)]
    for r in results:
        wait = None if r.data_wait_share is None else 100 * r.data_wait_share
        percent = " " if wait is None else "%"
        lines.append(f"{r.name:{name_width}s} {r.samples_per_s:10.2f} {r.ms_per_step:9.1f} "
                     f"{num(r.mb_per_s, '9.0f')} {num(wait, '8.1f')}{percent} "
                     f"{num(r.peak_memory_gib, '9.2f')} {num(r.tflops, '8.3g')}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "host": platform.node(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        env["loadavg"] = os.getloadavg()
    return env


_CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m climseg.bench",
        description="Throughput of the training step, the data loader and the trainer; one "
                    "table on stdout, JSON with --json. docs/performance.md has the commands "
                    "behind every published figure.")
    modes = parser.add_subparsers(dest="mode", required=True)

    def common(p, device=True):
        if device:
            p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
        p.add_argument("--steps", type=int, default=20, help="measured steps/batches per run")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")

    def precision_options(p):
        p.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="as train.precision (auto: bf16 on CUDA, fp32 on the CPU)")
        p.add_argument("--channels-last", default="auto", choices=tuple(_CHANNELS_LAST),
                       help="model input layout, as train.channels_last (auto: on CUDA only)")

    p = modes.add_parser("step", help="training step on a synthetic batch on the device")
    common(p)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[HEIGHT, WIDTH], metavar=("H", "W"))
    p.add_argument("--in-channels", type=int, default=16)
    precision_options(p)
    p.add_argument("--channels-last-weights", action="store_true",
                   help="also convert the weights to channels_last (the trainer does not: "
                        "Horovod refuses non-contiguous tensors); to compare layouts")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--optimizer", default="adamw", choices=("adam", "adamw", "lamb"))
    p.add_argument("--sync-each-step", action="store_true",
                   help="synchronize the device after every step (per-step times)")

    p = modes.add_parser("loader", help="BatchLoader vs the reference-style DataLoader")
    common(p)
    p.add_argument("--data", required=True, help="folder of data-*.h5 files (a split)")
    p.add_argument("--stats", help="stats.h5 (default: DATA/stats.h5 or DATA/../stats.h5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=None,
                   help="batches before timing (default: one epoch)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--channels", type=int, nargs="+", help="channel indices (default: all)")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 4],
                   help="BatchLoader thread counts to try")
    p.add_argument("--prefetch", type=int, default=2)
    precision_options(p)
    p.add_argument("--ref-workers", type=int, nargs="+", default=[1, 2, 4],
                   help="reference DataLoader worker counts to try (0: main process)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; median reported")
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before each run and time one "
                        "pass over them")

    p = modes.add_parser("train", help="the real trainer for N steps on staged data (it picks "
                         "the device: CUDA when present)")
    common(p, device=False)
    p.add_argument("--config", required=True, help="YAML config, e.g. yaml/workstation.yaml")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing")
    p.add_argument("--output-dir", help="keep the run here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.root=/dev/shm/cam")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.mode == "step" and args.warmup < 1:
        parser.error("step: --warmup must be >= 1 (the first step is timed on its own)")
    return args


MODES = {"step": step_mode, "loader": loader_mode, "train": train_mode}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from climseg.config import ConfigError
    try:
        results, summary = MODES[args.mode](args)
    except (ConfigError, DataError) as err:
        log.error("error: %s", err)
        return 2
    print(format_table(results))
    if args.mode == "loader" and "speedup" in summary:
        print(f"climseg best ({summary['climseg_best']}) / reference best "
              f"({summary['reference_best']}): {summary['speedup']:.2f}x (medians); per repeat: "
              + ", ".join(f"{s:.2f}x" for s in summary["speedup_per_repeat"]))
    if args.json:
        record = {"mode": args.mode, "argv": sys.argv if argv is None else argv,
                  "environment": environment(), "summary": summary,
                  "results": [asdict(r) for r in results]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
