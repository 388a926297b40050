"""Byzantine behaviours for tests, simulation and benchmarks (docs/algorithms.md §6.5).

Registered in ``ATTACKS``; applied to chosen ranks with ``AttackPlan``.
"""
from commlib.attacks.base import ATTACKS, Attack  # noqa: F401
from commlib.attacks.data import Crash, LabelFlipping, flip_labels  # noqa: F401
from commlib.attacks.optimal import OptimalALIE, OptimalIPM, line_search  # noqa: F401
from commlib.attacks.plan import AttackPlan  # noqa: F401
from commlib.attacks.vector import (  # noqa: F401
    ALittleIsEnough, Gaussian, InfAttack, InnerProductManipulation, Mimic, NaNAttack, SignFlipping,
)
