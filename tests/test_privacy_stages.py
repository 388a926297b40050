"""DP-SGD, EF-DPSGD (DiceSGD) and DIFF2 stages, and the single-process trainer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from commlib.errors import ConfigError
from commlib.privacy import (
    DIFF2Server,
    DIFF2Worker,
    DPSGD,
    EFDPSGD,
    PRIVACY_STAGES,
    GaussianNoise,
    PrivateTrainer,
    per_sample_grads,
)


def _grads(seed: int, b: int = 8, d: int = 12, spread: float = 3.0) -> torch.Tensor:
    """Per-sample grads with norms spread over ~[e^-spread, e^spread] so some rows clip."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(b, d, generator=gen, dtype=torch.float64)
    return g * torch.exp(spread * (2 * torch.rand(b, 1, generator=gen, dtype=torch.float64) - 1))


def _ref_clip(row: torch.Tensor, c: float) -> torch.Tensor:
    n = math.sqrt(sum(float(v) ** 2 for v in row))
    return row.clone() if n <= c else row * (c / n)


def _ref_clipped_mean(g: torch.Tensor, c: float, b: float) -> torch.Tensor:
    total = torch.zeros(g.shape[1], dtype=g.dtype)
    for row in g:
        total = total + _ref_clip(row, c)
    return total / b


def _chi2_std_ok(z: torch.Tensor, std: float) -> bool:
    n = z.numel()
    stat = (n - 1) * z.double().var().item() / std ** 2
    return 2 * min(stats.chi2.cdf(stat, n - 1), stats.chi2.sf(stat, n - 1)) > 1e-4


# ------------------------------------------------------------------ DP-SGD

def test_dpsgd_noise_free_is_clipped_mean():
    g = _grads(0)
    out = DPSGD(clip=1.0, sigma=0.0).step(g)
    torch.testing.assert_close(out, _ref_clipped_mean(g, 1.0, 8))


def test_dpsgd_noise_is_seeded_gaussian_with_sigma_c_over_b():
    g = _grads(1)
    stage = DPSGD(clip=0.5, sigma=1.3, seed=11)
    out = stage.step(g, normalizer=10.0)
    expected_noise = GaussianNoise(1.0, seed=11).sample(12, std=1.3 * 0.5 / 10.0, dtype=g.dtype)
    torch.testing.assert_close(out - _ref_clipped_mean(g, 0.5, 10.0), expected_noise)
    assert stage.last_noise_multiplier == 1.3


def test_dpsgd_noise_std_statistical():
    d, b, c, sigma = 200_000, 16, 2.0, 0.8
    out = DPSGD(clip=c, sigma=sigma, seed=5).step(torch.zeros(b, d))
    assert _chi2_std_ok(out, sigma * c / b)


def test_dpsgd_empty_batch_releases_noise_and_refusals():
    out = DPSGD(clip=1.0, sigma=1.0, seed=0).step(torch.zeros(0, 4), normalizer=5.0)
    assert out.shape == (4,) and (out != 0).all()
    with pytest.raises(ConfigError, match="empty batch"):
        DPSGD(clip=1.0, sigma=1.0).step(torch.zeros(0, 4))
    with pytest.raises(ConfigError, match="unbounded"):
        DPSGD(clip=math.inf, sigma=1.0)
    with pytest.raises(ConfigError):
        DPSGD(clip=1.0, sigma=-1.0)
    with pytest.raises(ConfigError):
        DPSGD(clip=1.0, sigma=1.0).step(torch.zeros(2, 3), torch.zeros(2, 3))


# ------------------------------------------------------------------ EF-DPSGD / DiceSGD

def test_efdpsgd_matches_direct_reference_recursion():
    # summed scale (reference code 564612540/DiceSGD): s = Σclip(g, C₁) + clip(e, C₂), v = (s + w)/B,
    # e ← e + Σg − s, noise std σ(C₁ + 2C₂) on the sum. (The old test encoded the mean-scale
    # version with noise σC₁√(1 + 2C₂/C₁)/B, which under-noised.)
    c1, c2, sigma, seed, b = 0.5, 1.5, 0.7, 9, 8
    stage = EFDPSGD(clip1=c1, clip2=c2, sigma=sigma, seed=seed)
    ref_noise = GaussianNoise(1.0, seed=seed)
    e = torch.zeros(12, dtype=torch.float64)
    std = sigma * (c1 + 2 * c2) / b
    for t in range(10):
        g = _grads(100 + t)
        # Zhang et al. 2024, Alg. 1, written out directly on the summed scale.
        s = _ref_clipped_mean(g, c1, 1.0) + _ref_clip(e, c2)
        expected_out = s / b + ref_noise.sample(12, std=std, dtype=torch.float64)
        e = e + g.sum(0) - s
        out = stage.step(g)
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(stage.error, e)
    assert stage.last_noise_multiplier == sigma
    rel = stage.last_release
    assert rel.sensitivity == pytest.approx((c1 + 2 * c2) / b) and not rel.subsampled


def test_efdpsgd_error_feedback_removes_clipping_bias():
    """B·Σ_t v_t = Σ_t Σ_i g_i − e_T (telescoping of e_{t+1} = e_t + Σg − s_t), noise off."""
    stage = EFDPSGD(clip1=0.3, clip2=0.6, sigma=0.0)
    sum_v = torch.zeros(12, dtype=torch.float64)
    sum_g = torch.zeros(12, dtype=torch.float64)
    for t in range(25):
        g = _grads(200 + t)
        sum_v += stage.step(g)
        sum_g += g.mean(0)
    torch.testing.assert_close(sum_v * 8, sum_g * 8 - stage.error)
    # and DP-SGD's clipped sum is biased: it misses what EF recovers
    dpsgd = DPSGD(clip=0.3, sigma=0.0)
    sum_clip = sum(dpsgd.step(_grads(200 + t)) for t in range(25))
    assert (sum_g - sum_v).norm() < (sum_g - sum_clip).norm()


def test_efdpsgd_noise_std_and_state_round_trip():
    d, b = 100_000, 10
    stage = EFDPSGD(clip1=1.0, clip2=2.0, sigma=1.2, seed=3)
    out = stage.step(torch.zeros(b, d))
    assert _chi2_std_ok(out, 1.2 * (1.0 + 2 * 2.0) / b)
    a = EFDPSGD(clip1=0.5, clip2=0.5, sigma=0.3, seed=1)
    a.step(_grads(1))
    st = a.state_dict()
    x = a.step(_grads(2))
    b2 = EFDPSGD(clip1=0.5, clip2=0.5, sigma=0.3, seed=99)
    b2.load_state_dict(st)
    torch.testing.assert_close(b2.step(_grads(2)), x)


def test_efdpsgd_error_clip_ratio_option():
    a = EFDPSGD(0.5, sigma=1.0, error_clip_ratio=3.0)
    assert a.clip2 == 1.5 and a.error_clip_ratio == 3.0
    assert EFDPSGD(0.5, sigma=1.0).clip2 == 0.5  # default C₂ = C₁ (the reference code's)
    with pytest.raises(ConfigError, match="not both"):
        EFDPSGD(0.5, 1.0, 1.0, error_clip_ratio=2.0)
    with pytest.raises(ConfigError, match="sigma"):
        EFDPSGD(0.5, 0.5)


def test_efdpsgd_refusals_and_no_clip_is_plain_mean():
    with pytest.raises(ConfigError, match="C2 >= C1"):
        EFDPSGD(clip1=1.0, clip2=0.5, sigma=1.0)
    with pytest.raises(ConfigError):
        EFDPSGD(clip1=math.inf, clip2=math.inf, sigma=1.0)
    stage = EFDPSGD(clip1=math.inf, clip2=math.inf, sigma=0.0)
    g = _grads(3)
    torch.testing.assert_close(stage.step(g), g.mean(0))
    torch.testing.assert_close(stage.error, torch.zeros_like(stage.error), atol=1e-12, rtol=0)


# ------------------------------------------------------------------ DIFF2

def test_diff2_estimator_is_true_gradient_without_noise_and_clipping():
    worker, server = DIFF2Worker(math.inf, math.inf, 0.0, 0.0, period=4), DIFF2Server(4)
    prev = None
    for r in range(1, 12):
        g = _grads(300 + r)  # per-sample grads "at x_{r-1}" on this round's samples
        # the previous round's matrix stands for the grads at x_{r-2} on the same (full) batch
        v = server.step(worker.step(g, prev if worker.needs_previous else None))
        torch.testing.assert_close(v, g.mean(0))
        prev = g


def test_diff2_restart_schedule_and_noise_levels():
    b, d = 20, 100_000
    c1, c2, s1, s2 = 2.0, 0.25, 1.5, 3.0
    worker = DIFF2Worker(c1, c2, s1, s2, period=3, seed=4)
    restarts, mults = [], []
    for r in range(1, 8):
        restarts.append(not worker.needs_previous)
        z = torch.zeros(b, d)
        out = worker.step(z, None if not worker.needs_previous else z)
        mults.append(worker.last_noise_multiplier)
        if r in (1, 2):
            assert _chi2_std_ok(out, (s1 * c1 if r == 1 else s2 * c2) / b)
    assert restarts == [True, False, False, True, False, False, True]  # (r-1) mod T == 0
    assert mults == [s1, s2, s2, s1, s2, s2, s1]


def test_diff2_clips_the_difference_not_each_gradient():
    """Large gradients whose difference is small pass unclipped: sensitivity is C2 on the difference."""
    g_prev = _grads(7, spread=0.0) * 10  # norms ~ 10·sqrt(12)
    delta = _grads(8, spread=0.0) * 0.01  # norms ~ 0.035 < C2
    worker = DIFF2Worker(1.0, 0.1, 0.0, 0.0, period=5)
    worker.step(g_prev)
    out = worker.step(g_prev + delta, g_prev)
    torch.testing.assert_close(out, delta.mean(0))
    # and removing one sample moves the clipped-difference sum by at most C2
    big = _grads(9, spread=3.0)
    w2 = DIFF2Worker(1.0, 0.1, 0.0, 0.0, period=5)
    w2.step(big)
    full = w2.step(big * 2, big) * 8
    for i in range(8):
        w3 = DIFF2Worker(1.0, 0.1, 0.0, 0.0, period=5)
        keep = torch.cat([big[:i], big[i + 1:]])
        w3.step(keep)
        rest = w3.step(keep * 2, keep, normalizer=1.0)
        assert (full - rest).norm() <= 0.1 * (1 + 1e-9)


def test_diff2_refusals_and_state():
    w = DIFF2Worker(1.0, 1.0, 1.0, 1.0, period=2, seed=0)
    w.step(_grads(1))
    with pytest.raises(ConfigError, match="previous point"):
        w.step(_grads(2))
    with pytest.raises(ConfigError):
        DIFF2Worker(1.0, 1.0, 1.0, 1.0, period=0)
    with pytest.raises(ConfigError):
        DIFF2Worker(1.0, math.inf, 1.0, 1.0, period=2)
    s = DIFF2Server(3)
    s.step(torch.ones(4))
    st = s.state_dict()
    s2 = DIFF2Server(3)
    s2.load_state_dict(st)
    torch.testing.assert_close(s2.step(torch.ones(4)), torch.full((4,), 2.0))
    with pytest.raises(ConfigError, match="no estimate"):
        fresh = DIFF2Server(3)
        fresh.round = 1
        fresh.step(torch.ones(4))


# ------------------------------------------------------------------ trainer

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))


def _mse(out, y):
    return F.mse_loss(out, y)


def test_trainer_diff2_applies_true_full_gradient_when_non_private():
    model = _model()
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(2)), torch.randn(32, 1)
    trainer = PrivateTrainer(model, _mse, DIFF2Worker(math.inf, math.inf, 0.0, 0.0, period=3),
                             torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(7):
        expected = per_sample_grads(model, _mse, x, y).mean(0)
        direction = trainer.step(x, y)
        torch.testing.assert_close(direction, expected, rtol=1e-5, atol=1e-6)


def test_trainer_records_to_accountant_and_refuses_non_private():
    from commlib.privacy import Accountant, epsilon

    model = _model()
    acc = Accountant(1e-5)
    trainer = PrivateTrainer(model, _mse, DPSGD(1.0, 1.1, seed=0), torch.optim.SGD(model.parameters(), lr=0.1),
                             accountant=acc, sample_rate=0.1, expected_batch_size=3.2)
    x, y = torch.randn(3, 4), torch.randn(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        trainer.step(x, y)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert acc.steps == 5 and acc.epsilon == pytest.approx(epsilon(1.1, 1e-5, 0.1, 5))
    with pytest.raises(ConfigError, match="not private"):
        PrivateTrainer(model, _mse, DPSGD(1.0, 0.0), accountant=Accountant(1e-5))


def test_registry_builds_stages():
    st = PRIVACY_STAGES.build("dicesgd", clip1=1.0, clip2=2.0, sigma=1.0, seed=0)
    assert isinstance(st, EFDPSGD)
    diff2 = PRIVACY_STAGES.build("diff2", clip1=1.0, clip2=0.1, sigma1=1.0, sigma2=1.0, period=4)
    assert isinstance(diff2, DIFF2Worker)
    with pytest.raises(ConfigError):
        PRIVACY_STAGES.build("dpsgd", clip=1.0)
