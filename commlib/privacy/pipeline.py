"""The privacy pipeline, written once: per-sample grads -> stage -> accountant -> scheme.

Every runtime calls this one piece: ``PrivateTrainer`` (one process, and the DDP runtime,
whose ``communicate`` is the scheme's collective), the parameter server's ``private`` task
(one pipeline per worker; the server half runs on the server) and the privacy benchmark.

A step: the per-sample gradients at the current point (and, when the stage needs them, at
the previous point on the same samples) go through the stage; the release is recorded in
the accountant exactly as the stage describes it (``Release``: σ, sensitivity, subsampled
or not); only then does the privatised vector go to ``communicate`` (the scheme:
compression, aggregation), and the aggregate through the stage's server half.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from commlib.errors import ConfigError
from commlib.privacy.base import PrivacyStage, ServerHalf
from commlib.privacy.per_sample import LossFn, per_sample_grads

if TYPE_CHECKING:  # accounting needs the optional dp-accounting package; the pipeline does not
    from commlib.privacy.accounting import Accountant

#: grads_at(None) -> per-sample grads (B, d) at the current point; grads_at(point) -> at ``point``
GradsAt = Callable[[Optional[Sequence[torch.Tensor]]], torch.Tensor]
_NO_SERVER = object()


def model_grads_at(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
                   params: Optional[Sequence[nn.Parameter]] = None) -> GradsAt:
    """``GradsAt`` of a batch through ``commlib.privacy.per_sample_grads`` (torch.func)."""
    return lambda at: per_sample_grads(model, loss_fn, inputs, targets, params, at=at)


class PrivacyPipeline:
    """One worker's privacy pipeline.

    Args:
        stage: the ``PrivacyStage``.
        accountant: records every release (None: no accounting). Given one, the stage must
            be accountable (a declared guarantee, σ > 0, finite clip) or ConfigError.
        sample_rate: q, the Poisson sampling rate of the batches (used only for releases
            the stage declares subsampled).
        normalizer: the public B the stage divides by (q·N under Poisson sampling); None:
            the realised batch size (public only for fixed-size batches).
        server: the server half applied to the aggregate (default: ``stage.make_server()``;
            pass None for a worker whose server half runs elsewhere, as in the PS).
    """

    def __init__(self, stage: PrivacyStage, *, accountant: Optional["Accountant"] = None, sample_rate: float = 1.0,
                 normalizer: Optional[float] = None, server: Any = _NO_SERVER) -> None:
        if not isinstance(stage, PrivacyStage):
            raise ConfigError(f"a privacy pipeline needs a PrivacyStage, got {type(stage).__name__}")
        if accountant is not None:
            stage.require_accountable()
        if not (0.0 < float(sample_rate) <= 1.0):
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.stage, self.accountant = stage, accountant
        self.sample_rate, self.normalizer = float(sample_rate), normalizer
        self._check_normalizer()
        self.server: Optional[ServerHalf] = stage.make_server() if server is _NO_SERVER else server
        #: the point of the last release (DIFF2's x_{r−2}); kept only for stages that use it
        self.previous_point: Optional[List[torch.Tensor]] = None

    def release(self, grads_at: GradsAt, point: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample grads -> stage -> accountant; returns the privatised vector (all that may leave).

        ``point`` is the current parameter values (remembered when the stage uses the previous point).
        """
        self._check_normalizer()
        grads = grads_at(None)
        previous = None
        if self.stage.needs_previous:
            if self.previous_point is None:
                raise ConfigError("the stage needs the previous point, but this pipeline has released nothing "
                                  "since it started (restore its state, or restart the stage)")
            previous = grads_at(self.previous_point)
        released = self.stage.step(grads, previous, normalizer=self.normalizer)
        if self.accountant is not None:
            self.accountant.record_release(self.stage.last_release, self.sample_rate)
        if self.stage.uses_previous_point:
            self.previous_point = [p.detach().clone() for p in point]
        return released

    def _check_normalizer(self) -> None:
        """Under Poisson sampling the realised batch size depends on the data (add/remove changes
        it by one), so dividing by it is not covered by the noise's sensitivity: refuse it."""
        if self.accountant is not None and self.sample_rate < 1.0 and self.normalizer is None:
            raise ConfigError("accounting a subsampled release needs a public normaliser: pass "
                              "expected_batch_size (q·N) / normalizer instead of the realised batch size")

    def apply_server(self, aggregate: torch.Tensor) -> torch.Tensor:
        """The server half on the aggregate of all workers' releases (identity without one)."""
        return aggregate if self.server is None else self.server.step(aggregate)

    def step(self, grads_at: GradsAt, point: Sequence[torch.Tensor],
             communicate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """release -> communicate (the scheme; None: one process) -> server half: the direction to apply."""
        released = self.release(grads_at, point)
        aggregate = released if communicate is None else communicate(released)
        return self.apply_server(aggregate)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """The stage starts over (no error, round 0, no previous point); its noise stream goes on."""
        self.stage.reset()
        self.previous_point = None

    def rollback_state(self) -> Dict[str, Any]:
        """Worker state to roll back to: the stage without its noise generator, and the previous point."""
        prev = None if self.previous_point is None else [p.clone() for p in self.previous_point]
        return {"stage": self.stage.rollback_state(), "previous": prev}

    def load_rollback_state(self, state: Dict[str, Any]) -> None:
        self.stage.load_rollback_state(state["stage"])
        self.previous_point = None if state["previous"] is None else [p.clone() for p in state["previous"]]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage.state_dict(),
            "server": None if self.server is None else self.server.state_dict(),
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "previous": None if self.previous_point is None else [t.clone() for t in self.previous_point],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stage.load_state_dict(state["stage"])
        if self.server is not None and state["server"] is not None:
            self.server.load_state_dict(state["server"])
        if self.accountant is not None and state["accountant"] is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.previous_point = None if state["previous"] is None else [t.clone() for t in state["previous"]]
