"""Pure-torch reference implementations of the sparse hot-path ops.

The native extension (``commlib._native``, built from ``csrc/``) implements the same
functions with the same results; ``commlib.ops`` dispatches to whichever is active.
All selections return indices in ascending order (deterministic, cache-friendly).

Rounding is part of the contract: thresholds and scale factors are applied in the tensor's
dtype (a Python float is rounded to float32 first, as torch does for ``x >= thr``), and every
multiply-then-add is two roundings (no fused multiply-add), so the native kernels can match
these results bit for bit.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch

from commlib.errors import ConfigError, PayloadError

INT32_MAX = 2**31 - 1


def check_index_range(numel: int) -> None:
    """Sparse indices are int32 on the wire: refuse tensors they cannot address."""
    if numel > INT32_MAX:
        raise ConfigError(f"a tensor of {numel} entries is too large for int32 sparse indices")


def threshold_select(x: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32, ascending) and values of the entries of flat ``x`` with |x| >= threshold."""
    x = x.reshape(-1)
    check_index_range(x.numel())
    idx = torch.nonzero(x.abs() >= threshold, as_tuple=False).reshape(-1)
    return idx.to(torch.int32), x[idx]


def topk_select(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by magnitude of flat ``x``; indices int32 ascending. Ties: torch.topk's choice."""
    x = x.reshape(-1)
    k = max(0, min(int(k), x.numel()))
    if k == 0:
        return torch.empty(0, dtype=torch.int32, device=x.device), x[:0]
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return idx.to(torch.int32), x[idx]


def keep_largest(idx: torch.Tensor, vals: torch.Tensor, max_nnz: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Of a selection (idx ascending), the max_nnz entries of largest |value|, in index order.

    Ties at the cut go to the lower index, so the result is deterministic. ``None``: keep all.
    """
    if max_nnz is None or vals.numel() <= max_nnz:
        return idx, vals
    if max_nnz < 0:
        raise ConfigError(f"max_nnz must be >= 0, got {max_nnz}")
    order = torch.sort(vals.abs(), descending=True, stable=True).indices[:max_nnz].sort().values
    return idx[order], vals[order]


def dgc_sample_count(numel: int, ratio: float, sample_ratio: float = 0.01) -> int:
    """DGC (Lin et al. 2018; docs/algorithms.md §1, step 1): sample 1% of entries, at least ceil(2/ratio), at most numel."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ConfigError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    return int(min(numel, max(math.ceil(sample_ratio * numel), math.ceil(2.0 / ratio))))


#: DGC's threshold sample is taken in blocks of this many consecutive entries, each starting at a
#: multiple of 16 entries from the tensor's start (16 float32 = one 64-byte cache line when the
#: tensor starts on one): a strided sample of single entries reads one cache line per entry of u,
#: v and g, as much memory traffic as reading g whole (docs/algorithms.md §1).
SAMPLE_BLOCK = 16


class SamplePlan(NamedTuple):
    """DGC's threshold sample: entries ``start + (j // block) * stride + j % block`` for j < count
    (``sample_index``); the threshold is the top-th largest sampled magnitude."""
    start: int
    stride: int
    count: int
    top: int
    block: int


def check_sample_block(block) -> int:
    """``block`` as an int if it is a power of two >= 1 (bools refused), else a ConfigError."""
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1 or block & (block - 1):
        raise ConfigError(f"sample block must be a power of two >= 1, got {block!r}")
    return int(block)


def sample_plan(numel: int, ratio: float, sample_ratio: float = 0.01, offset: int = 0,
                block: int = SAMPLE_BLOCK) -> SamplePlan:
    """The sample of :func:`sampled_threshold`: ``dgc_sample_count`` entries in blocks of ``block``
    consecutive entries (a power of two; fewer when the sample is smaller), one block per
    ``stride`` entries (a multiple of the block), the first at a multiple of the block chosen by
    ``offset``. ``block=1`` is a strided sample of single entries. numel must be > 0."""
    block = check_sample_block(block)
    s = dgc_sample_count(numel, ratio, sample_ratio)
    b = min(block, 1 << (s.bit_length() - 1))  # a power of two <= s
    stride = max(b, numel // -(-s // b) // b * b)  # blocks start on multiples of b
    start = offset % (stride // b) * b
    rest = numel - start  # entries from start on, > 0
    full = (rest - b) // stride + 1 if rest >= b else 0  # blocks that fit whole
    count = min(s, full * b + max(0, min(b, rest - full * stride)))
    return SamplePlan(start, stride, count, max(1, math.ceil(count * ratio)), b)


def sample_index(plan: SamplePlan, device: Optional[torch.device] = None) -> torch.Tensor:
    """The positions of ``plan``'s sample, ascending (int64)."""
    j = torch.arange(plan.count, device=device)
    return plan.start + torch.div(j, plan.block, rounding_mode="floor") * plan.stride + j % plan.block


def _kth_largest(mags: torch.Tensor, k: int) -> float:
    # min of the top k = the k-th largest; NaN (topk's largest) propagates through min.
    return float(torch.topk(mags, k, sorted=False).values.min())


def sampled_threshold(x: torch.Tensor, ratio: float, sample_ratio: float = 0.01, offset: int = 0,
                      block: int = SAMPLE_BLOCK) -> float:
    """DGC threshold estimate: the smallest of the top ceil(s * ratio) magnitudes of the sample
    of :func:`sample_plan` (blocks of consecutive entries spread evenly over x)."""
    x = x.reshape(-1)
    n = x.numel()
    if n == 0:
        return float("inf")
    plan = sample_plan(n, ratio, sample_ratio, offset, block)
    return _kth_largest(x[sample_index(plan, x.device)].abs(), plan.top)


def dgc_momentum_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool) -> None:
    """DGC momentum correction, in place on flat u, v (Lin et al. 2018, arXiv 1712.01887)."""
    if nesterov:
        u.add_(g).mul_(momentum)  # App. B, Nesterov: u <- (u + g)·m
        v.add_(u).add_(g)  # v <- v + u + g
    else:
        u.mul_(momentum).add_(g)  # §3.2 momentum correction: u <- m·u + g
        v.add_(u)  # v <- v + u


def check_state(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    """DGC state tensors: same size as the gradient, contiguous (they are updated in place)."""
    if not (u.numel() == v.numel() == g.numel()):
        raise ConfigError(f"u, v and g must have the same size, got {u.numel()}, {v.numel()}, {g.numel()}")
    if not (u.is_contiguous() and v.is_contiguous()):
        raise ConfigError("DGC state tensors u and v must be contiguous")
    if u.dtype != v.dtype:
        raise ConfigError(f"u and v must share a dtype, got {u.dtype} and {v.dtype}")
    check_index_range(v.numel())


def dgc_threshold(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, ratio: float, *,
                  nesterov: bool = False, sample_ratio: float = 0.01, offset: int = 0,
                  block: int = SAMPLE_BLOCK) -> float:
    """``sampled_threshold`` of the v that ``dgc_update_select_`` would produce this step, computed
    on the sample only (u and v are not modified)."""
    check_state(u, v, g)
    n = v.numel()
    if n == 0:
        return float("inf")
    plan = sample_plan(n, ratio, sample_ratio, offset, block)
    at = sample_index(plan, v.device)
    us, vs = u.reshape(-1)[at], v.reshape(-1)[at]
    dgc_momentum_(us, vs, g.reshape(-1)[at].to(v.dtype), momentum, nesterov)
    return _kth_largest(vs.abs(), plan.top)


def dgc_update_select_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, threshold: float, *,
                       nesterov: bool = False, max_nnz: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DGC step on flat state: momentum correction, selection |v| >= threshold (at most
    max_nnz of the largest), momentum factor masking (Lin et al. 2018 §3.3: u, v <- 0 where sent).

    Returns (indices int32 ascending, values of v at them before masking).
    """
    check_state(u, v, g)
    uf, vf = u.view(-1), v.view(-1)
    dgc_momentum_(uf, vf, g.reshape(-1).to(v.dtype), momentum, nesterov)
    idx, vals = keep_largest(*threshold_select(vf, threshold), max_nnz)
    mask_(uf, vf, idx)
    return idx, vals


def mask_(uf: torch.Tensor, vf: torch.Tensor, idx: torch.Tensor) -> None:
    """DGC momentum factor masking (Lin et al. 2018 §3.3): u[idx] = v[idx] = 0."""
    at = idx.to(torch.int64)
    uf[at] = 0
    vf[at] = 0


def check_scatter(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Arguments of scatter_add_: one value per index, every index inside out (a PayloadError)."""
    if indices.numel() != values.numel():
        raise PayloadError(f"{indices.numel()} indices but {values.numel()} values")
    if indices.numel():
        lo, hi = torch.aminmax(indices.reshape(-1))
        if int(lo) < 0 or int(hi) >= out.numel():
            raise PayloadError(f"sparse index out of range [0, {out.numel()}): min {int(lo)}, max {int(hi)}")


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out[indices] += alpha * values (in out's dtype, duplicates accumulate in order).

    Out-of-range indices raise PayloadError before anything is written.
    """
    check_scatter(out, indices, values)
    if indices.numel() == 0:
        return out
    v = values.reshape(-1).to(out.dtype)
    if alpha != 1.0:
        v = v * alpha
    out.view(-1).index_add_(0, indices.reshape(-1).to(torch.int64), v)
    return out
