"""Aggregator interface: an (n, d) stack of worker vectors -> one d-vector."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, Mapping

import torch

from commlib.errors import ConfigError
from commlib.registry import Registry

AGGREGATORS: "Registry[Aggregator]" = Registry("aggregator")


class Aggregator(ABC):
    """Combine worker vectors. Never modifies its input; deterministic for a given input.

    ``f`` is the number of Byzantine workers the rule is asked to tolerate.
    """

    name: ClassVar[str]
    #: True only for the plain mean, which runtimes may replace by all-reduce / scatter-add.
    is_mean: ClassVar[bool] = False

    def __init__(self, f: int = 0) -> None:
        if int(f) < 0:
            raise ConfigError(f"f must be >= 0, got {f}")
        self.f = int(f)

    def check(self, stack: torch.Tensor) -> None:
        if stack.dim() != 2:
            raise ConfigError(f"aggregators take an (n, d) stack, got shape {tuple(stack.shape)}")
        if stack.shape[0] == 0:
            raise ConfigError("cannot aggregate zero vectors")
        self.check_n(stack.shape[0])

    def check_n(self, n: int) -> None:
        """Raise ConfigError when this rule cannot tolerate f of n (override for stricter rules)."""
        if 2 * self.f >= n and self.f > 0:
            raise ConfigError(f"{self.name}: f={self.f} Byzantine of n={n} needs n > 2f")

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        self.check(stack)
        return self.aggregate(stack)

    @abstractmethod
    def aggregate(self, stack: torch.Tensor) -> torch.Tensor:
        """The rule itself on a checked stack."""

    def evaluate(self, stack: torch.Tensor) -> torch.Tensor:
        """Aggregate without advancing any state (what-if use, e.g. an attack's line search).

        The same as calling the rule for stateless rules; stateful rules (centered clipping,
        bucketing) override ``__call__`` to also update their state."""
        self.check(stack)
        return self.aggregate(stack)

    def state_dict(self) -> Dict[str, Any]:
        """The rule's state, to save with a checkpoint (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ConfigError(f"{self.name} is stateless; got state keys {sorted(state)}")


def mean_divisor(n: int, received: float, increments: bool) -> float:
    """What the sum of the received contributions is divided by to form the mean: ``n`` when
    the feedback sends increments (EF21 family: a silent worker is a zero increment, so the
    server's state keeps tracking the mean of all n workers' states), otherwise the number of
    contributions ``received`` (0 when none arrived: the caller returns zeros).
    Every runtime's mean (``SchemeServer.decode_group``, the DDP all-reduce path) uses this."""
    return n if increments else received


@AGGREGATORS.register("mean", "average")
class Mean(Aggregator):
    """Plain average (not robust)."""

    is_mean = True

    def check_n(self, n: int) -> None:
        if self.f:
            raise ConfigError("the mean tolerates no Byzantine worker; use a robust aggregator")

    def aggregate(self, stack: torch.Tensor) -> torch.Tensor:
        return stack.mean(dim=0)
