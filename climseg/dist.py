"""The one place that knows about Horovod (and MPI).

Everything here works unchanged in a plain single process: ``rank()`` is 0, ``size()`` is 1 and
the collectives return their input. Under ``horovodrun`` or ``srun`` (with a Horovod built with
MPI) :func:`init` starts Horovod and the same calls become collectives over all ranks.

The rest of the package never imports Horovod or mpi4py: wrapping the optimizer, the process
sets that batch-norm groups reduce over (:mod:`climseg.batchnorm` converts the layers),
broadcasting the training state and the synchronise/skip-synchronise recipe of Horovod's
``DistributedOptimizer`` are all here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

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
    # Dynamic process sets: batch-norm groups (climseg.batchnorm) are added once the config
    # is known, after init.
    hvd.init(process_sets="dynamic")
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


def allgather_object(obj: Any, name: str = "gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if size() == 1:
        return [obj]
    return _hvd.allgather_object(obj, name=name)


class AnyRankPoll:
    """A vote of small integer flags summed over ranks, read one call late so that nobody waits:
    :meth:`exchange` returns the sums of the flags given at the previous call (None at the
    first) and starts the next vote with ``flags``. Every rank must call it at the same points.

    Started with Horovod's asynchronous allreduce, it completes during the next training step;
    a blocking allreduce at every step would cost a full Horovod cycle instead."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None
        self._local: list[int] | None = None

    def exchange(self, flags: list[int]) -> list[int] | None:
        previous = self._take()
        tensor = torch.tensor(flags, dtype=torch.int32)
        if size() == 1:
            self._local = flags
        else:
            self._handle = _hvd.allreduce_async(tensor, op=_hvd.Sum, name=self.name)
        return previous

    def _take(self) -> list[int] | None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            return [int(v) for v in _hvd.synchronize(handle).tolist()]
        local, self._local = self._local, None
        return local

    def drain(self) -> None:
        """Finish a vote still in flight (at the end of a run), discarding it."""
        try:
            self._take()
        except Exception:  # noqa: BLE001  Horovod already shut down by another rank's failure
            self._handle = None


def is_shutdown_error(err: BaseException) -> bool:
    """Whether ``err`` is Horovod telling this rank that another rank has gone (so the run
    ended there, with that rank's own error)."""
    if _hvd is None:
        return False
    from horovod.common.exceptions import HorovodInternalError

    return isinstance(err, HorovodInternalError) or "has been shut down" in str(err)


# -- training: the model and optimizer meet Horovod only here --------------------------------

def wrap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                   compression: str = "none",
                   backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
    """Horovod's ``DistributedOptimizer`` around ``optimizer`` (allreduce of the gradients
    inside ``step()``); the optimizer itself in a single process."""
    if _hvd is None:
        return optimizer
    codecs = {"none": _hvd.Compression.none, "fp16": _hvd.Compression.fp16}
    return _hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=codecs[compression],
        backward_passes_per_step=backward_passes_per_step)


_GROUPS: dict[tuple[int, ...], Any] = {}  # Horovod refuses to add the same process set twice


def rank_group(group_size: int) -> Any:
    """A handle for collectives over this rank's group of ``group_size`` consecutive ranks
    (ranks 0..N-1, N..2N-1, ...), for :func:`group_allreduce_sum`; None in a single process.

    A collective itself: every rank must call it with the same size, since Horovod adds every
    group on every rank.
    """
    if _hvd is None:
        return None
    world = size()
    if world % group_size:
        raise ValueError(f"{group_size} ranks per group do not divide {world} ranks")
    if group_size == world:
        return _hvd.global_process_set
    mine = None
    for first in range(0, world, group_size):
        ranks = tuple(range(first, first + group_size))
        if ranks not in _GROUPS:
            _GROUPS[ranks] = _hvd.add_process_set(list(ranks))
        if rank() in ranks:
            mine = _GROUPS[ranks]
    return mine


def group_allreduce_sum(tensor: torch.Tensor, group: Any, name: str) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (from :func:`rank_group`), differentiable:
    the gradient of the sum is the sum of the gradients over the group. Identity for None."""
    if group is None:
        return tensor
    return _hvd.allreduce(tensor, op=_hvd.Sum, process_set=group, name=name)


def broadcast_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                             root: int = 0) -> None:
    """Rank ``root``'s parameters, buffers and (when given) optimizer state on every rank."""
    if size() == 1:
        return
    if optimizer is not None:
        # Order matters: broadcast_optimizer_state may take a zero-gradient step on ranks whose
        # optimizer is still empty, so the parameters are broadcast after it.
        _hvd.broadcast_optimizer_state(optimizer, root_rank=root)
    _hvd.broadcast_parameters(model.state_dict(), root_rank=root)


def _reduces_in_step(optimizer) -> bool:
    # Horovod's DistributedOptimizer is a dynamically made subclass of the wrapped optimizer;
    # these two methods are what tell it apart.
    return hasattr(optimizer, "synchronize") and hasattr(optimizer, "skip_synchronize")


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Finish the gradient allreduce now, so gradients can be unscaled or clipped before
    ``step()``; a no-op for a plain optimizer."""
    if _reduces_in_step(optimizer):
        optimizer.synchronize()


def skip_synchronize(optimizer: torch.optim.Optimizer):
    """Context for the ``step()`` that follows :func:`synchronize`: no second allreduce."""
    if _reduces_in_step(optimizer):
        return optimizer.skip_synchronize()
    return contextlib.nullcontext()


def set_accumulation(optimizer: torch.optim.Optimizer, passes: int) -> None:
    """Change how many backward passes Horovod's optimizer accumulates before it reduces
    (elastic runs, when the rank count changes); nothing for a plain optimizer."""
    if hasattr(optimizer, "set_backward_passes_per_step"):
        optimizer.set_backward_passes_per_step(passes)


# -- Horovod elastic ---------------------------------------------------------------------------

def elastic_launch() -> bool:
    """Whether ``horovodrun`` started this process in elastic mode (--min-np/--max-np or
    --host-discovery-script): it sets HOROVOD_ELASTIC=1 in the ranks' environment."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


class Elastic:
    """Horovod elastic around a training loop, with the trainer's own state handling.

    ``save`` keeps a copy of the state in memory (a commit), ``restore`` goes back to it after a
    rank failed, ``sync`` sends rank 0's state to every rank (after each reset, and at the start
    so that a rank that joins later receives the live state). :meth:`run` calls ``body`` and,
    when a rank is lost or one joins, restores/re-initialises Horovod/syncs and calls it again.
    Not launched elastic (or without Horovod) it simply calls ``body``, and commits do nothing."""

    def __init__(self, save: Callable[[], None], restore: Callable[[], None],
                 sync: Callable[[], None]):
        self._save, self._restore, self._sync = save, restore, sync
        self._state = None
        if _hvd is not None:
            from horovod.common.elastic import State

            outer = self

            class _State(State):
                def save(self):
                    outer._save()

                def restore(self):
                    outer._restore()

                def sync(self):
                    outer._sync()

            self._state = _State(bcast_object=_hvd.broadcast_object, get_rank=_hvd.rank)

    @property
    def active(self) -> bool:
        """Whether a lost rank is survived: Horovod runs and horovodrun launched elastic."""
        return self._state is not None and elastic_launch()

    def save(self) -> None:
        """Keep a copy of the state to roll back to; nothing where no roll-back can happen."""
        if self.active:
            self._save()

    def commit(self) -> None:
        """Save the state; raises Horovod's HostsUpdatedInterrupt (all ranks at once) when
        hosts were added or removed, which :meth:`run` answers with a reset. A collective;
        nothing where no roll-back can happen."""
        if self.active:
            self._state.commit()

    def run(self, body: Callable[[], Any]) -> Any:
        if not self.active:
            self._sync()
            return body()
        self._save()  # something to roll back to before the first commit
        import horovod.torch.elastic as hvd_elastic

        return hvd_elastic.run(lambda state: body())(self._state)


# -- numpy reductions for the data tools (mpi4py or Horovod) -----------------------------------

# Reduces an array over all ranks elementwise with op 'sum', 'min' or 'max'.
ArrayReducer = Callable[[np.ndarray, str], np.ndarray]


def _no_reduce(values: np.ndarray, op: str) -> np.ndarray:
    return values


def _mpi_reducer() -> tuple[int, int, ArrayReducer]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    ops = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}

    def reduce(values: np.ndarray, op: str) -> np.ndarray:
        out = np.empty_like(values)
        comm.Allreduce(values, out, op=ops[op])
        return out

    return comm.Get_rank(), comm.Get_size(), reduce


def _horovod_reducer() -> tuple[int, int, ArrayReducer]:
    init()

    def reduce(values: np.ndarray, op: str) -> np.ndarray:
        if op == "sum":
            t = torch.from_numpy(np.ascontiguousarray(values, np.float64))
            return allreduce_sum(t, name="array_sum").numpy()
        # min/max through an allgather of the small per-rank vectors.
        gathered = np.stack(allgather_object(values, name=f"array_{op}"))
        return gathered.min(axis=0) if op == "min" else gathered.max(axis=0)

    return rank(), size(), reduce


def array_reducer(expected_size: int,
                  environ: dict[str, str] | None = None) -> tuple[int, int, ArrayReducer]:
    """(rank, size, reduce) for a launch of ``expected_size`` ranks, for tools that need a
    reduction but not a training run (``summarize``).

    One rank: no communication. Several: Horovod first under horovodrun (it sets
    HOROVOD_RANK), mpi4py first otherwise (mpirun, srun with PMI); the first communicator that
    spans all the ranks is used. RuntimeError with one line when none does.
    """
    if expected_size == 1:
        return 0, 1, _no_reduce
    env = os.environ if environ is None else environ
    order = ((_horovod_reducer, _mpi_reducer) if "HOROVOD_RANK" in env
             else (_mpi_reducer, _horovod_reducer))
    tried = []
    for make in order:
        name = make.__name__.strip("_").replace("_reducer", "")
        try:
            r, world, reduce = make()
        except (ImportError, RuntimeError) as err:
            tried.append(f"{name}: {err}")
            continue
        if world == expected_size:
            return r, world, reduce
        tried.append(f"{name}: sees {world} rank(s)")
    raise RuntimeError(f"launched as {expected_size} ranks but no communicator spans them "
                       f"({'; '.join(tried)})")
