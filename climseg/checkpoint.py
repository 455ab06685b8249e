"""Checkpoints: what one holds, how a run is restored from it, where files go, and the run's
policy over them (:class:`CheckpointManager`: resume, save, best).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, loadable with
``torch.load(weights_only=True)`` (see docs/design.md). :func:`training_state` builds it from a
run's objects and :func:`restore_training_state` puts it back into them; the trainer never
spells out the keys. Files are written to a temporary name, fsynced and renamed, so a crash
mid-write leaves the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from climseg import dist
from climseg.atomic import atomic_path
from climseg.control import every_rank_agrees
from climseg.errors import CheckpointError, DivergenceError
from climseg.identity import check_identity, run_identity
from climseg.runlock import LOCK_NAME

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^ckpt-step(\d+)\.pt$")
# What atomic_path leaves behind when its writer is killed mid-write (see climseg.atomic).
_TEMP_FILE = re.compile(r"^\.(ckpt-step\d+\.pt|best\.pt)\.tmp\d+-\d+$")
BEST_NAME = "best.pt"


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint taken after optimizer step ``step``."""
    return f"ckpt-step{step:08d}.pt"


@dataclass
class Progress:
    """Where a run is; saved in checkpoints so that a resumed run continues exactly."""

    step: int = 0             # optimizer steps taken
    epoch: int = 0            # epochs started before this one (0-based)
    batch_in_epoch: int = 0   # micro-batches of this epoch already consumed
    best_iou: float = float("-inf")
    validations: int = 0


def world_size_of(state: dict[str, Any]) -> int:
    """How many ranks wrote ``state``: its own entry, else (older checkpoints) one RNG state
    per rank."""
    return int(state.get("world_size", len(state.get("rng", [None]))))


def training_state(*, model, optimizer, scheduler, scaler, progress: Progress,
                   rng: list[dict[str, Any]], config: dict[str, Any],
                   identity: dict[str, Any] | None = None,
                   grid: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Everything a resumed run needs, as a weights-only-loadable dict.

    ``model`` is the unwrapped model (no compile/DDP prefixes in its keys); ``rng`` holds one
    :func:`rng_state` per rank; ``config`` is the resolved config as a plain dict;
    ``identity`` is what a resume must match (:func:`climseg.identity.run_identity`);
    ``grid`` the latitude/longitude grid of the fields the model learned on
    (:func:`climseg.grid.grid_record`; for a crop-trained run, the fields it cropped from:
    the pixel scale is what the model learned), which ``predict`` regrids other inputs to.
    """
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **asdict(progress),
        "rng": rng,
        "world_size": len(rng),
        "config": config,
        "identity": identity,
        "grid": grid,
    }


def restore_training_state(state: dict[str, Any], *, model, optimizer, scheduler,
                           scaler) -> Progress:
    """Load ``state`` (from :func:`training_state`) into the run's objects; returns its
    :class:`Progress`. Tensors may be on the CPU: each object moves them where it keeps its own.
    A model or optimizer of another shape is a CheckpointError naming the first difference."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"the checkpoint does not fit this run's model or optimizer "
                              f"({detail[:300]})") from None
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return progress_of(state)


def progress_of(state: dict[str, Any]) -> Progress:
    return Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["best_iou"],
                    state["validations"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error if it is not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        # torch's own text suggests weights_only=False, which would run arbitrary pickled
        # code from the file: say what is wrong without that advice.
        detail = ("it holds objects other than tensors and plain values"
                  if "weights_only" in str(err) else str(err).splitlines()[0])
        raise CheckpointError(f"{path}: not a readable climseg checkpoint "
                              f"({type(err).__name__}: {detail})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a climseg checkpoint (no 'model' and 'config' entries)")
    return state


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt-stepN.pt`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = step_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_resume(resume: str, directory: str | Path) -> Path | None:
    """The checkpoint a run with ``resume`` (none | auto | a path) starts from, or None."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {path} not found")
    return path


def load_resume(resume: str, directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """``(path, state)`` of the checkpoint a run with ``resume`` starts from, or None.

    ``auto`` takes the newest *readable* ``ckpt-stepN.pt``: a file truncated or corrupted after
    it was written (a full disk, a node lost during a copy) is skipped with a warning naming
    it, so a requeued job goes on from the one before. An explicit path is what the user
    asked for: a bad one stays an error.
    """
    if resume != "auto":
        path = resolve_resume(resume, directory)
        return None if path is None else (path, load_checkpoint(path))
    for _, path in reversed(step_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("resume=auto: skipping %s", err)
    return None


def another_run(cfg) -> list[str]:
    """The checkpoints in ``output_dir`` that this run would write beside without continuing
    them (it neither resumes with ``auto`` nor from a file of that folder, nor overwrites)."""
    out = Path(cfg.output_dir)
    if cfg.resume == "auto" or cfg.overwrite:
        return []
    if cfg.resume != "none" and Path(cfg.resume).resolve().parent == out.resolve():
        return []  # going on from one of its own checkpoints (an earlier step)
    found = [p.name for _, p in step_checkpoints(out)]
    return found + [BEST_NAME] * (out / BEST_NAME).exists()


def refuse_another_run(cfg) -> None:
    """A folder belongs to one run: a run that does not continue the one whose checkpoints
    ``output_dir`` holds is refused (one line), rather than mixing its checkpoints, best.pt
    and metrics with that run's."""
    found = another_run(cfg)
    if found:
        raise CheckpointError(
            f"output_dir: {cfg.output_dir} holds another run's checkpoints "
            f"({', '.join(found)}); "
            "resume=auto to continue it, or overwrite=true (train --force) to start over: "
            f"the old run is moved aside to {aside_name(Path(cfg.output_dir), 'YYYYmmdd-HHMMSS')}")


def aside_name(directory: Path, date: str) -> Path:
    return directory.with_name(f"{directory.name}.replaced-{date}")


def move_aside(directory: str | Path, keep: tuple[str, ...]) -> Path | None:
    """``overwrite=true``: everything in ``directory`` but ``keep`` (the run's lock) moves to a
    dated sibling folder (renames, on the same file system), which is returned; None when
    there was nothing to move. Nothing is deleted."""
    directory = Path(directory)
    entries = [p for p in directory.iterdir() if p.name not in keep]
    if not entries:
        return None
    date = time.strftime("%Y%m%d-%H%M%S")
    dest, n = aside_name(directory, date), 1
    while dest.exists():
        n += 1
        dest = aside_name(directory, f"{date}-{n}")
    try:
        dest.mkdir()
        for p in entries:
            p.rename(dest / p.name)
    except OSError as err:
        raise CheckpointError(f"output_dir: overwrite=true cannot move the previous run in "
                              f"{directory} aside to {dest} ({err.strerror or err}); move or "
                              "remove it yourself") from None
    log.warning("overwrite=true: the previous run in %s (%d entries) moved aside to %s",
                directory, len(entries), dest)
    return dest


class CheckpointSaver:
    """The checkpoint writer: ``ckpt-stepN.pt``, the newest ``keep`` of them kept, and
    ``best.pt`` naming the best-scoring one. Built on every rank, it writes only where
    ``enabled`` (rank 0), so the caller needs no rank branch."""

    def __init__(self, directory: str | Path, keep: int, enabled: bool = True):
        self.directory = Path(directory)
        self.keep = keep
        self.enabled = enabled
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()

    def path(self, step: int) -> Path:
        return self.directory / checkpoint_name(step)

    def save(self, state: dict[str, Any], step: int, is_best: bool = False) -> Path | None:
        """Write ``state`` as the checkpoint of ``step``; ``is_best`` also points best.pt at it."""
        if not self.enabled:
            return None
        try:
            path = save_checkpoint(state, self.path(step))
            if is_best:
                _link_atomically(path, self.directory / BEST_NAME)
        except (OSError, RuntimeError) as err:
            # A full or read-only file system: atomic_path has already removed the partial
            # temporary, and the previous checkpoints were never touched. torch.save reports a
            # failed write as a RuntimeError from its C++ stream ("iostream error"), so the
            # free space is what tells the user why.
            detail = (err.strerror if isinstance(err, OSError) and err.strerror
                      else str(err).splitlines()[0] if str(err) else type(err).__name__)
            free = shutil.disk_usage(self.directory).free
            raise CheckpointError(f"{self.path(step)}: cannot write the checkpoint ({detail}; "
                                  f"{free / 2**20:.0f} MiB free there); the previous "
                                  "checkpoints are intact") from None
        for _, old in step_checkpoints(self.directory)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def _remove_stale_temporaries(self) -> None:
        # A writer killed mid-save leaves its temporary (hundreds of MB) behind; a later run in
        # the same folder is the first to know it is stale.
        for p in self.directory.iterdir():
            if _TEMP_FILE.match(p.name):
                log.warning("removing %s, left by a checkpoint write that did not finish", p)
                p.unlink(missing_ok=True)


def _link_atomically(source: Path, dest: Path) -> None:
    """Make ``dest`` name the same file as ``source`` (a hard link: a checkpoint is hundreds
    of MB, so best.pt costs no second write), replacing ``dest`` atomically."""
    with atomic_path(dest, fsync=False) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links: copy instead
            shutil.copyfile(source, tmp)


def rng_state() -> dict[str, Any]:
    """Every random generator the training uses, as tensors (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": int(py_version),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s generators (its tensors may be on any device)."""
    torch.set_rng_state(state["torch"].cpu())
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class CheckpointManager:
    """A run's policy over its checkpoints: where it resumes from and whether it may, when a
    step is saved, which checkpoint is best, and that no broken model is ever saved.

    Built on every rank over the run's model, optimizer, scheduler and scaler; only rank 0's
    saver writes. ``plan`` (a :class:`climseg.plan.RunPlan`) is the launch the run is on now.
    """

    def __init__(self, plan, *, model, optimizer, scheduler, scaler):
        cfg = plan.config
        self.plan = plan
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.every = cfg.train.save_frequency
        self.interval_s = cfg.train.save_interval_minutes * 60
        self.save_best = cfg.train.save_best
        self.saves = 0  # checkpoints written by this run: the same count on every rank
        self._saves_at_vote = self._saves_at_read = 0
        self.saved_step: int | None = None  # the step of the last one
        self.last_save_time = time.monotonic()
        # Writes nothing until the resume is checked (resume): a refused resume leaves
        # output_dir as it was, a dead writer's temporaries included.
        self.saver = CheckpointSaver(cfg.output_dir, cfg.train.keep_checkpoints, enabled=False)
        self.resumed_from: Path | None = None
        self.identity: dict[str, Any] = {}  # what a resume must match (resume sets it)
        self.grid: dict[str, list[float]] | None = None  # the data's grid (resume sets it)

    def follow(self, plan, fingerprint: dict[str, str],
               grid: dict[str, list[float]] | None = None) -> None:
        """The ranks changed (elastic): the new launch, and rank 0 may be another process,
        perhaps one that joined since the resume (so the identity its checkpoints record)."""
        self.plan, self.grid = plan, grid
        self.saver.enabled = dist.is_primary()
        self.identity = run_identity(plan.config.to_dict(), fingerprint)

    def path(self, step: int) -> Path:
        return self.saver.path(step)

    def due(self, progress: Progress, last_eval: dict[str, Any]) -> bool:
        """Whether to save after this step: one of ``train.save_frequency``'s (the final one is
        saved too), or a better validation (:meth:`improves`)."""
        return ((bool(self.every) and progress.step % self.every == 0)
                or self.improves(progress, last_eval))

    def improves(self, progress: Progress, last_eval: dict[str, Any]) -> bool:
        """Whether ``train.save_best`` asks for a checkpoint now: this step's validation beats
        every one before (the same on every rank: the scores are reduced over ranks)."""
        return (self.save_best and last_eval.get("step") == progress.step
                and last_eval["mean_iou"] > progress.best_iou)

    def cast_time_vote(self) -> bool:
        """This rank's vote at a step boundary on "``train.save_interval_minutes`` have passed
        since the last save": rank 0's clock decides (the others say no), and the stop vote,
        which carries it, makes its answer every rank's one boundary later."""
        self._saves_at_read, self._saves_at_vote = self._saves_at_vote, self.saves
        return (dist.is_primary() and self.interval_s > 0
                and time.monotonic() - self.last_save_time >= self.interval_s)

    def time_voted(self, voted: bool) -> bool:
        """Whether to save on the vote just read (``voted``: some rank said due when it was
        cast): not if a checkpoint was written since the cast. Every rank counts the same
        saves, so all decide alike."""
        return voted and self.saves == self._saves_at_read

    # -- save ------------------------------------------------------------------------------
    def state_dict(self, progress: Progress) -> dict[str, Any]:
        """What a checkpoint holds; a collective (every rank's RNG state goes into it)."""
        rng = dist.allgather_object(rng_state(), name="rng_state")
        return training_state(model=self.model, optimizer=self.optimizer,
                              scheduler=self.scheduler, scaler=self.scaler, progress=progress,
                              rng=rng, config=self.plan.config.to_dict(), identity=self.identity,
                              grid=self.grid)

    def save(self, progress: Progress, last_eval: dict[str, Any], monitor) -> None:
        """A checkpoint of this step (a collective); best.pt follows it when this step's
        validation (``last_eval``) is the best so far. The caller has checked the steps'
        health; the weights themselves are checked here (identical on every rank, so every
        rank agrees). A step already saved is written again only if its own validation came
        after and improved (the checkpoint must record it, and best.pt name it)."""
        # NaN compares False: a broken evaluation never becomes best.pt.
        is_best = (last_eval.get("step") == progress.step
                   and last_eval["mean_iou"] > progress.best_iou)
        if self.saved_step == progress.step and not is_best:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in self.model.state_dict().values()
                              if v.is_floating_point()]).all().item()
        if not finite:
            raise DivergenceError(f"training diverged at step {progress.step}: the model's "
                                  "weights hold NaN/inf; no checkpoint written")
        if is_best:  # counted before the state is taken, so the checkpoint knows it
            progress.best_iou = last_eval["mean_iou"]
        monitor.save_start(progress.epoch, progress.step)
        state = self.state_dict(progress)
        monitor.saved(progress.epoch, progress.step,
                      self.saver.save(state, progress.step, is_best))
        self.saves += 1
        self.saved_step = progress.step
        self.last_save_time = time.monotonic()

    # -- resume ----------------------------------------------------------------------------
    def resume(self, fingerprint: dict[str, str],
               grid: dict[str, list[float]] | None = None) -> Progress:
        """Where the run starts: ``resume`` (none | auto | a path) read by rank 0, checked
        against this run (its config and the data's ``fingerprint``) and loaded, its contents
        sent to every rank by broadcast, so that only rank 0 needs to see ``output_dir``. A
        collective; ``resumed_from`` names the file. A run that does not continue the run
        whose checkpoints output_dir holds is refused. Nothing is written before these
        checks; after them, with ``overwrite``, the folder's previous run is moved aside.
        ``grid``: the data's grid, which the checkpoints record."""
        cfg, self.grid = self.plan.config, grid
        self.identity = run_identity(cfg.to_dict(), fingerprint)
        path = meta = None
        with every_rank_agrees("resume"):
            if dist.is_primary():
                refuse_another_run(cfg)
                # Loaded on the CPU: each object moves its tensors to its own device, and the
                # RNG states must stay on the CPU.
                found = load_resume(cfg.resume, cfg.output_dir)
                if found is not None:
                    path, state = found
                    self.check_resumable(path, state)
                    meta = self._restore_primary(path, state)
                    del state
                if cfg.overwrite:  # the checks passed: the old run goes aside
                    move_aside(cfg.output_dir, keep=(LOCK_NAME,))
                self.saver = CheckpointSaver(cfg.output_dir, cfg.train.keep_checkpoints)
        path = dist.broadcast_object(path, name="resume_path")
        if path is None:
            # A fresh model: its initialisation differs by rank only if seeding does, but
            # this makes it certain.
            dist.broadcast_training_state(self.model)
            return Progress()
        meta = dist.broadcast_object(meta, name="resume_meta")
        dist.broadcast_training_state(self.model, self.optimizer)
        if not dist.is_primary():
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.scaler is not None and meta["scaler"] is not None:
                self.scaler.load_state_dict(meta["scaler"])
        rngs = meta["rng"]
        set_rng_state(rngs[dist.rank()] if len(rngs) == self.plan.world_size else rngs[0])
        self.resumed_from = path
        return Progress(**meta["progress"])

    def _restore_primary(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 loads ``state`` (from ``path``); returns what the other ranks need of it."""
        try:
            restore_training_state(state, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, scaler=self.scaler)
        except CheckpointError as err:
            raise CheckpointError(f"resume: {path}: {err}") from None
        progress = progress_of(state)
        # Micro-batches into the epoch, counted with the accumulation of the run that wrote
        # the checkpoint (elastic runs change it with the rank count).
        accum = self.plan.accumulation
        then = state["config"].get("train", {}).get("gradient_accumulation", accum)
        progress.batch_in_epoch = progress.batch_in_epoch // then * accum
        return {"rng": state["rng"], "scheduler": self.scheduler.state_dict(),
                "scaler": state["scaler"], "progress": asdict(progress)}

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, data set or optimizer (:mod:`climseg.identity`),
        or whose run would not continue with the same data order: each rank shuffles its own
        files[r::n], so another rank count (or another per-rank batch) draws a different
        global order, and the losses would silently differ from the run's."""
        check_identity(path, state, self.identity)
        t = state["config"].get("train", {})
        now_t = self.plan.config.train
        if now_t.elastic or t.get("elastic"):
            # An elastic run's order depends only on the global batch, not on the ranks.
            then = (t.get("elastic", False), t.get("global_batch_size"), t.get("local_batch_size"))
            now = (now_t.elastic, now_t.global_batch_size, now_t.local_batch_size)
            if then != now:
                raise CheckpointError(
                    f"{path}: written with train.elastic={then[0]} train.global_batch_size="
                    f"{then[1]} train.local_batch_size={then[2]}, this run has {now[0]}, "
                    f"{now[1]}, {now[2]}: the data order would change and the run would not "
                    "continue; resume with the checkpoint's values, or start a new run "
                    "(resume=none, another output_dir)")
            return
        then = (world_size_of(state), t.get("local_batch_size"), t.get("gradient_accumulation"))
        now = (self.plan.world_size, now_t.local_batch_size, self.plan.accumulation)
        if then != now:
            raise CheckpointError(
                f"{path}: written by {then[0]} rank(s) x train.local_batch_size={then[1]} x "
                f"train.gradient_accumulation={then[2]}, this run has {now[0]} x {now[1]} x "
                f"{now[2]}: each rank shuffles its own files[rank::ranks], so the data order "
                f"would change and the run would not continue; resume on {then[0]} rank(s) "
                f"with train.local_batch_size={then[1]} train.gradient_accumulation={then[2]}, "
                "or start a new run (resume=none, another output_dir)")
