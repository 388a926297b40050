"""Private training on a model: a ``PrivacyPipeline`` around per-sample gradients, with the
result written into ``.grad`` and the optimizer stepped.

For one process, the benchmark, and the DDP runtime (``commlib.ddp.private_trainer`` sets
``communicate`` to the scheme's collective). The parameter server calls the same pipeline
per worker (``commlib.ps.private``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from commlib.privacy.base import PrivacyStage
from commlib.privacy.per_sample import LossFn, select_params, unflatten
from commlib.privacy.pipeline import _NO_SERVER, PrivacyPipeline, model_grads_at

if TYPE_CHECKING:  # accounting needs the optional dp-accounting package; the trainer does not
    from commlib.privacy.accounting import Accountant


class PrivateTrainer:
    """Runs private steps on a model.

    Args:
        model, loss_fn: as for ``per_sample_grads``.
        stage: a ``PrivacyStage`` (DPSGD, EFDPSGD, DIFF2Worker, ...).
        optimizer: stepped after the privatised gradient is written into ``.grad``
            (None: only ``.grad`` is written).
        params: parameters to train (default: all that require grad).
        server: the server half applied to the aggregate (default: ``stage.make_server()``).
        accountant: if given, every release is recorded as the stage describes it; a stage
            that is not accountable (σ = 0, no clipping, no declared guarantee) is refused.
        sample_rate: q, the Poisson sampling rate of the batches passed to ``step``.
        expected_batch_size: the normaliser B (q·N under Poisson sampling); default: the
            realised batch size (only right for fixed-size batches).
        communicate: maps this worker's released vector to the aggregate of all workers'
            (a runtime's collective, e.g. ``commlib.ddp.private_trainer``); None in one process.
            It runs after the stage, so only privatised vectors ever leave the worker.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        stage: PrivacyStage,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        params: Optional[Sequence[nn.Parameter]] = None,
        server: Optional[Any] = None,
        accountant: Optional["Accountant"] = None,
        sample_rate: float = 1.0,
        expected_batch_size: Optional[float] = None,
        communicate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        names = select_params(model, params)
        by_name = dict(model.named_parameters())
        self.params: List[nn.Parameter] = [by_name[n] for n in names]
        self.pipeline = PrivacyPipeline(stage, accountant=accountant, sample_rate=sample_rate,
                                        normalizer=expected_batch_size,
                                        server=_NO_SERVER if server is None else server)
        self.communicate = communicate

    @property
    def stage(self) -> PrivacyStage:
        return self.pipeline.stage

    @property
    def accountant(self) -> Optional["Accountant"]:
        return self.pipeline.accountant

    @property
    def server(self) -> Any:
        return self.pipeline.server

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One private step on a batch; returns the flat direction written into ``.grad``."""
        grads_at = model_grads_at(self.model, self.loss_fn, inputs, targets, self.params)
        direction = self.pipeline.step(grads_at, self.params, self.communicate)
        for p, g in zip(self.params, unflatten(direction, self.params)):
            p.grad = g.detach().clone()
        if self.optimizer is not None:
            self.optimizer.step()
        return direction

    def state_dict(self) -> Dict[str, Any]:
        return self.pipeline.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state)
