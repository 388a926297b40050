"""MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative
Learning with Linear Gradient Overhead", ICML 2023, arXiv 2209.10931; code
LPD-EPFL/robust-collaborative-learning).

Three pieces:
- ``WorkerMomentum``: each honest worker's Polyak momentum m_i <- beta m_i + (1 - beta) g_i
  (beta = 0.99 by default, m_i = 0 before the first step), kept per key with state_dict().
- ``monna_mix``: the decentralised mixing. Every worker takes its half-step model (or
  momentum) ``own``, receives vectors from the others, and keeps the mean of the ``keep``
  received vectors nearest to its own (its own vector included). In the paper a worker waits
  for n - f vectors (its own among them) and keeps n - 2f, i.e. keep = (number received) - f;
  the reference code does exactly this (aggregating the n - f vectors that reach worker j
  with f declared Byzantine).
- ``MoNNA`` (registered "monna"): the server variant: momentum on the workers, NNM + a base
  rule on the server.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional

import torch

from commlib.aggregate.base import AGGREGATORS
from commlib.aggregate.nnm import NNM
from commlib.aggregate.points import chunk_columns
from commlib.aggregate.robust import BaseSpec
from commlib.errors import ConfigError


def polyak_momentum_(m: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """m <- beta m + (1 - beta) g, in place; returns m (MoNNA, Algorithm 1, local step).

    The one implementation of worker momentum: ``WorkerMomentum``, the ``momentum`` feedback
    and the decentralised ``MoNNAMixer`` all call it (docs/algorithms.md §2.7, §6.3)."""
    return m.mul_(beta).add_(grad if grad.dtype == m.dtype else grad.to(m.dtype), alpha=1.0 - beta)


class WorkerMomentum:
    """Per-key worker momentum m <- beta m + (1 - beta) g (MoNNA, Algorithm 1, local step)."""

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= float(beta) < 1.0:
            raise ConfigError(f"momentum beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.momenta: Dict[Hashable, torch.Tensor] = {}

    def update(self, grad: torch.Tensor, key: Hashable = 0) -> torch.Tensor:
        """Fold in one gradient; returns (a copy of) the new momentum for ``key``."""
        m = self.momenta.get(key)
        if m is None:
            m = torch.zeros_like(grad)
            self.momenta[key] = m
        elif m.shape != grad.shape:
            raise ConfigError(f"momentum for key {key!r} has shape {tuple(m.shape)}, gradient {tuple(grad.shape)}")
        return polyak_momentum_(m, grad, self.beta).clone()

    def state_dict(self) -> Dict[str, Any]:
        return {"beta": self.beta, "momenta": {k: v.clone() for k, v in self.momenta.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.momenta = {k: v.clone() for k, v in dict(state["momenta"]).items()}


def _sq_dists_to(received: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """||r_j - own||^2 for every row, computed directly, chunk by chunk."""
    q, d = received.shape
    out = torch.zeros(q, dtype=torch.float64, device=received.device)
    step = chunk_columns(q, received.device)
    for s in range(0, d, step):
        diff = received[:, s: s + step] - own[s: s + step]
        out.add_(torch.linalg.vector_norm(diff, dim=1).double().square())  # float64 across chunks
    return out


def monna_mix(own: torch.Tensor, received: torch.Tensor, f: int, n: Optional[int] = None) -> torch.Tensor:
    """MoNNA's nearest-neighbour averaging at one worker (Farhadkhani et al. 2023, Algorithm 1).

    Args:
        own: this worker's vector, shape (d,).
        received: (q, d) every vector this worker has for the round, its own row included
            (e.g. the rows of an all-gather).
        f: Byzantine workers tolerated.
        n: total workers. When given, keep n - 2f vectors (the paper's count); when None,
            keep q - f (the paper's rule counted from what arrived: q = n - f gives n - 2f; with
            all n rows of an all-gather it keeps n - f, as byzfl's MoNNA).

    Returns the mean of the ``keep`` rows nearest to ``own`` (ties: lower row index).
    """
    if received.dim() != 2 or own.dim() != 1 or received.shape[1] != own.shape[0]:
        raise ConfigError(f"monna_mix: own (d,) and received (q, d) expected, got {tuple(own.shape)} "
                          f"and {tuple(received.shape)}")
    q = received.shape[0]
    f = int(f)
    if f < 0:
        raise ConfigError(f"monna_mix: f must be >= 0, got {f}")
    keep = q - f if n is None else int(n) - 2 * f
    if n is not None and q < int(n) - f:
        raise ConfigError(f"monna_mix: received {q} vectors, needs at least n - f = {int(n) - f}")
    if not 1 <= keep <= q:
        raise ConfigError(f"monna_mix: cannot keep {keep} of {q} received vectors (f={f}, n={n})")
    own = own.to(dtype=received.dtype, device=received.device)
    dist = _sq_dists_to(received, own)
    if not bool((dist == 0).any()):
        raise ConfigError("monna_mix: own vector must be one of the received rows")
    chosen = torch.sort(dist, stable=True).indices[:keep]
    w = torch.zeros(q, dtype=received.dtype, device=received.device)
    w[chosen] = 1.0 / keep
    return w @ received


@AGGREGATORS.register("monna")
class MoNNA(NNM):
    """MoNNA, server variant: workers send their momenta (``WorkerMomentum``); the server
    runs NNM (each momentum replaced by the mean of its n - f nearest) and then a base rule
    (default: trimmed mean with the same f)."""

    def __init__(self, f: int = 0, base: BaseSpec = "trimmed-mean") -> None:
        super().__init__(f, base)

    @staticmethod
    def worker_state(beta: float = 0.99) -> WorkerMomentum:
        """The worker-side half: a momentum state with MoNNA's default beta = 0.99."""
        return WorkerMomentum(beta)
