"""Optimizers the runtimes use: SGD with momentum plus Adaptive Braking, an lr schedule that is
a function of the step, and a gradient-delay simulator for experiments (pure torch; no runtime
imports)."""
from commlib.optim.adaptive_braking import (  # noqa: F401
    AdaptiveBrakingSGD,
    adaptive_braking_sgd_,
    braking_cosine,
    braking_cosines,
    braking_factor,
)
from commlib.optim.delay import DelayedGradients  # noqa: F401
from commlib.optim.schedule import LR_SCHEDULES, LRSchedule, warmup_cosine_factor  # noqa: F401

__all__ = [
    "AdaptiveBrakingSGD",
    "DelayedGradients",
    "LR_SCHEDULES",
    "LRSchedule",
    "adaptive_braking_sgd_",
    "braking_cosine",
    "braking_cosines",
    "braking_factor",
    "warmup_cosine_factor",
]
