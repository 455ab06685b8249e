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
        if not lr >= 0:
            raise ValueError(f"optimizer.lr: must be non-negative, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optimizer.betas: must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"optimizer.eps: must be positive, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay: must be non-negative, got {weight_decay}")
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

        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LAMB does not support sparse gradients")
        clip = None
        max_norm = self.param_groups[0]["max_grad_norm"]
        if max_norm > 0:
            norms = torch._foreach_norm([g.float() for g in grads])
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
            # Scale only when the norm exceeds the threshold; a tensor, to avoid a host sync.
            clip = (max_norm / total).clamp(max=1.0)

        for group in self.param_groups:
            self._update_group(group, clip)
        return loss

    def _update_group(self, group: dict, clip: torch.Tensor | None) -> None:
        # Multi-tensor (_foreach) ops: a few kernel launches per group instead of a dozen per
        # parameter, which matters on GPUs with ~300 parameter tensors.
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        moments, squares, bc1, bc2 = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                    memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                       memory_format=torch.preserve_format)
            state["step"] += 1
            moments.append(state["exp_avg"])
            squares.append(state["exp_avg_sq"])
            correct = group["bias_correction"]
            bc1.append(1 - beta1 ** state["step"] if correct else 1.0)
            bc2.append(1 - beta2 ** state["step"] if correct else 1.0)

        grads = [p.grad.float() for p in params]
        # Out of place: p.grad must not change (and .float() of a float32 grad is the grad).
        grads = torch._foreach_mul(grads, clip) if clip is not None else grads
        torch._foreach_mul_(moments, beta1)
        torch._foreach_add_(moments, grads, alpha=1 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)

        denom = torch._foreach_div(squares, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(moments, bc1)
        torch._foreach_div_(updates, denom)
        weights = [p.float() for p in params]
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, weights, alpha=group["weight_decay"])

        w_norm = torch.stack(torch._foreach_norm(weights))
        u_norm = torch.stack(torch._foreach_norm(updates))
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(updates, list((ratio * -group["lr"]).unbind(0)))
        if all(p.dtype == torch.float32 for p in params):
            torch._foreach_add_(params, updates)
        else:
            for p, w, u in zip(params, weights, updates):
                p.copy_(w + u)


def _lamb(params, lr, betas, eps, weight_decay, max_grad_norm, fused):
    return LAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm)


def _adam(params, lr, betas, eps, weight_decay, max_grad_norm, fused):
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            fused=fused)


def _adamw(params, lr, betas, eps, weight_decay, max_grad_norm, fused):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused)


# Adam's weight decay is the L2 penalty of torch.optim.Adam (as in the DeepCAM reference);
# AdamW and LAMB decouple it. For Adam and AdamW the trainer clips the gradient norm; LAMB
# clips inside its step, after Horovod has averaged the gradients.
OPTIMIZERS = {
    "lamb": _lamb,
    "adam": _adam,
    "adamw": _adamw,
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
                    **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer named `name` from the `optimizer` config section.

    Adam and AdamW use PyTorch's fused kernels when the parameters are on CUDA.
    `max_grad_norm` is used by LAMB only (see OPTIMIZERS).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r}; "
                         f"choose one of {sorted(OPTIMIZERS)}")
    for key in kwargs:
        raise ValueError(f"optimizer.{key}: unknown option")
    if len(betas) != 2:
        raise ValueError(f"optimizer.betas: must be two numbers, got {list(betas)}")
    params = list(params)
    device = _first_device(params)
    fused = True if device is not None and device.type == "cuda" else None
    return OPTIMIZERS[name](params, lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                            eps=float(eps), weight_decay=float(weight_decay),
                            max_grad_norm=float(max_grad_norm), fused=fused)


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
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps: must be a non-negative integer, "
                         f"got {warmup_steps!r}")
    if not warmup_factor >= 1.0:
        raise ValueError(f"scheduler.warmup_factor: must be at least 1, got {warmup_factor}")
    milestones = list(milestones)
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones) \
            or milestones != sorted(set(milestones)):
        raise ValueError(f"scheduler.milestones: must be increasing non-negative integers, "
                         f"got {milestones}")
    if not 0 < decay_rate <= 1:
        raise ValueError(f"scheduler.decay_rate: must be in (0, 1], got {decay_rate}")
    if type == "cosine" and (t_max is None or isinstance(t_max, bool)
                             or not isinstance(t_max, int) or t_max < 1):
        raise ValueError(f"scheduler.t_max: must be a positive number of steps for the cosine "
                         f"schedule, got {t_max!r}")
    if not eta_min >= 0:
        raise ValueError(f"scheduler.eta_min: must be non-negative, got {eta_min}")
    schedules = [WarmupSchedule(group.get("initial_lr", group["lr"]), type, warmup_steps,
                                warmup_factor, milestones, decay_rate, t_max, eta_min)
                 for group in optimizer.param_groups]
    return LambdaLR(optimizer, schedules)
