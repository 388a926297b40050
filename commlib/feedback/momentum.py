"""Worker-side Polyak momentum: the worker sends C(m_i) with m_i = beta m_i + (1 - beta) g_i.

This is the worker half of robust schemes that need momentum before aggregation: MoNNA's
server variant (Farhadkhani et al., ICML 2023, Algorithm 1, beta = 0.99) and "learning from
history" (Karimireddy, He, Jaggi, ICML 2021). Momentum lives in the worker, so the
optimizer must not add momentum again (``worker_momentum``).
"""
from __future__ import annotations

import torch

from commlib.aggregate.monna import polyak_momentum_
from commlib.compress.base import Compressor
from commlib.errors import ConfigError
from commlib.feedback.base import FEEDBACKS, Feedback, State, StepContext
from commlib.wire import Payload


@FEEDBACKS.register("momentum", "worker-momentum")
class WorkerMomentumFeedback(Feedback):
    worker_momentum = True

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"momentum: beta must be in [0, 1), got {beta}")
        self.beta = float(beta)

    def worker_step(self, state: State, grad: torch.Tensor, compressor: Compressor, ctx: StepContext) -> Payload:
        m = state.get("m")
        if m is None:
            m = state["m"] = torch.zeros_like(grad)
        polyak_momentum_(m, grad, self.beta)
        p = self._compress(compressor, m, ctx)
        if p.values.untyped_storage().data_ptr() == m.untyped_storage().data_ptr():
            p.values = p.values.clone()
        return p

    @property
    def momentum(self) -> float:  # read by the double-momentum check
        return self.beta
