"""The run plan: what follows from the config and the launch, checked once before anything is
built.

:func:`plan_run` is the one place that checks what needs the launch (the rank count, the
launcher's mode): the elastic launch against ``train.elastic``, the accumulation that keeps an
elastic run's global batch, the batch-norm group against the ranks, the global batch. The
builders and the trainer take the plan and never check or change the config themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from climseg.batchnorm import resolve_group_size
from climseg.config import Config, ConfigError


@dataclass(frozen=True)
class RunPlan:
    """One launch of a run: the rank count and what it decides.

    ``config`` is a resolved copy of the user's config (which stays as it was): its
    ``train.gradient_accumulation`` is the one this launch runs with, and ``data.stats_file``
    is absolute (evaluate and predict read it from the checkpoint, perhaps from another
    working directory). Checkpoints, ``config.yaml`` and the reports record this copy."""

    config: Config
    world_size: int
    accumulation: int          # micro-batches per optimizer step
    global_batch: int          # samples per optimizer step, all ranks
    batchnorm_group_size: int  # ranks sharing batch-norm statistics, resolved


def plan_run(cfg: Config, world_size: int, elastic_launch: bool = False) -> RunPlan:
    """The plan of ``cfg`` on ``world_size`` ranks; a ConfigError naming the key when the
    launch does not fit it. ``elastic_launch``: horovodrun started the job in elastic mode."""
    t = cfg.train
    if elastic_launch and not t.elastic:
        raise ConfigError("train.elastic: horovodrun started this job in elastic mode "
                          "(--min-np/--max-np/--host-discovery-script); set "
                          "train.elastic=true, or launch with -np and -H")
    accumulation = cfg.elastic_accumulation(world_size) if t.elastic else t.gradient_accumulation
    try:
        group = resolve_group_size(t.batchnorm_group_size, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolved = copy.deepcopy(cfg)
    resolved.train.gradient_accumulation = accumulation
    resolved.data.stats_file = str(cfg.data.stats_path.resolve())
    return RunPlan(resolved, world_size, accumulation, resolved.global_batch(world_size), group)
