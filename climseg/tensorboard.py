"""TensorBoard for a training run: scalars, the validation map and the HParams table.

Built on rank 0 only (by :class:`climseg.monitor.RunMonitor`); it runs no collective.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from climseg.mlperf import Topology


# ------------------------------------------------------------------------------ TensorBoard
# The scalar tags the HParams table shows as metric columns (logged by the trainer later).
HPARAM_METRICS = ("eval/eval_accuracy", "eval/mean_iou", "eval/loss", "train/loss")


def run_name(output_dir: str | Path) -> str:
    """The name a run has in TensorBoard's runs list: its output directory's name."""
    return Path(output_dir).resolve().name or "run"


def hparams_of(cfg, topology: Topology, global_batch: int, batchnorm_group_size: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat hyperparameters shown in TensorBoard: every config key (dotted) plus the launch
    (ranks, nodes, GPUs per node, global batch, batch-norm group)."""
    flat = _flatten(cfg.to_dict())
    flat.update({"launch.ranks": topology.number_of_ranks,
                 "launch.nodes": topology.number_of_nodes,
                 "launch.accelerators_per_node": topology.accelerators_per_node,
                 "launch.device": topology.device_type,
                 "launch.global_batch_size": int(global_batch),
                 "launch.batchnorm_group_size": int(batchnorm_group_size)})
    flat.update(extra or {})
    return flat


class TensorBoard:
    """Scalars, the validation map and the hyperparameters of one run.

    Events go to ``log_dir/<name>`` so that ``tensorboard --logdir log_dir`` lists the run
    under ``name`` (a writer at ``log_dir`` itself is listed as "."). The hyperparameters are
    written when the writer opens, so a killed run is in the HParams table too; its metric
    columns are the scalars of :data:`HPARAM_METRICS`, which the HParams plugin reads from this
    same run as they are logged. A resumed segment writes into the same run directory.
    """

    def __init__(self, log_dir: Path, name: str, hparams: dict[str, Any],
                 metrics: Iterable[str] = HPARAM_METRICS):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        _quiet_writer_thread_errors()
        self.run_dir = Path(log_dir) / name
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        values = {k: _hparam_value(v) for k, v in hparams.items()}
        # The metric values passed here are not written anywhere (only their tags are): the
        # plugin takes each metric's value from the run's scalars of that tag.
        experiment, session_start, self._session_end = hparams_summaries(
            values, {tag: 0.0 for tag in metrics})
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)
        self.writer.flush()

    def scalars(self, prefix: str, values: dict[str, float | None], step: int) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def validation_map(self, field: np.ndarray, truth, prediction, step: int, title: str,
                       window=None, tag: str = "validation/map") -> None:
        """The map of one validation sample, drawn at its place on the globe (``window``:
        :class:`climseg.plot.GridWindow`, e.g. ``centre_window(full_shape, crop)``)."""
        from climseg.plot import figure_to_array, plot_sample

        fig = plot_sample(field, prediction=prediction, truth=truth, title=title, window=window)
        self.image(tag, figure_to_array(fig), step)

    def timing(self, step: int, *, step_seconds: float, data_wait_seconds: float) -> None:
        """``perf/data_wait_share``: the part of the steps' wall time spent waiting for batches
        (0: the loader keeps up; near 1: the accelerator starves)."""
        if step_seconds > 0:
            self.scalars("perf", {"data_wait_share": data_wait_seconds / step_seconds}, step)

    def validation_time(self, step: int, seconds: float) -> None:
        self.scalars("eval", {"seconds": seconds}, step)

    def epoch(self, step: int, epoch_num: int) -> None:
        self.scalars("train", {"epoch": float(epoch_num)}, step)

    def peak_memory(self, step: int, device) -> None:
        """``perf/peak_gpu_memory_gib``: rank 0's peak allocated GPU memory since the last call
        (the peak is reset after reading); nothing on a CPU device."""
        import torch

        if getattr(device, "type", str(device)) != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        self.scalars("perf", {"peak_gpu_memory_gib": peak}, step)

    def close(self) -> None:
        """Ends the HParams session (a killed run, which never gets here, has no end there)."""
        self.writer._get_file_writer().add_summary(self._session_end)
        self.writer.close()

    def abandon(self) -> None:
        """A write failed (a full disk): close the event file without another write, so
        that nothing retries it at exit."""
        with contextlib.suppress(OSError, ValueError):
            self.writer.close()


def _quiet_writer_thread_errors() -> None:
    """TensorBoard writes events in a thread that keeps a failed write's error for the next
    write on the main thread, which reports it in one line (climseg.monitor); the thread
    also re-raises it, and Python's default hook would print its traceback beside that line."""
    default = threading.excepthook
    if getattr(default, "climseg_quiet", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread"
                and issubclass(args.exc_type, OSError)):
            default(args)

    hook.climseg_quiet = True
    threading.excepthook = hook


def _hparam_value(value: Any) -> int | float | str:
    """TensorBoard's HParams take numbers and strings; booleans (which torch would turn into
    0/1), lists and None become text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
