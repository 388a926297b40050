"""Flag Aggregator against a direct FlagIRLS: explicit unit columns, QR of the seeded d x r
matrix, thin SVD of the d x (p + pairs) weighted matrix at every step (docs/algorithms.md §6.4)."""
from __future__ import annotations

import math

import pytest
import torch

from commlib.aggregate import NNM, FlagAggregator
from commlib.aggregate.flag import _ZRows, flag_init_matrix


def ref_flag(x, r, iterations=4, lam=0.0, eps=1e-7, seed=1):
    xd = x.double()
    p, d = xd.shape
    cols = [(v / max(float(v.norm()), 1e-12))[:, None] for v in xd]
    y = torch.linalg.qr(flag_init_matrix(d, r, seed).double()).Q[:, :r]

    def objective(y):
        return sum(math.sqrt(max(0.0, 1.0 - float((y.t() @ c).square().sum()))) for c in cols)

    def step(y):
        a = []
        for c in cols:
            a.append(c * (abs(1.0 - float((y.t() @ c).square().sum())) + eps) ** -0.25)
        if lam > 0:
            for i in range(p):
                for j in range(p):
                    if i != j:
                        dc = cols[i] - cols[j]
                        w = lam / (p * (p - 1)) * (abs(1.0 - float((y.t() @ dc).square().sum())) + eps) ** -0.25
                        a.append(w * dc)
        return torch.linalg.svd(torch.hstack(a), full_matrices=False).U[:, :r]

    err, it, diff = [objective(y)], 1, 1.0
    prev = y
    while it <= iterations and diff > 1e-10 and err[it - 1] > 1e-10:
        prev = y
        y = step(y)
        err.append(objective(y))
        diff = err[it - 1] - err[it]
        it += 1
    if not diff > 0:
        y = prev
    return sum(y @ (y.t() @ c) for c in cols)[:, 0] / r


def data(p, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    x = base + 0.7 * torch.randn(p, d, generator=g, dtype=torch.float64)
    return (x * torch.linspace(0.5, 2.0, p, dtype=torch.float64)[:, None]).to(dtype)


def assert_close(a, b, tol):
    err = float((a.double() - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


@pytest.mark.parametrize("p,d,r,lam", [(8, 40, 4, 0.0), (7, 25, 2, 0.0), (6, 30, 3, 0.5), (5, 12, 1, 2.0)])
def test_flag_matches_direct_flag_irls(p, d, r, lam):
    x = data(p, d, seed=p + d)
    ref = ref_flag(x, r, lam=lam)
    assert_close(FlagAggregator(r=r, lam=lam)(x), ref, 1e-8)
    assert_close(FlagAggregator(r=r, lam=lam, cache_init=False)(x), ref, 1e-8)
    assert_close(FlagAggregator(r=r, lam=lam)(x.float()), ref, 2e-4)


def test_flag_iteration_count_and_seed_matter():
    x = data(8, 30, seed=3)
    assert_close(FlagAggregator(r=3, iterations=1, seed=5)(x), ref_flag(x, 3, iterations=1, seed=5), 1e-8)
    assert_close(FlagAggregator(r=3, iterations=0)(x), ref_flag(x, 3, iterations=0), 1e-8)  # Y_0 itself


def test_flag_zero_rows_stay_zero_and_rescale_uses_the_median_norm():
    x = data(6, 20, seed=4)
    x[2] = 0.0
    assert_close(FlagAggregator(r=3)(x), ref_flag(x, 3), 1e-8)
    out = FlagAggregator(r=3, rescale=True)(x)
    assert math.isclose(float(out.norm()), float(torch.quantile(x.norm(dim=1), 0.5)), rel_tol=1e-9)


def test_flag_init_rows_stream_equals_the_full_matrix():
    full = flag_init_matrix(1000, 3, seed=9)
    rows = _ZRows(1000, 3, 9, torch.float32, torch.device("cpu"), None)
    parts = torch.cat([rows(s, min(1000, s + 137)) for s in range(0, 1000, 137)], dim=1)
    assert torch.equal(parts, full.t())


def test_flag_after_nnm_is_flag_of_the_mixed_points():
    x = data(9, 30, seed=6)
    y = NNM(f=2).preaggregate(x)
    assert_close(NNM(f=2, base={"name": "flag", "r": 3})(x), ref_flag(y, 3), 1e-8)
