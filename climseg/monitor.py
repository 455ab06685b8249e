"""What a training run reports, and where: the console, TensorBoard (:mod:`climseg.tensorboard`),
the MLPerf log (:mod:`climseg.mlperf`) and ``metrics.jsonl`` (:class:`MetricsFile`, here), with the
sums of a training window (:class:`TrainWindow`) and the time spent waiting for data
(:class:`DataWait`) that they report.

:class:`RunMonitor` is built on every rank. Rank 0 owns the writers; on the other ranks every
method only logs to the console (which :mod:`climseg.logs` filters to warnings there), so the
training loop calls it unconditionally, with no ``if primary`` branches. Nothing here runs a
collective, so no rank can wait on another through it.

Epochs are 0-based here, as the trainer counts them, and 1-based in what is reported (MLPerf's
``epoch_num``, the console), as MLPerf and the reference count them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml

from climseg.atomic import write_failure
from climseg.config import Config, ConfigError, save_config
from climseg.data.format import CHANNELS
from climseg.errors import ReportError
from climseg.mlperf import MLPerfLog, Topology, mlperf_log_path
from climseg.tensorboard import TensorBoard, hparams_of, run_name

log = logging.getLogger("climseg.train")


class MetricsFile:
    """``output_dir/metrics.jsonl``: one JSON object per logged event, appended and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        _drop_partial_line(self.path)
        self._f = open(self.path, "a")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self._f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def abandon(self) -> None:
        """A write failed: close without retrying it (a failed flush would be tried again,
        and fail again, when the file is closed at exit)."""
        with contextlib.suppress(OSError):
            self._f.close()


def _drop_partial_line(path: Path) -> None:
    """A segment that ended on a full disk can leave half a line at the end: cut it, so the
    next segment's lines start on a line of their own and every line stays JSON."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("%s: removed a partial last line (%d bytes) left by a segment that could "
                    "not finish writing it", path, size - keep)


class DataWait:
    """Wall time spent waiting for batches, on the rank that measures it.

    ``with wait.waiting(): micro = [next(batches) ...]`` around each fetch; at a log step,
    ``wait.take()`` returns (seconds waited, seconds elapsed) since the previous ``take`` and
    starts a new window. Pass them to :meth:`TensorBoard.timing`.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._waited = 0.0
        self._window_start = clock()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._waited += self._clock() - start

    def take(self) -> tuple[float, float]:
        now = self._clock()
        result = (self._waited, now - self._window_start)
        self._waited, self._window_start = 0.0, now
        return result


def _reports(method):
    """Rank 0's reports are files in output_dir: a write that fails (a full disk, a folder gone
    read-only) ends the run with one line naming the folder and its free space, as a failed
    checkpoint does; the checkpoints already written stay as they were."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            if isinstance(err, ReportError):
                raise
            for writer in (self.tb, self.metrics):
                if writer is not None:
                    writer.abandon()
            self.tb = self.metrics = None
            line = write_failure(self.output_dir / "its reports", err)
            raise ReportError(f"{line}; the checkpoints written so far are intact (free space, "
                              f"then resume=auto continues the run)") from None
    return wrapper


class RunMonitor:
    def __init__(self, cfg: Config, primary: bool, init_ms: float | None = None):
        self.cfg = cfg
        self.primary = primary
        self.output_dir = Path(cfg.output_dir)
        self.class_names = cfg.model.class_names
        self.mlperf = self.tb = self.metrics = None
        self._old_config: bytes | None = None
        self._mlperf_path: Path | None = None
        if primary:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config = self.output_dir / "config.yaml"
            self._old_config = config.read_bytes() if config.exists() else None
            save_config(cfg, config)
            self._mlperf_path = mlperf_log_path(self.output_dir)
            self.mlperf = MLPerfLog(self._mlperf_path)
            self.mlperf.init_start(time_ms=init_ms)

    def abandon(self) -> None:
        """The run failed to start: leave output_dir as it was. Its MLPerf log segment goes,
        the previous run's config.yaml comes back (or this one goes); the run lock removes a
        folder this run created (:meth:`climseg.runlock.RunLock.abandon`)."""
        if not self.primary:
            return
        if self.mlperf is not None:
            self.mlperf.close()
            self._mlperf_path.unlink(missing_ok=True)
        config = self.output_dir / "config.yaml"
        if self._old_config is None:
            config.unlink(missing_ok=True)
        else:
            config.write_bytes(self._old_config)

    # -- start -------------------------------------------------------------------------------
    def config(self, size: int, device, global_batch: int) -> None:
        log.info("climseg training on %d rank(s), %s, global batch %d; config:\n%s", size,
                 device, global_batch,
                 yaml.safe_dump(self.cfg.to_dict(), sort_keys=False).rstrip())

    @_reports
    def run_start(self, topology: Topology, *, global_batch: int, batchnorm_group_size: int,
                  train_samples: int, eval_samples: int, resumed_from: Path | None) -> None:
        """Initialisation is over: the writers open (hyperparameters first, so that a run
        killed later is still in TensorBoard's HParams table), the MLPerf run starts."""
        if not self.primary:
            return
        self.tb = TensorBoard(self.output_dir / "tensorboard", run_name(self.output_dir),
                              hparams_of(self.cfg, topology, global_batch, batchnorm_group_size))
        self.metrics = MetricsFile(self.output_dir / "metrics.jsonl")
        division = self.mlperf.hyperparameters(
            self.cfg, topology, train_samples=train_samples, eval_samples=eval_samples,
            batchnorm_group_size=batchnorm_group_size,
            checkpoint=None if resumed_from is None else str(resumed_from))
        log.info("MLPerf log %s, %s division%s", self.mlperf.path, division.name,
                 "" if not division.reasons else f" ({division.reasons[0]}"
                 + (f"; and {len(division.reasons) - 1} more)" if len(division.reasons) > 1
                    else ")"))
        self.mlperf.init_stop()
        self.mlperf.run_start()

    def resumed(self, path: Path, step: int, epoch: int, batch: int) -> None:
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, epoch + 1, batch)

    # -- the loop ----------------------------------------------------------------------------
    @_reports
    def epoch_start(self, epoch: int, step: int) -> None:
        if self.mlperf:
            self.mlperf.epoch_start(epoch + 1, step)

    @_reports
    def epoch_stop(self, epoch: int, step: int) -> None:
        if self.mlperf:
            self.mlperf.epoch_stop(epoch + 1, step)

    @_reports
    def train_window(self, step: int, max_steps: int, epoch: int, values: dict[str, float],
                     *, eta_seconds: float, data_wait_seconds: float, window_seconds: float,
                     device) -> None:
        """The averages of the steps since the last log step."""
        if self.primary:
            self.tb.scalars("train", values, step)
            self.tb.epoch(step, epoch + 1)
            self.tb.timing(step, step_seconds=window_seconds, data_wait_seconds=data_wait_seconds)
            self.tb.peak_memory(step, device)
            self.metrics.write("train", step, {**values, "epoch": epoch + 1,
                                               "data_wait_seconds": data_wait_seconds})
            self.mlperf.train_progress(epoch + 1, step, loss=values["loss"], lr=values["lr"],
                                       accuracy=values["iou"])
        wait = data_wait_seconds / window_seconds if window_seconds > 0 else 0.0
        log.info("step %d/%d epoch %d  loss %.4f  IoU %.3f  lr %.3g  %.2f samples/s  "
                 "data wait %.0f%%  ETA %s", step, max_steps, epoch + 1, values["loss"],
                 values["iou"], values["lr"], values["samples_per_second"], 100 * wait,
                 duration(eta_seconds))

    @_reports
    def eval_start(self, epoch: int, step: int, samples: int) -> None:
        if self.mlperf:
            self.mlperf.eval_start(epoch + 1, step)
        log.info("validating %d samples at step %d", samples, step)

    def eval_progress(self, batches: Iterable, total: int,
                      every_seconds: float = 30.0) -> Iterator:
        """``batches`` passed through, with a progress line at most every ``every_seconds``
        (a validation of the real 15,158 samples takes minutes; a short one prints none)."""
        start = last = time.perf_counter()
        for done, batch in enumerate(batches, 1):
            yield batch
            now = time.perf_counter()
            if now - last >= every_seconds and done < total:
                last = now
                rate = done / (now - start)
                log.info("validation: %d/%d batches, %.1f batches/s, ETA %s", done, total,
                         rate, duration((total - done) / rate))

    @_reports
    def eval_result(self, step: int, epoch: int, result: dict[str, Any], *,
                    target: float | None, sample=None) -> None:
        """A validation's result. ``sample`` is (field, truth, prediction, title, window) of
        one validation sample for the TensorBoard map, or None."""
        per_class = dict(zip(self.class_names, result["per_class_iou"]))
        if self.primary:
            self.mlperf.eval_result(epoch + 1, step, result["eval_accuracy"], result["loss"],
                                    target)
            self.mlperf.eval_stop(epoch + 1, step)
            self.tb.scalars("eval", {"loss": result["loss"], "mean_iou": result["mean_iou"],
                                     "eval_accuracy": result["eval_accuracy"],
                                     **{f"iou_{k}": v for k, v in per_class.items()}}, step)
            self.tb.validation_time(step, result["seconds"])
            if sample is not None:
                field, truth, prediction, title, window = sample
                self.tb.validation_map(field, truth, prediction, step, title, window)
            self.metrics.write("eval", step, {k: result[k] for k in (
                "loss", "mean_iou", "eval_accuracy", "per_class_iou", "samples", "seconds")})
        ious = "  ".join(f"{k} {v:.3f}" for k, v in per_class.items())
        log.info("eval step %d: loss %.4f  mean IoU %.4f  eval_accuracy %.4f  (%.1f s)  IoU %s",
                 step, result["loss"], result["mean_iou"], result["eval_accuracy"],
                 result["seconds"], ious)

    @_reports
    def save_start(self, epoch: int, step: int) -> None:
        if self.mlperf:
            self.mlperf.save_start(epoch + 1, step)

    @_reports
    def saved(self, epoch: int, step: int, path: Path | None) -> None:
        if self.mlperf:
            self.mlperf.save_stop(epoch + 1, step)
        if path is not None:
            log.info("saved %s", path)

    # -- end ---------------------------------------------------------------------------------
    @_reports
    def run_stop(self, summary: dict[str, Any], epoch: int) -> None:
        if self.primary:
            status = "success" if summary["stop_reason"] == "target_reached" else "aborted"
            self.mlperf.run_stop(status, epoch + 1, summary["steps"])
            self.mlperf.close()
            self.tb.close()
            self.metrics.write("summary", summary["steps"], summary)
            self.metrics.close()
        iou, accuracy = summary["eval_mean_iou"], summary["eval_accuracy"]
        # A run stopped before its first validation has no score: say so, not "nan".
        scores = ("no validation yet" if iou != iou
                  else f"eval mean IoU {iou:.4f}, eval_accuracy {accuracy:.4f}")
        log.info("done: %d steps in %s (%s); %s\ncheckpoint: %s\nTensorBoard: %s --logdir %s",
                 summary["steps"], duration(summary["wall_seconds"]), summary["stop_reason"],
                 scores, summary["checkpoint"], tensorboard_command(), summary["tensorboard"])


def open_monitor(cfg: Config, init_ms: float | None = None) -> RunMonitor:
    """Rank 0's monitor, its files opened (``config.yaml``, the MLPerf log, whose
    ``init_start`` is ``init_ms`` when given); a ConfigError naming output_dir when they
    cannot be written."""
    try:
        return RunMonitor(cfg, primary=True, init_ms=init_ms)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write to {cfg.output_dir} "
                          f"({err.strerror or err})") from None


def tensorboard_command() -> str:
    """``tensorboard`` as the user can type it after the run: this virtual environment's own
    when the environment is not activated (``make demo`` only puts it on the make's PATH)."""
    own = Path(sys.prefix) / "bin" / "tensorboard"
    active = os.environ.get("VIRTUAL_ENV")
    in_venv = sys.prefix != sys.base_prefix
    if not own.exists() or not in_venv or (active and Path(active).resolve() == Path(sys.prefix).resolve()):
        return "tensorboard"
    path = os.path.relpath(own)
    return path if not path.startswith("..") else str(own)


def duration(seconds: float) -> str:
    """``H:MM:SS``, or ``?`` for a time not known yet."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainWindow:
    """Device-side sums over the steps between two log steps (no host sync per step)."""

    def __init__(self, num_classes: int, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.confusion.zero_()
        self.steps = 0
        self.grad_norm = None
        self.start = time.perf_counter()


def validation_sample(first, channels: list[int] | None, shift, scale, full_shape,
                      step: int, path=None) -> tuple:
    """(field, truth, prediction, title, window) for :meth:`RunMonitor.eval_result`'s map from
    ``first`` (input, truth, prediction of the first validation sample): the TMQ field (or the
    first channel used) in its own units, drawn where its crop lies. With the sample's ``path``
    the title also gives its name and the date and time the name holds."""
    from climseg.plot import centre_window, map_title

    x, y, pred = first
    channels = channels or list(range(len(CHANNELS)))
    column = channels.index(0) if 0 in channels else 0
    field = x[column].float().numpy() / scale[column] + shift[column]
    title = f"{CHANNELS[channels[column]]}, validation, step {step}"
    if path is not None:
        title = map_title(path, title)
    window = centre_window(full_shape[:2], tuple(field.shape))
    return field, y.numpy(), pred.numpy(), title, window
