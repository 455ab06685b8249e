"""Divergence: the device-side record of non-finite steps, and the one-line error every rank
raises when the run has diverged."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from climseg import dist
from climseg.data.format import DataError, read_sample
from climseg.errors import DivergenceError

# fp16's GradScaler skips a step whose gradients overflow and halves its scale: normal now and
# then. This many skipped steps in a row (scale 2^16 -> 2^-4) means the run has diverged.
FP16_SKIP_LIMIT = 20


class StepFiles:
    """The input files of the last few steps on this rank, for a diverged run's report:
    ``record`` each step's place in its epoch's plan (``plan(epoch)``: the rank's (path, ...)
    entries in order), call with a step to get its files; cleared at each log step."""

    def __init__(self, plan: Callable[[int], list], batch_size: int):
        self.plan, self.batch_size = plan, batch_size
        self.where: dict[int, tuple[int, int, int]] = {}  # step -> epoch, first micro, micros

    def record(self, step: int, epoch: int, first: int, micro_batches: int) -> None:
        self.where[step] = (epoch, first, micro_batches)

    def clear(self) -> None:
        self.where.clear()

    def __call__(self, step: int) -> list[str]:
        found = self.where.get(step)
        if found is None:
            return []
        epoch, first, count = found
        size = self.batch_size
        return [entry[0] for entry in self.plan(epoch)[first * size:(first + count) * size]]


class Health:
    """Device-side record of non-finite steps, updated every step without a host sync; read
    where the loop synchronises anyway (log steps, validation, checkpoints).

    ``first`` holds the first step whose loss, and whose gradient norm (where the step
    computes one), was NaN/inf, and the first step at which the run counts as diverged: at
    once in fp32/bf16, after FP16_SKIP_LIMIT skipped steps in a row in fp16. 0 means none.

    ``inputs(step)`` names the input files of a recorded step, so that a diverged run can say
    which of them hold NaN/inf."""

    def __init__(self, device: torch.device, fp16: bool,
                 inputs: Callable[[int], list[str]] | None = None):
        self.fp16 = fp16
        self.inputs = inputs or (lambda step: [])
        self.first = torch.zeros(3, dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        bad_loss = ~torch.isfinite(loss_sum)
        bad_grad = (~torch.isfinite(grad_norm) if grad_norm is not None
                    else torch.zeros_like(bad_loss))
        bad = bad_loss | bad_grad
        if self.fp16:
            self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
            fatal = self.streak >= FP16_SKIP_LIMIT
        else:
            fatal = bad
        now = torch.stack([bad_loss, bad_grad, fatal])
        self.first = torch.where((self.first == 0) & now, step, self.first)

    def check(self) -> None:
        """Stop on a non-finite loss or gradient since the last check (a collective; called
        where the loop synchronises anyway: validation and checkpoints)."""
        health = self.first.tolist()
        flag = torch.tensor([float(health[2] > 0)], dtype=torch.float64)
        if dist.allreduce_sum(flag, name="health").item() > 0:
            self.diverged(health)

    def diverged(self, health: list[int]) -> None:
        """Raise the same one-line DivergenceError on every rank (a collective): the first
        step that went bad, what went bad, and the input file when its data holds NaN/inf."""
        bad_loss, bad_grad, fatal = health
        files = bad_input_files(self.inputs(bad_loss)) if bad_loss else []
        reports = dist.allgather_object((dist.rank(), bad_loss, bad_grad, fatal, files),
                                        name="diverged")
        fatal_step = min(r[3] for r in reports if r[3])
        parts = []
        for what, index in (("loss", 1), ("gradient norm", 2)):
            steps = [(r[index], r[0]) for r in reports if r[index]]
            if steps:
                step, rank = min(steps)
                parts.append(f"the {what} is NaN/inf from step {step} (rank {rank})")
        files = [f for r in reports for f in r[4]]
        if files:
            parts.append("the batch's input " + "; ".join(files))
        skipped = (f" after {FP16_SKIP_LIMIT} fp16 steps in a row skipped as non-finite"
                   if self.fp16 else "")
        raise DivergenceError(f"training diverged at step {fatal_step}{skipped}: "
                              f"{', '.join(parts)}; stopped without a checkpoint of it")


def bad_input_files(paths: list[str]) -> list[str]:
    """Which of ``paths`` hold NaN/inf: read only once the loss went bad (scanning every
    sample as it is loaded would cost every step)."""
    found = []
    for path in dict.fromkeys(paths):
        try:
            data, _ = read_sample(path)
        except DataError as err:
            found.append(str(err))
            continue
        bad = int(data.size - np.isfinite(data).sum())
        if bad:
            found.append(f"{path} holds {bad} NaN/inf values")
    return found
