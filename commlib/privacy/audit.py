"""Sensitivity audit: the noise of every release must cover its measured worst-case change.

For one stage configuration (an :class:`AuditCase`), two copies of the stage run noise-free
side by side for many steps on neighbouring batches: the same common samples every step
(the public past is shared: both sides see the same inputs, as they would at the same
public model point), plus a differing sample that is adversarial — norms from 1e-2 to 1e4
times the stage's clip, aligned with the common samples' mean direction, anti-aligned,
alternating, or in a fresh random direction each step, present in every step so stateful
mechanisms (error feedback) accumulate the difference.

* add/remove: one side has the differing sample, the other not;
* replace-one: each side has its own differing sample (opposite directions).

Per step and per release, ‖v − v′‖ is compared with the ℓ₂ sensitivity Δ that the stage
declares in its :class:`commlib.privacy.base.Release` (the noise std is σ·Δ by
construction); replace-one may reach 2Δ. Both sides must declare the same Release (a
descriptor that depended on the data would itself leak). ``benchmarks/privacy_audit.py``
prints the table; ``tests/test_privacy_audit.py`` asserts it for every registered stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from commlib.errors import ConfigError
from commlib.privacy.base import PrivacyStage, Release

NEIGHBOURS = ("add/remove", "replace-one")
PATTERNS = ("aligned", "anti-aligned", "alternating", "random")
MAGNITUDES = (1e-2, 1.0, 1e2, 1e4)  # times the case's scale (its largest clip)


@dataclass(frozen=True)
class AuditCase:
    """How to build one configuration of a stage for the audit.

    Attributes:
        label: the row name ("DP-SGD", "DIFF2", ...).
        build: ``build(sigma_factor, seed)`` -> a stage; ``sigma_factor = 0`` must give the
            same mechanism with its noise off (its Releases keep their sensitivities).
        batch: common samples per step; normalizer: the public B the stage divides by.
        scale: unit of the adversarial magnitudes (the stage's largest clip).
    """

    label: str
    build: Callable[[float, int], PrivacyStage]
    batch: int = 8
    normalizer: float = 8.0
    scale: float = 1.0
    dim: int = 16


@dataclass
class AuditRow:
    stage: str
    release: str
    neighbour: str
    max_change: float  # max over steps and adversaries of ‖v − v′‖
    covered: float  # the sensitivity the noise assumes (×2 for replace-one)
    releases: int  # (step, adversary) pairs measured

    @property
    def ratio(self) -> float:
        return self.max_change / self.covered if self.covered > 0 else math.inf

    @property
    def passed(self) -> bool:
        return self.max_change <= self.covered * (1 + 1e-9) + 1e-12


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _common(gen: torch.Generator, case: AuditCase, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step's common samples: grads with norms spread over e^±3·scale and a shared direction u,
    and their grads at the previous point (differences of spread size, some clipped)."""
    b, d = case.batch, case.dim
    spread = lambda: torch.exp(6 * torch.rand(b, 1, generator=gen, dtype=torch.float64) - 3)  # noqa: E731
    now = (torch.randn(b, d, generator=gen, dtype=torch.float64) + 2 * u) * spread() * case.scale
    diff = torch.randn(b, d, generator=gen, dtype=torch.float64) * spread() * case.scale * 0.3
    return now, now - diff


def _direction(pattern: str, step: int, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if pattern == "aligned":
        return u
    if pattern == "anti-aligned":
        return -u
    if pattern == "alternating":
        return u if step % 2 == 0 else -u
    if pattern == "random":
        return _unit(torch.randn(u.shape, generator=gen, dtype=torch.float64))
    raise ConfigError(f"unknown audit pattern {pattern!r}")


def _step(stage: PrivacyStage, now: torch.Tensor, prev: torch.Tensor, normalizer: float) -> torch.Tensor:
    return stage.step(now, prev if stage.needs_previous else None, normalizer=normalizer)


def _runs(case: AuditCase, neighbour: str, steps: int, seed: int) -> Iterator[Tuple[Release, float]]:
    """(release, ‖v − v′‖) for every step of every adversary."""
    for pi, pattern in enumerate(PATTERNS):
        for mi, magnitude in enumerate(MAGNITUDES):
            gen = torch.Generator().manual_seed(seed * 1000 + pi * 10 + mi)
            u = _unit(torch.randn(case.dim, generator=gen, dtype=torch.float64))
            a, b = case.build(0.0, 0), case.build(0.0, 0)
            for t in range(steps):
                now, prev = _common(gen, case, u)
                g = magnitude * case.scale * _direction(pattern, t, u, gen)
                # the differing sample's difference is 2g on DIFF2's difference rounds
                extra_a = (g.unsqueeze(0), -g.unsqueeze(0))
                if neighbour == "add/remove":
                    va = _step(a, torch.cat([now, extra_a[0]]), torch.cat([prev, extra_a[1]]), case.normalizer)
                    vb = _step(b, now, prev, case.normalizer)
                elif neighbour == "replace-one":
                    va = _step(a, torch.cat([now, extra_a[0]]), torch.cat([prev, extra_a[1]]), case.normalizer)
                    vb = _step(b, torch.cat([now, -extra_a[0]]), torch.cat([prev, -extra_a[1]]), case.normalizer)
                else:
                    raise ConfigError(f"unknown neighbour kind {neighbour!r}; known: {', '.join(NEIGHBOURS)}")
                if a.last_release != b.last_release:
                    raise AssertionError(f"{case.label}: the release descriptor depends on the data "
                                         f"({a.last_release} vs {b.last_release})")
                assert a.last_release is not None
                yield a.last_release, float((va - vb).norm())


def audit(case: AuditCase, neighbour: str, steps: int = 60, seed: int = 0) -> List[AuditRow]:
    """One row per release kind of the case: the largest per-step change against the covered sensitivity."""
    rows: Dict[str, AuditRow] = {}
    factor = 2.0 if neighbour == "replace-one" else 1.0
    for release, change in _runs(case, neighbour, steps, seed):
        covered = factor * release.sensitivity
        row = rows.get(release.kind)
        if row is None:
            row = rows[release.kind] = AuditRow(case.label, release.kind, neighbour, 0.0, covered, 0)
        if covered != row.covered:  # e.g. a stage whose clip changed between steps: audit each separately
            row.covered = min(row.covered, covered)
        row.max_change = max(row.max_change, change)
        row.releases += 1
    return list(rows.values())


def audit_stage_class(cls: type, steps: int = 60) -> List[AuditRow]:
    """Every case the class declares, under both neighbour kinds."""
    cases = cls.audit_cases()  # type: ignore[attr-defined]
    if not cases:
        raise ConfigError(f"stage {cls.__name__} declares no audit case")
    return [row for case in cases for nb in NEIGHBOURS for row in audit(case, nb, steps)]


def markdown_table(rows: List[AuditRow]) -> str:
    lines = ["| stage | release | neighbour kind | max per-step change | covered sensitivity | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.release} | {r.neighbour} | {r.max_change:.6g} | {r.covered:.6g} | "
                     f"{r.ratio:.4f} |")
    return "\n".join(lines)
