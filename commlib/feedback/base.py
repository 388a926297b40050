"""Feedback interface: the worker half around a compressor and the matching server half.

A feedback object holds configuration only. State is a plain ``dict[str, Tensor]`` per
tensor key (parameter name), owned by the runtime's state object, so it can be saved with
``state_dict()`` and restored, and so it survives DDP rebuilding its buckets.

Worker:  payload   = worker_step(state_i, grad, compressor, ctx)
Server:  direction = server_step(state, aggregate, ctx)   # aggregate = mean (or robust rule) of the decoded payloads
The direction is what the optimizer receives as the gradient.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch

from commlib.compress.base import Compressor
from commlib.registry import Registry
from commlib.wire import Payload

FEEDBACKS: "Registry[Feedback]" = Registry("feedback")

State = Dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What a feedback step may need to know besides the tensor itself."""

    rank: int = 0
    world_size: int = 1
    step: int = 0
    ratio: Optional[float] = None  # current compression ratio (sparsity warm-up)
    seed: int = 0  # seed for randomised compressors
    slot: int = 0  # position of the tensor in its group
    dense: bool = False  # this tensor is not compressed (DGC: momentum applied on the server)
    param: Optional[torch.Tensor] = None  # the parameter (flat view) when the feedback needs it (weight decay)
    out: Optional[torch.Tensor] = None  # send buffer (flat uint8): compress straight into out[offset:]
    offset: int = 0


class Feedback(ABC):
    """Error feedback / momentum correction around a compressor."""

    name: ClassVar[str]
    #: Momentum lives in the worker (DGC): the user's optimizer must not add momentum again.
    worker_momentum: ClassVar[bool] = False
    #: The server accumulates increments (EF21, EControl): a worker that sends nothing counts as a
    #: zero increment and the server divides by n; otherwise it averages the workers that sent.
    increments: ClassVar[bool] = False

    @abstractmethod
    def worker_step(self, state: State, grad: torch.Tensor, compressor: Compressor, ctx: StepContext) -> Payload:
        """Consume the local (flat) gradient, update worker state, return what to send."""

    def server_step(self, state: State, aggregate: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Turn the aggregated payloads into the direction the optimizer applies (default: as is)."""
        return aggregate

    def _compress(self, compressor: Compressor, x: torch.Tensor, ctx: StepContext) -> Payload:
        """C(x); with a send buffer in ``ctx.out`` the compressor writes it there (``Compressor.pack_``)
        and the payload views those bytes: an in-place change to its values is what is sent; a
        changed header field (e.g. EF21-W's scale) makes the worker write the payload again."""
        if ctx.out is not None:
            return compressor.pack_(ctx.out, ctx.offset, x, ratio=ctx.ratio, seed=ctx.seed, slot=ctx.slot)
        return compressor.compress(x, ratio=ctx.ratio, seed=ctx.seed, slot=ctx.slot)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


@FEEDBACKS.register("none", "plain")
class NoFeedback(Feedback):
    """Send C(g) as it is (biased for contractive compressors: use an EF variant with them)."""

    def worker_step(self, state: State, grad: torch.Tensor, compressor: Compressor, ctx: StepContext) -> Payload:
        return self._compress(compressor, grad, ctx)
