"""DGC momentum correction (Lin et al., ICLR 2018, arXiv 1712.01887, §3.2-3.3; docs/algorithms.md §2.1).

Worker, per compressed tensor:
  local clipping (§3.3): g *= min(1, (max_norm / sqrt(n)) / ||g||)      (per tensor; off by default)
  momentum correction (§3.2, Eq. 4-5): u = m u + g;  v = v + u
      Nesterov: u = (u + g) m;  v = v + u + g
  send v at the selected entries; momentum factor masking (§3.3): u[sel] = 0, v[sel] = 0
  (without masking only v[sel] = 0: what was sent leaves the accumulator either way).
Tensors that are not compressed (dim <= 1: biases, norm weights) are sent dense and their
momentum is applied on the server after aggregation (``server_step`` with ctx.dense).
Momentum lives here, so the user's optimizer must run without momentum (``worker_momentum``).
Weight decay (optional) is added to g first, as the reference does; set the optimizer's
weight_decay to 0 when using it here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from commlib import ops
from commlib.compress.base import Compressor, k_of
from commlib.compress.topk import DGCTopK
from commlib.ops.torch_pack import write_sparse
from commlib.errors import ConfigError
from commlib.feedback.base import FEEDBACKS, Feedback, State, StepContext
from commlib.wire import Kind, Payload


@FEEDBACKS.register("dgc", "momentum-correction")
class DGCMomentum(Feedback):
    worker_momentum = True

    def __init__(self, momentum: float = 0.9, nesterov: bool = False, max_norm: Optional[float] = None,
                 weight_decay: float = 0.0, masking: bool = True) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"dgc: momentum must be in [0, 1), got {momentum}")
        if max_norm is not None and max_norm <= 0:
            raise ConfigError(f"dgc: max_norm must be > 0, got {max_norm}")
        if weight_decay < 0:
            raise ConfigError("dgc: weight_decay must be >= 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.weight_decay = float(weight_decay)
        self.masking = bool(masking)

    def _prepare(self, grad: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        g = grad
        if self.weight_decay and ctx.param is not None:
            g = g + self.weight_decay * ctx.param.detach().reshape(-1).to(g.dtype)
        if self.max_norm is not None and not ctx.dense:
            limit = self.max_norm / math.sqrt(ctx.world_size)  # §3.3: threshold scaled by N^-1/2
            norm = float(torch.linalg.vector_norm(g))
            if norm > limit:
                g = g * (limit / norm)
        return g

    def worker_step(self, state: State, grad: torch.Tensor, compressor: Compressor, ctx: StepContext) -> Payload:
        g = self._prepare(grad, ctx)
        if ctx.dense or compressor.is_identity:
            return Payload.dense(g.clone() if g is grad else g, slot=ctx.slot)
        u = state.get("u")
        if u is None:
            u = state["u"] = torch.zeros_like(grad)
            state["v"] = torch.zeros_like(grad)
        v = state["v"]
        if ctx.out is not None and self.masking and isinstance(compressor, DGCTopK) and v.dtype == torch.float32:
            return self._fused_step(u, v, g, compressor, ctx)
        m = self.momentum
        if self.nesterov:
            u.add_(g).mul_(m)
            v.add_(u).add_(g)
        else:
            u.mul_(m).add_(g)
            v.add_(u)
        p = self._compress(compressor, v, ctx)
        if p.kind in (Kind.SPARSE, Kind.RANDK):
            p.values = p.values.clone()  # detach from v before it is masked
            sel = p.dense_indices().to(torch.int64)
            v.index_fill_(0, sel, 0.0)
            if self.masking:
                u.index_fill_(0, sel, 0.0)
        else:  # a dense compressor sent all of v (cast error stays in v)
            p_vals = p.values.clone()
            p.values = p_vals
            p.add_to(v, alpha=-1.0)
            if self.masking:
                u.zero_()
        return p

    def _fused_step(self, u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, comp: DGCTopK,
                    ctx: StepContext) -> Payload:
        """Momentum correction + DGC selection + masking + packing into ``ctx.out`` in one pass over
        u, v, g (``ops.dgc_update_pack_``), with the threshold from the sample of the v it will
        produce (``ops.dgc_threshold``). The selection rule is ``DGCTopK.select``'s: when fewer than
        lower * k entries pass, lower the threshold and add the entries of the (masked) v that now
        pass -- exactly the entries a lower threshold on the unmasked v would have added."""
        m, n = self.momentum, v.numel()
        ratio = comp._ratio(ctx.ratio)
        k = k_of(n, ratio)
        buf, off = ctx.out, ctx.offset
        thr = 0.0 if k >= n else ops.dgc_threshold(u, v, g, m, ratio, nesterov=self.nesterov,
                                                    sample_ratio=comp.sample_ratio, block=comp.sample_block)
        end, nnz = ops.dgc_update_pack_(buf, off, u, v, g, m, thr, nesterov=self.nesterov, max_nnz=k, slot=ctx.slot)
        if k < n and nnz < comp.lower * k:  # too few: everything >= thr was taken (nnz < k)
            extra = None
            for _ in range(comp.adapt_rounds):
                thr *= comp.lower
                extra = ops.threshold_select(v, thr)  # entries of v not sent yet
                if nnz + extra[0].numel() >= comp.lower * k:
                    break
            if extra is not None and extra[0].numel():
                nnz = self._add_to_payload(buf, off, nnz, n, u, v, ops.keep_largest(*extra, k - nnz), ctx.slot)
        return Payload.view(buf, off, Kind.SPARSE, n, nnz, torch.float32, slot=ctx.slot)

    @staticmethod
    def _add_to_payload(buf: torch.Tensor, off: int, nnz: int, n: int, u: torch.Tensor, v: torch.Tensor,
                        extra, slot: int) -> int:
        """Merge the selection (idx, vals) into the SPARSE payload of nnz entries at buf[off:] (index
        order kept) and mask u, v there; returns the new nnz."""
        sent = Payload.view(buf, off, Kind.SPARSE, n, nnz, torch.float32, slot=slot)
        idx = torch.cat([sent.indices, extra[0]])
        vals = torch.cat([sent.values, extra[1]])
        order = torch.sort(idx, stable=True).indices
        write_sparse(buf, off, idx[order], vals[order], n, slot=slot, scale=1.0, flags=0, value_dtype=torch.float32)
        sel = extra[0].to(torch.int64)
        v.index_fill_(0, sel, 0.0)
        u.index_fill_(0, sel, 0.0)
        return int(idx.numel())

    def server_step(self, state: State, aggregate: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if not ctx.dense:
            return aggregate
        u = state.get("u")  # dense tensors: ordinary momentum after aggregation (docs/algorithms.md §2.1)
        if u is None:
            u = state["u"] = torch.zeros_like(aggregate)
        u.mul_(self.momentum).add_(aggregate)
        if self.nesterov:
            return aggregate + self.momentum * u
        return u
