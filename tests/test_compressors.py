"""Compressors against direct references, and their stated contraction / unbiasedness."""
import math

import pytest
import torch

from commlib import ConfigError, Scheme
from commlib.compress import COMPRESSORS, DGCTopK, RandK, TopK, k_of
from commlib.compress.identity import BF16, FP16


def ref_topk(x, k):
    order = sorted(range(x.numel()), key=lambda i: -abs(float(x[i])))
    out = torch.zeros_like(x)
    for i in order[:k]:
        out[i] = x[i]
    return out


def ref_dgc_select(x, ratio, sample_ratio=0.01, rounds=10, block=16):
    """DGC selection (docs/algorithms.md §1, steps 1-3), written out directly (loops, Python lists)."""
    n = x.numel()
    k = max(1, math.ceil(ratio * n))
    s = min(n, max(math.ceil(sample_ratio * n), math.ceil(2 / ratio)))
    b = 1  # blocks of b consecutive entries, b the largest power of two <= min(block, s)
    while 2 * b <= min(block, s):
        b *= 2
    stride = max(b, (n // -(-s // b)) // b * b)  # one block every stride entries, the first at 0
    sample = [abs(float(x[i])) for start in range(0, n, stride) for i in range(start, min(start + b, n))][:s]
    top = max(1, math.ceil(len(sample) * ratio))
    thr = sorted(sample, reverse=True)[top - 1]
    mags = [abs(float(v)) for v in x]
    sel = [i for i in range(n) if mags[i] >= thr]
    for _ in range(rounds):
        if len(sel) > 1.3 * k:
            break
        if len(sel) < 0.8 * k:
            thr *= 0.8
            sel = [i for i in range(n) if mags[i] >= thr]
            continue
        break
    if len(sel) > k:
        sel = sorted(sel, key=lambda i: -mags[i])[:k]
    return sorted(sel)


@pytest.mark.parametrize("n,ratio", [(1, 0.5), (10, 0.3), (257, 0.01), (1000, 0.05), (5000, 0.001)])
def test_topk_matches_reference(n, ratio):
    x = torch.randn(n, dtype=torch.float64)
    c = TopK(ratio)
    assert torch.equal(c(x), ref_topk(x, k_of(n, ratio)))
    p = c.compress(x)
    assert p.nnz == k_of(n, ratio) and torch.all(p.indices[1:] > p.indices[:-1])


@pytest.mark.parametrize("n,ratio,seed", [(3000, 0.01, 0), (20000, 0.001, 1), (777, 0.05, 2), (100, 0.5, 3)])
def test_dgc_selection_matches_reference(n, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) ** 3
    for block in (16, 4, 1):
        p = DGCTopK(ratio, sample_block=block).compress(x)
        assert p.indices.tolist() == ref_dgc_select(x, ratio, block=block)
        assert p.nnz <= k_of(n, ratio)
        assert torch.equal(p.values, x[p.indices.long()])
    for bad in (0, 3, 2.0, -4, True):
        with pytest.raises(ConfigError):
            DGCTopK(ratio, sample_block=bad)


def test_dgc_selects_largest_entries_and_contracts():
    x = torch.randn(50000)
    c = DGCTopK(0.001)
    y = c(x)
    sel = y != 0
    # every selected magnitude >= every unselected magnitude
    assert x[sel].abs().min() >= x[~sel].abs().max()
    nnz = int(sel.sum())
    assert (y - x).pow(2).sum() <= (1 - nnz / x.numel()) * x.pow(2).sum() + 1e-6
    assert 0.8 * k_of(x.numel(), 0.001) <= nnz <= k_of(x.numel(), 0.001)


@pytest.mark.parametrize("name,opts", [("topk", {"ratio": 0.1}), ("dgc", {"ratio": 0.1}), ("randk", {"ratio": 0.1}),
                                       ("identity", {}), ("fp16", {}), ("bf16", {})])
def test_stated_contraction_holds(name, opts):
    c = COMPRESSORS.build(name, **opts)
    torch.manual_seed(0)
    if name == "randk":  # contraction in expectation: average many seeds
        x = torch.randn(400, dtype=torch.float64)
        err = torch.stack([(c(x, seed=s) - x).pow(2).sum() for s in range(400)]).mean()
        assert err <= (1 - c.delta(400)) * x.pow(2).sum() * 1.05
        return
    for _ in range(5):
        x = torch.randn(400, dtype=torch.float32 if name in ("fp16", "bf16") else torch.float64)
        d = c.delta(x.numel())
        assert d is not None and 0 < d <= 1
        err = (c(x).to(torch.float64) - x.to(torch.float64)).pow(2).sum()
        assert err <= (1 - d) * x.to(torch.float64).pow(2).sum() + 1e-12


def test_randk_unbiased_mean():
    c = RandK(0.25, unbiased=True)
    x = torch.randn(40, dtype=torch.float64)
    mean = torch.stack([c(x, seed=s) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, x, atol=0.25)
    assert c.unbiased and c.omega(40) == pytest.approx(3.0)
    assert not RandK(0.25).unbiased


def test_fp16_overflow_scaled_and_bf16_range():
    x = torch.tensor([1e6, -3e5, 1.0])
    p = FP16().compress(x)
    assert p.scale > 1 and torch.isfinite(p.values).all()
    assert torch.allclose(p.to_dense(), x, rtol=1e-3)
    assert BF16().compress(x).scale == 1.0


def test_registry_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown compressor 'nope'"):
        Scheme(compressor="nope")
    with pytest.raises(ConfigError, match="ratio"):
        Scheme(compressor="topk", ratio=0.0)
    with pytest.raises(ConfigError, match="topk"):
        Scheme(compressor="topk", compressor_options={"bogus": 1})
    with pytest.raises(ConfigError, match="nonfinite"):
        Scheme(nonfinite="ignore")
    with pytest.raises(ConfigError, match="smoothness"):
        Scheme(compressor="topk", ratio=0.1, feedback="ef21-w")
