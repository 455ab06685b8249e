"""The MLPerf HPC DeepCAM log: the launch topology it reports, the division a run belongs to
(closed or open, with the reasons), and :class:`MLPerfLog`, rank 0's writer of one run
segment's ``mlperf.log`` with ``mlperf-logging``'s mllog. Nothing here runs a collective: the
topology is gathered from every rank by the caller and passed in as plain values.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- launch
RankInfo = tuple[str, int, str]  # (hostname, local rank, device type: "cuda" | "cpu" | ...)


def this_rank(device_type: str) -> RankInfo:
    """This rank's entry for :func:`launch_topology`; gather it from every rank
    (``dist.allgather_object(this_rank(device.type))``) before building the MLPerf log."""
    from climseg import dist

    return socket.gethostname(), dist.local_rank(), str(device_type)


@dataclass(frozen=True)
class Topology:
    """How the run was launched, as MLPerf logs it."""

    number_of_ranks: int
    number_of_nodes: int
    accelerators_per_node: int  # GPUs used per node; 0 for a CPU run
    device_type: str            # "cuda", "cpu", or "mixed" if ranks disagree


def launch_topology(ranks: Sequence[RankInfo]) -> Topology:
    """Nodes and accelerators per node from every rank's (hostname, local rank, device type).

    Nodes are the distinct hostnames. An accelerator is a (host, local rank) pair whose rank
    runs on a GPU (one GPU per rank, as climseg's device choice does). If nodes use different
    numbers of GPUs the largest is reported, with a warning: MLPerf has one value per system.
    """
    if not ranks:
        raise ValueError("launch_topology: no ranks given")
    per_node: dict[str, set[int]] = {}
    devices = set()
    for host, local_rank, device_type in ranks:
        gpus = per_node.setdefault(str(host), set())
        devices.add(device_type)
        if device_type == "cuda":
            gpus.add(int(local_rank))
    counts = sorted({len(g) for g in per_node.values()})
    if len(counts) > 1:
        log.warning("nodes use different numbers of GPUs (%s); MLPerf's accelerators_per_node "
                    "is logged as the largest", counts)
    device_type = devices.pop() if len(devices) == 1 else "mixed"
    return Topology(len(ranks), len(per_node), counts[-1], device_type)


# ------------------------------------------------------------------------------ the division
# The real DeepCAM data set and quality target (MLPerf HPC rules, hpc_3.0.0/closed_deepcam.yaml).
CLOSED_TRAIN_SAMPLES = 121_266
CLOSED_EVAL_SAMPLES = 15_158
CLOSED_TARGET_IOU = 0.82
CLOSED_EPS = 1e-6
# The only schedules the closed rules know (closed_deepcam_<type>.yaml exists for these).
_CLOSED_SCHEDULERS = ("multistep", "cosine")


@dataclass(frozen=True)
class Division:
    name: str                                 # "closed" or "open"
    reasons: tuple[str, ...] = field(default=())  # why not closed, each naming a config key


def mlperf_division(cfg, train_samples: int, eval_samples: int) -> Division:
    """``closed`` when the run keeps to the closed rules of MLPerf HPC DeepCAM, else ``open``.

    Closed means: the hyperparameter constraints the checker enforces (Adam/AdamW/LAMB with
    eps 1e-6, LAMB clipping at 1.0, a multistep or cosine schedule), the fixed parts of the
    reference that are not on its list of modifiable hyperparameters (full 768x1152 fields of
    all 16 channels with min-max normalization, DeepLabv3+, the reference's class weights, the
    0.82 target) and the real data set's sample counts. Every synthetic or cropped run is open.
    """
    from climseg.data.format import DEEPCAM_CLASS_FREQUENCIES, DEEPCAM_WEIGHT_POW

    d, m, o, s, t, loss = cfg.data, cfg.model, cfg.optimizer, cfg.scheduler, cfg.train, cfg.loss
    reasons = []

    def need(ok: bool, why: str) -> None:
        if not ok:
            reasons.append(why)

    need(train_samples == CLOSED_TRAIN_SAMPLES,
         f"data.root: {train_samples} training samples, the real set has {CLOSED_TRAIN_SAMPLES}")
    need(eval_samples == CLOSED_EVAL_SAMPLES,
         f"data.root/data.max_validation_samples: {eval_samples} validation samples, the real "
         f"set has {CLOSED_EVAL_SAMPLES}")
    need(d.crop is None, f"data.crop: {d.crop}; the closed division trains on whole fields")
    need(d.validation_crop is None,
         f"data.validation_crop: {d.validation_crop}; the closed division validates whole fields")
    need(d.channels is None or list(d.channels) == list(range(16)),
         f"data.channels: {d.channels}; the closed division uses all 16")
    need(d.normalization == "minmax",
         f"data.normalization: {d.normalization}; the reference uses minmax")
    need(m.name == "deeplabv3plus" and m.num_classes == 3,
         f"model: {m.name} with {m.num_classes} classes; the reference is deeplabv3plus, 3")
    need(m.width == 1, f"model.width: {m.width}; the reference's channels are width 1")
    need([float(f) for f in loss.class_frequencies] == list(DEEPCAM_CLASS_FREQUENCIES)
         and loss.weight_pow == DEEPCAM_WEIGHT_POW,
         "loss: class weights differ from the reference's")
    need(math.isclose(o.eps, CLOSED_EPS), f"optimizer.eps: {o.eps}; the rules fix 1e-6")
    need(o.name != "lamb" or o.max_grad_norm == 1.0,
         f"optimizer.max_grad_norm: {o.max_grad_norm}; LAMB's is fixed at 1.0")
    need(s.type in _CLOSED_SCHEDULERS,
         f"scheduler.type: {s.type}; the closed rules know multistep and cosine only")
    need(t.target_iou == CLOSED_TARGET_IOU,
         f"train.target_iou: {t.target_iou}; the benchmark's target is {CLOSED_TARGET_IOU}")
    return Division("open" if reasons else "closed", tuple(reasons))


def mlperf_log_path(output_dir: Path) -> Path:
    """The file for this run segment: ``mlperf.log`` for a fresh run directory, then
    ``mlperf-2.log``, ``mlperf-3.log``, ... for each resumed segment (never appended: the
    checker reads one run per file)."""
    output_dir = Path(output_dir)
    path, n = output_dir / "mlperf.log", 1
    while path.exists():
        n += 1
        path = output_dir / f"mlperf-{n}.log"
    return path


# MLPerf HPC names the schedules and optimizers differently from our config.
_MLPERF_SCHEDULER = {"multistep": "multistep", "cosine": "cosine_annealing", "constant": "constant"}
_MLPERF_OPTIMIZER = {"lamb": "LAMB", "adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


class _RaisingFileHandler(logging.FileHandler):
    """A failed write (a full disk) raises to the caller, which reports it in one line;
    logging's own handler would print a traceback and let the log lose lines silently."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # emit()'s exception, still being handled


class MLPerfLog:
    """The MLPerf HPC DeepCAM log of one run segment, written with ``mlperf-logging``'s mllog.

    The trainer calls, on rank 0 only (``None`` elsewhere), in this order::

        log = MLPerfLog(mlperf_log_path(output_dir))
        log.init_start()
        log.hyperparameters(cfg, topology, train_samples=..., eval_samples=...,
                            batchnorm_group_size=..., checkpoint=resumed_from)
        log.init_stop(); log.run_start()
        per epoch:   log.epoch_start(epoch, step) ... log.epoch_stop(epoch, step)
        log steps:   log.train_progress(epoch, step, loss=..., lr=..., accuracy=...)
        validation:  log.eval_start(epoch, step); log.eval_result(epoch, step, accuracy, loss,
                     target); log.eval_stop(epoch, step)
        checkpoints: log.save_start(epoch, step); ...; log.save_stop(epoch, step)
        log.run_stop("success" | "aborted", epoch, step); log.close()

    ``epoch`` is 1-based as MLPerf counts (the reference logs ``epoch + 1``); ``step`` is the
    optimizer step. Each method flushes its line, so a killed run leaves a readable prefix.
    """

    def __init__(self, path: Path):
        from mlperf_logging import mllog

        self.path = Path(path)
        self._constants = mllog.constants
        # mllog keeps one process-wide logger; a second run in the same process (tests, a
        # notebook) reuses it with this run's file as its only handler.
        logger = logging.getLogger("climseg.mlperf")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        # "x": a segment never appends to, or overwrites, another segment's log.
        self._handler = _RaisingFileHandler(self.path, mode="x")
        logger.addHandler(self._handler)
        self.mllogger = mllog.get_mllogger()
        if self.mllogger.logger is not logger:
            mllog.config(logger=logger)
        mllog.config(default_stack_offset=3, root_dir=str(Path(__file__).resolve().parent.parent))
        self.division: Division | None = None

    def close(self) -> None:
        self.mllogger.logger.removeHandler(self._handler)
        self._handler.close()

    # -- raw lines --------------------------------------------------------------------------
    def event(self, key: str, value: Any = None, **metadata) -> None:
        self.mllogger.event(key=key, value=value, metadata=metadata or None)

    def start(self, key: str, time_ms: float | None = None, **metadata) -> None:
        self.mllogger.start(key=key, value=None, metadata=metadata or None, time_ms=time_ms)

    def end(self, key: str, **metadata) -> None:
        self.mllogger.end(key=key, value=None, metadata=metadata or None)

    # -- the run's phases -------------------------------------------------------------------
    def init_start(self, cache_cleared: bool = False, time_ms: float | None = None) -> None:
        """``init_start`` (at ``time_ms``, ms since the epoch, when the run began before its
        log could be opened; else now) then ``cache_clear``. climseg does not drop the page
        cache itself; pass True only when the launch did (e.g. ``sync; echo 3 >
        /proc/sys/vm/drop_caches``)."""
        self.start(self._constants.INIT_START, time_ms=time_ms)
        self.event(self._constants.CACHE_CLEAR, bool(cache_cleared))

    def init_stop(self) -> None:
        self.end(self._constants.INIT_STOP)

    def run_start(self) -> None:
        self.start(self._constants.RUN_START)

    def epoch_start(self, epoch_num: int, step_num: int) -> None:
        self.start(self._constants.EPOCH_START, epoch_num=epoch_num, step_num=step_num)

    def epoch_stop(self, epoch_num: int, step_num: int) -> None:
        self.end(self._constants.EPOCH_STOP, epoch_num=epoch_num, step_num=step_num)

    def train_progress(self, epoch_num: int, step_num: int, *, loss: float, lr: float,
                       accuracy: float | None = None) -> None:
        """The reference's per-log-step lines: learning_rate, train_accuracy, train_loss."""
        meta = dict(epoch_num=epoch_num, step_num=step_num)
        self.event("learning_rate", float(lr), **meta)
        if accuracy is not None:
            self.event("train_accuracy", float(accuracy), **meta)
        self.event("train_loss", float(loss), **meta)

    def eval_start(self, epoch_num: int, step_num: int) -> None:
        self.start(self._constants.EVAL_START, epoch_num=epoch_num, step_num=step_num)

    def eval_result(self, epoch_num: int, step_num: int, accuracy: float, loss: float,
                    target: float | None) -> bool:
        """eval_accuracy and eval_loss; ``target_accuracy_reached`` (valued with the target, as
        the reference logs it) when ``target`` is set and reached. Returns whether it was."""
        meta = dict(epoch_num=epoch_num, step_num=step_num)
        self.event(self._constants.EVAL_ACCURACY, float(accuracy), **meta)
        self.event("eval_loss", float(loss), **meta)
        reached = bool(target) and accuracy >= target
        if reached:
            self.event("target_accuracy_reached", float(target), **meta)
        return reached

    def eval_stop(self, epoch_num: int, step_num: int) -> None:
        self.end(self._constants.EVAL_STOP, epoch_num=epoch_num, step_num=step_num)

    def save_start(self, epoch_num: int, step_num: int) -> None:
        self.start("save_start", epoch_num=epoch_num, step_num=step_num)

    def save_stop(self, epoch_num: int, step_num: int) -> None:
        self.end("save_stop", epoch_num=epoch_num, step_num=step_num)

    def run_stop(self, status: str, epoch_num: int, step_num: int) -> None:
        """``status`` is "success" when the target was reached, else "aborted"."""
        if status not in ("success", "aborted"):
            raise ValueError(f"run_stop: status must be success or aborted, got {status!r}")
        self.end(self._constants.RUN_STOP, status=status, epoch_num=epoch_num, step_num=step_num)

    # -- the settings -----------------------------------------------------------------------
    def hyperparameters(self, cfg, topology: Topology, *, train_samples: int, eval_samples: int,
                        batchnorm_group_size: int, checkpoint: str | None = None,
                        division: str | None = None, org: str = "climseg",
                        platform: str | None = None) -> Division:
        """The submission's settings under the key names of the MLPerf HPC DeepCAM rules.

        ``batchnorm_group_size`` is the resolved number of ranks whose batch statistics are
        reduced together (1 = plain batch norm; "all ranks" is logged as the rank count).
        ``checkpoint`` is the file this segment resumed from (None for a fresh start), as the
        reference logs it. ``division`` forces "closed"/"open" (for checking what the closed
        rules say of a run); by default :func:`mlperf_division` decides. Returns the division
        with the reasons a run is not closed.
        """
        c = self._constants
        decided = mlperf_division(cfg, train_samples, eval_samples)
        if division is None:
            self.division = decided
        elif division in ("closed", "open"):
            self.division = Division(division, decided.reasons)
        else:
            raise ValueError(f"division must be closed, open or None, got {division!r}")
        opt, sched, train = cfg.optimizer, cfg.scheduler, cfg.train
        ranks = topology.number_of_ranks
        micro_global = ranks * train.local_batch_size
        self.event(c.SUBMISSION_BENCHMARK, "deepcam")
        self.event(c.SUBMISSION_DIVISION, self.division.name)
        self.event(c.SUBMISSION_STATUS, "onprem")
        self.event(c.SUBMISSION_ORG, org)
        self.event(c.SUBMISSION_PLATFORM, platform or _platform(topology))
        self.event("number_of_ranks", ranks)
        self.event("number_of_nodes", topology.number_of_nodes)
        self.event("accelerators_per_node", topology.accelerators_per_node)
        self.event(c.SEED, cfg.seed)
        # MLPerf's global batch is the samples per optimizer update. The reference logs
        # local x ranks, which is the same only without accumulation: then its quantity is
        # logged too, under a name of its own.
        self.event(c.GLOBAL_BATCH_SIZE, micro_global * train.gradient_accumulation)
        if train.gradient_accumulation > 1:
            self.event("global_micro_batch_size", micro_global)
        self.event("local_batch_size", train.local_batch_size)
        self.event("gradient_accumulation_frequency", train.gradient_accumulation)
        self.event("batchnorm_group_size", int(batchnorm_group_size))
        self.event("checkpoint", None if checkpoint is None else str(checkpoint))
        self.event(c.TRAIN_SAMPLES, int(train_samples))
        self.event(c.EVAL_SAMPLES, int(eval_samples))
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
        return self.division

def _platform(t: Topology) -> str:
    """A platform description from the launch when the submitter gives none."""
    nodes = f"{t.number_of_nodes} node{'s' if t.number_of_nodes != 1 else ''}"
    if t.accelerators_per_node:
        return f"{nodes} x {t.accelerators_per_node} GPU"
    return f"{nodes}, CPU"
