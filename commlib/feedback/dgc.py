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

from commlib.compress.base import Compressor
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
