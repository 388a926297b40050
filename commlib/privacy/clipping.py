"""Per-sample clipping: clip(g, C) = g · min(1, C/‖g‖₂) (Abadi et al., CCS 2016, Algorithm 1).

After clipping every row has norm at most C, so adding or removing one sample changes the
clipped *sum* by at most C in ℓ₂ (the sensitivity every Gaussian mechanism here is
calibrated to). ``C = inf`` turns clipping off; that is only allowed for non-private runs
(the stages refuse noise with an unbounded sensitivity).
"""
from __future__ import annotations

import math

import torch

from commlib.aggregate.clipping import clip_scales
from commlib.errors import ConfigError, NonFiniteError


def check_clip(c: float, name: str = "C") -> float:
    """Validate a clipping threshold: > 0, or +inf for 'clipping off'."""
    c = float(c)
    if math.isnan(c) or c <= 0:
        raise ConfigError(f"clipping threshold {name} must be > 0 (or inf to disable), got {c}")
    return c


def _refuse_non_finite(g: torch.Tensor) -> None:
    # A NaN/Inf gradient would pass through the clip unchanged and reveal that some sample
    # produced it; refuse instead of releasing it.
    if not torch.isfinite(g).all():
        raise NonFiniteError("per-sample gradient holds NaN or Inf; refusing to clip and release it")


def clip_factors(grads: torch.Tensor, c: float) -> torch.Tensor:
    """Per-row factors min(1, C/‖gᵢ‖) of a (B, d) matrix (1 for zero rows; all 1 when C = inf)."""
    c = check_clip(c)
    if grads.dim() != 2:
        raise ConfigError(f"clipping takes a (B, d) matrix, got shape {tuple(grads.shape)}")
    if math.isinf(c):
        _refuse_non_finite(grads)
        return torch.ones(grads.shape[0], dtype=grads.dtype, device=grads.device)
    norms = torch.linalg.vector_norm(grads, dim=1)
    if not torch.isfinite(norms).all():  # a NaN/Inf entry makes its row's norm non-finite
        _refuse_non_finite(grads)  # (a finite row whose norm overflows gets factor 0: still within C)
    # clip(g, C) = g·min(1, C/‖g‖) (Abadi et al. 2016, Alg. 1): exactly 1 up to C, ‖g‖ = 0 safe.
    return clip_scales(norms, c)


def clip_per_sample(grads: torch.Tensor, c: float) -> torch.Tensor:
    """Clip each row of a (B, d) matrix to ℓ₂ norm at most ``c``; zero rows stay zero."""
    return grads * clip_factors(grads, c).unsqueeze(1)


def clip_vector(v: torch.Tensor, c: float) -> torch.Tensor:
    """Clip one flat vector to ℓ₂ norm at most ``c`` (used for DiceSGD's clip(e_t, C₂))."""
    return clip_per_sample(v.reshape(1, -1), c).reshape(v.shape)


def clipped_sum(grads: torch.Tensor, c: float) -> torch.Tensor:
    """Σᵢ clip(gᵢ, c) over the rows of a (B, d) matrix (an empty batch gives zeros)."""
    return clip_factors(grads, c) @ grads
