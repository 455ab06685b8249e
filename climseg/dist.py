"""The one place that knows about Horovod.

Everything here works unchanged in a plain single process: ``rank()`` is 0, ``size()`` is 1 and
the collectives return their input. Under ``horovodrun`` or ``srun`` (with a Horovod built with
MPI) :func:`init` starts Horovod and the same calls become collectives over all ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_hvd = None  # the horovod.torch module once init() has started it

# Launcher variables, most specific first: (rank, size, local rank, local size).
_LAUNCHER_VARS = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def launcher_rank_size(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, size, local_rank) from the launcher's environment, without starting Horovod.

    Reads horovodrun (Gloo), Open MPI, MPICH/PMI and Slurm variables, in that order. Tools that
    need no collective (stage_data) use this so that they run under any launcher.
    """
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key, _ in _LAUNCHER_VARS:
        if rank_key in env and size_key in env:
            # A launcher may give rank and size but no local rank (srun --mpi=pmi2 sets no
            # MPI_LOCALRANKID): take it from whichever launcher variable has it.
            local_keys = [local_key] + [v[2] for v in _LAUNCHER_VARS if v[2] != local_key]
            local_raw = next((env[k] for k in local_keys if k in env), "0")
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
                local = int(local_raw.split("(")[0])
            except ValueError as err:
                raise RuntimeError(f"launcher variable {rank_key}/{size_key} is not an integer: {err}")
            if not 0 <= rank < size:
                raise RuntimeError(f"launcher variables give rank {rank} outside size {size}")
            return rank, size, local
    return 0, 1, 0


def _launched_multi() -> bool:
    return launcher_rank_size()[1] > 1


def init() -> None:
    """Start Horovod when launched as several ranks; otherwise stay single-process.

    A single process with Horovod installed still starts it (size 1), so that the training
    code path is the same everywhere.
    """
    global _hvd
    if _hvd is not None:
        return
    try:
        import horovod.torch as hvd
    except ImportError as err:
        if _launched_multi():
            raise RuntimeError(
                "launched as several ranks but horovod.torch cannot be imported "
                f"({err}); run tools/install_horovod.sh") from err
        return
    hvd.init()
    launched = launcher_rank_size()[1]
    if launched > 1 and hvd.size() != launched:
        # e.g. srun starting a Horovod built without MPI: every task would train alone.
        raise RuntimeError(
            f"the launcher started {launched} ranks but Horovod sees {hvd.size()}: under srun or "
            "mpirun Horovod needs its MPI controller (horovodrun --check-build must list MPI); "
            "rebuild with tools/install_horovod.sh CLIMSEG_HOROVOD_MPI=1")
    _hvd = hvd


def horovod():
    """The horovod.torch module when Horovod is running, else None."""
    return _hvd


def rank() -> int:
    return _hvd.rank() if _hvd is not None else 0


def size() -> int:
    return _hvd.size() if _hvd is not None else 1


def local_rank() -> int:
    return _hvd.local_rank() if _hvd is not None else 0


def local_size() -> int:
    """Ranks on this node."""
    return _hvd.local_size() if _hvd is not None else 1


def is_primary() -> bool:
    return rank() == 0


def allreduce_sum(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input is left unchanged)."""
    if size() == 1:
        return tensor.clone()
    return _hvd.allreduce(tensor, op=_hvd.Sum, name=name)


def allreduce_mean_(tensors: list[torch.Tensor], name: str = "mean") -> None:
    """Average ``tensors`` in place over ranks with one grouped allreduce."""
    if size() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    flat = _hvd.allreduce(flat, op=_hvd.Average, name=name)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def broadcast_object(obj: Any, root: int = 0, name: str = "object") -> Any:
    """Rank ``root``'s ``obj`` on every rank (pickled; for small control data only)."""
    if size() == 1:
        return obj
    return _hvd.broadcast_object(obj, root_rank=root, name=name)


def barrier() -> None:
    if size() > 1:
        _hvd.allreduce(torch.zeros(1), name="barrier")


def allgather_object(obj: Any, name: str = "gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if size() == 1:
        return [obj]
    return _hvd.allgather_object(obj, name=name)
