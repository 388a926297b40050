"""MoNNA, decentralised variant (Farhadkhani et al., ICML 2023, arXiv 2209.10931, Algorithm 1).

Collaborative learning without a server: every worker i keeps its own model theta_i and
    m_i     <- beta m_i + (1 - beta) g_i          (local Polyak momentum, beta = 0.99 in the paper)
    theta_i' = theta_i - lr * m_i                 (half step)
    broadcast theta_i' (one all-gather of flat parameter vectors)
    theta_i <- mean of the n - 2f received vectors nearest to theta_i' (its own included)
Workers' models differ (that is the point: a Byzantine neighbour cannot drag them), so this is
not a DDP hook: wrap a plain module and call ``step()`` after ``backward()``.

Byzantine ranks can be simulated with ``attack=`` (an AttackPlan or dict): after the
all-gather, every honest rank replaces those ranks' rows by the attack's output computed from
the honest rows, so all honest ranks see the same adversarial vectors. Rows with NaN/Inf are
dropped (counted in ``dropped``), like a silent worker.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist

from commlib.aggregate.monna import monna_mix, polyak_momentum_
from commlib.aggregate.nonfinite import drop_nonfinite
from commlib.errors import ConfigError
from commlib.scheme import Scheme


class MoNNAMixer:
    """Decentralised MoNNA over a torch.distributed group (gloo or NCCL).

    Args:
        model: the local module (not wrapped in DDP).
        lr: step size gamma of the half step.
        f: Byzantine workers tolerated (the mixing keeps n - 2f >= 1 vectors).
        beta: momentum (paper default 0.99).
        process_group: defaults to the default group.
        attack: simulate Byzantine ranks (see module docstring).
    """

    def __init__(self, model: torch.nn.Module, lr: float, f: int, beta: float = 0.99,
                 process_group: Optional[dist.ProcessGroup] = None, attack: Any = None) -> None:
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), got {beta}")
        self.model = model
        self.lr = float(lr)
        self.f = int(f)
        self.beta = float(beta)
        self.group = process_group
        self.n = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        if self.n - 2 * self.f < 1:
            raise ConfigError(f"MoNNA keeps n - 2f vectors: f={self.f} is too many for n={self.n}")
        self.attack = Scheme._build_attack(attack)
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        ref = self.params[0]
        self.momentum = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
        self._gather = torch.empty(self.n * numel, dtype=ref.dtype, device=ref.device)
        self.steps = 0
        self.dropped = 0
        self.skipped = 0

    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    @torch.no_grad()
    def step(self) -> None:
        """Momentum, half step, exchange, nearest-neighbour mixing; writes the new parameters."""
        theta = self._flat([p.detach() for p in self.params])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        g = self._flat(grads)
        if bool(torch.isfinite(g).all()):
            polyak_momentum_(self.momentum, g, self.beta)  # Alg. 1: m_i = beta m_i + (1-beta) g_i
            half = theta - self.lr * self.momentum  # theta_i' = theta_i - gamma m_i
        else:
            self.skipped += 1  # a non-finite local gradient: keep momentum, send the current model
            half = theta.clone()
        from commlib.ddp.hooks import _all_gather_flat

        _all_gather_flat(self._gather, half, self.group).wait()
        rows = self._gather.view(self.n, -1)
        if self.attack is not None:
            rows, _present = self.attack.apply(rows)
        if self.attack is None or self.rank not in self.attack.ranks:
            clean, kept = drop_nonfinite(rows)
            self.dropped += int((~kept).sum())
            if clean.shape[0] < self.n - self.f:
                raise ConfigError(f"MoNNA: only {clean.shape[0]} finite vectors of {self.n}; needs n - f")
            mixed = monna_mix(half, clean, self.f, n=self.n)  # mean of the n - 2f nearest (own included)
            offset = 0
            for p in self.params:
                k = p.numel()
                p.copy_(mixed[offset:offset + k].view_as(p))
                offset += k
        self.steps += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"momentum": self.momentum.clone(), "steps": self.steps, "dropped": self.dropped,
                "skipped": self.skipped}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd["momentum"].shape != self.momentum.shape:
            raise ConfigError("MoNNA state was saved for a different model")
        self.momentum.copy_(sd["momentum"])
        self.steps, self.dropped, self.skipped = int(sd["steps"]), int(sd["dropped"]), int(sd["skipped"])
