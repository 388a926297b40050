"""The sparse hot-path ops (commlib.ops): both paths against slow direct references, and the
native extension against the pure-torch path bit for bit, under every CPU instruction set
the machine has (scalar, AVX2, AVX-512 kernels)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch

import commlib.ops as ops
from commlib.errors import ConfigError, NonFiniteError, PayloadError
from commlib.ops import native, torch_ops, torch_pack
from commlib.wire import PAYLOAD_HEADER_BYTES, Flag, Kind, Payload

LIB = native.LIB
needs_native = pytest.mark.skipif(LIB is None, reason=f"native extension not active: {ops.native_status()}")
BACKENDS = ["torch"] + (["native"] if LIB is not None else [])
SEL = {"torch": torch_ops, "native": native}
PACK = {"torch": torch_pack, "native": native}
ISAS = [i for i in ("scalar", "avx2", "avx512") if LIB is not None and
        ["scalar", "avx2", "avx512"].index(i) <= ["scalar", "avx2", "avx512"].index(LIB.best_isa())]
SIZES = [0, 1, 7, 15, 16, 17, 63, 64, 65, 1000, 4097, 70001, 200003]


@pytest.fixture(autouse=True)
def two_threads():
    """conftest runs torch single-threaded; the native kernels' parallel paths need 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    if LIB is None:
        pytest.skip(f"native extension not active: {ops.native_status()}")
    before = LIB.isa()
    assert LIB.set_isa(request.param) == request.param
    yield request.param
    LIB.set_isa(before)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(iv), b.contiguous().view(iv))
    return torch.equal(a, b)


def gradient_like(n: int, seed: int, density: float = 0.01) -> torch.Tensor:
    """Heavy-tailed values with ties, zeros, -0.0 and a few huge entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4)
    if n > 10:
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = 0.0
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = -0.0
        x[torch.randint(0, n, (max(1, n // 100),), generator=g)] = 0.5  # ties
        x[torch.randint(0, n, (max(1, int(n * density)),), generator=g)] *= 1e3
    return x


# ---- slow, obviously-correct references ---------------------------------------------------------
def ref_select(x: torch.Tensor, thr: float) -> Tuple[np.ndarray, np.ndarray]:
    a = x.reshape(-1).numpy()
    t = np.float32(thr)
    keep = [i for i in range(a.size) if abs(a[i]) >= t]
    return np.array(keep, dtype=np.int32), a[keep]


def ref_kth(mags: List[float], k: int) -> float:
    if any(math.isnan(m) for m in mags):
        return math.nan
    return sorted(mags, reverse=True)[k - 1]


def ref_keep_largest(idx: np.ndarray, vals: np.ndarray, m: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    if m is None or len(idx) <= m:
        return idx, vals
    order = sorted(range(len(idx)), key=lambda j: (-abs(float(vals[j])), int(idx[j])))[:m]
    order.sort()
    return idx[order], vals[order]


def ref_dgc(u, v, g, m, nesterov):
    """numpy float32: every operation rounds once, as the paper's formulas read."""
    m = np.float32(m)
    if nesterov:
        u = (u + g) * m
        v = (v + u) + g
    else:
        u = m * u + g
        v = v + u
    return u.astype(np.float32), v.astype(np.float32)


# ---- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_threshold_select_matches_reference(backend, n):
    x = gradient_like(n, seed=n)
    if n > 3:
        x[3] = float("nan")
    for thr in (2.0, 0.5, 0.0, float("inf"), 1.0 + 1e-10):
        idx, vals = SEL[backend].threshold_select(x, thr)
        ri, rv = ref_select(x, thr) if n < 5000 else ref_select_np(x, thr)
        assert idx.dtype == torch.int32 and np.array_equal(idx.numpy(), ri)
        assert same(vals, torch.from_numpy(rv.copy()))


def ref_select_np(x: torch.Tensor, thr: float):
    a = x.numpy()
    keep = np.nonzero(np.abs(a) >= np.float32(thr))[0].astype(np.int32)
    return keep, a[keep]


@needs_native
@pytest.mark.parametrize("n", SIZES + [1 << 20])
def test_native_select_equals_torch(isa, n):
    for density in (0.001, 0.01, 0.1, 1.0):
        x = gradient_like(n, seed=7 * n + 1, density=density)
        thr = torch_ops.sampled_threshold(x, density) if n else 1.0
        a, b = native.threshold_select(x, thr), torch_ops.threshold_select(x, thr)
        assert same(a[0], b[0]) and same(a[1], b[1])
    x = gradient_like(n, seed=3)
    for thr in (0.0, -1.0, float("-inf"), float("nan"), float("inf")):
        a, b = native.threshold_select(x, thr), torch_ops.threshold_select(x, thr)
        assert same(a[0], b[0]) and same(a[1], b[1])


@needs_native
def test_non_contiguous_inputs(isa):
    base = gradient_like(2 * 300_007, seed=5)
    views = [base[::2], base.view(2, -1).t(), base[1::3], base[:600_012].view(-1, 6)[:, 2]]
    for x in views:
        assert not x.is_contiguous()
        a, b = native.threshold_select(x, 1.5), torch_ops.threshold_select(x, 1.5)
        assert same(a[0], b[0]) and same(a[1], b[1])
        for off in (0, 5):
            for block in (1, 4, 16):
                assert native.sampled_threshold(x, 0.01, offset=off, block=block) == \
                    torch_ops.sampled_threshold(x, 0.01, offset=off, block=block)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_largest_breaks_ties_by_lower_index(backend):
    x = torch.tensor([3.0, -1.0, 3.0, 0.5, -3.0, 2.0, 3.0, 0.0])
    buf = torch.zeros(512, dtype=torch.uint8)
    end, nnz = PACK[backend].pack_threshold_(buf, 0, x, 0.0, max_nnz=3)
    p, _ = Payload.decode_from(buf, 0)
    assert (end, nnz) == (p.nbytes, 3)
    assert p.indices.tolist() == [0, 2, 4] and p.values.tolist() == [3.0, 3.0, -3.0]
    end, nnz = PACK[backend].pack_threshold_(buf, 0, x, 0.0, max_nnz=5)
    p, _ = Payload.decode_from(buf, 0)
    assert p.indices.tolist() == [0, 2, 4, 5, 6]
    end, nnz = PACK[backend].pack_threshold_(buf, 0, x, 0.0, max_nnz=0)
    assert nnz == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [None, 0, 1, 10, 57, 1000])
def test_keep_largest_matches_reference(backend, m):
    x = torch.round(gradient_like(3001, seed=11) * 4) / 4  # many ties
    idx, vals = torch_ops.threshold_select(x, 0.25)
    ri, rv = ref_keep_largest(idx.numpy(), vals.numpy(), m)
    buf = torch.zeros(64 + 8 * 4000, dtype=torch.uint8)
    PACK[backend].pack_threshold_(buf, 0, x, 0.25, max_nnz=m)
    p, _ = Payload.decode_from(buf, 0)
    assert np.array_equal(p.indices.numpy(), ri) and np.array_equal(p.values.numpy(), rv)


# ---- sampled thresholds -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 99, 1000, 12345, 250_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_sampled_threshold_matches_reference(backend, n, ratio):
    x = gradient_like(n, seed=n + 17)
    for offset in (0, 3, 1_000_003):
        sample = [abs(float(x[i])) for i in ref_sample_positions(n, ratio, 0.01, offset)]
        want = ref_kth(sample, max(1, math.ceil(len(sample) * ratio)))
        assert SEL[backend].sampled_threshold(x, ratio, offset=offset) == want


def ref_sample_positions(n: int, ratio: float, sample_ratio: float, offset: int, block: int = 16):
    """DGC's threshold sample written out: s = max(1% of n, 2 / ratio) entries (at most n), taken
    in blocks of b consecutive entries (b: the largest power of two <= min(block, s)), one block
    every stride entries (n // the number of blocks, rounded down to a multiple of b, at least b),
    the first block at the (offset mod stride / b)-th multiple of b; entries past the end of the
    tensor are dropped."""
    s = min(n, max(math.ceil(sample_ratio * n), math.ceil(2 / ratio)))
    b = 1
    while 2 * b <= min(block, s):
        b *= 2
    blocks = -(-s // b)
    stride = max(b, (n // blocks) // b * b)
    start = (offset % (stride // b)) * b
    out = []
    for k in range(blocks):
        for t in range(b):
            if len(out) < s and start + k * stride + t < n:
                out.append(start + k * stride + t)
    return out


@pytest.mark.parametrize("n", [1, 5, 7, 16, 17, 99, 1000, 12345, 250_000, 49_500_000])
@pytest.mark.parametrize("ratio", [0.001, 0.3])
def test_sample_plan_is_the_written_out_sample(n, ratio):
    for sample_ratio in (0.01, 0.2):
        for offset in (0, 5, 1599):
            want = ref_sample_positions(n, ratio, sample_ratio, offset)
            plan = torch_ops.sample_plan(n, ratio, sample_ratio, offset)
            if n <= 250_000:
                assert torch_ops.sample_index(plan).tolist() == want
            else:  # compare the ends and the count only (the list is long)
                got = torch_ops.sample_index(plan)
                assert got.numel() == len(want) and got[:40].tolist() == want[:40] and got[-40:].tolist() == want[-40:]
            assert plan.top == max(1, math.ceil(len(want) * ratio))
            s = min(n, max(math.ceil(sample_ratio * n), math.ceil(2 / ratio)))
            assert s - plan.block < plan.count <= s  # all but part of the last block fit
            # spread over the tensor: stride = n // blocks rounded down to a multiple of the block,
            # so after the last block's start less than one stride plus block + 1 entries per
            # block are left
            blocks = -(-plan.count // plan.block)
            assert n - (plan.start + (blocks - 1) * plan.stride) <= plan.stride + blocks * (plan.block + 1)
            assert plan.start % plan.block == 0 and plan.stride % plan.block == 0


@needs_native
def test_native_sample_checks_refuse_bad_plans():
    x = torch.ones(100)
    for start, stride, s, top, log2 in ((0, 8, 20, 1, 4),        # blocks of 16 every 8: overlap
                                        (0, 2 ** 62, 20, 1, 2),  # the last entry's position overflows
                                        (2 ** 63 - 10, 1, 20, 1, 0), (0, 5, 21, 1, 0), (-1, 1, 5, 1, 0),
                                        (0, 1, 5, 6, 0), (0, 16, 5, 1, 31)):
        with pytest.raises(RuntimeError):
            native.LIB.sampled_threshold(x, start, stride, s, top, log2)
    assert native.LIB.sampled_threshold(x, 4, 16, 20, 1, 4) == 1.0  # entries 4..19 and 20..23: fine


def test_sample_plan_block_one_is_the_strided_sample():
    for n, ratio, off in ((12345, 0.001, 3), (250_000, 0.01, 0), (99, 0.3, 7)):
        plan = torch_ops.sample_plan(n, ratio, 0.01, off, block=1)
        s = min(n, max(math.ceil(0.01 * n), math.ceil(2 / ratio)))
        stride = max(1, n // s)
        assert torch_ops.sample_index(plan).tolist() == list(range(off % stride, n, stride))[:s]
    with pytest.raises(ConfigError):
        torch_ops.sample_plan(100, 0.1, block=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_threshold_nan_and_empty(backend):
    x = torch.ones(1000)
    x[10] = float("nan")
    assert math.isnan(SEL[backend].sampled_threshold(x, 0.01, sample_ratio=1.0))
    assert SEL[backend].sampled_threshold(torch.empty(0), 0.01) == math.inf
    with pytest.raises(ConfigError):
        SEL[backend].sampled_threshold(x, 0.0)


@needs_native
@pytest.mark.parametrize("n", [5, 640, 100_003, 1 << 20])
def test_native_sampled_threshold_equals_torch(n):
    for seed in range(3):
        x = gradient_like(n, seed=seed)
        for ratio in (0.001, 0.05, 0.5):
            for sample_ratio in ((0.01, 0.2, 1.0) if n < 200_000 else (0.01, 0.2)):
                for off in (0, 1, 97):
                    for block in (1, 4, 16):
                        assert native.sampled_threshold(x, ratio, sample_ratio, off, block) == \
                            torch_ops.sampled_threshold(x, ratio, sample_ratio, off, block)
    x = torch.full((n,), 0.25)  # every sample equal: the radix select's worst case
    assert native.sampled_threshold(x, 0.001) == 0.25


# ---- DGC ------------------------------------------------------------------------------------------
def dgc_state(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.3,
            gradient_like(n, seed=seed + 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("max_nnz", [None, 0, 5, 40])
def test_dgc_update_select_matches_reference(backend, nesterov, max_nnz):
    n = 4099
    u, v, g = dgc_state(n, seed=1)
    ru, rv = ref_dgc(u.numpy().copy(), v.numpy().copy(), g.numpy(), 0.9, nesterov)
    thr = 0.8
    keep = np.nonzero(np.abs(rv) >= np.float32(thr))[0].astype(np.int32)
    ri, rvals = ref_keep_largest(keep, rv[keep], max_nnz)
    ru[ri] = 0.0
    rv_masked = rv.copy()
    rv_masked[ri] = 0.0
    idx, vals = SEL[backend].dgc_update_select_(u, v, g, 0.9, thr, nesterov=nesterov, max_nnz=max_nnz)
    assert np.array_equal(idx.numpy(), ri) and np.array_equal(vals.numpy(), rvals)
    assert np.array_equal(u.numpy(), ru) and np.array_equal(v.numpy(), rv_masked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_threshold_is_sampled_threshold_of_updated_v(backend, nesterov):
    u, v, g = dgc_state(200_001, seed=2)
    u0, v0 = u.clone(), v.clone()
    thr = SEL[backend].dgc_threshold(u, v, g, 0.9, 0.001, nesterov=nesterov, offset=4)
    assert same(u, u0) and same(v, v0)  # nothing written
    torch_ops.dgc_momentum_(u, v, g, 0.9, nesterov)
    assert thr == torch_ops.sampled_threshold(v, 0.001, offset=4)


@needs_native
@pytest.mark.parametrize("n", [0, 1, 17, 1000, 300_001])
@pytest.mark.parametrize("nesterov", [False, True])
def test_native_dgc_equals_torch(isa, n, nesterov):
    for max_nnz in (None, 3, n // 500 + 1):
        states = [dgc_state(n, seed=n + 3) for _ in range(2)]
        g = states[0][2]
        for step in range(2):  # the second step starts from masked state
            for block in (1, 4):
                assert native.dgc_threshold(*states[0], 0.9, 0.002, nesterov=nesterov, block=block) == \
                    torch_ops.dgc_threshold(*states[1], 0.9, 0.002, nesterov=nesterov, block=block)
            thr = native.dgc_threshold(*states[0], 0.9, 0.002, nesterov=nesterov)
            assert thr == torch_ops.dgc_threshold(*states[1], 0.9, 0.002, nesterov=nesterov)
            thr = thr if n else 1.0
            a = native.dgc_update_select_(states[0][0], states[0][1], g, 0.9, thr, nesterov=nesterov, max_nnz=max_nnz)
            b = torch_ops.dgc_update_select_(states[1][0], states[1][1], g, 0.9, thr, nesterov=nesterov,
                                             max_nnz=max_nnz)
            assert same(a[0], b[0]) and same(a[1], b[1])
            assert same(states[0][0], states[1][0]) and same(states[0][1], states[1][1])


# ---- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vd", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_threshold_writes_a_valid_payload(backend, vd):
    x = gradient_like(10_001, seed=4)
    x[7] = 1e6  # overflows float16: inf on the wire, as x.to(float16) gives
    buf = torch.full((200_000,), 0xAB, dtype=torch.uint8)
    end, nnz = PACK[backend].pack_threshold_(buf, 40, x, 1.0, slot=3, scale=0.5, flags=Flag.RESET, value_dtype=vd)
    p, end2 = Payload.decode_from(buf, 40, finite="allow", numel=10_001, slot=3)
    idx, vals = torch_ops.threshold_select(x, 1.0)
    assert end == end2 == 40 + p.nbytes and nnz == p.nnz == idx.numel()
    assert p.kind == Kind.SPARSE and p.scale == 0.5 and p.flags == Flag.RESET
    assert same(p.indices, idx) and same(p.values, vals.to(vd))
    body = buf[40 + PAYLOAD_HEADER_BYTES:end]
    if nnz % 2:  # index padding
        assert int(body[4 * nnz:4 * nnz + 4].sum()) == 0
    assert bool((buf[end:] == 0xAB).all()) and bool((buf[:40] == 0xAB).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_refuses_a_buffer_too_small(backend):
    x = gradient_like(5000, seed=6)
    nnz = torch_ops.threshold_select(x, 1.0)[0].numel()
    need = Payload.max_bytes(Kind.SPARSE, nnz, torch.float32)
    buf = torch.full((need - 8,), 7, dtype=torch.uint8)
    with pytest.raises(PayloadError, match="needs"):
        PACK[backend].pack_threshold_(buf, 0, x, 1.0)
    assert bool((buf == 7).all())
    assert PACK[backend].pack_threshold_(torch.zeros(need, dtype=torch.uint8), 0, x, 1.0) == (need, nnz)
    with pytest.raises(PayloadError):
        PACK[backend].pack_threshold_(buf, 4, x, 1.0)
    with pytest.raises(ConfigError):
        PACK[backend].pack_threshold_(buf, 0, x, 1.0, value_dtype=torch.int8)


@needs_native
@pytest.mark.parametrize("n", [0, 1, 33, 4096, 262_147])
def test_native_pack_bytes_equal_torch(isa, n):
    x = gradient_like(n, seed=n + 9)
    for vd in (torch.float32, torch.float16, torch.bfloat16):
        for thr, max_nnz in ((1.0, None), (0.0, None), (0.3, 17), (float("inf"), None)):
            a = torch.full((64 + 8 * n + 80,), 0x5A, dtype=torch.uint8)
            b = a.clone()
            ra = native.pack_threshold_(a, 16, x, thr, max_nnz=max_nnz, slot=9, scale=2.0, value_dtype=vd)
            rb = torch_pack.pack_threshold_(b, 16, x, thr, max_nnz=max_nnz, slot=9, scale=2.0, value_dtype=vd)
            assert ra == rb and torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("nesterov", [False, True])
def test_native_dgc_pack_equals_torch(isa, nesterov):
    n = 150_001
    sa, sb = dgc_state(n, 8), dgc_state(n, 8)
    a = torch.zeros(64 + 8 * n, dtype=torch.uint8)
    b = a.clone()
    for step in range(2):
        thr = torch_ops.dgc_threshold(*sb, 0.9, 0.001, nesterov=nesterov)
        ra = native.dgc_update_pack_(a, 8, sa[0], sa[1], sa[2], 0.9, thr, nesterov=nesterov, max_nnz=100,
                                     value_dtype=torch.bfloat16)
        rb = torch_pack.dgc_update_pack_(b, 8, sb[0], sb[1], sb[2], 0.9, thr, nesterov=nesterov, max_nnz=100,
                                         value_dtype=torch.bfloat16)
        assert ra == rb and torch.equal(a, b) and same(sa[0], sb[0]) and same(sa[1], sb[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dgc_pack_too_small_keeps_values(backend):
    u, v, g = dgc_state(1000, 12)
    ru, rv = ref_dgc(u.numpy().copy(), v.numpy().copy(), g.numpy(), 0.5, False)
    with pytest.raises(PayloadError):
        PACK[backend].dgc_update_pack_(torch.zeros(64, dtype=torch.uint8), 0, u, v, g, 0.5, 0.0)
    assert np.array_equal(u.numpy(), ru) and np.array_equal(v.numpy(), rv)  # updated, not masked


# ---- scatter-add ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("vd", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scatter_add_matches_reference(backend, idx_dtype, vd):
    g = torch.Generator().manual_seed(0)
    n, k = 30_011, 20_000
    idx = torch.randint(0, n, (k,), generator=g).to(idx_dtype)  # unsorted, with duplicates
    vals = torch.randn(k, generator=g).to(vd)
    out = torch.randn(n, generator=g)
    ref = out.numpy().copy()
    a32 = np.float32(0.3)
    for i, val in zip(idx.tolist(), vals.to(torch.float32).numpy()):
        ref[i] = np.float32(ref[i] + np.float32(val * a32))
    SEL[backend].scatter_add_(out, idx, vals, 0.3)
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_rejects_out_of_range_before_writing(backend):
    out = torch.zeros(10)
    for bad in ([0, 10], [-1, 3], [2**31 - 1]):
        with pytest.raises(PayloadError, match="out of range"):
            SEL[backend].scatter_add_(out, torch.tensor(bad, dtype=torch.int32), torch.ones(len(bad)))
    assert bool((out == 0).all())
    with pytest.raises(PayloadError):
        SEL[backend].scatter_add_(out, torch.tensor([1, 2], dtype=torch.int32), torch.ones(3))


@needs_native
@pytest.mark.parametrize("n", [1, 1000, 300_007])
def test_native_scatter_equals_torch(n):
    g = torch.Generator().manual_seed(n)
    for sorted_idx in (True, False):
        idx = torch.randint(0, n, (n // 3 + 1,), generator=g)
        if sorted_idx:
            idx = torch.unique(idx)
        vals = torch.randn(idx.numel(), generator=g)
        a = torch.randn(n, generator=g)
        b = a.clone()
        native.scatter_add_(a, idx.to(torch.int32), vals, 1.7)
        torch_ops.scatter_add_(b, idx.to(torch.int32), vals, 1.7)
        assert same(a, b)


# ---- unpack -------------------------------------------------------------------------------------
def rank_buffers(n: int, ranks: int, seed: int, cap: int):
    """Rank r's row: a 32-byte preamble, a payload for another tensor, then ours; returns
    (bufs, offsets of ours, payloads)."""
    bufs = torch.zeros(ranks, cap, dtype=torch.uint8)
    offs, pays = [], []
    for r in range(ranks):
        x = gradient_like(n, seed=seed + r)
        kind = r % 4
        vd = (torch.float32, torch.float16, torch.bfloat16, torch.float64)[r % 4]
        if kind == 3 and r == 3:
            p = Payload.skip(n)
        elif kind == 2:
            p = Payload.dense(x.to(vd), scale=0.5)
        else:
            idx, vals = torch_ops.threshold_select(x, 1.0)
            p = Payload.sparse(idx, vals.to(vd), n, scale=1.0 + r)
        other = Payload.sparse(torch.tensor([1], dtype=torch.int32), torch.ones(1), 5)
        off = other.encode_into(bufs[r], 32)
        offs.append(off)
        p.encode_into(bufs[r], off)
        pays.append(p)
    return bufs, offs, pays


def ref_unpack(out: np.ndarray, pays, alpha: float, skip=()):
    for r, p in enumerate(pays):
        if r in skip or p.kind == Kind.SKIP:
            continue
        a = np.float32(alpha * p.scale)
        vals = p.values.to(torch.float32).numpy()
        idx = range(p.numel) if p.kind == Kind.DENSE else p.indices.tolist()
        for j, i in enumerate(idx):
            out[i] = np.float32(out[i] + np.float32(vals[j] * a))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_matches_reference(backend):
    n, ranks = 20_011, 8
    bufs, offs, pays = rank_buffers(n, ranks, seed=1, cap=8 * n + 512)
    out = torch.randn(n)
    want = ref_unpack(out.numpy().copy(), pays, 0.125)
    res = PACK[backend].unpack_scatter_add_(out, bufs, offs, alpha=0.125)
    assert np.array_equal(out.numpy(), want)
    assert res.ends == [o + p.nbytes for o, p in zip(offs, pays)] and res.errors == {}
    assert res.nnz == [p.nnz for p in pays] and res.accepted == list(range(ranks))


def corrupt(bufs: torch.Tensor, offs: List[int], r: int, how: str) -> None:
    o = offs[r]
    hdr = bufs[r, o:o + 64]
    if how == "magic":
        hdr[0] = ord("X")
    elif how == "index":  # first index of a sparse payload out of range
        bufs[r, o + 64:o + 68].view(torch.int32)[0] = 10**9
    elif how == "nan":
        p, _ = Payload.decode_from(bufs[r], o, finite="allow")
        p.values[0] = float("nan")
    elif how == "numel":
        hdr[16:24].view(torch.int64)[0] += 1
    elif how == "body":
        hdr[48:52].view(torch.int32)[0] += 8
    elif how == "checksum":
        hdr[8:12].view(torch.int32)[0] |= int(Flag.CHECKSUM)
    elif how == "randk":
        hdr[6] = int(Kind.RANDK)
    elif how == "flags":
        hdr[8] |= 4
    elif how == "stray-crc":  # a crc without the CHECKSUM flag
        hdr[52] = 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["magic", "index", "nan", "numel", "body", "checksum", "randk", "flags", "stray-crc"])
def test_unpack_rejects_bad_payloads(backend, how):
    n = 3001
    bufs, offs, pays = rank_buffers(n, 6, seed=2, cap=8 * n + 512)
    corrupt(bufs, offs, 4, how)  # rank 4: a sparse payload
    out = torch.zeros(n)
    err = NonFiniteError if how == "nan" else PayloadError
    with pytest.raises(err, match="rank 4"):
        PACK[backend].unpack_scatter_add_(out, bufs, offs)
    assert bool((out == 0).all())  # nothing written
    res = PACK[backend].unpack_scatter_add_(out, bufs, offs, on_error="skip")
    assert list(res.errors) == [4] and res.ends[4] == -1 and res.accepted == [0, 1, 2, 3, 5]
    assert np.array_equal(out.numpy(), ref_unpack(np.zeros(n, np.float32), pays, 1.0, skip=(4,)))
    if how == "nan":  # finite="allow" lets it through
        res = PACK[backend].unpack_scatter_add_(torch.zeros(n), bufs, offs, finite="allow")
        assert res.errors == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_checksum_skip_and_unsorted(backend):
    n = 500
    idx = torch.tensor([0, 3, 7, 499], dtype=torch.int32)
    p = Payload.sparse(idx, torch.tensor([5.0, 2.0, 4.0, 4.0]), n, scale=0.5)
    raw = torch.frombuffer(bytearray(p.to_bytes(checksum=True)), dtype=torch.uint8)
    bufs = torch.zeros(3, 256, dtype=torch.uint8)
    bufs[0, :raw.numel()] = raw
    bufs[2, :raw.numel()] = raw
    out = torch.zeros(n)
    res = PACK[backend].unpack_scatter_add_(out, bufs, [0, -1, 0], alpha=2.0)
    assert res.ends == [raw.numel(), -1, raw.numel()] and res.errors == {}
    assert out[7].item() == 8.0 and out[3].item() == 4.0 and out[499].item() == 8.0 and out[0].item() == 10.0
    for bad in ([7, 3, 499, 0], [0, 3, 3, 499]):  # unsorted, duplicate: not the canonical form, rejected
        q = Payload.sparse(torch.tensor(bad, dtype=torch.int32), torch.ones(4), n)
        rows = torch.zeros(1, 256, dtype=torch.uint8)
        q.encode_into(rows[0], 0)
        with pytest.raises(PayloadError, match="ascending"):
            PACK[backend].unpack_scatter_add_(torch.zeros(n), rows, [0])
    with pytest.raises(PayloadError, match="slot"):
        PACK[backend].unpack_scatter_add_(out, bufs, [0, -1, 0], slot=1)
    PACK[backend].unpack_scatter_add_(torch.zeros(n), bufs, [0, -1, 0], require_checksum=True)
    plain = torch.zeros(1, 256, dtype=torch.uint8)
    p.encode_into(plain[0], 0)  # no checksum
    with pytest.raises(PayloadError, match="requires"):
        PACK[backend].unpack_scatter_add_(torch.zeros(n), plain, [0], require_checksum=True)
    with pytest.raises(ConfigError):
        PACK[backend].unpack_scatter_add_(out, bufs[:, :100], [0, -1, 0])


@needs_native
def test_native_unpack_equals_torch():
    for n in (1, 999, 400_009):
        bufs, offs, _ = rank_buffers(n, 8, seed=n, cap=8 * n + 512)
        a = torch.randn(n)
        b = a.clone()
        ra = native.unpack_scatter_add_(a, bufs, offs, alpha=1 / 3)
        rb = torch_pack.unpack_scatter_add_(b, bufs, offs, alpha=1 / 3)
        assert same(a, b) and ra == rb


# ---- dispatch -------------------------------------------------------------------------------------
def test_backend_and_env_switch():
    assert ops.backend() == ("native" if LIB is not None else "torch")
    code = "import commlib.ops as o; print(o.backend(), o.native_status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "COMMLIB_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("torch disabled by COMMLIB_NATIVE=0")


def test_dispatch_falls_back_for_other_dtypes():
    x = gradient_like(1000, seed=1).to(torch.float64)
    idx, vals = ops.threshold_select(x, 1.0)
    assert vals.dtype == torch.float64 and np.array_equal(idx.numpy(), ref_select(x.float(), 1.0)[0])
    h = x.to(torch.float16)
    assert ops.sampled_threshold(h, 0.01) == torch_ops.sampled_threshold(h, 0.01)
    out = torch.zeros(1000, dtype=torch.float64)
    ops.scatter_add_(out, idx, vals)
    assert torch.equal(out[idx.long()], vals)


@needs_native
def test_native_threads_do_not_share_scratch():
    """The GIL is released inside the kernels: concurrent callers must not mix selections."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [gradient_like(150_001 + i, seed=i) for i in range(4)]
    want = [torch_ops.threshold_select(x, 0.7) for x in xs]

    def work(i: int) -> bool:
        return all(same(native.threshold_select(xs[i], 0.7)[0], want[i][0]) for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))
    ops.release_scratch()
    assert same(native.threshold_select(xs[0], 0.7)[1], want[0][1])
