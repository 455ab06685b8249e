"""``climseg bench train``: the real trainer for N steps, its waits for batches timed from
outside."""

from __future__ import annotations

import contextlib
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
        self._inner.close()


def train_mode(args) -> tuple[list[Result], dict[str, Any]]:
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
        field: list[int] = []  # the samples' (H, W), as the loader found them

        def timed(data):
            field[:] = data.train.full_shape[:2]
            data.train = _TimedEpochs(data.train, record)
            return data

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
    # The work per sample is the trained size's: the crop, else the field of these files (not
    # the real data's 768x1152: a 192x288 demo set would be credited 16x its FLOPs).
    crop = cfg.data.crop or tuple(field)
    result = Result(
        name=f"train {Path(args.config).name}, {dist.size()} rank(s), local batch {bs}",
        samples_per_s=rate, ms_per_step=1e3 * seconds, batch_size=bs * accum * dist.size(),
        steps=len(periods) // accum, data_wait_share=sum(waits) / sum(periods),
        peak_memory_gib=peak_memory_gib(device), tflops=rate * tflop_per_sample(*crop, cfg.model.width),
        extra={"trainer_summary": {k: summary[k] for k in ("steps", "stop_reason",
                                                             "wall_seconds")}})
    return [result], {"config": args.config, "overrides": args.overrides,
                      "crop": list(crop), "ranks": dist.size()}
