"""The torch.distributed engine (``dist.engine: torch``): NCCL on CUDA, Gloo on CPU, started by
torchrun or by a plain srun (no MPI). Only :mod:`climseg.dist` calls this module; it is the one
place that imports ``torch.distributed``.

Gradients are averaged by DistributedDataParallel rather than by hooks of our own: DDP's
reducer starts each bucket's allreduce as soon as backward has produced its gradients (the
overlap Horovod's hooks give), its ``no_sync`` accumulates micro-batches without
communication, and its communication hooks give fp16 compression; it is the code path every
published DeepCAM submission runs, and the one NCCL is tuned for.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

NAME = "torch"

# Rendezvous under srun without torchrun: a port derived from the job id, so that two jobs
# sharing a first node do not collide (MASTER_PORT, when set, wins).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 29500, 20000

LAUNCH_HINT = ("launch the torch engine with torchrun (torchrun --nproc_per_node N -m "
               "climseg.train ...) or a plain srun (srun -n N climseg train ...)")

_state = {"size": 1, "rank": 0, "local_rank": 0, "local_size": 1, "device": None}


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[03-05,9],gpu1`` gives ``node03``."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist.strip())
    if not match:
        raise RuntimeError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def rendezvous(env: dict[str, str]) -> tuple[str, int, int, int, int] | None:
    """(init_method, rank, size, local_rank, local_size or 0 when unknown) from torchrun's or
    Slurm's variables; None for neither (one process, or a launcher the engine does not know)."""
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env and "WORLD_SIZE" in env:
        return ("env://", int(env["RANK"]), int(env["WORLD_SIZE"]),
                int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
        host = env.get("MASTER_ADDR") or _first_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or
                   SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN)
        return (f"tcp://{host}:{port}", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", "0")), 0)
    return None


def init(launched: int) -> None:
    """Join the process group the launcher set up; ``launched`` is the rank count any known
    launcher's variables give (launcher_rank_size). One process: no group at all."""
    found = rendezvous(os.environ)
    if found is None or found[2] == 1:
        if launched > 1:
            raise RuntimeError(f"dist.engine=torch: launched as {launched} ranks by a launcher "
                               f"the torch engine does not read (mpirun or horovodrun?); "
                               + LAUNCH_HINT)
        return
    method, rank, world, local, local_world = found
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    try:
        tdist.init_process_group("nccl" if cuda else "gloo", init_method=method, rank=rank,
                                 world_size=world, timeout=datetime.timedelta(minutes=10))
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(f"dist.engine=torch: the process group did not start at {method} "
                           f"({' '.join(str(err).split())[:300]}); " + LAUNCH_HINT) from None
    # Tear the group down before the interpreter does: a Gloo group left to static destruction
    # can abort the process ("terminate called without an active exception", SIGABRT) when the
    # peer has already closed its sockets, which turns a finished run into a failed one.
    atexit.register(_destroy)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    _state.update(size=world, rank=rank, local_rank=local, device=device)
    if not local_world:  # srun: count the ranks on this host
        hosts = allgather_object(os.uname().nodename, "hosts")
        local_world = hosts.count(os.uname().nodename)
    _state["local_size"] = local_world


def _destroy() -> None:
    # The batch-norm groups too: a group still referenced here outlives destroy_process_group
    # and meets the same static destruction (seen: 1 abort in 15 runs of group_batchnorm.py).
    _GROUPS.clear()
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    return _state["rank"]


def size() -> int:
    return _state["size"]


def local_rank() -> int:
    return _state["local_rank"]


def local_size() -> int:
    return _state["local_size"]


def _to_comm(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` on the device the backend reduces on (NCCL: this rank's GPU)."""
    return tensor.detach().to(_state["device"], copy=True)


def allreduce_sum(tensor: torch.Tensor, name: str | None) -> torch.Tensor:
    out = _to_comm(tensor)
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast_object(obj: Any, root: int, name: str) -> Any:
    box = [obj]
    tdist.broadcast_object_list(box, src=root)
    return box[0]


def allgather_object(obj: Any, name: str) -> list[Any]:
    out = [None] * size()
    tdist.all_gather_object(out, obj)
    return out


def start_sum(tensor: torch.Tensor, name: str):
    out = _to_comm(tensor)
    return out, tdist.all_reduce(out, op=tdist.ReduceOp.SUM, async_op=True)


def wait_sum(handle) -> torch.Tensor:
    out, work = handle
    work.wait()
    return out.cpu()


def is_shutdown_error(err: BaseException) -> bool:
    # Gloo/NCCL report a peer that went away as DistBackendError/DistNetworkError (DistError).
    text = str(err)
    return isinstance(err, tdist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "NCCL communicator was aborted"))


# -- training ----------------------------------------------------------------------------------

def wrap_model(model: nn.Module, compression: str) -> nn.Module:
    device_ids = [_state["device"].index] if _state["device"].type == "cuda" else None
    # broadcast_buffers off: batch-norm running statistics are averaged before each validation
    # (engine.average_batchnorm_stats), as under Horovod, not overwritten by rank 0's.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                              broadcast_buffers=False)
    if compression == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


def no_sync(model: nn.Module):
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *, compression: str,
                   backward_passes_per_step: int) -> torch.optim.Optimizer:
    return optimizer  # DDP (wrap_model) reduces during backward


_GROUPS: dict[int, Any] = {}


def rank_group(group_size: int) -> Any:
    """This rank's group from ``new_group`` (made for every group on every rank, as new_group
    requires), a communicator of its own even for all ranks: batch-norm sums then never
    interleave with DDP's bucket allreduces on the world group."""
    if group_size not in _GROUPS:
        mine = None
        for first in range(0, size(), group_size):
            ranks = list(range(first, first + group_size))
            group = tdist.new_group(ranks)
            if rank() in ranks:
                mine = group
        _GROUPS[group_size] = mine
    return _GROUPS[group_size]


def group_allreduce_sum(tensor: torch.Tensor, group: Any, name: str) -> torch.Tensor:
    # Differentiable: its backward is the allreduce (sum) of the gradients over the group.
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=tdist.ReduceOp.SUM, group=group)


def broadcast_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             root: int) -> None:
    for value in model.state_dict().values():
        comm = _to_comm(value)
        tdist.broadcast(comm, src=root)
        with torch.no_grad():
            value.copy_(comm)
    if optimizer is not None:
        # The optimizer state as a whole (tensors included) through one pickled broadcast:
        # ranks that have not stepped hold no state, and load_state_dict moves it to the
        # parameters' device.
        state = broadcast_object(optimizer.state_dict() if rank() == root else None, root,
                                 "optimizer_state")
        if rank() != root:
            optimizer.load_state_dict(state)


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Nothing: DDP's backward has already averaged the gradients."""


def skip_synchronize(optimizer: torch.optim.Optimizer):
    return contextlib.nullcontext()


def set_accumulation(optimizer: torch.optim.Optimizer, passes: int) -> None:
    """Nothing: accumulation is :func:`no_sync` around the passes that only accumulate."""
