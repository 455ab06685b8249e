"""Checkpoints: atomic writes, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (see
docs/design.md). Files are written to a temporary name, fsynced and renamed, so a crash
mid-write leaves the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from climseg.atomic import atomic_path

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^ckpt-step(\d+)\.pt$")
BEST_NAME = "best.pt"


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


class CheckpointSaver:
    """Rank 0's checkpoint writer: ``ckpt-stepN.pt``, the newest ``keep`` of them kept, and
    ``best.pt`` for the best evaluation IoU seen. Other ranks hold ``None`` instead."""

    def __init__(self, directory: str | Path, keep: int, best_iou: float = float("-inf")):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.best_iou = best_iou

    def save(self, state: dict[str, Any], step: int, eval_iou: float | None = None) -> Path:
        path = save_checkpoint(state, self.directory / f"ckpt-step{step:08d}.pt")
        if eval_iou is not None and eval_iou > self.best_iou:
            self.best_iou = eval_iou
            _link_atomically(path, self.directory / BEST_NAME)
        for _, old in step_checkpoints(self.directory)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path


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
    torch.set_rng_state(state["torch"].cpu())
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
