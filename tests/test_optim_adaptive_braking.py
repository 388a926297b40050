"""Adaptive Braking (arXiv 2007.01397; docs/algorithms.md §5): reference tests."""
from __future__ import annotations

import copy
import math
from typing import List

import pytest
import torch

from commlib.errors import ConfigError
from commlib.optim import (
    AdaptiveBrakingSGD,
    DelayedGradients,
    braking_cosine,
    braking_cosines,
    braking_factor,
)


def _params(seed: int) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 2, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _random_grads(params, gen: torch.Generator, step: int) -> List[torch.Tensor]:
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if step % 3 == 2:  # sometimes push the gradient against/along the velocity direction
        grads = [-(p.detach() * 0.5) + 0.1 * g for p, g in zip(params, grads)]
    return grads


# --- rho = 0 is torch.optim.SGD bit for bit ----------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_rho_zero_is_torch_sgd_bit_for_bit(weight_decay, dampening, per_tensor):
    a, b = _params(0), _params(0)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]  # noqa: E731
    ref = torch.optim.SGD(groups(a), lr=0.1, momentum=0.9, nesterov=False,
                          weight_decay=weight_decay, dampening=dampening)
    ab = AdaptiveBrakingSGD(groups(b), lr=0.1, momentum=0.9, rho=0.0,
                            weight_decay=weight_decay, dampening=dampening, per_tensor=per_tensor)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        grads = _random_grads(a, gen, step)
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        if step == 7:  # a parameter without gradient is skipped by both
            a[1].grad = b[1].grad = None
        ref.step()
        ab.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
            sa, sb = ref.state.get(pa, {}), ab.state.get(pb, {})
            if "momentum_buffer" in sa:
                assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_sgd_state_dict_loads_into_adaptive_braking():
    a, b = _params(3), _params(3)
    ref = torch.optim.SGD(a, lr=0.05, momentum=0.8)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        for p, g in zip(a, _random_grads(a, gen, step)):
            p.grad = g
        ref.step()
    with torch.no_grad():
        for pa, pb in zip(a, b):
            pb.copy_(pa)
    ab = AdaptiveBrakingSGD(b, lr=0.05, momentum=0.8, rho=0.0)
    ab.load_state_dict(copy.deepcopy(ref.state_dict()))  # load_state_dict does not copy tensors
    for step in range(4):
        grads = _random_grads(a, gen, step)
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        ref.step()
        ab.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))


# --- cosine and factor ---------------------------------------------------------------------

def test_cos_is_zero_when_velocity_or_gradient_is_zero():
    g = torch.randn(7, generator=torch.Generator().manual_seed(5))
    assert braking_cosine([g], [None]).item() == 0.0
    assert braking_cosine([g], [torch.zeros(7)]).item() == 0.0
    assert braking_cosine([torch.zeros(7)], [g]).item() == 0.0
    # First step: no velocity yet, so the factor is exactly 1 and AB equals SGD's first step.
    a, b = _params(6), _params(6)
    for pa, pb in zip(a, b):
        pa.grad = torch.ones_like(pa)
        pb.grad = torch.ones_like(pb)
    torch.optim.SGD(a, lr=0.1, momentum=0.9).step()
    ab = AdaptiveBrakingSGD(b, lr=0.1, momentum=0.9, rho=0.7)
    ab.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    assert all(ab.state[p]["braking_factor"].item() == 1.0 for p in b)


@pytest.mark.parametrize("rho", [0.3, 1.0, 2.0])
def test_factor_lies_in_one_minus_rho_one_plus_rho(rho):
    gen = torch.Generator().manual_seed(7)
    for _ in range(200):
        g = torch.randn(11, generator=gen)
        v = torch.randn(11, generator=gen) * torch.rand(1, generator=gen) * 10
        f = braking_factor(braking_cosine([g], [v]), rho).item()
        assert 1 - rho - 1e-6 <= f <= 1 + rho + 1e-6
    g = torch.randn(11, generator=gen)
    # aligned: most braking of the gradient; opposed: most amplification (buffer convention).
    assert braking_factor(braking_cosine([g], [3 * g]), rho).item() == pytest.approx(1 - rho, abs=1e-6)
    assert braking_factor(braking_cosine([g], [-3 * g]), rho).item() == pytest.approx(1 + rho, abs=1e-6)
    assert braking_factor(braking_cosine([g], [torch.zeros(11)]), rho).item() == 1.0


def test_global_cosine_is_cosine_of_concatenation():
    gen = torch.Generator().manual_seed(8)
    gs = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)]
    vs = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)]
    g, v = torch.cat([t.flatten() for t in gs]), torch.cat([t.flatten() for t in vs])
    want = torch.dot(g, v) / (g.norm() * v.norm())
    assert braking_cosine(gs, vs).item() == pytest.approx(want.item(), rel=1e-5)
    # a missing velocity contributes zeros to the concatenation
    want2 = torch.dot(gs[1], vs[1]) / (g.norm() * vs[1].norm())
    assert braking_cosine(gs, [None, vs[1]]).item() == pytest.approx(want2.item(), rel=1e-5)


# --- against a direct, slow reference of the formula --------------------------------------

def _slow_reference(w0, grads_per_step, *, lr, m, rho, wd, damp, per_tensor):
    """Python floats, element by element (arXiv 2007.01397, docs/algorithms.md §5.1)."""
    w = [[float(x) for x in t.flatten()] for t in w0]
    v = [None for _ in w0]
    for grads in grads_per_step:
        d = [[float(gx) + wd * wx for gx, wx in zip(g.flatten().tolist(), wt)]
             for g, wt in zip(grads, w)]

        def cos(idx):
            dot = gg = vv = 0.0
            for i in idx:
                for j, dx in enumerate(d[i]):
                    gg += dx * dx
                    if v[i] is not None:
                        dot += dx * v[i][j]
                        vv += v[i][j] * v[i][j]
            if gg == 0.0 or vv == 0.0:
                return 0.0
            return max(-1.0, min(1.0, dot / (math.sqrt(gg) * math.sqrt(vv))))

        if per_tensor:
            factors = [1.0 - rho * cos([i]) for i in range(len(w))]
        else:
            shared = 1.0 - rho * cos(range(len(w)))
            factors = [shared] * len(w)
        for i in range(len(w)):
            dt = [factors[i] * x for x in d[i]]
            if v[i] is None:
                v[i] = dt
            else:
                v[i] = [m * vx + (1.0 - damp) * dx for vx, dx in zip(v[i], dt)]
            w[i] = [wx - lr * vx for wx, vx in zip(w[i], v[i])]
    return w, v


@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("rho,wd,damp", [(0.5, 0.0, 0.0), (1.0, 1e-2, 0.0), (2.0, 1e-2, 0.25)])
def test_matches_slow_reference_on_random_tensors(per_tensor, rho, wd, damp):
    torch.set_default_dtype(torch.float64)
    try:
        params = _params(9)
        w0 = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(10)
        steps = [_random_grads(params, gen, s) for s in range(12)]
        opt = AdaptiveBrakingSGD(params, lr=0.07, momentum=0.85, rho=rho, weight_decay=wd,
                                 dampening=damp, per_tensor=per_tensor)
        for grads in steps:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        w_ref, v_ref = _slow_reference(w0, steps, lr=0.07, m=0.85, rho=rho, wd=wd, damp=damp,
                                       per_tensor=per_tensor)
        for p, wr, vr in zip(params, w_ref, v_ref):
            assert torch.allclose(p.detach().flatten(), torch.tensor(wr), rtol=1e-10, atol=1e-12)
            assert torch.allclose(opt.state[p]["momentum_buffer"].flatten(), torch.tensor(vr),
                                  rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


# --- the sign convention brakes: damping on a delayed ill-conditioned quadratic -------------

def _delayed_quadratic(rho: float, delay: int, steps: int = 400) -> float:
    """f(w) = 0.5 (1.0 w1^2 + 0.05 w2^2): one high-curvature and one flat direction, each its
    own tensor; gradients computed at the weights of `delay` steps earlier."""
    hs = [1.0, 0.05]
    ws = [torch.nn.Parameter(torch.tensor([1.0])) for _ in hs]
    opt = AdaptiveBrakingSGD(ws, lr=0.05, momentum=0.9, rho=rho)
    sim = DelayedGradients(ws, delay=delay)
    loss = lambda: sum(0.5 * h * (w * w).sum() for h, w in zip(hs, ws))  # noqa: E731
    for _ in range(steps):
        with sim.stale_weights():
            opt.zero_grad()
            loss().backward()
        opt.step()
    return float(loss().detach())


def test_braking_damps_delay_induced_oscillation(monkeypatch):
    # Plain momentum at this step size is fine without delay, diverges with D = 8; braking
    # (gradient opposed to the velocity amplified, aligned gradient shrunk) keeps it stable.
    assert _delayed_quadratic(rho=0.0, delay=0) < 1e-6
    assert _delayed_quadratic(rho=0.0, delay=8) > 1e3
    assert _delayed_quadratic(rho=2.0, delay=8) < 1e-2
    assert _delayed_quadratic(rho=2.0, delay=16) < 1e-2
    # The opposite sign convention (1 + rho cos in the buffer convention) does not brake.
    import commlib.optim.adaptive_braking as ab_mod
    monkeypatch.setattr(ab_mod, "braking_factor", lambda cos, rho: 1.0 + rho * cos)
    assert _delayed_quadratic(rho=2.0, delay=8) > 1e3


# --- bad configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(momentum=0.0), dict(rho=-0.1),
                                dict(weight_decay=-1e-3), dict(dampening=1.0)])
def test_bad_arguments_raise_config_error(kw):
    args = dict(lr=0.1, momentum=0.9, rho=1.0)
    args.update(kw)
    with pytest.raises(ConfigError):
        AdaptiveBrakingSGD(_params(0), **args)


def test_sparse_gradient_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError):
        AdaptiveBrakingSGD(emb.parameters(), lr=0.1).step()


def test_loading_a_nesterov_sgd_state_is_refused():
    a = _params(0)
    ref = torch.optim.SGD(a, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError):
        AdaptiveBrakingSGD(_params(0), lr=0.1).load_state_dict(ref.state_dict())


def test_per_tensor_cosines_are_each_tensors_own_cosine():
    gen = torch.Generator().manual_seed(11)
    gs = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen), torch.randn(2, generator=gen)]
    vs = [torch.randn(3, 2, generator=gen), None, torch.zeros(2)]
    cos = braking_cosines(gs, vs, per_tensor=True)
    want0 = torch.dot(gs[0].flatten(), vs[0].flatten()) / (gs[0].norm() * vs[0].norm())
    assert cos.shape == (3,)
    assert cos[0].item() == pytest.approx(want0.item(), rel=1e-5)
    assert cos[1].item() == 0.0 and cos[2].item() == 0.0
    glob = braking_cosines(gs, vs, per_tensor=False)
    assert torch.equal(glob, braking_cosine(gs, vs).expand(3))


def test_low_precision_parameters_brake_with_a_float32_cosine():
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = AdaptiveBrakingSGD([w], lr=0.1, momentum=0.9, rho=1.0)
    for _ in range(3):
        w.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    f = opt.state[w]["braking_factor"]
    assert f.dtype == torch.float32 and f.item() == pytest.approx(0.0, abs=1e-6)  # aligned: cos = 1
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
