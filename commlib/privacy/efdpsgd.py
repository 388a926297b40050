"""EF-DPSGD / DiceSGD: DP-SGD with clipped error feedback (Zhang, Bu, Wu & Hong, ICLR 2024,
arXiv 2311.14632, Algorithm 1 "DiceSGD"; reference code 564612540/DiceSGD).

On the summed scale of the reference code (B = the public normalizer, e₀ = 0):

    s_t     = Σ_{i∈I_t} clip(gᵢ, C₁) + clip(e_t, C₂)
    v_t     = (s_t + w_t) / B,        w_t ~ N(0, σ²(C₁ + 2C₂)² I)      (released)
    e_{t+1} = e_t + Σ_{i∈I_t} gᵢ − s_t

e_t accumulates what clipping removed and feeds it back, clipped, so
B·Σ_{τ<t} v_τ − Σ_τ w_τ = Σ_{τ<t} Σᵢ gᵢ − e_t: the clipping bias does not persist (a test
checks this telescoping identity). C₂ = ``error_clip_ratio``·C₁ trades error feedback
against noise: a larger C₂ returns the clipped-off mass faster and costs noise std
σ·(C₁ + 2C₂) instead of DP-SGD's σ·C₁.

Privacy, step by step (add/remove one sample z; D, D′ neighbouring datasets):

1. The public past h_t = (v_0, …, v_{t−1}) fixes the point x_t (post-processing), so every
   per-sample gradient gᵢ at x_t is a function of (data, h_t).
2. e_t is *not* a function of (data, h_t): it sums the clipped-off parts of every earlier
   batch and the earlier noise (e_t = Σ_{τ<t}(Σᵢ gᵢ − B·v_τ + w_τ)). Its change between D
   and D′ is unbounded, and it carries samples into steps that did not draw them. What is
   bounded is clip(e_t, C₂): it lies in the ball of radius C₂ whatever e_t is.
3. So for any h_t, any coupled batches (differing at most in z) and any hidden errors
   e, e′ on the two sides: ‖s_t(D) − s_t(D′)‖ <= ‖clip(g_z, C₁)‖ + ‖clip(e, C₂) − clip(e′, C₂)‖
   <= C₁ + 2C₂ =: Δ (replace-one: 2C₁ + 2C₂ <= 2Δ). Released units: Δ/B.
4. Given h_t, v_t is a mixture over the hidden (e_t, batch) of Gaussians with std σΔ/B and
   means that, under a product coupling of the two mixtures, are pairwise within Δ/B.
   Rényi divergence is jointly quasi-convex (van Erven & Harremoës 2014, arXiv 1206.2459),
   so each step is bounded by one Gaussian mechanism with multiplier σ (RDP α/(2σ²),
   Mironov 2017, arXiv 1702.07476), and adaptive composition over t holds (same paper). The
   hockey-stick divergence is jointly convex, so the Gaussian pair also dominates each step
   for PLD accounting.
5. No amplification by subsampling (step 2: a sample acts on later steps through e), so
   each step is accounted as an unsampled (q = 1) Gaussian at σ, whatever the batch
   sampling: T steps = ``SelfComposedDpEvent(GaussianDpEvent(σ), T)``.

The DiceSGD paper proves its own, algorithm-specific privacy bound; commlib has not
verified that theorem, so it uses the conservative bound above and nothing tighter. The
audit in ``tests/test_privacy_audit.py`` measures the per-step change on adversarial
neighbours against Δ/B.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from commlib.errors import ConfigError
from commlib.privacy.audit import AuditCase
from commlib.privacy.base import PRIVACY_STAGES, PrivacyStage, Release, check_noise_vs_clip, check_sigma
from commlib.privacy.clipping import check_clip, clip_vector, clipped_sum


def efdpsgd_sensitivity(c1: float, c2: float) -> float:
    """Δ = C₁ + 2C₂: per-step ℓ₂ sensitivity of s_t given the public past (module docstring, step 3)."""
    return c1 + 2.0 * c2


@PRIVACY_STAGES.register("efdpsgd", "ef-dpsgd", "dicesgd")
class EFDPSGD(PrivacyStage):
    """DiceSGD worker stage with explicit error state ``e`` (summed scale).

    Args:
        clip1: C₁, per-sample clipping threshold.
        clip2: C₂ >= C₁, clipping threshold of the fed-back error (same units as C₁: the
            summed scale). Give either ``clip2`` or ``error_clip_ratio``.
        sigma: noise multiplier σ; the noise std on the sum is σ·(C₁ + 2C₂), on the
            released mean σ·(C₁ + 2C₂)/B.
        error_clip_ratio: C₂/C₁ (default 1, the reference code's C₂ = C₁); trades error
            feedback against noise.
        seed / secure: the noise source.
    """

    guarantee = ("each step a Gaussian release of sensitivity (C₁ + 2C₂)/B given the public past, "
                 "unsampled (q = 1): the error feedback defeats subsampling amplification "
                 "(derivation in commlib/privacy/efdpsgd.py)")
    subsampling_amplifies = False  # e_t carries every earlier batch (module docstring, step 5)

    def __init__(
        self,
        clip1: float,
        clip2: Optional[float] = None,
        sigma: Optional[float] = None,
        seed: Optional[int] = None,
        secure: bool = False,
        *,
        error_clip_ratio: Optional[float] = None,
    ) -> None:
        super().__init__(seed=seed, secure=secure)
        self.clip1 = check_clip(clip1, "clip1")
        if clip2 is not None and error_clip_ratio is not None:
            raise ConfigError("give clip2 or error_clip_ratio, not both")
        if clip2 is None:
            ratio = 1.0 if error_clip_ratio is None else float(error_clip_ratio)
            if not (ratio > 0 and math.isfinite(ratio)):
                raise ConfigError(f"error_clip_ratio must be finite and > 0, got {error_clip_ratio}")
            clip2 = ratio * self.clip1
        self.clip2 = check_clip(clip2, "clip2")
        if self.clip2 < self.clip1:
            raise ConfigError(f"DiceSGD needs C2 >= C1 (the setting of Zhang et al. 2024; their code uses C2 = C1), "
                              f"got C1={clip1}, C2={self.clip2}")
        if sigma is None:
            raise ConfigError("EF-DPSGD needs sigma, the noise multiplier (0 only for non-private runs)")
        self.sigma = check_sigma(sigma)
        check_noise_vs_clip(self.sigma, self.clip1, "sigma", "clip1")
        check_noise_vs_clip(self.sigma, self.clip2, "sigma", "clip2")
        self.error: Optional[torch.Tensor] = None

    @property
    def error_clip_ratio(self) -> float:
        return self.clip2 / self.clip1

    @property
    def private(self) -> bool:
        return self.sigma > 0

    @classmethod
    def audit_cases(cls) -> List[AuditCase]:
        return [AuditCase("EF-DPSGD", lambda f, seed: cls(0.5, 0.5, 4.0 * f, seed=seed), batch=8, normalizer=8.0,
                          scale=0.5),
                AuditCase("EF-DPSGD (C₂ = 3C₁)", lambda f, seed: cls(0.5, sigma=4.0 * f, seed=seed,
                                                                    error_clip_ratio=3.0),
                          batch=8, normalizer=8.0, scale=1.5)]

    def _step(self, grads: torch.Tensor, previous: Optional[torch.Tensor], batch: float) -> Tuple[torch.Tensor, Release]:
        if previous is not None:
            raise ConfigError("EF-DPSGD uses the current point only; do not pass previous-point grads")
        d = grads.shape[1]
        if self.error is None:
            self.error = torch.zeros(d, dtype=grads.dtype, device=grads.device)  # e₀ = 0
        elif self.error.numel() != d:
            raise ConfigError(f"gradient size changed from {self.error.numel()} to {d}")
        # Zhang et al. 2024, Alg. 1 (summed scale): s_t = Σ clip(g_i, C₁) + clip(e_t, C₂).
        s = clipped_sum(grads, self.clip1) + clip_vector(self.error, self.clip2)
        # Zhang et al. 2024, Alg. 1: e_{t+1} = e_t + Σ g_i − s_t.
        self.error = self.error + grads.sum(dim=0) - s
        sensitivity = efdpsgd_sensitivity(self.clip1, self.clip2) / batch
        return s / batch, Release("gradient+error", self.sigma, sensitivity, self.subsampling_amplifies)

    def _mechanism_state(self) -> Dict[str, Any]:
        return {"error": None if self.error is None else self.error.clone()}

    def _load_mechanism_state(self, state: Dict[str, Any]) -> None:
        self.error = None if state["error"] is None else state["error"].clone()

    def _initial_mechanism_state(self) -> Dict[str, Any]:
        return {"error": None}
