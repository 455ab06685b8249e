"""Checkpoints: what one holds, how a run is restored from it, and where files go.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from climseg.atomic import atomic_path

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
                   rng: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run needs, as a weights-only-loadable dict.

    ``model`` is the unwrapped model (no compile/DDP prefixes in its keys); ``rng`` holds one
    :func:`rng_state` per rank; ``config`` is the resolved config as a plain dict.
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
    }


def restore_training_state(state: dict[str, Any], *, model, optimizer, scheduler,
                           scaler) -> Progress:
    """Load ``state`` (from :func:`training_state`) into the run's objects; returns its
    :class:`Progress`. Tensors may be on the CPU: each object moves them where it keeps its own."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return progress_of(state)


def progress_of(state: dict[str, Any]) -> Progress:
    return Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["best_iou"],
                    state["validations"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


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
