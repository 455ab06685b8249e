"""The Horovod engine (``dist.engine: horovod``): horovodrun with Gloo, or srun/mpirun with an
MPI-built Horovod. Only :mod:`climseg.dist` calls this module; it is the one place that imports
Horovod.

Gradients are averaged inside the optimizer's ``step()`` (Horovod's ``DistributedOptimizer``,
whose hooks start each allreduce during backward); accumulation is its
``backward_passes_per_step``; batch-norm groups are dynamic process sets.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn

NAME = "horovod"

_hvd = None  # the horovod.torch module once init() has started it

INSTALL_HINT = ("install it with `make install` (tools/install_horovod.sh), or use the torch "
                "engine: dist.engine=torch (climseg train --engine torch) under torchrun or srun")


def init(launched: int) -> None:
    """Start Horovod; ``launched`` is the rank count the launcher's variables give.

    A single process still starts it (size 1), so that the training code path is the same
    everywhere (and an elastic run may start alone and grow)."""
    global _hvd
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise RuntimeError(f"dist.engine=horovod but horovod.torch cannot be imported ({err}); "
                           + INSTALL_HINT) from None
    # Dynamic process sets: batch-norm groups (climseg.batchnorm) are added once the config
    # is known, after init.
    hvd.init(process_sets="dynamic")
    if launched > 1 and hvd.size() != launched:
        # e.g. srun starting a Horovod built without MPI, or torchrun: every task would train alone.
        raise RuntimeError(
            f"the launcher started {launched} ranks but Horovod sees {hvd.size()}: under srun or "
            "mpirun Horovod needs its MPI controller (horovodrun --check-build must list MPI; "
            "rebuild with tools/install_horovod.sh CLIMSEG_HOROVOD_MPI=1); under torchrun or a "
            "plain srun use dist.engine=torch")
    _hvd = hvd


def module():
    return _hvd


def rank() -> int:
    return _hvd.rank()


def size() -> int:
    return _hvd.size()


def local_rank() -> int:
    return _hvd.local_rank()


def local_size() -> int:
    return _hvd.local_size()


def allreduce_sum(tensor: torch.Tensor, name: str | None) -> torch.Tensor:
    return _hvd.allreduce(tensor, op=_hvd.Sum, name=name)


def broadcast_object(obj: Any, root: int, name: str) -> Any:
    return _hvd.broadcast_object(obj, root_rank=root, name=name)


def allgather_object(obj: Any, name: str) -> list[Any]:
    return _hvd.allgather_object(obj, name=name)


def start_sum(tensor: torch.Tensor, name: str):
    return _hvd.allreduce_async(tensor, op=_hvd.Sum, name=name)


def wait_sum(handle) -> torch.Tensor:
    return _hvd.synchronize(handle)


def silent_peer_hint() -> str:
    # A frozen rank (SIGSTOP, a hung node) makes a collective time out in Gloo; Horovod prints
    # that wait ("Timed out waiting ...") above, and the others only learn of a shutdown.
    seconds = os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "30")
    return (f"a rank silent for HOROVOD_GLOO_TIMEOUT_SECONDS={seconds} s ends the run: Horovod's "
            f"'Timed out waiting' line above says so; raise it in horovodrun's environment")


def is_shutdown_error(err: BaseException) -> bool:
    from horovod.common.exceptions import HorovodInternalError

    return isinstance(err, HorovodInternalError) or "has been shut down" in str(err)


# -- training ----------------------------------------------------------------------------------

def wrap_model(model: nn.Module, compression: str) -> nn.Module:
    return model  # Horovod reduces (and compresses) in the optimizer


def no_sync(model: nn.Module):
    return contextlib.nullcontext()  # the optimizer counts backward_passes_per_step


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *, compression: str,
                   backward_passes_per_step: int) -> torch.optim.Optimizer:
    codecs = {"none": _hvd.Compression.none, "fp16": _hvd.Compression.fp16}
    return _hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=codecs[compression],
        backward_passes_per_step=backward_passes_per_step)


_GROUPS: dict[tuple[int, ...], Any] = {}  # Horovod refuses to add the same process set twice


def rank_group(group_size: int) -> Any:
    world = size()
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
    # Horovod's allreduce is an autograd function: backward is the allreduce of the gradients.
    return _hvd.allreduce(tensor, op=_hvd.Sum, process_set=group, name=name)


def broadcast_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             root: int) -> None:
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
    if _reduces_in_step(optimizer):
        optimizer.synchronize()


def skip_synchronize(optimizer: torch.optim.Optimizer):
    if _reduces_in_step(optimizer):
        return optimizer.skip_synchronize()
    return contextlib.nullcontext()


def set_accumulation(optimizer: torch.optim.Optimizer, passes: int) -> None:
    if hasattr(optimizer, "set_backward_passes_per_step"):
        optimizer.set_backward_passes_per_step(passes)


# -- elastic -----------------------------------------------------------------------------------

def elastic_state(save: Callable[[], None], restore: Callable[[], None],
                  sync: Callable[[], None]):
    """A Horovod elastic State whose save/restore/sync are the trainer's."""
    from horovod.common.elastic import State

    class _State(State):
        def save(self):
            save()

        def restore(self):
            restore()

        def sync(self):
            sync()

    return _State(bcast_object=_hvd.broadcast_object, get_rank=_hvd.rank)


def elastic_run(state, body: Callable[[], Any]) -> Any:
    import horovod.torch.elastic as hvd_elastic

    return hvd_elastic.run(lambda s: body())(state)
