"""The one place that knows how ranks talk to each other: a small interface over two engines.

``dist.engine: horovod`` (the default, :mod:`climseg.dist.horovod_engine`) runs under
``horovodrun`` or ``srun`` with an MPI-built Horovod; ``dist.engine: torch``
(:mod:`climseg.dist.torch_engine`) runs ``torch.distributed`` (NCCL on CUDA, Gloo on CPU) under
``torchrun`` or a plain ``srun``. Nothing outside this package imports either engine, Horovod or
``torch.distributed``.

Everything here works unchanged in a plain single process, before or without :func:`init`:
``rank()`` is 0, ``size()`` is 1 and the collectives return their input. Wrapping the optimizer
and the model, the process sets that batch-norm groups reduce over (:mod:`climseg.batchnorm`
converts the layers) and broadcasting the training state are all here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from climseg.config import ENGINES

_MODULES = {"horovod": "climseg.dist.horovod_engine", "torch": "climseg.dist.torch_engine"}

_engine = None  # the engine module once init() has started it (it may still be one process)

# Launcher variables, most specific first: (rank, size, local rank, local size).
_LAUNCHER_VARS = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # torchrun (it sets TORCHELASTIC_RUN_ID too); after MPI's, which never set these.
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def launcher_rank_size(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, size, local_rank) from the launcher's environment, without starting an engine.

    Reads horovodrun (Gloo), Open MPI, MPICH/PMI, torchrun and Slurm variables, in that order.
    Tools that need no collective (stage_data) use this so that they run under any launcher.
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


def torchrun_launch(environ: dict[str, str] | None = None) -> bool:
    """Whether torchrun (torch.distributed.run) started this process."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env and "RANK" in env and "WORLD_SIZE" in env


def _auto_engine() -> str:
    """The engine a tool without a config uses: the launcher's (torchrun: torch, horovodrun:
    horovod), else Horovod where it is installed, else torch."""
    if torchrun_launch():
        return "torch"
    if "HOROVOD_RANK" in os.environ:
        return "horovod"
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return "torch"
    return "horovod"


def init(engine: str | None = None) -> None:
    """Start ``engine`` (``horovod`` or ``torch``; None: the launcher's, see
    :func:`_auto_engine`). Several ranks become collectives; one process stays one process.
    RuntimeError with one line when the engine cannot start (not installed, a launch it does
    not know); calling it again with the same engine does nothing."""
    global _engine
    engine = engine or (_engine.NAME if _engine is not None else _auto_engine())
    if engine not in ENGINES:
        raise RuntimeError(f"dist.engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if _engine is not None:
        if _engine.NAME != engine:
            raise RuntimeError(f"dist.engine: {_engine.NAME} already runs in this process, "
                               f"{engine} cannot start beside it")
        return
    module = importlib.import_module(_MODULES[engine])
    module.init(launcher_rank_size()[1])
    _engine = module


def engine_name() -> str | None:
    """The running engine's name, None before :func:`init`."""
    return None if _engine is None else _engine.NAME


def horovod():
    """The horovod.torch module when the Horovod engine is running, else None."""
    return _engine.module() if _engine is not None and _engine.NAME == "horovod" else None


def _multi() -> bool:
    return _engine is not None and _engine.size() > 1


def rank() -> int:
    return _engine.rank() if _engine is not None else 0


def size() -> int:
    return _engine.size() if _engine is not None else 1


def local_rank() -> int:
    return _engine.local_rank() if _engine is not None else 0


def local_size() -> int:
    """Ranks on this node."""
    return _engine.local_size() if _engine is not None else 1


def is_primary() -> bool:
    return rank() == 0


def allreduce_sum(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input is left unchanged)."""
    if not _multi():
        return tensor.clone()
    return _engine.allreduce_sum(tensor, name)


def start_sum(tensor: torch.Tensor, name: str):
    """Start summing ``tensor`` over all ranks; :func:`wait_sum` of the handle gives the sum
    (one process: the tensor itself)."""
    return _engine.start_sum(tensor, name) if _multi() else tensor


def wait_sum(handle) -> torch.Tensor:
    return _engine.wait_sum(handle) if _multi() else handle


def allreduce_mean_(tensors: list[torch.Tensor], name: str = "mean") -> None:
    """Average ``tensors`` in place over ranks with one grouped allreduce."""
    if not _multi() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    flat = _engine.allreduce_sum(flat, name) / size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def broadcast_object(obj: Any, root: int = 0, name: str = "object") -> Any:
    """Rank ``root``'s ``obj`` on every rank (pickled; for small control data only)."""
    if not _multi():
        return obj
    return _engine.broadcast_object(obj, root, name)


def allgather_object(obj: Any, name: str = "gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _multi():
        return [obj]
    return _engine.allgather_object(obj, name)


class AnyRankPoll:
    """A vote of small integer flags summed over ranks, read one call late so that nobody waits:
    :meth:`exchange` returns the sums of the flags given at the previous call (None at the
    first) and starts the next vote with ``flags``. Every rank must call it at the same points.

    Started as an asynchronous allreduce (Horovod's, or ``torch.distributed``'s with
    ``async_op``), it completes during the next training step; a blocking allreduce at every
    step would cost a full round trip instead."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None
        self._local: list[int] | None = None

    def exchange(self, flags: list[int]) -> list[int] | None:
        previous = self.take()
        if not _multi():
            self._local = flags
        else:
            self._handle = _engine.start_sum(torch.tensor(flags, dtype=torch.int32), self.name)
        return previous

    def take(self) -> list[int] | None:
        """Wait for the vote in flight and return its sums (None if none is)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            return [int(v) for v in _engine.wait_sum(handle).tolist()]
        local, self._local = self._local, None
        return local

    def drain(self) -> None:
        """Finish a vote still in flight (at the end of a run), discarding it."""
        try:
            self.take()
        except Exception:  # noqa: BLE001  the engine already shut down by another rank's failure
            self._handle = None


def is_shutdown_error(err: BaseException) -> bool:
    """Whether ``err`` is the engine telling this rank that another rank has gone (so the run
    ended there, with that rank's own error)."""
    return _engine is not None and _engine.is_shutdown_error(err)


def shutdown_line() -> str:
    """What a rank says after :func:`is_shutdown_error`: it did not fail itself, and how long
    the engine waits for a rank that stops responding (the knob, where there is one)."""
    line = "stopped because another rank failed or stopped responding; its error, if any, is above"
    hint = getattr(_engine, "silent_peer_hint", None)
    return f"{line} ({hint()})" if hint else line


# -- training: the model and optimizer meet the engine only here -------------------------------

def wrap_model(model: nn.Module, compression: str = "none") -> nn.Module:
    """The module the training step calls: ``model`` itself under Horovod (it reduces in the
    optimizer), DistributedDataParallel under torch (it reduces during backward, with
    ``compression`` "fp16" as a communication hook). Keep the unwrapped ``model`` for state
    dicts: checkpoints hold no engine's wrapper."""
    if not _multi():
        return model
    return _engine.wrap_model(model, compression)


def no_sync(model: nn.Module):
    """Context for a backward pass whose gradients only accumulate (all micro-batches of a step
    but the last): no communication. Nothing under Horovod (its optimizer counts the passes)."""
    if not _multi():
        return contextlib.nullcontext()
    return _engine.no_sync(model)


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                   compression: str = "none",
                   backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
    """Horovod's ``DistributedOptimizer`` around ``optimizer`` (allreduce of the gradients
    inside ``step()``); the optimizer itself in a single process and under torch, where
    :func:`wrap_model` reduces."""
    if _engine is None:
        return optimizer
    # Horovod wraps even one rank: an elastic run that starts alone may grow.
    return _engine.wrap_optimizer(optimizer, model, compression=compression,
                                  backward_passes_per_step=backward_passes_per_step)


def rank_group(group_size: int) -> Any:
    """A handle for collectives over this rank's group of ``group_size`` consecutive ranks
    (ranks 0..N-1, N..2N-1, ...), for :func:`group_allreduce_sum`; None in a single process.

    A collective itself: every rank must call it with the same size, since every group is
    made on every rank.
    """
    if not _multi():
        return None
    world = size()
    if world % group_size:
        raise ValueError(f"{group_size} ranks per group do not divide {world} ranks")
    return _engine.rank_group(group_size)


def group_allreduce_sum(tensor: torch.Tensor, group: Any, name: str) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (from :func:`rank_group`), differentiable:
    the gradient of the sum is the sum of the gradients over the group. Identity for None."""
    if group is None:
        return tensor
    return _engine.group_allreduce_sum(tensor, group, name)


def broadcast_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                             root: int = 0) -> None:
    """Rank ``root``'s parameters, buffers and (when given) optimizer state on every rank."""
    if not _multi():
        return
    _engine.broadcast_training_state(model, optimizer, root)


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Finish the gradient allreduce now, so gradients can be unscaled or clipped before
    ``step()``; a no-op for a plain optimizer (and under torch, where backward reduced)."""
    if _engine is not None:
        _engine.synchronize(optimizer)


def skip_synchronize(optimizer: torch.optim.Optimizer):
    """Context for the ``step()`` that follows :func:`synchronize`: no second allreduce."""
    if _engine is not None:
        return _engine.skip_synchronize(optimizer)
    return contextlib.nullcontext()


def set_accumulation(optimizer: torch.optim.Optimizer, passes: int) -> None:
    """Change how many backward passes Horovod's optimizer accumulates before it reduces
    (elastic runs, when the rank count changes); nothing for a plain optimizer."""
    if _engine is not None:
        _engine.set_accumulation(optimizer, passes)


# -- Horovod elastic (Horovod only: train.elastic requires dist.engine=horovod) ----------------

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
        self._save, self._sync = save, sync
        hvd = horovod()
        self._state = None
        if hvd is not None:
            from climseg.dist.horovod_engine import elastic_state

            self._state = elastic_state(save, restore, sync)

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
        from climseg.dist.horovod_engine import elastic_run

        return elastic_run(self._state, body)


# -- numpy reductions for the data tools (mpi4py or an engine) ---------------------------------

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


def _engine_reducer(engine: str) -> Callable[[], tuple[int, int, ArrayReducer]]:
    def make() -> tuple[int, int, ArrayReducer]:
        init(engine)

        def reduce(values: np.ndarray, op: str) -> np.ndarray:
            if op == "sum":
                t = torch.from_numpy(np.ascontiguousarray(values, np.float64))
                return allreduce_sum(t, name="array_sum").numpy()
            # min/max through an allgather of the small per-rank vectors.
            gathered = np.stack(allgather_object(values, name=f"array_{op}"))
            return gathered.min(axis=0) if op == "min" else gathered.max(axis=0)

        return rank(), size(), reduce

    make.__name__ = f"_{engine}_reducer"
    return make


def array_reducer(expected_size: int,
                  environ: dict[str, str] | None = None) -> tuple[int, int, ArrayReducer]:
    """(rank, size, reduce) for a launch of ``expected_size`` ranks, for tools that need a
    reduction but not a training run (``summarize``).

    One rank: no communication. Several: torch.distributed under torchrun, Horovod first under
    horovodrun (it sets HOROVOD_RANK), mpi4py first otherwise (mpirun, srun with PMI); the
    first communicator that spans all the ranks is used. RuntimeError with one line when none
    does.
    """
    if expected_size == 1:
        return 0, 1, _no_reduce
    env = os.environ if environ is None else environ
    if torchrun_launch(env):
        order = (_engine_reducer("torch"),)
    elif "HOROVOD_RANK" in env:
        order = (_engine_reducer("horovod"), _mpi_reducer)
    else:
        order = (_mpi_reducer, _engine_reducer("horovod"))
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
