"""The worker-side privacy stage interface, what each release is, and the stage registry.

A stage takes one step's per-sample gradients as a flat (B, d) matrix and returns the
privatised d-vector that leaves the worker. It composes *before* compression: commlib's
feedback/compressor takes that vector as its "gradient" (compression of a privatised
vector is post-processing and costs no privacy).

Conventions shared by every stage:

* ``normalizer`` is the B in the (1/B)Σ of the clipped mean. It must be a public constant:
  under Poisson sampling pass the *expected* batch size q·N, not the realised one (the
  realised size depends on whether a given sample is present). Default: the realised size,
  which is public only for fixed-size batches.
* Every release is a Gaussian mechanism described by a :class:`Release`: its ℓ₂
  sensitivity Δ (one sample added or removed, given everything released before), its noise
  multiplier σ (noise std = σ·Δ), and whether privacy amplification by Poisson subsampling
  applies to it. The accountant records exactly that; nothing is inferred from the name.
* Each worker must use its own noise (distinct ``seed``, or ``secure=True``). Two workers
  sharing a seed add identical noise, and the difference of their messages then reveals
  the difference of their clipped gradients with no noise at all.

What a runtime may ask of a stage (declared here, so runtimes never probe attributes):
``needs_previous`` / ``uses_previous_point`` (per-sample grads at the previous point, same
samples), ``make_server()`` (the server half, e.g. DIFF2's estimator), ``needs_full_quorum``
(the server half counts rounds with the workers: every worker, every round),
``state_dict()`` / ``load_state_dict()`` (everything, noise generator included),
``rollback_state()`` / ``load_rollback_state()`` (mechanism state without the noise
generator: a rolled-back worker must never replay noise), ``reset()`` (back to the initial
mechanism state, e.g. after a restart), ``noise_fingerprint()`` (to refuse shared seeds),
``require_accountable()`` (before an ε is claimed) and ``audit_cases()`` (how the
sensitivity audit in the test suite builds it).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple

import torch

from commlib.errors import ConfigError
from commlib.privacy.noise import GaussianNoise
from commlib.registry import Registry

if TYPE_CHECKING:  # the audit module imports this one
    from commlib.privacy.audit import AuditCase

class _StageRegistry(Registry["PrivacyStage"]):
    """The stage registry: a class is registered only if it declares how the sensitivity audit
    builds it (``audit_cases``); tests/test_privacy_audit.py then audits every registered class."""

    def register(self, *names: str):  # type: ignore[override]
        inner = super().register(*names)

        def deco(cls):
            if not hasattr(cls, "audit_cases") or "audit_cases" in getattr(cls, "__abstractmethods__", ()):
                raise ConfigError(f"privacy stage {cls.__name__} declares no audit_cases(): it cannot be "
                                  "registered before it can be audited")
            return inner(cls)

        return deco


PRIVACY_STAGES: "Registry[PrivacyStage]" = _StageRegistry("privacy stage")


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """A noise multiplier: finite and >= 0 (0 only for non-private runs)."""
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(f"noise multiplier {name} must be finite and >= 0, got {sigma}")
    return sigma


def check_noise_vs_clip(sigma: float, c: float, sigma_name: str, c_name: str) -> None:
    """Noise on an unclipped (unbounded-sensitivity) quantity protects nothing: refuse it."""
    if sigma > 0 and math.isinf(c):
        raise ConfigError(
            f"{sigma_name}={sigma} with {c_name}=inf: without clipping the sensitivity is unbounded "
            "and the noise gives no privacy; set a finite clip, or sigma=0 for a non-private run"
        )


@dataclass(frozen=True)
class Release:
    """One release of a stage, as the accountant must see it: a Gaussian mechanism.

    Attributes:
        kind: what was released ("gradient", "difference", "gradient+error").
        noise_multiplier: σ = noise std / ``sensitivity``.
        sensitivity: ℓ₂ sensitivity Δ of the released vector (its own units) to adding or
            removing one sample, given all earlier releases (replace-one: at most 2Δ).
        subsampled: True when amplification by Poisson subsampling applies (the release
            depends on the data only through this step's sampled batch); False: account it
            as an unsampled (q = 1) Gaussian.
    """

    kind: str
    noise_multiplier: float
    sensitivity: float
    subsampled: bool

    @property
    def noise_std(self) -> float:
        """σ·Δ (0 when σ = 0, even with an unbounded Δ)."""
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * self.sensitivity

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ServerHalf(ABC):
    """Server half of a mechanism (runs after aggregation; deterministic, replicable per rank)."""

    @abstractmethod
    def step(self, aggregate: torch.Tensor) -> torch.Tensor:
        """The aggregated released vector of one round -> the direction the optimizer applies."""

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class PrivacyStage(ABC):
    """Worker half of a DP mechanism: per-sample grads (B, d) -> privatised vector (d,)."""

    name: ClassVar[str]
    #: one line: the guarantee of each release and its source. None: no proven sensitivity,
    #: and no ε may be claimed for the stage (``require_accountable`` refuses it).
    guarantee: ClassVar[Optional[str]] = None
    #: True when every release depends on the data only through its step's batch, so privacy
    #: amplification by Poisson subsampling applies; False (the safe default): q = 1
    subsampling_amplifies: ClassVar[bool] = False
    #: True when the per-sample grads at the previous point are needed on some steps (DIFF2)
    uses_previous_point: ClassVar[bool] = False
    #: True when the server half counts rounds with the workers (every worker, every round)
    needs_full_quorum: ClassVar[bool] = False

    def __init__(self, seed: Optional[int] = None, secure: bool = False) -> None:
        self.noise = GaussianNoise(1.0, seed=seed, secure=secure)
        #: the most recent release (what the accountant records); None before the first.
        self.last_release: Optional[Release] = None
        self.steps = 0

    # ------------------------------------------------------------------ declarations
    @classmethod
    @abstractmethod
    def audit_cases(cls) -> List["AuditCase"]:
        """How the sensitivity audit (tests/test_privacy_audit.py) builds this stage: one case
        per configuration it must pass. Every registered stage is audited."""

    @property
    def needs_previous(self) -> bool:
        """True when the next ``step`` needs per-sample grads at the previous point too."""
        return False

    @property
    @abstractmethod
    def private(self) -> bool:
        """True when every release is clipped and noised (σ > 0, finite clip)."""

    def make_server(self) -> Optional[ServerHalf]:
        """A fresh server half, if the mechanism has one (DIFF2); else None."""
        return None

    def require_accountable(self) -> None:
        """Refuse (ConfigError, naming what is missing) when no ε can be computed for this stage."""
        if self.guarantee is None:
            raise ConfigError(
                f"stage {type(self).__name__} declares no proven per-release sensitivity (its `guarantee` "
                "is None), so no ε can be computed for it; audit it and declare one first"
            )
        if not self.private:
            raise ConfigError(
                f"stage {type(self).__name__} is not private (σ = 0 or no clipping): its ε is infinite; "
                "refusing to account it"
            )

    @property
    def last_noise_multiplier(self) -> Optional[float]:
        """σ of the most recent release (None before the first)."""
        return None if self.last_release is None else self.last_release.noise_multiplier

    def noise_fingerprint(self) -> Optional[int]:
        """The seed of a seeded noise stream (62 bits), None for CSPRNG noise."""
        return self.noise.seed_fingerprint()

    # ------------------------------------------------------------------ the step
    def step(
        self,
        grads: torch.Tensor,
        previous: Optional[torch.Tensor] = None,
        *,
        normalizer: Optional[float] = None,
    ) -> torch.Tensor:
        """Privatise one step's per-sample gradients; returns the d-vector to send."""
        if grads.dim() != 2:
            raise ConfigError(f"a privacy stage takes (B, d) per-sample grads, got shape {tuple(grads.shape)}")
        if normalizer is None:
            if grads.shape[0] == 0:
                raise ConfigError("empty batch: pass normalizer (the expected batch size) so noise is still released")
            batch = float(grads.shape[0])
        else:
            batch = float(normalizer)
            if not math.isfinite(batch) or batch <= 0:
                raise ConfigError(f"normalizer must be a positive batch size, got {normalizer}")
        if previous is not None and previous.shape != grads.shape:
            raise ConfigError(
                f"previous-point grads {tuple(previous.shape)} must match current grads {tuple(grads.shape)} "
                "(same samples at both points)"
            )
        clean, release = self._step(grads, previous, batch)
        self.last_release = release
        self.steps += 1
        return clean + self.noise.sample(clean.shape, std=release.noise_std, dtype=clean.dtype, device=clean.device)

    @abstractmethod
    def _step(self, grads: torch.Tensor, previous: Optional[torch.Tensor], batch: float) -> Tuple[torch.Tensor, Release]:
        """The mechanism on checked input: (noise-free released vector, its Release). The base
        class adds N(0, (σΔ)² I), so the noise is always the one the Release declares."""

    # ------------------------------------------------------------------ state
    def _mechanism_state(self) -> Dict[str, Any]:
        """Mechanism state besides the step counter (error buffers, round counters)."""
        return {}

    def _load_mechanism_state(self, state: Dict[str, Any]) -> None:
        """Inverse of ``_mechanism_state``."""

    def rollback_state(self) -> Dict[str, Any]:
        """Everything but the noise generator (a rollback must never replay noise)."""
        last = None if self.last_release is None else self.last_release.to_dict()
        return {"steps": self.steps, "last_release": last, **self._mechanism_state()}

    def load_rollback_state(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_release = None if state["last_release"] is None else Release(**state["last_release"])
        self._load_mechanism_state(state)

    def reset(self) -> None:
        """Back to the initial mechanism state (no release yet); the noise stream goes on."""
        self.steps, self.last_release = 0, None
        self._load_mechanism_state(self._initial_mechanism_state())

    def _initial_mechanism_state(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {"noise": self.noise.state_dict(), **self.rollback_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.noise.load_state_dict(state["noise"])
        self.load_rollback_state(state)
