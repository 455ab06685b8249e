"""The elastic driver: a :class:`climseg.train.Trainer` run under Horovod elastic
(``train.elastic``, docs/elastic.md), surviving a lost rank and taking in a joining one.

The driver sits over a Trainer built with ``start=False`` and drives it through
:class:`climseg.dist.Elastic`: each time the loop (re)starts it re-enters the run on the new
ranks (:meth:`ElasticDriver.enter`: plan, lock and reporters, data, resume), commits the state
every ``train.elastic_commit_frequency`` steps, rolls back to the last commit after a rank was
lost and sends rank 0's state to every rank after a reset. The Trainer knows nothing of it;
``climseg.train.train`` chooses the driver.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from climseg import dist
from climseg.checkpoint import Progress
from climseg.control import every_rank_agrees
from climseg.health import Health
from climseg.logs import setup_logging
from climseg.monitor import RunMonitor
from climseg.plan import plan_run

if TYPE_CHECKING:
    from climseg.train import Trainer

log = logging.getLogger("climseg.train")


class ElasticDriver:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.started = False  # whether this process has trained (or resumed) yet
        self.committed: dict[str, Any] | None = None
        self.elastic = dist.Elastic(save=self.save, restore=self.restore, sync=self.sync)
        trainer.after_step = self.after_step

    def fit(self) -> dict[str, Any]:
        """:meth:`Trainer.fit` under Horovod elastic; the summary. The output folder's lock is
        released however the run ends."""
        try:
            if not self.elastic.active and dist.is_primary():
                log.warning("train.elastic: not launched by horovodrun in elastic mode "
                            "(--min-np/--max-np/--host-discovery-script): a lost rank ends "
                            "the run")
            return self.elastic.run(self._run)
        finally:
            self.trainer.close()

    def _run(self) -> dict[str, Any]:
        self.enter()
        return self.trainer.run()

    def after_step(self, step: int) -> None:
        if step % self.trainer.cfg.train.elastic_commit_frequency == 0:
            self.elastic.commit()

    def enter(self) -> None:
        """Every rank, each time the elastic loop (re)starts: at the start, after a rank was
        lost, when one joined. Ranks and the rank count may have changed: the accumulation
        that keeps the global batch, the data shares, rank 0's lock and reporters follow."""
        t = self.trainer
        t.rank = dist.rank()
        setup_logging(t.rank, dist.size())  # rank 0 logs at INFO: it may be another process now
        first = dist.broadcast_object(not self.started, name="elastic_first")
        with every_rank_agrees("elastic"):
            plan = plan_run(t.plan.config, dist.size(), dist.elastic_launch())
            t.adopt(plan)
            if dist.is_primary() and t.lock is None:
                t.take_output_dir()
                if not first:  # a rank become rank 0: the run's checks passed long ago
                    t.open_reports()
            elif not dist.is_primary() and t.lock is not None:  # rank 0 no longer
                t.lock.release()
                t.lock, t.monitor = None, RunMonitor(t.cfg, primary=False)
            t.data = t.load_data()
        p = t.progress
        p.batch_in_epoch = p.batch_in_epoch // t.accum * plan.accumulation  # same steps in
        t.accum = plan.accumulation
        dist.set_accumulation(t.optimizer, plan.accumulation)
        t.checkpoints.follow(plan, t.data.fingerprint, t.data.grid)
        t.stop.reset()  # a vote in flight died with the reset
        t.watchdog.pause()  # waiting for hosts is not a hang
        if first:
            t.begin()
        else:
            t.start_run()
        log.warning("elastic: rank %d of %d (host %s, pid %d) at step %d, %d micro-batch(es) "
                    "of %d per step", t.rank, t.size, os.uname().nodename, os.getpid(),
                    t.progress.step, t.accum, t.cfg.train.local_batch_size)
        self.started = True
        # What a rank lost before the next commit rolls back to: the state every rank now
        # shares (at the start, the resumed checkpoint rather than the fresh model).
        self.elastic.save()

    def _state(self) -> dict[str, Any]:
        t = self.trainer
        return {"scheduler": t.scheduler.state_dict(),
                "scaler": None if t.prec.scaler is None else t.prec.scaler.state_dict(),
                "progress": dataclasses.asdict(t.progress), "accum": t.accum}

    def save(self) -> None:
        """A commit: a copy of the whole training state in memory, to roll back to."""
        t = self.trainer
        self.committed = copy.deepcopy({"model": t.model.state_dict(),
                                        "optimizer": t.optimizer.state_dict(), **self._state()})

    def restore(self) -> None:
        """Back to the last commit after a rank was lost (the steps since are redone)."""
        t = self.trainer
        c = copy.deepcopy(self.committed)  # the optimizer would alias the copy's tensors
        t.model.load_state_dict(c["model"])
        t.optimizer.load_state_dict(c["optimizer"])
        self._load(c)
        t.health = Health(t.device, t.prec.scaler is not None, t.step_files)
        t.step_files.clear()
        log.warning("elastic: a rank was lost; back to the commit at step %d", t.progress.step)

    def sync(self) -> None:
        """Rank 0's training state on every rank (a rank that joined has only its own fresh
        one). ``accum`` travels along: it is the unit of ``progress.batch_in_epoch``."""
        t = self.trainer
        # Before the first step rank 0's optimizer holds no state: broadcasting it would make
        # Horovod take a zero-gradient step everywhere (weight decay would move the weights).
        trained = dist.broadcast_object(bool(t.optimizer.state), name="elastic_trained")
        dist.broadcast_training_state(t.model, t.optimizer if trained else None)
        meta = dist.broadcast_object(self._state(), name="elastic_sync")
        if not dist.is_primary():
            self._load(meta)

    def _load(self, state: dict[str, Any]) -> None:
        t = self.trainer
        t.scheduler.load_state_dict(state["scheduler"])
        if t.prec.scaler is not None and state["scaler"] is not None:
            t.prec.scaler.load_state_dict(state["scaler"])
        t.progress, t.accum = Progress(**state["progress"]), state["accum"]
