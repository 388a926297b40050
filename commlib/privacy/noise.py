"""Gaussian noise for the DP mechanisms: seeded (reproducible) or from a CSPRNG.

Two modes:

* ``secure=False`` (default): a ``torch.Generator`` seeded with ``seed`` (or with 64 bits
  from ``os.urandom`` when ``seed`` is None). Reproducible and checkpointable
  (``state_dict`` holds the generator state). This is the right mode for research,
  tests and benchmarks. It is **not** suitable when the noise must stay secret from an
  adversary: torch's CPU generator is a Mersenne Twister, whose state (and so all past and
  future noise) can be reconstructed from enough of its outputs, and a known seed gives
  the noise away outright.

* ``secure=True``: every draw takes fresh uniform bits from the operating system's CSPRNG
  (``os.urandom``), turns them into standard normals with the Box–Muller transform in
  float64, and returns ``(z₁ + z₂ + z₃ + z₄)/2`` for four independent normals, the
  construction Opacus uses against floating-point attacks (Holohan & Braghin,
  arXiv 2107.10138, §5.1; the attack on Opacus: Jin et al., arXiv 2112.05307).

  What it guarantees: the noise cannot be predicted or replayed from a seed or from other
  draws (there is no seed and no state), and the known attacks that invert a single
  floating-point Gaussian sample become far more expensive.
  What it does **not** guarantee: DP proofs assume real-valued Gaussian noise; floating-point
  sampling and the final rounding to the tensor's dtype (float32/bf16) make the released
  values a slightly different, discrete distribution, and no proof covers that here. A
  formally exact mechanism needs the discrete Gaussian with exact arithmetic (Canonne,
  Kamath & Steinke, NeurIPS 2020). Timing side channels are not addressed either.
  The mode is also slower (64 random bytes per coordinate) and, having no state, cannot be
  checkpointed or reproduced.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from commlib.errors import ConfigError

Shape = Union[int, Sequence[int], torch.Size]


def _check_std(std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ConfigError(f"noise standard deviation must be finite and >= 0, got {std}")
    return std


def _csprng_uniform(n: int) -> np.ndarray:
    """n uniforms in (0, 1] with 53 random bits each, from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53


def _csprng_box_muller(n: int) -> np.ndarray:
    """n standard normals by Box–Muller (Box & Muller 1958) on CSPRNG uniforms, float64."""
    m = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log(_csprng_uniform(m)))  # u in (0, 1]: log finite
    angle = 2.0 * math.pi * _csprng_uniform(m)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def secure_standard_normal(n: int) -> np.ndarray:
    """n standard normals: (z₁+z₂+z₃+z₄)/2 (Holohan & Braghin, arXiv 2107.10138, §5.1, n=2)."""
    return _csprng_box_muller(4 * n).reshape(4, n).sum(axis=0) / 2.0


class GaussianNoise:
    """N(0, std² I) noise source; see the module docstring for what ``secure`` means."""

    def __init__(self, std: float = 1.0, seed: Optional[int] = None, secure: bool = False) -> None:
        self.std = _check_std(std)
        self.secure = bool(secure)
        self._gen: Optional[torch.Generator] = None
        if self.secure:
            if seed is not None:
                raise ConfigError("secure=True draws from the OS CSPRNG; a seed would make the noise predictable")
            return
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        self._gen = torch.Generator()
        self._gen.manual_seed(int(seed))

    def sample(
        self,
        shape: Shape,
        std: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """A tensor of independent N(0, s²) entries, s = ``std`` if given else ``self.std``.

        Noise is drawn on the CPU and moved to ``device``, so a seed gives the same noise on
        every device. ``std == 0`` returns zeros without consuming randomness.
        """
        s = self.std if std is None else _check_std(std)
        size = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        if s == 0.0:
            return torch.zeros(size, dtype=dtype, device=device)
        n = size.numel()
        if self.secure:
            z = torch.from_numpy(secure_standard_normal(n)).reshape(size)
            return (z * s).to(dtype=dtype, device=device)
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        z = torch.randn(size, generator=self._gen, dtype=gen_dtype)
        return (z * s).to(dtype=dtype, device=device)

    __call__ = sample

    def seed_fingerprint(self) -> Optional[int]:
        """The seed of this stream (low 62 bits), None for CSPRNG noise (no seed)."""
        return None if self._gen is None else self._gen.initial_seed() & ((1 << 62) - 1)

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"std": self.std, "secure": self.secure}
        if self._gen is not None:
            state["generator"] = self._gen.get_state()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if bool(state["secure"]) != self.secure:
            raise ConfigError("cannot load a secure noise state into a seeded source, or the reverse")
        self.std = _check_std(state["std"])
        if self._gen is not None:
            self._gen.set_state(state["generator"])
