"""Differential privacy for commlib: per-sample gradients, clipping, Gaussian noise, the
worker stages (DP-SGD, EF-DPSGD/DiceSGD, DIFF2), the one pipeline every runtime calls
(per-sample grads -> stage -> accountant -> scheme), the sensitivity audit, and accounting
through dp-accounting.

Stages are pure tensor code (torch/numpy only). ``commlib.privacy.accounting`` needs the
optional ``dp-accounting`` package (``pip install 'commlib[privacy]'``); its names are
re-exported here lazily, so importing the stages never requires it.
"""
from __future__ import annotations

from typing import Any

from commlib.privacy.audit import AuditCase, AuditRow, audit, audit_stage_class
from commlib.privacy.base import PRIVACY_STAGES, PrivacyStage, Release, ServerHalf
from commlib.privacy.clipping import clip_per_sample, clip_vector, clipped_sum
from commlib.privacy.diff2 import DIFF2Server, DIFF2Worker
from commlib.privacy.dpsgd import DPSGD
from commlib.privacy.efdpsgd import EFDPSGD, efdpsgd_sensitivity
from commlib.privacy.noise import GaussianNoise
from commlib.privacy.per_sample import flatten, per_sample_grads, unflatten
from commlib.privacy.pipeline import PrivacyPipeline, model_grads_at
from commlib.privacy.sampling import PoissonSampler
from commlib.privacy.trainer import PrivateTrainer

_ACCOUNTING = (
    "Accountant",
    "PrivacyWarning",
    "calibrate_diff2",
    "calibrate_sigma",
    "calibrate_stage_sigma",
    "diff2_epsilon",
    "diff2_event",
    "dpsgd_event",
    "epsilon",
    "epsilon_of_event",
    "release_event",
)

__all__ = [
    "PRIVACY_STAGES", "PrivacyStage", "Release", "ServerHalf", "DPSGD", "EFDPSGD", "DIFF2Worker",
    "DIFF2Server", "GaussianNoise", "PoissonSampler", "PrivacyPipeline", "PrivateTrainer", "AuditCase",
    "AuditRow", "audit", "audit_stage_class", "clip_per_sample", "clip_vector", "clipped_sum",
    "efdpsgd_sensitivity", "flatten", "model_grads_at", "per_sample_grads", "unflatten", *_ACCOUNTING,
]


def __getattr__(name: str) -> Any:
    if name in _ACCOUNTING:
        from commlib.privacy import accounting

        return getattr(accounting, name)
    raise AttributeError(f"module 'commlib.privacy' has no attribute {name!r}")
