"""``python -m climseg.train --config yaml/X.yaml [key=value ...]`` (or ``climseg train``).

The same code path runs as a single process, under ``horovodrun`` and under ``srun``. The file
reads in the order of a run: the plan and the parts built from it; :class:`Trainer`'s start
(lock, data, resume, reports), loop (steps, validation, checkpoints, the stop vote) and finish
(final evaluation, checkpoint, summary). :class:`climseg.elastic.ElasticDriver` drives the
same Trainer in an elastic run.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from climseg import dist
from climseg.batchnorm import convert_batchnorm
from climseg.checkpoint import CheckpointManager, Progress
from climseg.config import Config
from climseg.control import SIGNALS, StopVote, every_rank_agrees
from climseg.data.build import Data, build_data
from climseg.elastic import ElasticDriver
from climseg.engine import (Precision, average_batchnorm_stats, configure_torch, evaluate,
                            grad_norm, tflop_per_sample, train_step)
from climseg.health import Health, StepFiles
from climseg.inference import TiledModel, select_device
from climseg.losses import build_loss
from climseg.metrics import iou_from_confusion
from climseg.mlperf import launch_topology, this_rank
from climseg.model import build_model
from climseg.monitor import DataWait, RunMonitor, TrainWindow, open_monitor, validation_sample
from climseg.optim import build_optimizer, build_scheduler
from climseg.plan import RunPlan, plan_run
from climseg.runlock import RunLock
from climseg.watchdog import Watchdog

log = logging.getLogger("climseg.train")

# Exit statuses of `climseg train` (docs/reliability.md). 1 stays Python's own "crashed".
EXIT_OK = 0
EXIT_ERROR = 2      # bad input, a fault, a diverged run: one line says which; do not requeue
EXIT_STOPPED = 3    # stopped by SIGTERM/SIGUSR1 after a checkpoint: resume=auto goes on


# -- build -------------------------------------------------------------------------------------
def build_training(plan: RunPlan, device: torch.device):
    """Model, loss, optimizer, scheduler: each from its config section. Batch norm is shared
    over groups of ranks here when asked, before the optimizer takes the parameters."""
    cfg, t = plan.config, plan.config.train
    model = build_model(**cfg.model.build_kwargs()).to(device)
    model = convert_batchnorm(model, t.batchnorm_group_size)
    loss_fn = build_loss(**dataclasses.asdict(cfg.loss)).to(device)
    optimizer = build_optimizer(model.parameters(), **dataclasses.asdict(cfg.optimizer))
    optimizer = dist.wrap_optimizer(optimizer, model, compression=t.gradient_compression,
                                    backward_passes_per_step=plan.accumulation)
    scheduler = build_scheduler(optimizer, **dataclasses.asdict(cfg.scheduler))
    return model, loss_fn, optimizer, scheduler


class Trainer:
    """One training run: built from a config, then :meth:`fit`.

    Every rank builds the same Trainer; rank 0's reporters and checkpoint writer are the only
    parts that write files, and they do nothing elsewhere. ``on_data`` may wrap the built
    loaders (``climseg bench train`` times the waits for batches). With ``start=False`` the
    collectives of the start (lock, data, resume, reports) are left to the caller:
    :class:`climseg.elastic.ElasticDriver` runs them each time the ranks change.
    """

    def __init__(self, cfg: Config, on_data: Callable[[Data], Data] | None = None,
                 start: bool = True):
        self.lock: RunLock | None = None
        self.init_ms = time.time() * 1000  # MLPerf's init_start, logged once the reports open
        self.stop = StopVote(SIGNALS)
        self.watchdog = Watchdog(cfg.train.stall_timeout, dist.rank()).start()
        self.on_data = on_data
        try:
            self.adopt(plan_run(cfg, dist.size(), dist.elastic_launch()))
            self.rank = dist.rank()
            self.device = select_device(None, dist.local_rank())  # this rank's GPU, else the CPU
            configure_torch(self.cfg, self.device)
            self.monitor = RunMonitor(self.cfg, primary=False)
            if start:
                with every_rank_agrees("start"):
                    self.take_output_dir()
                    self.data = self.load_data()
            self.build()
            if start:
                self.begin()
        except BaseException:
            if self.lock is not None:  # leave output_dir as it was found
                self.monitor.abandon()
                self.lock.abandon()
            self.close()  # a failed start must not keep output_dir locked in this process
            raise

    def adopt(self, plan: RunPlan) -> None:
        """Run on ``plan``'s launch (again, in an elastic run whose ranks changed)."""
        self.plan, self.cfg, self.size, self.global_batch = (plan, plan.config, plan.world_size,
                                                             plan.global_batch)

    def build(self) -> None:
        """The training parts; no collective (a rank joining an elastic run builds them while
        the others wait for it)."""
        cfg, t = self.cfg, self.cfg.train
        self.model, self.loss_fn, self.optimizer, self.scheduler = build_training(self.plan, self.device)
        self.prec = Precision.build(self.device, t.precision, t.channels_last)
        self.checkpoints = CheckpointManager(self.plan, model=self.model,
                                             optimizer=self.optimizer, scheduler=self.scheduler,
                                             scaler=self.prec.scaler)
        self.accum = self.plan.accumulation  # the unit of progress.batch_in_epoch
        self.progress = Progress()
        # DDP under the torch engine (Horovod: the model itself); self.model stays unwrapped, so
        # checkpoints hold the same keys under either engine.
        step_model = dist.wrap_model(self.model, t.gradient_compression)
        self.step_model = torch.compile(step_model) if t.compile else step_model
        # LAMB clips inside its own step; the others clip the global norm in train_step.
        self.clip_norm = cfg.optimizer.max_grad_norm if cfg.optimizer.name != "lamb" else 0.0
        self.step_files = StepFiles(lambda epoch: self.data.train.plan(epoch), t.local_batch_size)
        self.health = Health(self.device, self.prec.scaler is not None, self.step_files)
        self.last_eval: dict[str, Any] = {}
        self.window = TrainWindow(cfg.model.num_classes, self.device)
        self.data_wait = DataWait()
        self.after_step: Callable[[int], None] = lambda step: None  # elastic: commits

    # -- start -----------------------------------------------------------------------------
    def take_output_dir(self) -> None:
        """Rank 0 locks output_dir before anything is written there: a second run must not
        touch the first one's files."""
        if dist.is_primary():
            self.lock = RunLock(self.cfg.output_dir).acquire()

    def open_reports(self) -> None:
        """Rank 0 opens the reporters: the run's first writes to output_dir."""
        if dist.is_primary() and not self.monitor.primary:
            self.monitor = open_monitor(self.cfg, self.init_ms)

    def load_data(self) -> Data:
        data = build_data(self.plan, self.rank, self.device)
        return self.on_data(data) if self.on_data is not None else data

    def begin(self) -> None:
        """Resume (checked before output_dir changes) or start fresh, open reports. A collective."""
        p = self.progress = self.checkpoints.resume(self.data.fingerprint, self.data.grid)
        with every_rank_agrees("reports"):
            self.open_reports()
        if self.checkpoints.resumed_from is not None:
            self.monitor.resumed(self.checkpoints.resumed_from, p.step, p.epoch, p.batch_in_epoch)
        self.start_run()

    def start_run(self) -> None:
        """What follows from the data and the rank count; rank 0 starts the reports (once per
        process: in an elastic run again only on a rank that has become rank 0). A collective."""
        cfg, t = self.cfg, self.cfg.train
        self.steps_per_epoch = len(self.data.train) // self.accum
        self.max_steps = t.max_steps or t.max_epochs * self.steps_per_epoch
        self.tflop_per_sample = tflop_per_sample(
            *(cfg.data.crop or self.data.train.full_shape[:2]), cfg.model.width)
        topology = launch_topology(dist.allgather_object(this_rank(self.device.type),
                                                         name="topology"))
        if self.monitor.primary and self.monitor.metrics is None:
            self.monitor.config(self.size, self.device, self.global_batch)
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("model %s: %d parameters; %d steps per epoch; training to step %d; "
                     "precision %s", cfg.model.name, n_params, self.steps_per_epoch,
                     self.max_steps, self.prec.name)
            self.monitor.run_start(topology, global_batch=self.global_batch,
                                   batchnorm_group_size=self.plan.batchnorm_group_size,
                                   train_samples=self.data.train_samples,
                                   eval_samples=self.data.validation_samples,
                                   resumed_from=self.checkpoints.resumed_from)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until a budget, the target or a stop signal ends the run, then finish.
        Returns the summary (the same on every rank). The output folder's lock is released
        however the run ends."""
        try:
            return self.run()
        finally:
            self.close()

    def run(self) -> dict[str, Any]:
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
                    elif self.checkpoints.improves(p, self.last_eval):
                        self.save()
            if stop is None:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        return self.finish(stop or "max_epochs", start)

    def train_one_epoch(self) -> str | None:
        """Train to the end of the current epoch; returns why the run must stop, or None."""
        p, t = self.progress, self.cfg.train
        batches_per_epoch = self.accum * self.steps_per_epoch
        self.monitor.epoch_start(p.epoch, p.step)
        batches = self.data.train.epoch(p.epoch, start_batch=p.batch_in_epoch)
        stop = None
        try:
            while stop is None and p.batch_in_epoch + self.accum <= batches_per_epoch:
                self.watchdog.beat(p.step, f"step {p.step + 1} (its batch, gradient allreduce)")
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
                if stop is None and self.checkpoints.due(p, self.last_eval):
                    self.save()
                if stop is None:
                    stop = self.poll()
                if stop is None:
                    self.after_step(p.step)
        finally:
            batches.close()  # stops the loader's read-ahead (the epoch ended early, a reset)
        self.monitor.epoch_stop(p.epoch, p.step)
        return stop

    def poll(self) -> str | None:
        """The stop vote of this step boundary, and the time-based checkpoint it carries."""
        stop = self.stop.poll(self.size, save_due=self.checkpoints.cast_time_vote())
        if stop is None and self.checkpoints.time_voted(self.stop.save_voted):
            self.save()
        return stop

    def train_step(self, micro_batches) -> None:
        result = train_step(self.step_model, self.optimizer, self.loss_fn, micro_batches,
                            self.prec, self.clip_norm, self.cfg.model.num_classes)
        self.scheduler.step()
        self.step_files.record(self.progress.step + 1, self.progress.epoch,
                               self.progress.batch_in_epoch, self.accum)
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
            self.health.diverged(health.tolist())
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
        self.step_files.clear()

    def validate(self) -> dict[str, Any]:
        """Score the validation partition (a collective); the result goes to the reporters."""
        p, cfg = self.progress, self.cfg
        self.health.check()
        self.monitor.eval_start(p.epoch, p.step, self.data.validation_samples)
        average_batchnorm_stats(self.model)
        want_image = (cfg.train.image_frequency > 0
                      and p.validations % cfg.train.image_frequency == 0)
        batches = self.watchdog.watched(self.monitor.eval_progress(
            self.data.validation.epoch(0), len(self.data.validation)), p.step, "validation")
        tile = cfg.data.validation_tile
        result = evaluate(TiledModel(self.step_model, tile) if tile else self.step_model,
                          batches, self.loss_fn, self.prec, cfg.model.num_classes,
                          keep_first=dist.is_primary() and want_image)
        p.validations += 1
        result["step"] = p.step
        first = result.pop("first", None)
        sample = None if first is None else validation_sample(
            first, cfg.data.channels, self.data.shift, self.data.scale,
            self.data.validation.full_shape, p.step, path=self.data.validation.plan(0)[0][0])
        self.monitor.eval_result(p.step, p.epoch, result, target=cfg.train.target_iou,
                                 sample=sample)
        self.last_eval = result
        # The validation's time is not the next training window's.
        self.window.start = time.perf_counter()
        self.data_wait.take()
        return result

    def evaluated_now(self) -> bool:
        return self.last_eval.get("step") == self.progress.step

    def target_reached(self, result: dict[str, Any]) -> bool:
        target = self.cfg.train.target_iou
        return bool(target) and result["eval_accuracy"] >= target

    def save(self) -> None:
        """A checkpoint of this step (a collective), never of a broken model: the steps since
        the last check first, then (in the manager) the weights."""
        self.watchdog.beat(self.progress.step, f"the checkpoint of step {self.progress.step}")
        self.health.check()
        self.checkpoints.save(self.progress, self.last_eval, self.monitor)

    # -- finish ----------------------------------------------------------------------------
    def finish(self, stop: str, start: float) -> dict[str, Any]:
        """Evaluate the final model (unless one just happened, or a signal asked to stop:
        Slurm's SIGKILL follows its SIGTERM within KillWait), save it; the summary."""
        p = self.progress
        final = (self.last_eval if self.evaluated_now() or stop.startswith("stopped")
                 else self.validate())
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

    def close(self) -> None:
        self.watchdog.stop()
        self.stop.drain()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: Config, on_data: Callable[[Data], Data] | None = None) -> dict[str, Any]:
    """Build the run ``cfg`` describes and train it; returns the summary."""
    if cfg.train.elastic:
        return ElasticDriver(Trainer(cfg, on_data, start=False)).fit()
    return Trainer(cfg, on_data).fit()


if __name__ == "__main__":
    from climseg.train_cli import main
    sys.exit(main())
