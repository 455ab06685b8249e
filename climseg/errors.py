"""The errors a training run reports as one line and exit status 2.

They live in this low module so that the run's parts (checkpoints, the stop vote, divergence
health, the elastic driver) share them without importing one another.
"""

from __future__ import annotations

from climseg.config import ConfigError
from climseg.data.format import DataError
from climseg.runlock import RunLockError


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file."""


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient or weight: the run cannot go on; the message says where."""


class ReportError(OSError):
    """Rank 0 cannot write its reports (TensorBoard, metrics.jsonl, the MLPerf log): a full
    disk or a folder gone read-only; the message names the folder and the free space."""

    def __str__(self) -> str:
        return self.args[0]


class RunError(RuntimeError):
    """Another rank's one-line error, reported the same on every rank."""


# The errors a rank reports as one line and exit status 2.
RUN_ERRORS = (ConfigError, DataError, CheckpointError, RunLockError, ReportError)
