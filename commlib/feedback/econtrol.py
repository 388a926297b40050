"""EControl (Gao, Islamov, Stich, ICLR 2024, arXiv 2311.05645; docs/algorithms.md §2.6).

Worker: Delta_i = C(eta e_i + g_i - h_i); e_i += g_i - h_i - Delta_i; h_i += Delta_i.
Server: h += mean Delta_i; the optimizer steps along h. First step: h_i = g_i^0 uncompressed.
Invariant (any eta): x^t - lr * mean e_i^t = x^0 - lr * sum_{k<t} mean g_i^k.
eta = 0 gives EF21's h updates; the identity compressor keeps e = 0.
Theory: eta = delta/400; in practice eta ~ 0.1 (tuned).
"""
from __future__ import annotations

import torch

from commlib.compress.base import Compressor
from commlib.errors import ConfigError
from commlib.feedback.base import FEEDBACKS, Feedback, State, StepContext
from commlib.feedback.ef21 import _EF21Server, _reset_payload
from commlib.wire import Payload


@FEEDBACKS.register("econtrol")
class EControl(_EF21Server):
    def __init__(self, eta: float = 0.1) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"econtrol: eta must be in [0, 1], got {eta}")
        self.eta = float(eta)

    def worker_step(self, state: State, grad: torch.Tensor, compressor: Compressor, ctx: StepContext) -> Payload:
        h = state.get("g")  # h_i, stored under the same key as EF21's g_i
        if h is None:
            state["g"] = grad.clone()
            state["e"] = torch.zeros_like(grad)
            return _reset_payload(grad, ctx)
        e = state["e"]
        diff = grad - h  # g_i - h_i
        delta = self._compress(compressor, diff + self.eta * e if self.eta else diff, ctx)
        e.add_(diff)
        delta.add_to(e, alpha=-1.0)  # e_i += g_i - h_i - Delta_i
        delta.add_to(h)  # h_i += Delta_i
        return delta
