"""Sensitivity audit of every registered privacy stage: noise-free, on adversarial neighbouring
batches, the largest per-step change of every released vector is at most the sensitivity its
noise assumes (replace-one: twice it). A stage registered in PRIVACY_STAGES is audited here
automatically; one that declares no audit case, or fails it, fails this file."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import pytest
import torch

from commlib.errors import ConfigError
from commlib.privacy import PRIVACY_STAGES, AuditCase, GaussianNoise, PrivacyStage, Release, audit, audit_stage_class
from commlib.privacy.audit import NEIGHBOURS
from commlib.privacy.clipping import clip_vector, clipped_sum

STAGE_CLASSES = sorted({PRIVACY_STAGES.get(n) for n in PRIVACY_STAGES.names()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_every_registered_stage_passes_the_sensitivity_audit(cls):
    rows = audit_stage_class(cls, steps=40)
    assert {r.neighbour for r in rows} == set(NEIGHBOURS)
    for r in rows:
        assert r.releases > 0
        assert r.passed, (f"{r.stage} {r.release} ({r.neighbour}): max per-step change {r.max_change:.6g} > "
                          f"covered sensitivity {r.covered:.6g} (ratio {r.ratio:.3f})")
    # the adversaries reach the bound: the audit is not vacuous (ratio close to 1 somewhere)
    assert max(r.ratio for r in rows) > 0.9


def test_the_audit_covers_every_release_the_brief_names():
    labels = {(r.stage, r.release) for cls in STAGE_CLASSES for r in audit_stage_class(cls, steps=8)}
    for want in [("DP-SGD", "gradient"), ("DP-GD", "gradient"), ("EF-DPSGD", "gradient+error"),
                 ("DIFF2", "gradient"), ("DIFF2", "difference")]:
        assert want in labels


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_declared_guarantee_and_noise_is_sigma_times_declared_sensitivity(cls):
    assert cls.guarantee, f"{cls.__name__} declares no guarantee"
    for case in cls.audit_cases():
        gen = torch.Generator().manual_seed(1)
        noisy, clean = case.build(1.0, 5), case.build(0.0, 0)
        ref = GaussianNoise(1.0, seed=5)
        prev = torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64)
        for _ in range(6):
            g = torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64)
            p = prev if noisy.needs_previous else None
            out = noisy.step(g, p, normalizer=case.normalizer) - clean.step(g, p, normalizer=case.normalizer)
            rel = noisy.last_release
            assert rel.noise_multiplier > 0 and rel.kind == clean.last_release.kind
            assert rel.sensitivity == clean.last_release.sensitivity
            torch.testing.assert_close(out, ref.sample(case.dim, std=rel.noise_multiplier * rel.sensitivity,
                                                       dtype=torch.float64))
            prev = g


# ------------------------------------------------------------------ the audit can fail


class _MeanScaleEF(PrivacyStage):
    """The old, wrong EF-DPSGD: error clipped on the mean scale, noise σ·C₁√(1 + 2C₂/C₁)/B."""

    guarantee = "claimed like DP-SGD (wrong)"

    def __init__(self, c1: float, c2: float, sigma: float, seed: Optional[int] = None) -> None:
        super().__init__(seed=seed)
        self.c1, self.c2, self.sigma, self.error = c1, c2, sigma, None

    @property
    def private(self) -> bool:
        return self.sigma > 0

    @classmethod
    def audit_cases(cls) -> List[AuditCase]:
        return [AuditCase("old EF-DPSGD", lambda f, seed: cls(1.0, 1.0, f, seed), batch=63, normalizer=64.0)]

    def _step(self, grads, previous, batch) -> Tuple[torch.Tensor, Release]:
        if self.error is None:
            self.error = torch.zeros(grads.shape[1], dtype=grads.dtype)
        v = clipped_sum(grads, self.c1) / batch + clip_vector(self.error, self.c2)
        self.error = self.error + grads.sum(0) / batch - v
        return v, Release("gradient+error", self.sigma, self.c1 / batch * math.sqrt(1 + 2 * self.c2 / self.c1), True)


def test_the_audit_catches_the_old_mean_scale_ef_dpsgd():
    rows = audit(_MeanScaleEF.audit_cases()[0], "replace-one", steps=40)
    (row,) = rows
    assert not row.passed and row.ratio > 20  # far beyond what its noise covers


def test_a_stage_without_audit_cases_cannot_be_built():
    class NoAudit(PrivacyStage):
        @property
        def private(self) -> bool:
            return True

        def _step(self, grads, previous, batch):
            return grads.sum(0) / batch, Release("gradient", 1.0, 1.0 / batch, True)

    with pytest.raises(TypeError, match="audit_cases"):
        NoAudit()


def test_a_stage_without_a_guarantee_cannot_be_accounted():
    from commlib.privacy import PrivacyPipeline
    from commlib.privacy.accounting import Accountant, calibrate_stage_sigma

    class Unproven(_MeanScaleEF):
        guarantee = None

    with pytest.raises(ConfigError, match="no proven per-release sensitivity"):
        PrivacyPipeline(Unproven(1.0, 1.0, 1.0, seed=0), accountant=Accountant(1e-5))
    with pytest.raises(ConfigError, match="no proven per-release sensitivity"):
        calibrate_stage_sigma(Unproven, 2.0, 1e-5, 0.1, 100)


def test_a_stage_without_audit_cases_cannot_be_registered():
    from commlib.privacy.base import _StageRegistry

    reg = _StageRegistry("privacy stage (test)")

    class NoAudit(PrivacyStage):
        @property
        def private(self) -> bool:
            return True

        def _step(self, grads, previous, batch):
            return grads.sum(0) / batch, Release("gradient", 1.0, 1.0 / batch, True)

    with pytest.raises(ConfigError, match="audit_cases"):
        reg.register("no-audit")(NoAudit)
    assert "no-audit" not in reg
