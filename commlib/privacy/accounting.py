"""Privacy accounting with Google's ``dp-accounting`` library — no formulas of our own.

Everything here builds ``DpEvent``s and asks a library accountant (``RdpAccountant`` by
default, ``PLDAccountant`` with ``method="pld"``) for ε at a given δ; calibration uses the
library's ``calibrate_dp_mechanism``.

Model and assumptions:
* Neighbouring datasets differ by adding or removing one sample (the library default).
* Minibatches are Poisson-sampled with rate q (each sample independently), and the stages
  divide by the *expected* batch size; fixed-size shuffled batches are commonly accounted
  this way too, but that is then an approximation, not a proof.
* Every release is what the stage that made it declares (``commlib.privacy.Release``): a
  Gaussian mechanism with noise multiplier σ = std / ℓ₂-sensitivity, Poisson-subsampled
  only when the stage says amplification applies (DP-SGD, DIFF2), otherwise recorded at
  q = 1 whatever the batch sampling (EF-DPSGD: its error feedback carries samples into
  later steps). ``Accountant.record_release`` takes exactly that; nothing is mapped from a
  stage's name.
* DIFF2 (Murata & Suzuki 2023): ⌈R/T⌉ restart releases at σ₁ (sensitivity C₁) and
  R − ⌈R/T⌉ difference releases at σ₂ (sensitivity C₂: the difference is clipped as one
  vector), composed into one ``ComposedDpEvent`` (``diff2_event``).

Refused with ``ConfigError``: a missing or out-of-range δ, ε target <= 0 or infinite,
σ = 0 (no privacy) recorded or calibrated against a target, q outside (0, 1], < 1 step, a
release with an unbounded sensitivity, a stage without a declared guarantee.
δ >= 1/N (N = dataset size, when given) draws a ``PrivacyWarning``: such a δ allows
mechanisms that publish a whole sample.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    import dp_accounting
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "commlib.privacy.accounting needs the dp-accounting package: pip install 'commlib[privacy]'"
    ) from exc

from commlib.errors import ConfigError
from commlib.privacy.base import PrivacyStage, Release
from commlib.privacy.diff2 import check_period, restart_count

METHODS = ("rdp", "pld")


class PrivacyWarning(UserWarning):
    """A configuration that is allowed but weakens the privacy guarantee."""


# ---------------------------------------------------------------- validation

def check_delta(delta: Optional[float], dataset_size: Optional[int] = None) -> float:
    """δ must be given and in (0, 1); warn when δ >= 1/N."""
    if delta is None:
        raise ConfigError("δ (delta) is missing: an (ε, δ) guarantee needs both; typical δ is below 1/N")
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ConfigError(f"δ must be in (0, 1), got {delta}")
    if dataset_size is not None:
        n = int(dataset_size)
        if n < 1:
            raise ConfigError(f"dataset_size must be >= 1, got {dataset_size}")
        if delta >= 1.0 / n:
            warnings.warn(
                f"δ={delta:g} >= 1/N={1.0 / n:g}: such a δ permits releasing a whole sample; use δ << 1/N",
                PrivacyWarning,
                stacklevel=3,
            )
    return delta


def check_target_epsilon(eps: Optional[float]) -> float:
    if eps is None:
        raise ConfigError("target ε is missing")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"target ε must be finite and > 0, got {eps}")
    return eps


def check_rate(q: float) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):
        raise ConfigError(f"sampling rate must be in (0, 1], got {q}")
    return q


def check_steps(steps: int, name: str = "steps") -> int:
    if int(steps) != steps or int(steps) < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {steps}")
    return int(steps)


def check_private_sigma(sigma: float, name: str = "sigma") -> float:
    sigma = float(sigma)
    if sigma == 0.0:
        raise ConfigError(f"{name}=0 adds no noise: the release is not private (ε = ∞); refusing to account it")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"{name} must be finite and > 0, got {sigma}")
    return sigma


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown accounting method {method!r}; known: {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------- events

def gaussian_step_event(sigma: float, sample_rate: float = 1.0) -> dp_event.DpEvent:
    """One (Poisson-subsampled, if q < 1) Gaussian release with noise multiplier σ."""
    sigma, q = check_private_sigma(sigma), check_rate(sample_rate)
    gauss = dp_event.GaussianDpEvent(float(sigma))
    return gauss if q == 1.0 else dp_event.PoissonSampledDpEvent(q, gauss)


def release_event(release: Release, sample_rate: float = 1.0) -> dp_event.DpEvent:
    """The DpEvent of one release as its stage declared it: Poisson-subsampled at q only when
    ``release.subsampled``, otherwise an unsampled Gaussian."""
    if not (math.isfinite(release.sensitivity) and release.sensitivity > 0):
        raise ConfigError(f"release {release.kind!r} has sensitivity {release.sensitivity}: "
                          "its noise protects nothing (clip the quantity first)")
    return gaussian_step_event(release.noise_multiplier, sample_rate if release.subsampled else 1.0)


def dpsgd_event(sigma: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """DP-SGD: ``steps`` self-composed Poisson-subsampled Gaussian releases."""
    return dp_event.SelfComposedDpEvent(gaussian_step_event(sigma, sample_rate), check_steps(steps))


def diff2_event(sigma1: float, sigma2: float, sample_rate: float, rounds: int, period: int) -> dp_event.DpEvent:
    """DIFF2: ⌈R/T⌉ releases at σ₁ composed with R − ⌈R/T⌉ at σ₂, as one ComposedDpEvent."""
    rounds, period = check_steps(rounds, "rounds"), check_period(period)
    n1 = restart_count(rounds, period)
    events = [dp_event.SelfComposedDpEvent(gaussian_step_event(sigma1, sample_rate), n1)]
    if rounds - n1 > 0:
        events.append(dp_event.SelfComposedDpEvent(gaussian_step_event(sigma2, sample_rate), rounds - n1))
    return dp_event.ComposedDpEvent(events)


def _fresh(method: str) -> dp_accounting.PrivacyAccountant:
    if check_method(method) == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    return pld_privacy_accountant.PLDAccountant()


def epsilon_of_event(event: dp_event.DpEvent, delta: float, method: str = "rdp") -> float:
    """ε at δ of any DpEvent, from a fresh library accountant."""
    return float(_fresh(method).compose(event).get_epsilon(check_delta(delta)))


def epsilon(sigma: float, delta: float, sample_rate: float, steps: int, method: str = "rdp") -> float:
    """ε spent by DP-SGD with noise multiplier σ, sampling rate q, ``steps`` steps, at δ."""
    return epsilon_of_event(dpsgd_event(sigma, sample_rate, steps), delta, method)


def diff2_epsilon(
    sigma1: float, sigma2: float, delta: float, sample_rate: float, rounds: int, period: int, method: str = "rdp"
) -> float:
    """ε spent by DIFF2 (see ``diff2_event``) at δ."""
    return epsilon_of_event(diff2_event(sigma1, sigma2, sample_rate, rounds, period), delta, method)


def _calibrate(
    make_event: Callable[[float], dp_event.DpEvent], target: float, delta: float, method: str, tol: float
) -> float:
    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(method),
                make_event,
                target,
                delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                tol=tol,
            )
        )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as exc:
        raise ConfigError(f"no noise multiplier in [1e-3, 2^30] reaches ε={target} at δ={delta}") from exc
    except ValueError as exc:  # the library's bracket/brentq failures
        raise ConfigError(f"calibration failed for ε={target}, δ={delta}: {exc}") from exc


def calibrate_sigma(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    dataset_size: Optional[int] = None,
    method: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """Smallest DP-SGD noise multiplier σ (within ``tol``) with ε(σ) <= target at δ."""
    target = check_target_epsilon(target_epsilon)
    delta = check_delta(delta, dataset_size)
    q, steps = check_rate(sample_rate), check_steps(steps)
    return _calibrate(lambda s: dpsgd_event(s, q, steps), target, delta, method, tol)


def calibrate_stage_sigma(
    stage_cls: type,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    **kw: Any,
) -> float:
    """``calibrate_sigma`` for a single-σ stage class, at the sampling its releases get: q when
    they are Poisson-subsampled (DP-SGD), 1 when not (EF-DPSGD). Refuses a class without a
    declared guarantee."""
    if not (isinstance(stage_cls, type) and issubclass(stage_cls, PrivacyStage)):
        raise ConfigError(f"{stage_cls!r} is not a privacy stage class")
    if stage_cls.guarantee is None:
        raise ConfigError(f"stage {stage_cls.__name__} declares no proven per-release sensitivity "
                          "(its `guarantee` is None): no σ can be calibrated for it")
    return calibrate_sigma(target_epsilon, delta, sample_rate if stage_cls.subsampling_amplifies else 1.0, steps, **kw)


def calibrate_diff2(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    period: int,
    *,
    ratio: float = 1.0,
    dataset_size: Optional[int] = None,
    method: str = "rdp",
    tol: float = 1e-4,
) -> Tuple[float, float]:
    """(σ₁, σ₂) with σ₂ = ratio·σ₁ and ε(σ₁, σ₂) <= target at δ (smallest such σ₁ within tol).

    The split of the budget between restart and difference rounds is the caller's choice
    (``ratio``); the accounting itself is the library's composition.
    """
    target = check_target_epsilon(target_epsilon)
    delta = check_delta(delta, dataset_size)
    ratio = float(ratio)
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ConfigError(f"ratio σ₂/σ₁ must be finite and > 0, got {ratio}")
    q, rounds, period = check_rate(sample_rate), check_steps(rounds, "rounds"), check_period(period)
    s1 = _calibrate(lambda s: diff2_event(s, ratio * s, q, rounds, period), target, delta, method, tol)
    return s1, ratio * s1


# ---------------------------------------------------------------- running accountant

class Accountant:
    """Tracks ε spent as releases happen (during training) and reports it at the end.

    ``record_release(stage.last_release, q)`` after every release (the stage's own
    description of it), or ``record(σ, q)`` for a Poisson-subsampled Gaussian at σ; ``epsilon``
    is the library's ε for everything recorded so far. The ledger is a short list of
    (σ, q, count) runs, so ``state_dict`` is small and checkpoint-safe, and ε is recomputed
    from it lazily (PLD composition is costly per call).
    """

    def __init__(
        self,
        delta: Optional[float],
        *,
        target_epsilon: Optional[float] = None,
        dataset_size: Optional[int] = None,
        method: str = "rdp",
    ) -> None:
        self.delta = check_delta(delta, dataset_size)
        self.target_epsilon = None if target_epsilon is None else check_target_epsilon(target_epsilon)
        self.dataset_size = dataset_size
        self.method = check_method(method)
        self.ledger: List[List[Any]] = []  # [sigma, q, count] runs, in order
        self._eps: Optional[float] = 0.0

    def record(self, noise_multiplier: Optional[float], sample_rate: float = 1.0, count: int = 1) -> None:
        """Account ``count`` releases with noise multiplier σ at sampling rate q."""
        if noise_multiplier is None:
            raise ConfigError("no noise multiplier to record (has the stage released anything?)")
        sigma = check_private_sigma(noise_multiplier, "noise multiplier")
        q, count = check_rate(sample_rate), check_steps(count, "count")
        if self.ledger and self.ledger[-1][0] == sigma and self.ledger[-1][1] == q:
            self.ledger[-1][2] += count
        else:
            self.ledger.append([sigma, q, count])
        self._eps = None

    def record_release(self, release: Optional[Release], sample_rate: float = 1.0, count: int = 1) -> None:
        """Account ``count`` releases exactly as the stage described them (``Release``): at
        ``sample_rate`` when they are Poisson-subsampled, at q = 1 otherwise."""
        if release is None:
            raise ConfigError("no release to record (has the stage released anything?)")
        release_event(release, sample_rate)  # validates σ, Δ and q
        self.record(release.noise_multiplier, check_rate(sample_rate) if release.subsampled else 1.0, count)

    @property
    def steps(self) -> int:
        return sum(c for _, _, c in self.ledger)

    def event(self) -> dp_event.DpEvent:
        """Everything recorded, as one ComposedDpEvent."""
        return dp_event.ComposedDpEvent(
            [dp_event.SelfComposedDpEvent(gaussian_step_event(s, q), c) for s, q, c in self.ledger]
        )

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0 before any release)."""
        if self._eps is None:
            self._eps = epsilon_of_event(self.event(), self.delta, self.method)
        return self._eps

    @property
    def over_budget(self) -> bool:
        """True when a target ε was given and the spent ε exceeds it."""
        return self.target_epsilon is not None and self.epsilon > self.target_epsilon

    def state_dict(self) -> Dict[str, Any]:
        return {
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "dataset_size": self.dataset_size,
            "method": self.method,
            "ledger": [list(run) for run in self.ledger],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.delta = check_delta(state["delta"])
        self.target_epsilon = state["target_epsilon"]
        self.dataset_size = state["dataset_size"]
        self.method = check_method(state["method"])
        self.ledger = [[float(s), float(q), int(c)] for s, q, c in state["ledger"]]
        self._eps = None if self.ledger else 0.0
