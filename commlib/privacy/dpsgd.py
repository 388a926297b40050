"""DP-SGD with per-sample clipping (Abadi et al., CCS 2016, arXiv 1607.00133, Algorithm 1).

    v = (1/B) Σᵢ clip(gᵢ, C) + N(0, σ² C² / B² · I)

Noise convention: N(0, σ²C²) on the clipped *sum*, i.e. std σ·C/B on the mean
(Abadi et al. Alg. 1 adds N(0, σ²C²I) to Σᵢ clip(gᵢ) before dividing by the lot size). One sample changes the clipped sum by at most C (add/remove), so σ is the
noise multiplier of a Gaussian mechanism with sensitivity 1 after scaling — exactly what
``accounting.dpsgd_event(σ, q, steps)`` composes. With full batches (q = 1) this is DP-GD.

Sensitivity: the release depends on the data only through this step's batch; given the
public point x_t, adding or removing one sample changes Σᵢ clip(gᵢ, C) by ‖clip(g, C)‖ <= C,
so the mean changes by <= C/B (B the public normalizer), and replacing one by <= 2C/B.
Each release is a Gaussian mechanism with multiplier σ, amplified by Poisson subsampling
(Abadi et al. 2016, Thm. 1; Mironov, Talwar & Zhang 2019, arXiv 1908.10530).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from commlib.errors import ConfigError
from commlib.privacy.audit import AuditCase
from commlib.privacy.base import PRIVACY_STAGES, PrivacyStage, Release, check_noise_vs_clip, check_sigma
from commlib.privacy.clipping import check_clip, clipped_sum


@PRIVACY_STAGES.register("dpsgd", "dp-sgd", "dpgd")
class DPSGD(PrivacyStage):
    """Clipped, noised mean of per-sample gradients.

    Args:
        clip: C, the per-sample ℓ₂ clipping threshold.
        sigma: noise multiplier σ (std σ·C/B on the mean). 0 only for non-private runs.
        seed / secure: the noise source (see ``commlib.privacy.noise``).
    """

    guarantee = ("each step a Gaussian release of sensitivity C/B, Poisson-subsampled "
                 "(Abadi et al. 2016, Thm. 1; Mironov et al. 2019)")
    subsampling_amplifies = True

    def __init__(self, clip: float, sigma: float, seed: Optional[int] = None, secure: bool = False) -> None:
        super().__init__(seed=seed, secure=secure)
        self.clip = check_clip(clip, "clip")
        self.sigma = check_sigma(sigma)
        check_noise_vs_clip(self.sigma, self.clip, "sigma", "clip")

    @property
    def private(self) -> bool:
        return self.sigma > 0

    @classmethod
    def audit_cases(cls) -> List[AuditCase]:
        return [AuditCase("DP-SGD", lambda f, seed: cls(0.5, 1.1 * f, seed=seed), batch=8, normalizer=8.0, scale=0.5),
                AuditCase("DP-GD", lambda f, seed: cls(0.5, 20.0 * f, seed=seed), batch=63, normalizer=64.0,
                          scale=0.5)]

    def _step(self, grads: torch.Tensor, previous: Optional[torch.Tensor], batch: float) -> Tuple[torch.Tensor, Release]:
        if previous is not None:
            raise ConfigError("DP-SGD uses the current point only; do not pass previous-point grads")
        # Abadi et al. 2016, Alg. 1: ḡ = (1/B)(Σ clip(gᵢ, C) + N(0, σ²C²I)).
        return clipped_sum(grads, self.clip) / batch, Release("gradient", self.sigma, self.clip / batch, self.subsampling_amplifies)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "clip": self.clip, "sigma": self.sigma}
