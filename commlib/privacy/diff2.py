"""DIFF2: DP optimisation via gradient differences (Murata & Suzuki, ICML 2023, arXiv 2302.03884,
Algorithm 1, with the gradient-descent subroutine "DIFF2-GD").

Rounds r = 1..R; a restart every T rounds, i.e. when (r − 1) mod T = 0. Worker p:

    restart:   d_p = (1/B) Σ_{z∈I} clip(∇ℓ(x_{r−1}; z), C₁)                    + N(0, s₁² I)
    otherwise: d_p = (1/B) Σ_{z∈I} clip(∇ℓ(x_{r−1}; z) − ∇ℓ(x_{r−2}; z), C₂)   + N(0, s₂² I)

(the same samples I at both points). Server: ṽ_r = mean_p d_p on restarts, else
ṽ_r = ṽ_{r−1} + mean_p d_p; then x_r = x_{r−1} − η ṽ_r. Without noise and clipping the
differences telescope, so ṽ_r is exactly the gradient at x_{r−1} (a test checks this).

Noise convention (as for DP-SGD): σ₁, σ₂ are noise multipliers, s₁ = σ₁·C₁/B, s₂ = σ₂·C₂/B.

Sensitivity of a clipped difference: the quantity clipped is the per-sample difference
Δ_z = ∇ℓ(x_{r−1}; z) − ∇ℓ(x_{r−2}; z), and clip(Δ_z, C₂) has norm <= C₂. x_{r−1}, x_{r−2}
are public (post-processing of earlier releases), so adding/removing one sample changes
the sum by at most C₂, the same as DP-SGD with threshold C₂ — *provided the difference is
clipped as one vector*. Clipping the two gradients separately at C and subtracting would
give sensitivity 2C. (Under replace-one adjacency both bounds double, as for DP-SGD.)
Hence each round is one Gaussian mechanism (Poisson-subsampled if the batch is) with
noise multiplier σ₁ or σ₂, and the whole run is ⌈R/T⌉ releases at σ₁ composed with
R − ⌈R/T⌉ at σ₂ (``accounting.diff2_event``). The gain: for an L-smooth loss
‖Δ_z‖ <= L‖x_{r−1} − x_{r−2}‖ = Lη‖ṽ_{r−1}‖, so C₂ can be much smaller than C₁ and the noise
added per round shrinks with it.

Restart releases depend on the data only through the round's batch (as DP-SGD), and so do
difference releases (x_{r−1}, x_{r−2} public), so both are Poisson-subsampled Gaussians
when the batch is.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from commlib.errors import ConfigError
from commlib.privacy.audit import AuditCase
from commlib.privacy.base import PRIVACY_STAGES, PrivacyStage, Release, ServerHalf, check_noise_vs_clip, check_sigma
from commlib.privacy.clipping import check_clip, clipped_sum


def check_period(t: int) -> int:
    if int(t) != t or int(t) < 1:
        raise ConfigError(f"DIFF2 restart period T must be an integer >= 1, got {t}")
    return int(t)


def is_restart(round_index: int, period: int) -> bool:
    """Round r (1-based) restarts when (r − 1) mod T = 0 (Murata & Suzuki 2023, Alg. 1)."""
    return (round_index - 1) % period == 0


def restart_count(rounds: int, period: int) -> int:
    """Number of restart rounds among r = 1..R: ⌈R/T⌉."""
    return -(-int(rounds) // int(period))


@PRIVACY_STAGES.register("diff2")
class DIFF2Worker(PrivacyStage):
    """DIFF2 worker stage: clipped gradients on restarts, clipped gradient differences otherwise.

    Args:
        clip1, clip2: C₁ (gradients), C₂ (gradient differences).
        sigma1, sigma2: noise multipliers of restart and difference rounds.
        period: T, rounds between restarts.
        seed / secure: the noise source.

    ``step(grads_now, grads_prev)``: ``grads_prev`` (same samples, previous point) is required
    on non-restart rounds and ignored on restarts; ``needs_previous`` says which is next.
    """

    guarantee = ("each round a Gaussian release, sensitivity C₁/B on restarts and C₂/B on clipped "
                 "differences, Poisson-subsampled (Murata & Suzuki 2023, Alg. 1)")
    subsampling_amplifies = True
    uses_previous_point = True
    needs_full_quorum = True  # the server half counts rounds with the workers

    def __init__(
        self,
        clip1: float,
        clip2: float,
        sigma1: float,
        sigma2: float,
        period: int,
        seed: Optional[int] = None,
        secure: bool = False,
    ) -> None:
        super().__init__(seed=seed, secure=secure)
        self.clip1 = check_clip(clip1, "clip1")
        self.clip2 = check_clip(clip2, "clip2")
        self.sigma1 = check_sigma(sigma1, "sigma1")
        self.sigma2 = check_sigma(sigma2, "sigma2")
        check_noise_vs_clip(self.sigma1, self.clip1, "sigma1", "clip1")
        check_noise_vs_clip(self.sigma2, self.clip2, "sigma2", "clip2")
        self.period = check_period(period)
        self.round = 0  # rounds completed

    @property
    def private(self) -> bool:
        return self.sigma1 > 0 and (self.sigma2 > 0 or self.period == 1)

    @property
    def needs_previous(self) -> bool:
        return not is_restart(self.round + 1, self.period)

    def make_server(self) -> "DIFF2Server":
        return DIFF2Server(self.period)

    @classmethod
    def audit_cases(cls) -> List[AuditCase]:
        return [AuditCase("DIFF2", lambda f, seed: cls(1.0, 0.2, 3.0 * f, 5.0 * f, period=4, seed=seed),
                          batch=8, normalizer=8.0, scale=1.0)]

    def _step(self, grads: torch.Tensor, previous: Optional[torch.Tensor], batch: float) -> Tuple[torch.Tensor, Release]:
        r = self.round + 1
        if is_restart(r, self.period):
            # Murata & Suzuki 2023, Alg. 1 (restart): d = ClippedMean(∇ℓ(x_{r−1}; z), C₁) + N(0, s₁²I).
            d = clipped_sum(grads, self.clip1) / batch
            release = Release("gradient", self.sigma1, self.clip1 / batch, self.subsampling_amplifies)
        else:
            if previous is None:
                raise ConfigError(f"DIFF2 round {r} is a difference round: pass grads at the previous point")
            # Murata & Suzuki 2023, Alg. 1: d = ClippedMean(∇ℓ(x_{r−1}; z) − ∇ℓ(x_{r−2}; z), C₂) + N(0, s₂²I).
            d = clipped_sum(grads - previous, self.clip2) / batch
            release = Release("difference", self.sigma2, self.clip2 / batch, self.subsampling_amplifies)
        self.round = r
        return d, release

    def _mechanism_state(self) -> Dict[str, Any]:
        return {"round": self.round}

    def _load_mechanism_state(self, state: Dict[str, Any]) -> None:
        self.round = int(state["round"])

    def _initial_mechanism_state(self) -> Dict[str, Any]:
        return {"round": 0}


class DIFF2Server(ServerHalf):
    """DIFF2 server half: keeps the gradient estimator ṽ (deterministic; replicable per rank).

    ``step(mean_d)`` takes the aggregate of the workers' messages for one round (the mean,
    or a robust aggregate) and returns ṽ_r, the direction the optimizer applies.
    """

    def __init__(self, period: int) -> None:
        self.period = check_period(period)
        self.round = 0
        self.estimate: Optional[torch.Tensor] = None

    def step(self, aggregate: torch.Tensor) -> torch.Tensor:
        if aggregate.dim() != 1:
            raise ConfigError(f"DIFF2Server takes the aggregated d-vector, got shape {tuple(aggregate.shape)}")
        r = self.round + 1
        if is_restart(r, self.period):
            # Murata & Suzuki 2023, Alg. 1: ṽ_r = mean_p d_p on a restart round.
            self.estimate = aggregate.clone()
        else:
            if self.estimate is None:
                raise ConfigError("DIFF2Server has no estimate mid-period; restore its state_dict")
            if aggregate.shape != self.estimate.shape:
                raise ConfigError(f"aggregate size {aggregate.numel()} != estimate size {self.estimate.numel()}")
            # Murata & Suzuki 2023, Alg. 1: ṽ_r = ṽ_{r−1} + mean_p d_p.
            self.estimate = self.estimate + aggregate
        self.round = r
        return self.estimate.clone()

    def state_dict(self) -> Dict[str, Any]:
        est = None if self.estimate is None else self.estimate.clone()
        return {"period": self.period, "round": self.round, "estimate": est}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["period"]) != self.period:
            raise ConfigError(f"state has period {state['period']}, server has {self.period}")
        self.round = int(state["round"])
        self.estimate = None if state["estimate"] is None else state["estimate"].clone()
