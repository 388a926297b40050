"""Differential privacy in the DDP runtime: each rank privatises its own contribution through
the privacy pipeline (``commlib.privacy.pipeline``: per-sample grads -> stage -> accountant)
before anything leaves it, then the scheme
(compression, robust aggregation) moves the privatised vectors with the same collectives as
the DDP hook. Compressing after the noise is post-processing: it costs no privacy.

Per-sample clipping needs every sample's gradient norm over the whole model, which DDP's
bucket hooks never see at once, so this runs as an explicit step instead of a hook:

    trainer = commlib.ddp.private_trainer(model, F.cross_entropy, DPSGD(clip=1.0, sigma=s, seed=rank),
                                          optimizer, scheme=commlib.Scheme("topk", ratio=0.05, feedback="ef"))
    for x, y in local_batches:
        trainer.step(x, y)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from commlib.ddp.hooks import sync_gradients
from commlib.ddp.state import HookState
from commlib.errors import ConfigError
from commlib.privacy.base import PrivacyStage
from commlib.privacy.per_sample import flatten, unflatten
from commlib.privacy.trainer import PrivateTrainer
from commlib.scheme import Scheme


def _check_distinct_noise(stage: PrivacyStage, group: Optional[dist.ProcessGroup]) -> None:
    """Refuse ranks that draw identical noise: the difference of two such messages would
    reveal their clipped-gradient difference with no noise at all. CSPRNG noise (no seed)
    takes part with a fingerprint of -1 - rank, so every rank runs the same collective."""
    fingerprint = stage.noise_fingerprint()
    rank = dist.get_rank(group)
    mine = torch.tensor([-1 - rank if fingerprint is None else fingerprint], dtype=torch.int64)
    seeds = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(seeds, mine, group=group)
    values = [int(s) for s in seeds]
    if len(set(values)) != len(values):
        raise ConfigError("two ranks seeded their privacy noise identically; give each rank its own seed "
                          "(e.g. seed=base + rank) or use secure=True")


def private_trainer(model: torch.nn.Module, loss_fn, stage: PrivacyStage, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    scheme: Optional[Scheme] = None, state: Optional[HookState] = None,
                    process_group: Optional[dist.ProcessGroup] = None, **trainer_kw: Any) -> PrivateTrainer:
    """A :class:`commlib.privacy.PrivateTrainer` whose released vectors are exchanged across the
    process group with ``scheme`` (default: plain mean). The stage's server half (DIFF2's
    estimator) runs on every rank after aggregation, deterministically. Returns the trainer;
    its ``comm_state`` attribute is the HookState (stats, checkpoints)."""
    if state is None:
        state = HookState(scheme if scheme is not None else Scheme(), process_group=process_group, model=model)
    elif scheme is not None:
        raise ConfigError("give either scheme or state")
    if state.scheme.worker_momentum:
        raise ConfigError("worker-momentum schemes (DGC momentum correction) are not supported with privacy stages")
    _check_distinct_noise(stage, state.process_group)
    trainer = PrivateTrainer(model, loss_fn, stage, optimizer, **trainer_kw)
    params = trainer.params

    def communicate(released: torch.Tensor) -> torch.Tensor:
        for p, g in zip(params, unflatten(released, params)):
            p.grad = g.detach().clone()
        sync_gradients(state, params)
        return flatten([p.grad for p in params])

    trainer.communicate = communicate
    trainer.comm_state = state  # type: ignore[attr-defined]
    return trainer
