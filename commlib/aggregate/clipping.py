"""Clipping rules: centered clipping (a rule with state), static norm clipping and ARC
(pre-aggregators that rescale each input, then hand the points to a base rule).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch

from commlib.aggregate.base import AGGREGATORS
from commlib.aggregate.points import Points
from commlib.aggregate.robust import BaseSpec, PreAggregator, RobustAggregator
from commlib.errors import ConfigError


def clip_scales(norms: torch.Tensor, threshold: Union[torch.Tensor, float]) -> torch.Tensor:
    """min(1, threshold / norm) per vector (1 for zero vectors; 0 for an infinite norm).

    The one clip factor of the package: robust clipping rules here and the per-sample clipping
    of the privacy stages (``commlib.privacy.clipping.clip_factors``) use it."""
    return torch.where(norms > threshold, threshold / norms.clamp(min=torch.finfo(norms.dtype).tiny),
                       torch.ones_like(norms))


@AGGREGATORS.register("centered-clipping", "cclip")
class CenteredClipping(RobustAggregator):
    """Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021, arXiv 2012.10333, the centered clipping update):

        v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||),   l = 0..L-1

    starting from v_0 = the centre: the one passed to the call, else the previous output,
    else zero at the very first call. The centre is state: ``state_dict()`` holds it.

    Args:
        f: Byzantine workers tolerated (checked n > 2f).
        tau: clipping radius (default 100.0, as byzfl).
        iterations: L (default 1, as byzfl).
    """

    def __init__(self, f: int = 0, tau: float = 100.0, iterations: int = 1) -> None:
        super().__init__(f)
        if not float(tau) > 0.0:
            raise ConfigError(f"centered-clipping: tau must be > 0, got {tau}")
        if int(iterations) < 1:
            raise ConfigError(f"centered-clipping: iterations must be >= 1, got {iterations}")
        self.tau, self.iterations = float(tau), int(iterations)
        self.center: Optional[torch.Tensor] = None

    def __call__(self, stack: torch.Tensor, center: Optional[torch.Tensor] = None) -> torch.Tensor:
        if center is not None:
            self.center = center.detach().clone()
        return super().__call__(stack)

    def aggregate_points(self, points: Points) -> torch.Tensor:
        if self.center is not None and self.center.shape != (points.d,):
            raise ConfigError(f"centered-clipping: centre has shape {tuple(self.center.shape)}, "
                              f"expected ({points.d},)")
        m = points.m
        v = (torch.zeros(points.d, dtype=points.dtype, device=points.device) if self.center is None
             else self.center.to(dtype=points.dtype, device=points.device))
        tau = torch.tensor(self.tau, dtype=torch.float64, device=points.device)
        for _ in range(self.iterations):  # direct distances: O(m d) per iteration
            s = clip_scales(points.sq_dists_to(v).sqrt(), tau) / m
            # v + sum_i s_i (y_i - v) = (1 - sum s) v + sum_i s_i y_i
            v = points.combine(s).add_(v, alpha=float(1.0 - s.sum()))
        return v

    def commit(self, out: torch.Tensor) -> None:
        self.center = out.detach().clone()

    def state_dict(self) -> Dict[str, Any]:
        return {"center": None if self.center is None else self.center.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        extra = set(state) - {"center"}
        if extra:
            raise ConfigError(f"centered-clipping: unknown state keys {sorted(extra)}")
        c = state.get("center")
        self.center = None if c is None else c.detach().clone()


@AGGREGATORS.register("norm-clipping", "clipping", "static-clipping")
class NormClipping(PreAggregator):
    """Static clipping: x_i <- x_i min(1, c / ||x_i||), then the base rule (the static
    clipping that ARC is compared with: Allouah et al., "Adaptive Gradient Clipping for
    Robust Federated Learning", ICLR 2025, arXiv 2405.14432).

    Args:
        c: the clipping threshold (required, > 0).
        f: Byzantine workers, handed to the base rule.
        base: the rule run on the clipped vectors (default: mean, which refuses f > 0).
    """

    def __init__(self, c: float, f: int = 0, base: BaseSpec = "mean") -> None:
        if not float(c) > 0.0:
            raise ConfigError(f"norm-clipping: c must be > 0, got {c}")
        self.c = float(c)
        super().__init__(f, base)

    def check_own(self, n: int) -> None:
        """Clipping itself tolerates any f; the base rule checks its own requirement."""

    def transform(self, points: Points) -> Points:
        norms = points.sq_norms().sqrt()
        scale = clip_scales(norms, torch.tensor(self.c, dtype=torch.float64, device=norms.device))
        return points.mix(torch.diag(scale))


def arc_count(n: int, f: int) -> int:
    """How many vectors ARC clips: floor(2 (f/n) (n - f)) (Allouah et al. 2025, ARC), in integers."""
    return (2 * f * (n - f)) // n


@AGGREGATORS.register("arc")
class ARC(PreAggregator):
    """Adaptive Robust Clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive
    Gradient Clipping for Robust Federated Learning", ICLR 2025, arXiv 2405.14432): clip the
    k = floor(2 (f/n)(n - f)) largest vectors to the norm of the largest vector left unclipped,
    then run the base rule (default: trimmed mean with the same f).
    """

    def __init__(self, f: int = 0, base: BaseSpec = "trimmed-mean") -> None:
        super().__init__(f, base)

    def transform(self, points: Points) -> Points:
        n = points.m
        k = arc_count(n, self.f)
        if k == 0:
            return points
        norms = points.sq_norms().sqrt()
        order = torch.sort(norms, descending=True, stable=True).indices
        threshold = norms[order[k]]
        scale = torch.ones_like(norms)
        top = order[:k]
        scale[top] = clip_scales(norms[top], threshold)
        return points.mix(torch.diag(scale))
