"""``python -m climseg.train --config yaml/X.yaml [key=value ...]`` (or ``climseg train``).

The same code path runs as a single process, under ``horovodrun`` and under ``srun``.
:class:`Trainer` is the run: it builds its parts from the config (data, model, optimizer,
checkpoints, reporting), resumes, then :meth:`Trainer.fit` alternates training steps with
validation until the step budget, the epoch budget or the target IoU is reached.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from climseg import cli, dist
from climseg.batchnorm import convert_batchnorm, resolve_group_size
from climseg.checkpoint import (CheckpointError, CheckpointSaver, Progress, load_resume,
                                progress_of, restore_training_state, rng_state, set_rng_state,
                                training_state, world_size_of)
from climseg.config import Config, ConfigError, load_config
from climseg.data.format import CHANNELS, HEIGHT, WIDTH, DataError, read_sample, validate_file
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files, rank_partition
from climseg.data.stats import normalization, read_stats
from climseg.engine import Precision, average_batchnorm_stats, evaluate, grad_norm, train_step
from climseg.inference import select_device
from climseg.logs import setup_logging
from climseg.losses import build_loss
from climseg.metrics import iou_from_confusion
from climseg.model import build_model
from climseg.monitor import RunMonitor
from climseg.optim import build_optimizer, build_scheduler
from climseg.reporting import DataWait, launch_topology, this_rank
from climseg.runlock import RunLock, RunLockError

log = logging.getLogger("climseg.train")

# One training sample at 768x1152 costs about 1.97 TFLOP forward+backward (issue 6's count).
FULL_SAMPLE_TFLOP = 1.97

# Exit statuses of `climseg train` (docs/reliability.md). 1 stays Python's own "crashed".
EXIT_OK = 0
EXIT_ERROR = 2      # bad input, a fault, a diverged run: one line says which; do not requeue
EXIT_STOPPED = 3    # stopped by SIGTERM/SIGUSR1 after a checkpoint: resume=auto goes on

# fp16's GradScaler skips a step whose gradients overflow and halves its scale: normal now and
# then. This many skipped steps in a row (scale 2^16 -> 2^-4) means the run has diverged.
FP16_SKIP_LIMIT = 20

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# The errors a rank reports as one line and exit status 2.
RUN_ERRORS = (ConfigError, DataError, CheckpointError, RunLockError)


class RunError(RuntimeError):
    """Another rank's one-line error, reported the same on every rank."""


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient or weight: the run cannot go on; the message says where."""


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's time limit and its ``--signal=USR1@N`` warning) only set a
    flag here; the training loop acts on it at a step boundary, once every rank agrees."""

    def __init__(self):
        self.received: dict[int, int] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Nothing else is safe here: the main thread may be inside a collective.
        self.received[signum] = self.received.get(signum, 0) + 1

    def flags(self) -> list[int]:
        return [int(sig in self.received) for sig in STOP_SIGNALS]


SIGNALS = StopSignals()


@contextlib.contextmanager
def every_rank_agrees(name: str):
    """Run the block on every rank, then agree (one allgather) on whether any rank failed with
    a run error: if one did, every rank raises the same one-line error, so no rank is left
    waiting in a collective and none prints a traceback. Only for blocks without collectives."""
    err = None
    try:
        yield
    except RUN_ERRORS as caught:
        err = caught
    found = dist.allgather_object(None if err is None else str(err), name=f"agree_{name}")
    first = next((m for m in found if m is not None), None)
    if first is None:
        return
    if err is not None and str(err) == first:
        raise err
    raise RunError(first)


@dataclass
class Data:
    train: BatchLoader
    validation: BatchLoader
    train_samples: int        # whole split, all ranks
    validation_samples: int   # what one validation scores, all ranks
    shift: np.ndarray
    scale: np.ndarray


def build_data(cfg: Config, rank: int, size: int, device: torch.device) -> Data:
    """Each rank's loaders over its strided partition of the train and validation splits (in
    elastic runs, over its share of each global batch of one global order)."""
    d, t = cfg.data, cfg.train
    shift, scale = normalization(read_stats(d.stats_path), d.normalization, d.channels)
    root = Path(d.root)
    train_files = list_files(root / d.train_split)
    val_files = list_files(root / d.validation_split)
    if len(train_files) < size * t.local_batch_size * t.gradient_accumulation:
        raise DataError(f"{root / d.train_split}: {len(train_files)} training files are fewer "
                        f"than one global batch ({cfg.global_batch(size)})")
    share = None
    if t.elastic:
        # A rank's share changes with the rank count: every rank must see every file.
        missing = [f for f in train_files if not Path(f).exists()]
        if missing:
            raise DataError(f"{root / d.train_split}: {len(missing)} of {len(train_files)} "
                            f"files are not here (e.g. {missing[0]}): it was staged for its "
                            "node's ranks only, and train.elastic needs every file on every "
                            "node; read the shared file system, or stage the whole split on "
                            "each node (climseg stage run as one process per node)")
        share = (rank, size, cfg.global_batch(size))
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


def _section(cfg_section) -> dict[str, Any]:
    return dataclasses.asdict(cfg_section)


def build_training(cfg: Config, device: torch.device):
    """Model, loss, optimizer: each from its config section. Batch norm is shared over groups
    of ranks here when asked, before the optimizer takes the parameters."""
    model = build_model(**cfg.model.build_kwargs()).to(device)
    model = convert_batchnorm(model, cfg.train.batchnorm_group_size)
    loss_fn = build_loss(**_section(cfg.loss)).to(device)
    optimizer = build_optimizer(model.parameters(), **_section(cfg.optimizer))
    return model, loss_fn, optimizer


def configure_torch(cfg: Config, device: torch.device) -> None:
    """Threads, kernel choice and seeds: process-wide settings, made once per run."""
    if device.type == "cpu":  # ranks sharing a node share its cores
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, cores // dist.local_size()))
    else:
        # Input shapes are fixed for a run, so cuDNN's autotuning pays for itself after the
        # first steps; it picks kernels by timing, so it is off for deterministic runs.
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)


class _Window:
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


class _Health:
    """Device-side record of non-finite steps, updated every step without a host sync; read
    where the loop synchronises anyway (log steps, validation, checkpoints).

    ``first`` holds the first step whose loss, and whose gradient norm (where the step
    computes one), was NaN/inf, and the first step at which the run counts as diverged: at
    once in fp32/bf16, after FP16_SKIP_LIMIT skipped steps in a row in fp16. 0 means none."""

    def __init__(self, device: torch.device, fp16: bool):
        self.fp16 = fp16
        self.first = torch.zeros(3, dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        bad_loss = ~torch.isfinite(loss_sum)
        bad_grad = (~torch.isfinite(grad_norm) if grad_norm is not None
                    else torch.zeros_like(bad_loss))
        bad = bad_loss | bad_grad
        if self.fp16:
            self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
            fatal = self.streak >= FP16_SKIP_LIMIT
        else:
            fatal = bad
        now = torch.stack([bad_loss, bad_grad, fatal])
        self.first = torch.where((self.first == 0) & now, step, self.first)


class Trainer:
    """One training run: built from a config, then :meth:`fit`.

    Every rank builds the same Trainer; rank 0's reporters and checkpoint writer are the only
    parts that write files, and they do nothing elsewhere. ``on_data`` may wrap the built
    loaders (``climseg.bench`` times the waits for batches).
    """

    def __init__(self, cfg: Config, on_data: Callable[[Data], Data] | None = None):
        self.lock: RunLock | None = None
        self.stop_poll = dist.AnyRankPoll("stop_poll")
        self.elastic: dist.Elastic | None = None
        try:
            self._build(cfg, on_data)
        except BaseException:
            self.close()  # a failed start must not keep output_dir locked in this process
            raise

    def _build(self, cfg: Config, on_data: Callable[[Data], Data] | None) -> None:
        self.cfg, self.on_data = cfg, on_data
        self.rank, self.size = dist.rank(), dist.size()
        self.device = select_device(None, dist.local_rank())  # this rank's GPU, else the CPU
        t = cfg.train
        if dist.elastic_launch() and not t.elastic:
            raise ConfigError("train.elastic: horovodrun started this job in elastic mode "
                              "(--min-np/--max-np/--host-discovery-script); set "
                              "train.elastic=true, or launch with -np and -H")
        if t.elastic:
            t.gradient_accumulation = cfg.elastic_accumulation(self.size)
        try:
            self.bn_group = resolve_group_size(t.batchnorm_group_size, self.size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.global_batch = cfg.global_batch(self.size)
        configure_torch(cfg, self.device)
        # The resolved config names the stats file absolutely: evaluate/predict read it from
        # the checkpoint, perhaps from another working directory.
        cfg.data.stats_file = str(cfg.data.stats_path.resolve())

        if t.elastic:
            # No collective before the elastic loop starts: a rank that joins a running job
            # builds this while the others wait for it in the loop. Lock, data and resume
            # come in enter_elastic(), on every rank at once.
            self.monitor = RunMonitor(cfg, primary=False)
        else:
            with every_rank_agrees("start"):
                self.take_output_dir()
                self.data = self.load_data()
        self.model, self.loss_fn, optimizer = build_training(cfg, self.device)
        self.prec = Precision.build(self.device, t.precision, t.channels_last)
        self.optimizer = dist.wrap_optimizer(
            optimizer, self.model, compression=t.gradient_compression,
            backward_passes_per_step=t.gradient_accumulation)
        self.scheduler = build_scheduler(self.optimizer, **_section(cfg.scheduler))
        self.checkpoints = CheckpointSaver(cfg.output_dir, t.keep_checkpoints,
                                           enabled=dist.is_primary())
        self.resumed_from: Path | None = None
        self.accum = t.gradient_accumulation
        self.progress = Progress() if t.elastic else self.resume()
        step_model = dist.wrap_model(self.model, t.gradient_compression)  # self.model: unwrapped
        self.step_model = torch.compile(step_model) if t.compile else step_model
        # LAMB clips inside its own step; the others clip the global norm in train_step.
        self.clip_norm = cfg.optimizer.max_grad_norm if cfg.optimizer.name != "lamb" else 0.0
        self.health = _Health(self.device, fp16=self.prec.scaler is not None)
        self.step_batches: dict[int, tuple[int, int]] = {}  # step -> (epoch, first micro-batch)
        self.signals = SIGNALS
        self.last_eval: dict[str, Any] = {}
        self.window = _Window(cfg.model.num_classes, self.device)
        self.data_wait = DataWait()
        self.started = False  # elastic: whether this process has trained (or resumed) yet
        if not t.elastic:
            self.start_run()

    def take_output_dir(self) -> None:
        """Rank 0 locks output_dir and opens the reporters. The lock comes before anything is
        written there: a second run must not touch the first one's config.yaml and logs."""
        if dist.is_primary():
            self.lock = RunLock(self.cfg.output_dir).acquire()
        try:
            self.monitor = RunMonitor(self.cfg, primary=dist.is_primary())
        except OSError as err:
            raise ConfigError(f"output_dir: cannot write to {self.cfg.output_dir} "
                              f"({err.strerror or err})") from None

    def load_data(self) -> Data:
        data = build_data(self.cfg, self.rank, self.size, self.device)
        return self.on_data(data) if self.on_data is not None else data

    def start_run(self) -> None:
        """What follows from the data and the rank count; rank 0 starts the reports (once per
        process: in an elastic run again only on a rank that has become rank 0). A collective."""
        cfg, t = self.cfg, self.cfg.train
        self.steps_per_epoch = len(self.data.train) // self.accum
        self.max_steps = t.max_steps or t.max_epochs * self.steps_per_epoch
        height, width = cfg.data.crop or self.data.train.full_shape[:2]
        self.tflop_per_sample = FULL_SAMPLE_TFLOP * height * width / (HEIGHT * WIDTH)
        topology = launch_topology(dist.allgather_object(this_rank(self.device.type),
                                                         name="topology"))
        if self.monitor.primary and self.monitor.metrics is None:
            self.monitor.config(self.size, self.device, self.global_batch)
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("model %s: %d parameters; %d steps per epoch; training to step %d; "
                     "precision %s", cfg.model.name, n_params, self.steps_per_epoch,
                     self.max_steps, self.prec.name)
            self.monitor.run_start(topology, global_batch=self.global_batch,
                                   batchnorm_group_size=self.bn_group,
                                   train_samples=self.data.train_samples,
                                   eval_samples=self.data.validation_samples,
                                   resumed_from=self.resumed_from)

    # -- elastic -------------------------------------------------------------------------------
    def enter_elastic(self) -> None:
        """Every rank, each time the elastic loop (re)starts: at the start, after a rank was
        lost, when one joined. Ranks and the rank count may have changed: the accumulation
        that keeps the global batch, the data shares, rank 0's lock and reporters follow."""
        self.rank, self.size = dist.rank(), dist.size()
        setup_logging(self.rank, self.size)  # rank 0 logs at INFO: it may be another process now
        first = dist.broadcast_object(not self.started, name="elastic_first")
        with every_rank_agrees("elastic"):
            accum = self.cfg.train.gradient_accumulation = self.cfg.elastic_accumulation(self.size)
            if dist.is_primary() and self.lock is None:
                self.take_output_dir()
            elif not dist.is_primary() and self.lock is not None:  # rank 0 no longer
                self.lock.release()
                self.lock, self.monitor = None, RunMonitor(self.cfg, primary=False)
            self.data = self.load_data()
        p = self.progress
        p.batch_in_epoch = p.batch_in_epoch // self.accum * accum  # same steps into the epoch
        self.accum = accum
        dist.set_accumulation(self.optimizer, accum)
        self.global_batch = self.cfg.global_batch(self.size)
        self.checkpoints.enabled = dist.is_primary()
        self.stop_poll = dist.AnyRankPoll("stop_poll")  # a vote in flight died with the reset
        if first:
            self.progress = self.resume()
        self.start_run()
        log.warning("elastic: rank %d of %d (host %s, pid %d) at step %d, %d micro-batch(es) "
                    "of %d per step", self.rank, self.size, os.uname().nodename, os.getpid(),
                    self.progress.step, self.accum, self.cfg.train.local_batch_size)
        self.started = True
        # What a rank lost before the next commit rolls back to: the state every rank now
        # shares (at the start, the resumed checkpoint rather than the fresh model).
        if self.elastic is not None:
            self.elastic.save()

    def elastic_save(self) -> None:
        """A commit: a copy of the whole training state in memory, to roll back to."""
        self.committed = copy.deepcopy({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.prec.scaler is None else self.prec.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress), "accum": self.accum})

    def elastic_restore(self) -> None:
        """Back to the last commit after a rank was lost (the steps since are redone)."""
        c = copy.deepcopy(self.committed)  # the optimizer would alias the copy's tensors
        self.model.load_state_dict(c["model"])
        self.optimizer.load_state_dict(c["optimizer"])
        self.scheduler.load_state_dict(c["scheduler"])
        if self.prec.scaler is not None:
            self.prec.scaler.load_state_dict(c["scaler"])
        self.progress, self.accum = Progress(**c["progress"]), c["accum"]
        self.health = _Health(self.device, fp16=self.prec.scaler is not None)
        self.step_batches.clear()
        log.warning("elastic: a rank was lost; back to the commit at step %d",
                    self.progress.step)

    def elastic_sync(self) -> None:
        """Rank 0's training state on every rank (a rank that joined has only its own fresh
        one). ``accum`` travels along: it is the unit of ``progress.batch_in_epoch``."""
        # Before the first step rank 0's optimizer holds no state: broadcasting it would make
        # Horovod take a zero-gradient step everywhere (weight decay would move the weights).
        trained = dist.broadcast_object(bool(self.optimizer.state), name="elastic_trained")
        dist.broadcast_training_state(self.model, self.optimizer if trained else None)
        meta = dist.broadcast_object({
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.prec.scaler is None else self.prec.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress), "accum": self.accum,
        }, name="elastic_sync")
        if not dist.is_primary():
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.prec.scaler is not None and meta["scaler"] is not None:
                self.prec.scaler.load_state_dict(meta["scaler"])
            self.progress, self.accum = Progress(**meta["progress"]), meta["accum"]

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds; a collective (every rank's RNG state goes into it)."""
        rng = dist.allgather_object(rng_state(), name="rng_state")
        return training_state(model=self.model, optimizer=self.optimizer,
                              scheduler=self.scheduler, scaler=self.prec.scaler,
                              progress=self.progress, rng=rng, config=self.cfg.to_dict())

    def load_state_dict(self, state: dict[str, Any]) -> Progress:
        return restore_training_state(state, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, scaler=self.prec.scaler)

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose run would not continue with the same data: each rank
        shuffles its own files[r::n], so another rank count (or another per-rank batch) draws
        a different global order, and the losses would silently differ from the run's."""
        t = state["config"].get("train", {})
        if self.cfg.train.elastic or t.get("elastic"):
            # An elastic run's order depends only on the global batch, not on the ranks.
            then = (t.get("elastic", False), t.get("global_batch_size"), t.get("local_batch_size"))
            now = (self.cfg.train.elastic, self.cfg.train.global_batch_size,
                   self.cfg.train.local_batch_size)
            if then != now:
                raise CheckpointError(
                    f"{path}: written with train.elastic={then[0]} train.global_batch_size="
                    f"{then[1]} train.local_batch_size={then[2]}, this run has {now[0]}, "
                    f"{now[1]}, {now[2]}: the data order would change and the run would not "
                    "continue; resume with the checkpoint's values, or start a new run "
                    "(resume=none, another output_dir)")
            return
        then = (world_size_of(state), t.get("local_batch_size"), t.get("gradient_accumulation"))
        now = (self.size, self.cfg.train.local_batch_size, self.accum)
        if then != now:
            raise CheckpointError(
                f"{path}: written by {then[0]} rank(s) x train.local_batch_size={then[1]} x "
                f"train.gradient_accumulation={then[2]}, this run has {now[0]} x {now[1]} x "
                f"{now[2]}: each rank shuffles its own files[rank::ranks], so the data order "
                f"would change and the run would not continue; resume on {then[0]} rank(s) "
                f"with train.local_batch_size={then[1]} train.gradient_accumulation={then[2]}, "
                "or start a new run (resume=none, another output_dir)")

    def resume(self) -> Progress:
        """Rank 0 reads the checkpoint (if any) and every rank receives its contents by
        broadcast, so that only rank 0 needs to see ``output_dir``."""
        primary = dist.is_primary()
        path = state = None
        with every_rank_agrees("resume"):
            if primary:
                # Loaded on the CPU: each object moves its tensors to its own device, and the
                # RNG states must stay on the CPU.
                found = load_resume(self.cfg.resume, self.cfg.output_dir)
                if found is not None:
                    path, state = found
                    self.check_resumable(path, state)
        path = dist.broadcast_object(path, name="resume_path")
        if path is None:
            # A fresh model: its initialisation differs by rank only if seeding does, but
            # this makes it certain.
            dist.broadcast_training_state(self.model)
            return Progress()
        meta = None
        if primary:
            self.load_state_dict(state)
            progress = progress_of(state)
            # Micro-batches into the epoch, counted with the accumulation of the run that
            # wrote the checkpoint (elastic runs change it with the rank count).
            then = state["config"].get("train", {}).get("gradient_accumulation", self.accum)
            progress.batch_in_epoch = progress.batch_in_epoch // then * self.accum
            meta = {"rng": state["rng"], "scheduler": self.scheduler.state_dict(),
                    "scaler": state["scaler"], "progress": dataclasses.asdict(progress)}
            del state
        meta = dist.broadcast_object(meta, name="resume_meta")
        dist.broadcast_training_state(self.model, self.optimizer)
        if not primary:
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.prec.scaler is not None and meta["scaler"] is not None:
                self.prec.scaler.load_state_dict(meta["scaler"])
        rngs = meta["rng"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.size else rngs[0])
        progress = Progress(**meta["progress"])
        self.resumed_from = path
        self.monitor.resumed(path, progress.step, progress.epoch, progress.batch_in_epoch)
        return progress

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self, micro_batches) -> None:
        result = train_step(self.step_model, self.optimizer, self.loss_fn, micro_batches,
                            self.prec, self.clip_norm, self.cfg.model.num_classes)
        self.scheduler.step()
        self.step_batches[self.progress.step + 1] = (self.progress.epoch,
                                                     self.progress.batch_in_epoch)
        self.progress.step += 1
        self.progress.batch_in_epoch += self.accum
        self.health.update(self.progress.step, result.loss_sum, result.grad_norm)
        w = self.window
        w.loss += result.loss_sum / self.accum
        w.confusion += result.confusion
        w.grad_norm = result.grad_norm
        w.steps += 1

    def log_window(self) -> None:
        """Average the steps since the last log step over ranks and report them: the loop's
        only host synchronisation."""
        w, step = self.window, self.progress.step
        # The divergence flag rides on the log's own allreduce: no collective of its own.
        health = self.health.first.cpu()
        packed = torch.cat([w.loss.reshape(1).double().cpu(),
                            (health[2:] > 0).double(), w.confusion.flatten().double().cpu()])
        packed = dist.allreduce_sum(packed, name="train_log")
        if packed[1].item() > 0:
            self.diverged(health.tolist())
        loss = packed[0].item() / (self.size * w.steps)
        _, train_iou = iou_from_confusion(packed[2:].round().to(torch.int64).view_as(w.confusion))
        # Before clipping for every optimizer: train_step's norm where it clipped, else the
        # gradients as the optimizer saw them.
        gnorm = (w.grad_norm if w.grad_norm is not None else grad_norm(self.model)).item()
        elapsed = time.perf_counter() - w.start
        rate = w.steps * self.global_batch / elapsed if elapsed > 0 else float("nan")
        values = {"loss": loss, "iou": float(train_iou), "lr": self.optimizer.param_groups[0]["lr"],
                  "samples_per_second": rate, "grad_norm": gnorm,
                  "tflops": rate * self.tflop_per_sample}
        waited, _ = self.data_wait.take()
        self.monitor.train_window(step, self.max_steps, self.progress.epoch, values,
                                  eta_seconds=(self.max_steps - step) * elapsed / w.steps,
                                  data_wait_seconds=waited, window_seconds=elapsed,
                                  device=self.device)
        w.reset()
        self.step_batches.clear()

    def validate(self) -> dict[str, Any]:
        """Score the validation partition (a collective); the result also goes to the
        reporters."""
        p, cfg = self.progress, self.cfg
        self.check_health()
        self.monitor.eval_start(p.epoch, p.step, self.data.validation_samples)
        average_batchnorm_stats(self.model)
        want_image = (cfg.train.image_frequency > 0
                      and p.validations % cfg.train.image_frequency == 0)
        batches = self.monitor.eval_progress(self.data.validation.epoch(0),
                                             len(self.data.validation))
        result = evaluate(self.step_model, batches, self.loss_fn,
                          self.prec, cfg.model.num_classes,
                          keep_first=dist.is_primary() and want_image)
        p.validations += 1
        result["step"] = p.step
        first = result.pop("first", None)
        sample = self.validation_sample(first) if first is not None else None
        self.monitor.eval_result(p.step, p.epoch, result, target=cfg.train.target_iou,
                                 sample=sample)
        self.last_eval = result
        # The validation's time is not the next training window's.
        self.window.start = time.perf_counter()
        self.data_wait.take()
        return result

    def validation_sample(self, first) -> tuple:
        """(field, truth, prediction, title, window) of the first validation sample for the
        map: the TMQ field (or the first channel used), drawn where its crop lies."""
        from climseg.plot import centre_window

        x, y, pred = first
        channels = self.cfg.data.channels or list(range(len(CHANNELS)))
        column = channels.index(0) if 0 in channels else 0
        field = x[column].float().numpy() / self.data.scale[column] + self.data.shift[column]
        title = f"{CHANNELS[channels[column]]}, validation, step {self.progress.step}"
        window = centre_window(self.data.validation.full_shape[:2], tuple(field.shape))
        return field, y.numpy(), pred.numpy(), title, window

    def evaluated_now(self) -> bool:
        return self.last_eval.get("step") == self.progress.step

    def target_reached(self, result: dict[str, Any]) -> bool:
        target = self.cfg.train.target_iou
        return bool(target) and result["eval_accuracy"] >= target

    def save(self) -> None:
        """A checkpoint of this step (a collective); best.pt follows it when this step's
        validation is the best so far."""
        p = self.progress
        # Never a checkpoint of a broken model: the flags of the steps since the last check,
        # and the weights themselves (identical on every rank, so every rank agrees).
        self.check_health()
        finite = torch.stack([torch.isfinite(v).all() for v in self.model.state_dict().values()
                              if v.is_floating_point()]).all().item()
        if not finite:
            raise DivergenceError(f"training diverged at step {p.step}: the model's weights "
                                  "hold NaN/inf; no checkpoint written")
        # NaN compares False: a broken evaluation never becomes best.pt.
        is_best = self.evaluated_now() and self.last_eval["mean_iou"] > p.best_iou
        if is_best:  # counted before the state is taken, so the checkpoint knows it
            p.best_iou = self.last_eval["mean_iou"]
        self.monitor.save_start(p.epoch, p.step)
        state = self.state_dict()
        self.monitor.saved(p.epoch, p.step, self.checkpoints.save(state, p.step, is_best))

    # -- divergence ----------------------------------------------------------------------------
    def check_health(self) -> None:
        """Stop on a non-finite loss or gradient since the last check (a collective; called
        where the loop synchronises anyway: validation and checkpoints)."""
        health = self.health.first.tolist()
        flag = torch.tensor([float(health[2] > 0)], dtype=torch.float64)
        if dist.allreduce_sum(flag, name="health").item() > 0:
            self.diverged(health)

    def diverged(self, health: list[int]) -> None:
        """Raise the same one-line DivergenceError on every rank (a collective): the first
        step that went bad, what went bad, and the input file when its data holds NaN/inf."""
        bad_loss, bad_grad, fatal = health
        files = self.bad_input_files(bad_loss) if bad_loss else []
        reports = dist.allgather_object((self.rank, bad_loss, bad_grad, fatal, files),
                                        name="diverged")
        fatal_step = min(r[3] for r in reports if r[3])
        parts = []
        for what, index in (("loss", 1), ("gradient norm", 2)):
            steps = [(r[index], r[0]) for r in reports if r[index]]
            if steps:
                step, rank = min(steps)
                parts.append(f"the {what} is NaN/inf from step {step} (rank {rank})")
        files = [f for r in reports for f in r[4]]
        if files:
            parts.append("the batch's input " + "; ".join(files))
        skipped = (f" after {FP16_SKIP_LIMIT} fp16 steps in a row skipped as non-finite"
                   if self.health.fp16 else "")
        raise DivergenceError(f"training diverged at step {fatal_step}{skipped}: "
                              f"{', '.join(parts)}; stopped without a checkpoint of it")

    def bad_input_files(self, step: int) -> list[str]:
        """Which of step ``step``'s input files hold NaN/inf: read only once the loss went bad
        (scanning every sample as it is loaded would cost every step)."""
        where = self.step_batches.get(step)
        if where is None:
            return []
        epoch, first = where
        size = self.cfg.train.local_batch_size
        plan = self.data.train.plan(epoch)[first * size:(first + self.accum) * size]
        found = []
        for path in dict.fromkeys(entry[0] for entry in plan):
            try:
                data, _ = read_sample(path)
            except DataError as err:
                found.append(str(err))
                continue
            bad = int(data.size - np.isfinite(data).sum())
            if bad:
                found.append(f"{path} holds {bad} NaN/inf values")
        return found

    def poll_stop(self) -> str | None:
        """Whether any rank was asked to stop (SIGTERM/SIGUSR1), agreed by every rank.

        The vote is an asynchronous allreduce started at one step boundary and read at the
        next: by then it has long finished, so the loop never waits for it, and since every
        rank reads the same vote at the same step, all stop at the same step."""
        votes = self.stop_poll.exchange(self.signals.flags())
        if votes is None or not any(votes):
            return None
        names = [f"{signal.Signals(sig).name} ({n} of {self.size} ranks)"
                 for sig, n in zip(STOP_SIGNALS, votes) if n]
        return "stopped by " + ", ".join(names)

    # -- the loop ------------------------------------------------------------------------------
    def train_one_epoch(self) -> str | None:
        """Train to the end of the current epoch; returns why the run must stop, or None."""
        p, t = self.progress, self.cfg.train
        batches_per_epoch = self.accum * self.steps_per_epoch
        self.monitor.epoch_start(p.epoch, p.step)
        batches = self.data.train.epoch(p.epoch, start_batch=p.batch_in_epoch)
        stop = None
        try:
            while stop is None and p.batch_in_epoch + self.accum <= batches_per_epoch:
                with self.data_wait.waiting():
                    micro = [next(batches) for _ in range(self.accum)]
                self.train_step(micro)
                if p.step % t.log_frequency == 0 or p.step == self.max_steps:
                    self.log_window()
                if p.step >= self.max_steps:
                    stop = "max_steps" if t.max_steps else "max_epochs"
                if t.validation_frequency and p.step % t.validation_frequency == 0:
                    if self.target_reached(self.validate()):
                        stop = "target_reached"
                if t.save_frequency and p.step % t.save_frequency == 0 and stop is None:
                    self.save()
                if stop is None:
                    stop = self.poll_stop()
                if stop is None and self.elastic and p.step % t.elastic_commit_frequency == 0:
                    self.elastic.commit()
        finally:
            batches.close()  # stops the loader's read-ahead (the epoch ended early, a reset)
        self.monitor.epoch_stop(p.epoch, p.step)
        return stop

    def fit(self) -> dict[str, Any]:
        """Train until a budget, the target or a stop signal ends the run; evaluate (unless
        stopped by a signal: the time left goes to the checkpoint) and save the final model.
        Returns the summary (the same on every rank). The output folder's lock is released
        however the run ends."""
        try:
            if not self.cfg.train.elastic:
                return self._fit()
            self.elastic = dist.Elastic(save=self.elastic_save, restore=self.elastic_restore,
                                        sync=self.elastic_sync)
            if not self.elastic.active and dist.is_primary():
                log.warning("train.elastic: not launched by horovodrun in elastic mode "
                            "(--min-np/--max-np/--host-discovery-script): a lost rank ends "
                            "the run")
            return self.elastic.run(self._fit_elastic)
        finally:
            self.close()

    def _fit_elastic(self) -> dict[str, Any]:
        self.enter_elastic()
        return self._fit()

    def close(self) -> None:
        self.stop_poll.drain()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _fit(self) -> dict[str, Any]:
        p, t = self.progress, self.cfg.train
        start = time.perf_counter()
        self.model.train()
        self.window.reset()
        self.data_wait.take()
        stop = "max_steps" if p.step >= self.max_steps else None
        while stop is None and p.epoch < t.max_epochs:
            if p.batch_in_epoch < self.accum * self.steps_per_epoch:  # else resumed at its end
                stop = self.train_one_epoch()
                if stop is None and not self.evaluated_now():
                    if self.target_reached(self.validate()):
                        stop = "target_reached"
            if stop is None:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        stop = stop or "max_epochs"

        # Every run ends with an evaluation of the final model, unless one just happened or a
        # signal asked to stop (Slurm's SIGKILL follows its SIGTERM within KillWait).
        if self.evaluated_now() or stop.startswith("stopped"):
            final = self.last_eval
        else:
            final = self.validate()
        self.save()
        # No rank leaves before rank 0 has written the checkpoint: a launcher that sees one rank
        # exit (horovodrun, srun with --kill-on-bad-exit) kills the others.
        dist.allreduce_sum(torch.zeros(1), name="saved")
        nan = float("nan")
        summary = {
            "steps": p.step, "epochs_started": p.epoch + 1, "stop_reason": stop,
            "eval_mean_iou": final.get("mean_iou", nan),
            "eval_accuracy": final.get("eval_accuracy", nan),
            "eval_per_class_iou": final.get("per_class_iou", []),
            "wall_seconds": time.perf_counter() - start,
            "checkpoint": str(self.checkpoints.path(p.step)),
            "tensorboard": str(Path(self.cfg.output_dir) / "tensorboard"),
        }
        self.monitor.run_stop(summary, p.epoch)
        if stop.startswith("stopped"):
            log.warning("%s at step %d; checkpoint %s written: run again with resume=auto to "
                        "go on (exit status %d)", stop, p.step, summary["checkpoint"],
                        EXIT_STOPPED)
        return summary


def train(cfg: Config, on_data: Callable[[Data], Data] | None = None) -> dict[str, Any]:
    """Build the run ``cfg`` describes and train it; returns the summary."""
    return Trainer(cfg, on_data).fit()


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(
        "train", description="Train DeepLabv3+ on CAM5 climate data (single process, horovodrun or srun).",
        epilog="Overrides are dotted keys, e.g. optimizer.lr=0.002 data.root=/dev/shm/cam "
               "train.max_steps=100. See README.md for every key.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. yaml/demo.yaml")
    parser.add_argument("--engine", choices=dist.ENGINES, default=None,
                        help="the dist.engine override: horovod (horovodrun, srun with MPI) or "
                             "torch (torchrun, srun); see docs/engines.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # --engine may follow overrides
    if args.engine is not None:
        args.overrides.append(f"dist.engine={args.engine}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 an error (one line), 3 stopped by a signal with a checkpoint."""
    args = parse_args(argv)
    SIGNALS.install()  # before Horovod starts: a signal during start-up is a stop, not a death
    try:
        cfg = load_config(args.config, args.overrides)  # first: it names the engine
        dist.init(cfg.dist.engine)
    except (ConfigError, RuntimeError) as err:
        return cli.fail("train", str(err))
    setup_logging(dist.rank(), dist.size())
    try:
        summary = train(cfg)
    except RUN_ERRORS + (RunError, DivergenceError) as err:
        log.error("error: %s", err)
        return EXIT_ERROR
    except Exception as err:
        if not dist.is_shutdown_error(err):
            raise
        # Another rank ended (its own error is its one line); this one was only told to stop.
        log.error("error: stopped because another rank failed; its error is above")
        return EXIT_ERROR
    return EXIT_STOPPED if summary["stop_reason"].startswith("stopped") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
