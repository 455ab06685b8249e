"""Rank 0's reporters: TensorBoard, the MLPerf log, and a JSON-lines metrics file.

Each is built only on the primary rank; elsewhere the trainer holds ``None``. None of them
runs a collective, so a rank-0 branch around them can never deadlock the other ranks.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MetricsFile:
    """``output_dir/metrics.jsonl``: one JSON object per logged event, appended and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self._f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoard:
    """Scalars, the validation map image and the hyperparameters, under ``log_dir``."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in _flatten(config).items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()},
                                run_name=".")

    def close(self) -> None:
        self.writer.close()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# MLPerf HPC names the schedules differently from our config.
_MLPERF_SCHEDULER = {"multistep": "multistep", "cosine": "cosine_annealing", "constant": "constant"}
_MLPERF_OPTIMIZER = {"lamb": "LAMB", "adam": "Adam", "adamw": "AdamW"}


class MLPerfLog:
    """The MLPerf HPC DeepCAM log, written with the ``mlperf-logging`` package's ``mllog``."""

    def __init__(self, path: Path):
        from mlperf_logging import mllog

        self._constants = mllog.constants
        # mllog keeps one process-wide logger; a second run in the same process (tests, a
        # notebook) reuses it with this run's file as its only handler.
        logger = logging.getLogger("climseg.mlperf")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        self._handler = logging.FileHandler(path)
        logger.addHandler(self._handler)
        self.mllogger = mllog.get_mllogger()
        if self.mllogger.logger is not logger:
            mllog.config(logger=logger)
        mllog.config(default_stack_offset=2, root_dir=str(Path(__file__).resolve().parent.parent))

    def close(self) -> None:
        self.mllogger.logger.removeHandler(self._handler)
        self._handler.close()

    def event(self, key: str, value: Any = None, **metadata) -> None:
        self.mllogger.event(key=key, value=value, metadata=metadata or None)

    def start(self, key: str, **metadata) -> None:
        self.mllogger.start(key=key, value=None, metadata=metadata or None)

    def end(self, key: str, **metadata) -> None:
        self.mllogger.end(key=key, value=None, metadata=metadata or None)

    def hyperparameters(self, cfg, *, world_size: int, global_batch: int,
                        train_samples: int, eval_samples: int) -> None:
        """The submission's settings, with the key names of the MLPerf HPC DeepCAM rules."""
        c = self._constants
        opt, sched, train = cfg.optimizer, cfg.scheduler, cfg.train
        self.event(c.SUBMISSION_BENCHMARK, "deepcam")
        self.event(c.SUBMISSION_DIVISION, "closed")
        self.event(c.SUBMISSION_STATUS, "onprem")
        self.event(c.SUBMISSION_ORG, "climseg")
        self.event(c.SUBMISSION_PLATFORM, "unknown")
        self.event(c.SEED, cfg.seed)
        self.event(c.GLOBAL_BATCH_SIZE, global_batch)
        self.event("local_batch_size", train.local_batch_size)
        self.event("gradient_accumulation_frequency", train.gradient_accumulation)
        self.event("batchnorm_group_size", world_size if train.sync_batchnorm else 1)
        self.event(c.TRAIN_SAMPLES, train_samples)
        self.event(c.EVAL_SAMPLES, eval_samples)
        self.event("opt_name", _MLPERF_OPTIMIZER[opt.name])
        self.event("opt_lr", opt.lr)
        self.event("opt_betas", list(opt.betas))
        self.event("opt_eps", opt.eps)
        self.event("opt_weight_decay", opt.weight_decay)
        if opt.name == "lamb":
            self.event("opt_bias_correction", True)
            self.event("opt_grad_averaging", True)
            self.event("opt_max_grad_norm", opt.max_grad_norm)
        self.event("scheduler_type", _MLPERF_SCHEDULER[sched.type])
        self.event("scheduler_lr_warmup_steps", sched.warmup_steps)
        self.event("scheduler_lr_warmup_factor", sched.warmup_factor)
        if sched.type == "multistep":
            self.event("scheduler_milestones", list(sched.milestones))
            self.event("scheduler_decay_rate", sched.decay_rate)
        elif sched.type == "cosine":
            self.event("scheduler_t_max", sched.t_max)
            self.event("scheduler_eta_min", sched.eta_min)
