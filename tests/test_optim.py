"""LAMB against the paper's update computed by hand; optimizer table; learning-rate schedules."""

import io
import math

import pytest
import torch

from climseg.optim import LAMB, build_optimizer, build_scheduler


def lamb_by_hand(weights, grad_steps, lr, beta1, beta2, eps, wd, max_norm):
    """LAMB (You et al. 2019, Algorithm 2, phi = identity) in float64 Python lists, preceded by
    global gradient-norm clipping. `weights`: list of lists; `grad_steps`: per step, a list of
    gradient lists."""
    weights = [list(map(float, w)) for w in weights]
    m = [[0.0] * len(w) for w in weights]
    v = [[0.0] * len(w) for w in weights]
    for t, grads in enumerate(grad_steps, start=1):
        total = math.sqrt(sum(g * g for gs in grads for g in gs))
        scale = max_norm / total if 0 < max_norm < total else 1.0
        for i, (w, gs) in enumerate(zip(weights, grads)):
            r = []
            for j, g in enumerate(gs):
                g = g * scale
                m[i][j] = beta1 * m[i][j] + (1 - beta1) * g
                v[i][j] = beta2 * v[i][j] + (1 - beta2) * g * g
                m_hat = m[i][j] / (1 - beta1 ** t)
                v_hat = v[i][j] / (1 - beta2 ** t)
                r.append(m_hat / (math.sqrt(v_hat) + eps) + wd * w[j])
            w_norm = math.sqrt(sum(x * x for x in w))
            r_norm = math.sqrt(sum(x * x for x in r))
            trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            weights[i] = [x - lr * trust * u for x, u in zip(w, r)]
    return weights


WEIGHTS = [[1.0, -2.0], [0.5], [0.0, 0.0]]           # the last one exercises the ||w|| = 0 guard
GRADS = [[[3.0, 4.0], [12.0], [1.0, 1.0]],             # global norm sqrt(171): clipped to 1
         [[0.1, -0.2], [0.0], [0.05, 0.0]]]            # norm < 1: not clipped


def run_lamb(max_norm, steps=GRADS, **kwargs):
    params = [torch.nn.Parameter(torch.tensor(w)) for w in WEIGHTS]
    opt = LAMB(params, lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
               max_grad_norm=max_norm, **kwargs)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_lamb_matches_the_paper_update(max_norm):
    params, _ = run_lamb(max_norm)
    expected = lamb_by_hand(WEIGHTS, GRADS, 0.1, 0.9, 0.999, 1e-6, 0.01, max_norm)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), torch.tensor(e, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)


def test_lamb_clips_over_all_parameter_groups():
    params = [torch.nn.Parameter(torch.tensor(w)) for w in WEIGHTS]
    opt = LAMB([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, eps=1e-6,
               weight_decay=0.01, max_grad_norm=1.0)
    for grads in GRADS:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
    expected = lamb_by_hand(WEIGHTS, GRADS, 0.1, 0.9, 0.999, 1e-6, 0.01, 1.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), torch.tensor(e, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)


def test_lamb_first_step_by_hand():
    # One parameter, first step: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) + wd * w.
    w, g = [3.0, 4.0], [0.6, -0.8]          # ||g|| = 1: at the clip threshold, unchanged
    r = [gi / (abs(gi) + 1e-6) + 0.01 * wi for gi, wi in zip(g, w)]
    trust = 5.0 / math.hypot(*r)
    expected = [wi - 0.1 * trust * ri for wi, ri in zip(w, r)]
    p = torch.nn.Parameter(torch.tensor(w))
    p.grad = torch.tensor(g)
    LAMB([p], lr=0.1, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0).step()
    torch.testing.assert_close(p.detach().double(), torch.tensor(expected, dtype=torch.float64))


def test_lamb_leaves_gradients_alone():
    params, _ = run_lamb(1.0, steps=GRADS[:1])
    assert params[1].grad.item() == 12.0


def test_lamb_state_round_trip_continues_identically():
    full, _ = run_lamb(1.0)
    params, opt = run_lamb(1.0, steps=GRADS[:1])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = LAMB(params, max_grad_norm=5.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["max_grad_norm"] == 1.0
    for p, g in zip(params, GRADS[1]):
        p.grad = torch.tensor(g)
    fresh.step()
    for a, b in zip(params, full):
        assert torch.equal(a, b)


def test_lamb_settings_survive_reconstruction_from_param_groups():
    # hvd.DistributedOptimizer re-creates the optimizer class from `param_groups` alone.
    _, opt = run_lamb(0.25, steps=[])
    again = LAMB(opt.param_groups)
    assert again.param_groups[0]["max_grad_norm"] == 0.25


def lamb_per_tensor(params, state, lr, betas, eps, wd, max_norm, bias_correction=True):
    """The step as first written, one tensor at a time in float64: the oracle for the
    multi-tensor step. `params` (tensors with .grad) change in place; `state` is a dict."""
    grads = [p.grad.double() for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    clip = min(1.0, max_norm / total.item()) if max_norm > 0 else 1.0
    for p in params:
        if p.grad is None:
            continue
        s = state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p, dtype=torch.float64),
                                     "v": torch.zeros_like(p, dtype=torch.float64)})
        s["step"] += 1
        g = p.grad.double() * clip
        s["m"] = betas[0] * s["m"] + (1 - betas[0]) * g
        s["v"] = betas[1] * s["v"] + (1 - betas[1]) * g * g
        bc1 = 1 - betas[0] ** s["step"] if bias_correction else 1.0
        bc2 = 1 - betas[1] ** s["step"] if bias_correction else 1.0
        w = p.detach().double()
        u = (s["m"] / bc1) / ((s["v"] / bc2).sqrt() + eps) + wd * w
        w_norm, u_norm = w.norm(), u.norm()
        trust = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
        with torch.no_grad():
            p.copy_(w - lr * trust * u)


SHAPES = [(8, 4, 3, 3), (8,), (16, 8, 1, 1), (5, 7), (3,)]


def test_multi_tensor_step_equals_the_per_tensor_update():
    # Two parameter groups (one without weight decay, one without bias correction), tensors
    # of several shapes, one parameter without a gradient in the first step (so its step
    # count lags behind the others'), clipping active in some steps and not in others.
    # LAMB keeps its moments in float32 whatever the parameters' dtype (as apex does), so
    # float32 parameters against the float64 oracle, compared to float32 accuracy.
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    oracle = [torch.nn.Parameter(p.detach().double()) for p in ours]
    settings = [dict(lr=0.05, weight_decay=0.01, bias_correction=True),
                dict(lr=0.02, weight_decay=0.0, bias_correction=False)]
    opt = LAMB([dict(params=ours[:3], **settings[0]), dict(params=ours[3:], **settings[1])],
               betas=(0.9, 0.99), eps=1e-6, max_grad_norm=1.0)
    state = {}
    for step in range(4):
        scale = 3.0 if step % 2 == 0 else 0.01            # clipped, then not
        for i, (a, b) in enumerate(zip(ours, oracle)):
            g = None if step == 0 and i == 1 else scale * torch.randn_like(a)
            a.grad, b.grad = g, None if g is None else g.double()
        opt.step()
        # The per-tensor oracle clips with the norm over both groups, as LAMB does.
        total_norm = torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in oracle if p.grad is not None]))
        clip = min(1.0, 1.0 / total_norm.item())
        for group, ps in ((settings[0], oracle[:3]), (settings[1], oracle[3:])):
            for p in ps:
                if p.grad is not None:
                    p.grad = p.grad * clip
            lamb_per_tensor(ps, state, group["lr"], (0.9, 0.99), 1e-6, group["weight_decay"],
                            0.0, group["bias_correction"])
    assert [opt.state[p]["step"] for p in ours] == [4, 3, 4, 4, 4]
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_float32_step_matches_float64_oracle():
    torch.manual_seed(1)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    oracle = [torch.nn.Parameter(p.detach().double().clone()) for p in ours]
    opt = LAMB(ours, lr=0.01, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
    state = {}
    for _ in range(3):
        for a, b in zip(ours, oracle):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.double()
        opt.step()
        lamb_per_tensor(oracle, state, 0.01, (0.9, 0.999), 1e-6, 0.01, 1.0)
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_are_stepped_in_float32_and_rounded_once():
    torch.manual_seed(2)
    half = torch.nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    full = torch.nn.Parameter(torch.randn(5))
    oracle = [torch.nn.Parameter(half.detach().double()), torch.nn.Parameter(full.detach().double())]
    opt = LAMB([half, full], lr=0.01, max_grad_norm=1.0)
    half.grad = torch.randn(4, 6).to(torch.bfloat16)
    full.grad = torch.randn(5)
    oracle[0].grad, oracle[1].grad = half.grad.double(), full.grad.double()
    opt.step()
    lamb_per_tensor(oracle, {}, 0.01, (0.9, 0.999), 1e-6, 0.01, 1.0)
    assert half.dtype == torch.bfloat16 and opt.state[half]["exp_avg"].dtype == torch.float32
    assert torch.equal(half.detach(), oracle[0].detach().to(torch.bfloat16))
    torch.testing.assert_close(full.double(), oracle[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cls", [("lamb", LAMB), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], name=name, lr=0.002, betas=[0.8, 0.99], eps=1e-6,
                          weight_decay=0.01, max_grad_norm=1.0)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == \
        (0.002, (0.8, 0.99), 1e-6, 0.01)


def test_build_optimizer_rejects_bad_names_and_options():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="optimizer.name"):
        build_optimizer(p, name="rmsprop")
    with pytest.raises(ValueError, match="optimizer.nesterov"):
        build_optimizer(p, name="adam", nesterov=True)
    with pytest.raises(ValueError, match=r"optimizer.momentum: must be in \[0, 1\), got 1.0"):
        build_optimizer(p, name="sgd", momentum=1.0)


def test_sgd_momentum_and_weight_decay_by_hand():
    # Heavy-ball momentum with the L2 penalty in the gradient, as torch.optim.SGD defines it:
    # g = grad + wd p; buf = g on the first step, then mu buf + g; p -= lr buf.
    lr, mu, wd = 0.1, 0.9, 0.01
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = build_optimizer([p], name="sgd", lr=lr, momentum=mu, weight_decay=wd)
    assert type(opt) is torch.optim.SGD
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["weight_decay"]) == (mu, wd)
    grads = [torch.tensor([0.5, 1.0, -1.0]), torch.tensor([0.25, -0.5, 2.0]),
             torch.tensor([-1.0, 0.0, 0.5])]
    expected, buf = [1.0, -2.0, 0.5], None
    for g in grads:
        d = [gi + wd * pi for gi, pi in zip(g.tolist(), expected)]
        buf = d if buf is None else [mu * b + di for b, di in zip(buf, d)]
        expected = [pi - lr * b for pi, b in zip(expected, buf)]
        p.grad = g.double()
        opt.step()
    assert p.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_sgd_state_round_trip_continues_identically():
    # The momentum buffer is the state a resumed run must carry on with.
    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(4)]

    def run(steps, opt_state=None, start=None):
        p = torch.nn.Parameter(torch.ones(4) if start is None else start.clone())
        opt = build_optimizer([p], name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for g in steps:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    whole, _ = run(grads)
    half, opt = run(grads[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed, _ = run(grads[2:], torch.load(buffer, weights_only=True), start=half)
    assert torch.equal(resumed, whole)
    without_momentum, _ = run(grads[2:], start=half)
    assert not torch.allclose(without_momentum, whole)


def test_sgd_config_key_and_its_error():
    from climseg.config import ConfigError, load_config

    cfg = load_config(None, ["data.root=/x", "optimizer.name=sgd", "optimizer.momentum=0.5"])
    assert (cfg.optimizer.name, cfg.optimizer.momentum) == ("sgd", 0.5)
    assert load_config(None, ["data.root=/x"]).optimizer.momentum == 0.9
    with pytest.raises(ConfigError, match=r"^optimizer.momentum: must be in \[0, 1\), got -0.1$"):
        load_config(None, ["data.root=/x", "optimizer.name=sgd", "optimizer.momentum=-0.1"])


def lr_sequence(steps, base_lr=1.0, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = build_scheduler(opt, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_multistep_with_warmup_from_zero():
    # warmup 4 steps 0 -> base; milestone m applies at step warmup + m + 1 (reference).
    lrs = lr_sequence(13, type="multistep", warmup_steps=4, milestones=[3, 5], decay_rate=0.1)
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert lrs == pytest.approx(expected)


def test_warmup_factor_ramps_from_base_to_factor_times_base():
    lrs = lr_sequence(7, base_lr=0.5, type="multistep", warmup_steps=4, warmup_factor=3.0,
                      milestones=[1], decay_rate=0.5)
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 1.25, 1.5, 1.5, 0.75])


def test_multistep_without_warmup_is_torch_multistep():
    lrs = lr_sequence(8, type="multistep", milestones=[2, 5], decay_rate=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.1)
    expected = []
    for _ in range(8):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs == pytest.approx(expected)
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_cosine_after_warmup():
    lrs = lr_sequence(7, type="cosine", warmup_steps=2, t_max=4, eta_min=0.1)
    half = 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2
    assert lrs == pytest.approx([0.0, 0.5, 1.0, half, 0.55, 0.1 + 0.9 - (half - 0.1), 0.1])


def test_cosine_without_warmup_is_torch_cosine():
    lrs = lr_sequence(10, base_lr=0.00155, type="cosine", t_max=9, eta_min=1e-5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.00155)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9, eta_min=1e-5)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_constant_with_and_without_warmup():
    assert lr_sequence(4, base_lr=2.0) == [2.0] * 4
    assert lr_sequence(5, type="constant", warmup_steps=2) == pytest.approx([0, 0.5, 1, 1, 1])


def test_resumed_scheduler_gives_the_same_learning_rates():
    kwargs = dict(type="multistep", warmup_steps=3, warmup_factor=2.0, milestones=[2, 4])
    full = lr_sequence(12, base_lr=0.1, **kwargs)

    def build():
        opt = LAMB([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        return opt, build_scheduler(opt, **kwargs)

    opt, sched = build()
    for _ in range(5):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt, sched = build()
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(7):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == pytest.approx(full[5:])


# Values are validated with the config (test_config.py); the builder rejects what is not a
# schedule or an option at all.
@pytest.mark.parametrize("kwargs, key", [
    ({"type": "step"}, "scheduler.type"),
    ({"gamma": 0.1}, "scheduler.gamma"),
])
def test_build_scheduler_rejects_bad_options(kwargs, key):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=key):
        build_scheduler(opt, **kwargs)
