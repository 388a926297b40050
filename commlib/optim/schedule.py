"""Learning-rate schedules that are pure functions of the step, so a restarted server (or any
replica of one) sets exactly the same lr from its step counter alone.

``warmup_cosine_factor``: linear warm-up over the first ``warmup`` fraction of the steps, then
cosine decay to 0 at ``total`` (Goyal et al., arXiv 1706.02677 for the warm-up; Loshchilov &
Hutter, arXiv 1608.03983 for the cosine shape, without restarts). Why the asynchronous parameter
server uses it by default: docs/algorithms.md §5.4.
"""
from __future__ import annotations

import math
from typing import List

import torch

from commlib.errors import ConfigError

__all__ = ["LR_SCHEDULES", "LRSchedule", "warmup_cosine_factor"]

#: "constant": the lr as given; "cosine": warm-up then cosine decay over the run.
LR_SCHEDULES = ("constant", "cosine")


def _check_warmup(warmup: float) -> float:
    w = float(warmup)
    if not 0.0 <= w < 1.0:
        raise ConfigError(f"warmup must be a fraction of the steps in [0, 1), got {warmup}")
    return w


def warmup_cosine_factor(step: int, total: int, warmup: float = 0.05) -> float:
    """lr multiplier of step ``step`` (0-based) of ``total``:
    min(1, (step + 1) / W) * (1 + cos(pi * min(step, total) / total)) / 2, W = max(1, warmup * total).
    """
    if int(total) < 1:
        raise ConfigError(f"a schedule needs total >= 1 steps, got {total}")
    if int(step) < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    total, step = int(total), int(step)
    warm = max(1, int(_check_warmup(warmup) * total))
    return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class LRSchedule:
    """Sets every parameter group's lr to (its lr when the schedule was made) x the factor of a
    step. Call :meth:`set` with the step about to be taken, before ``optimizer.step()``.

    The base lrs are taken once, at construction, so loading an optimizer state dict (whose
    groups hold the last scheduled lr) does not change them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "cosine",
                 warmup: float = 0.05) -> None:
        kind = str(kind).lower()
        if kind not in LR_SCHEDULES:
            raise ConfigError(f"schedule must be one of {LR_SCHEDULES}, got {kind!r}")
        if int(total_steps) < 1:
            raise ConfigError(f"a schedule needs total_steps >= 1, got {total_steps}")
        self.optimizer, self.total, self.kind = optimizer, int(total_steps), kind
        self.warmup = _check_warmup(warmup)
        self.base_lrs: List[float] = [float(g["lr"]) for g in optimizer.param_groups]

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        return warmup_cosine_factor(step, self.total, self.warmup)

    def set(self, step: int) -> float:
        """Set the lr of step ``step``; returns the factor used."""
        f = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        return f
