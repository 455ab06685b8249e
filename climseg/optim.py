"""Optimizers and learning-rate schedules.

`build_optimizer(params, **config["optimizer"])` and `build_scheduler(optimizer,
**config["scheduler"])` are the entry points. Gradient averaging across ranks is Horovod's
job (`hvd.DistributedOptimizer` wraps what is built here); nothing in this module
communicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as MLPerf HPC
    DeepCAM uses it through apex's FusedLAMB.

    Each step:

    1. Global gradient clipping: with G the L2 norm of all gradients of all parameter groups,
       every gradient is scaled by `max_grad_norm / G` when `G > max_grad_norm`
       (`max_grad_norm <= 0` disables it). `p.grad` itself is left untouched.
    2. Adam moments with gradient averaging: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
       bias-corrected by 1 - b^t (`bias_correction=True`).
    3. Update with decoupled weight decay: u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p.
    4. Layer-wise trust ratio: p -= lr * (||p|| / ||u||) * u, the ratio taken as 1 when
       either norm is 0.

    apex skips step 4 for a group with weight_decay == 0 (unless `use_nvlamb`); here the
    trust ratio is always applied, as in the paper. The two agree for the MLPerf settings
    (weight_decay 0.01). Nothing here reads values back to the host.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                 bias_correction: bool = True):
        # The values were validated with the config (climseg.config.OptimizerConfig).
        # max_grad_norm is kept in the groups (so that it survives state_dict() and Horovod's
        # re-construction of the optimizer) but clipping is global: the first group's value
        # applies to all.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_grad_norm=float(max_grad_norm))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets = [(group, bucket) for group in self.param_groups
                   for bucket in _buckets([p for p in group["params"] if p.grad is not None])]
        if not buckets:
            return loss
        if any(p.grad.is_sparse for _, params in buckets for p in params):
            raise RuntimeError("LAMB does not support sparse gradients")
        clip = None
        max_norm = self.param_groups[0]["max_grad_norm"]
        if max_norm > 0:
            # One multi-tensor norm per (device, dtype); only the per-tensor norms meet on one
            # device. .float() is the gradient itself when it is float32 already.
            norms = [n for _, params in buckets
                     for n in torch._foreach_norm([p.grad.float() for p in params])]
            device = norms[0].device
            total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
            # Scale only when the norm exceeds the threshold; a tensor, to avoid a host sync.
            clip = (max_norm / total).clamp(max=1.0)

        for group, params in buckets:
            self._update(group, params, clip)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], clip: torch.Tensor | None) -> None:
        """One parameter group's parameters of one device and dtype: a dozen multi-tensor
        (_foreach) kernels in all, each one pass over the tensors, whatever their number."""
        beta1, beta2 = group["betas"]
        steps = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                    memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                       memory_format=torch.preserve_format)
            state["step"] += 1
            steps.append(state["step"])
        moments = [self.state[p]["exp_avg"] for p in params]
        squares = [self.state[p]["exp_avg_sq"] for p in params]

        # m_hat / (sqrt(v_hat) + eps) = (sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2)):
        # the bias corrections become two scalars per tensor instead of two passes over it.
        # Usually every tensor has taken the same number of steps: then they are plain numbers.
        def corrections(step: int) -> tuple[float, float]:
            if not group["bias_correction"]:
                return 1.0, group["eps"]
            root_bc2 = math.sqrt(1 - beta2 ** step)
            return root_bc2 / (1 - beta1 ** step), group["eps"] * root_bc2

        if len(set(steps)) == 1:
            step_size, eps = corrections(steps[0])
        else:
            pairs = [corrections(s) for s in steps]
            step_size, eps = [a for a, _ in pairs], [b for _, b in pairs]

        grads = [p.grad.float() for p in params]
        # Out of place: p.grad must not change.
        if clip is not None:
            grads = torch._foreach_mul(grads, clip.to(grads[0].device))
        torch._foreach_lerp_(moments, grads, 1 - beta1)       # b1 m + (1 - b1) g
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        del grads
        denom = torch._foreach_sqrt(squares)
        torch._foreach_add_(denom, eps)

        weights = params if params[0].dtype == torch.float32 else [p.float() for p in params]
        if group["weight_decay"] != 0:
            updates = torch._foreach_mul(weights, group["weight_decay"])
            torch._foreach_addcdiv_(updates, moments, denom, step_size)
        else:
            updates = torch._foreach_div(moments, denom)
            torch._foreach_mul_(updates, step_size)
        del denom

        w_norm = torch.stack(torch._foreach_norm(weights))
        u_norm = torch.stack(torch._foreach_norm(updates))
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(updates, list((ratio * -group["lr"]).unbind(0)))
        if weights is params:
            torch._foreach_add_(params, updates)
        else:
            # Low-precision parameters: the update is computed in float32, rounded once.
            torch._foreach_add_(weights, updates)
            torch._foreach_copy_(params, weights)


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` split by (device, dtype, gradient dtype): multi-tensor kernels take one of each."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype, p.grad.dtype), []).append(p)
    return list(buckets.values())


def _lamb(params, lr, betas, eps, weight_decay, max_grad_norm, momentum, fused):
    return LAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm)


def _adam(params, lr, betas, eps, weight_decay, max_grad_norm, momentum, fused):
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            fused=fused)


def _adamw(params, lr, betas, eps, weight_decay, max_grad_norm, momentum, fused):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused)


def _sgd(params, lr, betas, eps, weight_decay, max_grad_norm, momentum, fused):
    if not 0 <= momentum < 1:
        raise ValueError(f"optimizer.momentum: must be in [0, 1), got {momentum}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=fused)


# Adam's weight decay is the L2 penalty of torch.optim.Adam (as in the DeepCAM reference),
# and so is SGD's; AdamW and LAMB decouple it. For Adam, AdamW and SGD the trainer clips the
# gradient norm; LAMB clips inside its step, after Horovod has averaged the gradients.
# SGD with momentum is linear in the gradients: float-order noise (threads, ranks) stays at
# rounding level through training, where Adam-type updates turn it into sign flips. It is the
# optimizer of the tests that compare two ways of running the same training exactly.
OPTIMIZERS = {
    "lamb": _lamb,
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
}


def _first_device(params: list) -> torch.device | None:
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        for t in tensors:
            return t.device
    return None


def build_optimizer(params: Iterable, name: str = "lamb", lr: float = 1e-3,
                    betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-6,
                    weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                    momentum: float = 0.9, **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer named `name` from the `optimizer` config section.

    Adam, AdamW and SGD use PyTorch's fused kernels when the parameters are on CUDA.
    `max_grad_norm` is used by LAMB only (see OPTIMIZERS); `momentum` by SGD only, `betas`
    and `eps` by the others.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r}; "
                         f"choose one of {sorted(OPTIMIZERS)}")
    for key in kwargs:
        raise ValueError(f"optimizer.{key}: unknown option")
    params = list(params)
    device = _first_device(params)
    fused = True if device is not None and device.type == "cuda" else None
    return OPTIMIZERS[name](params, lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                            eps=float(eps), weight_decay=float(weight_decay),
                            max_grad_norm=float(max_grad_norm), momentum=float(momentum),
                            fused=fused)


class WarmupSchedule:
    """Learning-rate multiplier at scheduler step `s` (the number of optimizer steps taken).

    Follows the MLPerf HPC DeepCAM reference (`utils/schedulers.py`, MultiStepLRWarmup and
    CosineAnnealingLRWarmup, GradualWarmupScheduler semantics), with W = warmup_steps,
    f = warmup_factor, peak = f * base_lr:

    - warmup, 0 <= s <= W (only when W > 0): linear; with f == 1 from 0 to base_lr
      (lr(s) = base_lr * s / W, so the very first step has lr 0), with f > 1 from base_lr to
      f * base_lr (lr(s) = base_lr * (1 + (f - 1) * s / W)).
    - constant: peak.
    - multistep: peak * decay_rate ** k, k = the number of milestones m already passed. With
      W > 0 milestone m takes effect at s = W + m + 1 (the reference's
      `Counter(m + warmup_steps + 1)`); with W == 0 at s = m (the reference then uses
      torch's MultiStepLR).
    - cosine: with t = s - W, eta_min + (peak - eta_min) * (1 + cos(pi * t / t_max)) / 2;
      periodic past t_max, like torch's CosineAnnealingLR that the reference falls back to.

    A plain object (not a lambda) so that LambdaLR.state_dict() stores its settings, and
    the schedule is a pure function of the step: a resumed scheduler continues exactly.
    """

    def __init__(self, base_lr: float, kind: str, warmup_steps: int, warmup_factor: float,
                 milestones: Sequence[int], decay_rate: float, t_max: int | None,
                 eta_min: float):
        self.base_lr = float(base_lr)
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.milestones = [int(m) for m in milestones]
        self.decay_rate = float(decay_rate)
        self.t_max = None if t_max is None else int(t_max)
        self.eta_min = float(eta_min)

    def lr(self, step: int) -> float:
        w, f = self.warmup_steps, self.warmup_factor
        if w > 0 and step <= w:
            if f == 1.0:
                return self.base_lr * step / w
            return self.base_lr * (1.0 + (f - 1.0) * step / w)
        peak = self.base_lr * f
        if self.kind == "multistep":
            offset = w + 1 if w > 0 else 0
            passed = sum(1 for m in self.milestones if step >= m + offset)
            return peak * self.decay_rate ** passed
        if self.kind == "cosine":
            t = step - w
            return self.eta_min + (peak - self.eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2
        return peak

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr if self.base_lr > 0 else 0.0


SCHEDULES = ("constant", "multistep", "cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, type: str = "constant",
                    warmup_steps: int = 0, warmup_factor: float = 1.0,
                    milestones: Sequence[int] = (), decay_rate: float = 0.1,
                    t_max: int | None = None, eta_min: float = 0.0, **kwargs) -> LambdaLR:
    """Per-optimizer-step schedule (see WarmupSchedule); call `scheduler.step()` after each
    optimizer step. The base learning rate is each parameter group's `lr` at build time."""
    if type not in SCHEDULES:
        raise ValueError(f"scheduler.type: unknown schedule {type!r}; choose one of "
                         f"{list(SCHEDULES)}")
    for key in kwargs:
        raise ValueError(f"scheduler.{key}: unknown option")
    # The values were validated with the config (climseg.config.SchedulerConfig).
    schedules = [WarmupSchedule(group.get("initial_lr", group["lr"]), type, warmup_steps,
                                warmup_factor, milestones, decay_rate, t_max, eta_min)
                 for group in optimizer.param_groups]
    return LambdaLR(optimizer, schedules)
