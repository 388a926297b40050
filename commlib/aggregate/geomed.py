"""Geometric median by the smoothed Weiszfeld algorithm (Pillutla, Kakade, Harchaoui,
"Robust Aggregation for Federated Learning", IEEE TSP 2022, arXiv 1912.13445, the
"smoothed Weiszfeld" algorithm; Weiszfeld 1937).

Every iterate is a weighted average of the inputs (plus the starting point), so the whole
iteration runs on the (n+1) x (n+1) Gram matrix: O(n^2 d) once for the Gram, O(n^2) per
iteration, and one weighted sum of the rows at the end.
"""
from __future__ import annotations

import torch

from commlib.aggregate.base import AGGREGATORS
from commlib.aggregate.points import Points
from commlib.aggregate.robust import RobustAggregator
from commlib.errors import ConfigError


def weiszfeld_weights(k: torch.Tensor, c: torch.Tensor, nu: float, iterations: int) -> torch.Tensor:
    """Smoothed Weiszfeld on a Gram matrix.

    ``k``: (m+1, m+1) centred-frame Gram of [y_1..y_m, z0]; ``c``: (m+1,) coefficients of the
    starting point (sum 1). Returns the coefficients of the last iterate.
    """
    m = k.shape[0] - 1
    kd = torch.diagonal(k)[:m]
    for _ in range(iterations):
        kc = k @ c
        # ||y_i - z||^2 = K_ii - 2 (K c)_i + c^T K c
        dist = (kd - 2.0 * kc[:m] + c @ kc).clamp(min=0.0).sqrt()
        # beta_i = alpha_i / max(nu, ||z - y_i||), alpha_i = 1/m; z+ = sum beta_i y_i / sum beta_i
        beta = (1.0 / m) / dist.clamp(min=nu)
        c = torch.zeros_like(c)
        c[:m] = beta / beta.sum()
    return c


@AGGREGATORS.register("geometric-median", "geomed", "rfa")
class GeometricMedian(RobustAggregator):
    """Approximate geometric median argmin_z sum_i ||z - x_i||.

    Args:
        f: Byzantine workers tolerated (breakdown point 1/2: n > 2f).
        nu: smoothing; distances below nu count as nu (default 0.1).
        iterations: Weiszfeld iterations (default 3; RFA reports that a few suffice).
        init: starting point, "zero" (default, the origin, as byzfl) or "mean" (the average).
            With a few iterations the start matters: from the mean, each iteration only shrinks
            the pull of far-away vectors by a constant factor, so f vectors at distance T move
            the result by O(T). The origin does not depend on the inputs and far vectors get
            weight ~1/T from the first iteration on.
    """

    def __init__(self, f: int = 0, nu: float = 0.1, iterations: int = 3, init: str = "zero") -> None:
        super().__init__(f)
        if not float(nu) > 0.0:
            raise ConfigError(f"geometric-median: nu must be > 0, got {nu}")
        if int(iterations) < 0:
            raise ConfigError(f"geometric-median: iterations must be >= 0, got {iterations}")
        if init not in ("mean", "zero"):
            raise ConfigError(f"geometric-median: init must be 'mean' or 'zero', got {init!r}")
        self.nu, self.iterations, self.init = float(nu), int(iterations), init

    def aggregate_points(self, points: Points) -> torch.Tensor:
        m = points.m
        k = points.gram()  # last point: the origin
        c = torch.zeros(m + 1, dtype=torch.float64, device=k.device)
        if self.init == "mean":
            c[:m] = 1.0 / m
        else:
            c[m] = 1.0
        c = weiszfeld_weights(k, c, self.nu, self.iterations)
        return points.combine(c[:m])
