"""``climseg bench train``: the real trainer for N steps, its waits for batches timed from
outside."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from climseg import dist
from climseg import train as trainer
from climseg.bench.common import Result, peak_memory_gib, reset_peak_memory
from climseg.data.format import DataError
from climseg.data.loader import BatchLoader
from climseg.config import load_config
from climseg.engine import tflop_per_sample
from climseg.inference import select_device


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
        # The trainer closes an epoch's iterator right after that epoch's last step (and its
        # log sync): the end of the last period, so no extra step is needed to time it.
        self._inner.close()
        self._record.append((self._epoch, time.perf_counter(), None))


class _HideFolder(logging.Filter):
    """Writes a temporary run folder as ``<temporary run folder>`` in log lines: the folder is
    deleted when the bench ends, so a path into it would point at nothing."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.folder in message:
            record.msg, record.args = message.replace(self.folder, "<temporary run folder>"), ()
        return True


@contextlib.contextmanager
def _run_folder(keep: str | None):
    """``--run-dir``, or a temporary folder deleted at the end whose path is never printed."""
    if keep:
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="climseg-bench-") as folder:
        hide = _HideFolder(folder)
        handlers = logging.getLogger().handlers
        for handler in handlers:
            handler.addFilter(hide)
        try:
            yield folder
        finally:
            for handler in handlers:
                handler.removeFilter(hide)


def step_periods(record: list, skip: int) -> tuple[list[float], list[float]]:
    """Each batch's period (from asking for it to asking for the next one, or to its epoch's
    close) and its wait (the time in next()), after the first ``skip`` batches. Periods never
    span an epoch end: that would count validation."""
    periods, waits = [], []
    batches = [i for i, event in enumerate(record) if event[2] is not None]
    for i in batches[skip:]:
        if i + 1 == len(record):   # an iterator never closed (a failed run): no end
            break
        (epoch, asked, got), (next_epoch, end, _) = record[i], record[i + 1]
        if epoch == next_epoch:
            periods.append(end - asked)
            waits.append(got - asked)
    return periods, waits


def train_mode(args) -> tuple[list[Result], dict[str, Any]]:
    dist.init()
    total_steps = args.warmup + args.steps
    flags = [f"data.root={json.dumps(args.data)}"] if args.data is not None else []
    if args.workers is not None:
        flags.append(f"data.loader_threads={args.workers}")
    with _run_folder(args.run_dir) as output_dir:
        overrides = list(args.overrides) + flags + [
            f"output_dir={json.dumps(output_dir)}", f"train.max_steps={total_steps}",
            "train.validation_frequency=0", "train.save_frequency=0", "train.target_iou=0.0",
            f"train.log_frequency={total_steps}",
            f"data.max_validation_samples={dist.size()}"]
        cfg = load_config(args.config, overrides)
        record: list[tuple[int, float, float | None]] = []
        field: list[int] = []  # the samples' (H, W), as the loader found them

        def timed(data):
            field[:] = data.train.full_shape[:2]
            data.train = _TimedEpochs(data.train, record)
            return data

        device = select_device(None, dist.local_rank())   # the one the trainer will pick
        reset_peak_memory(device)
        summary = trainer.train(cfg, on_data=timed)

    accum = cfg.train.gradient_accumulation
    periods, waits = step_periods(record, accum * args.warmup)
    if not periods:
        raise DataError("train: no steps were measured; raise --steps or check the data root")
    bs = cfg.train.local_batch_size
    seconds = sum(periods) / len(periods) * accum
    rate = bs * accum / seconds * dist.size()
    # The work per sample is the trained size's: the crop, else the field of these files (not
    # the real data's 768x1152: a 192x288 demo set would be credited 16x its FLOPs).
    crop = cfg.data.crop or tuple(field)
    result = Result(
        name=f"train {Path(args.config).name}, {dist.size()} rank(s), local batch {bs}",
        samples_per_s=rate, ms_per_step=1e3 * seconds, batch_size=bs * accum * dist.size(),
        steps=len(periods) // accum, data_wait_share=sum(waits) / sum(periods),
        peak_memory_gib=peak_memory_gib(device),
        tflops=rate * tflop_per_sample(*crop, cfg.model.width),
        extra={"trainer_summary": {k: summary[k] for k in ("steps", "stop_reason",
                                                             "wall_seconds")}})
    return [result], {"config": args.config, "overrides": args.overrides,
                      "crop": list(crop), "ranks": dist.size()}
