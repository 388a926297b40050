"""Robust aggregation rules on an (n, d) stack (docs/algorithms.md §6).

Every rule is registered in ``AGGREGATORS`` and built by name with options, e.g.
``AGGREGATORS.build("nnm", f=2, base="trimmed-mean")``. Inputs: an (n, d) float32/float64
stack (never modified); call ``drop_nonfinite`` first (see nonfinite.py for the policy).

Sources, known answers and options of every rule: docs/algorithms.md §6.
"""
from commlib.aggregate.base import AGGREGATORS, Aggregator, Mean  # noqa: F401
from commlib.aggregate.bucketing import Bucketing  # noqa: F401
from commlib.aggregate.clipping import ARC, CenteredClipping, NormClipping  # noqa: F401
from commlib.aggregate.coordinate import CoordinateMedian, TrimmedMean  # noqa: F401
from commlib.aggregate.flag import FlagAggregator  # noqa: F401
from commlib.aggregate.geomed import GeometricMedian  # noqa: F401
from commlib.aggregate.krum import Krum, MultiKrum  # noqa: F401
from commlib.aggregate.monna import MoNNA, WorkerMomentum, monna_mix  # noqa: F401
from commlib.aggregate.nnm import NNM  # noqa: F401
from commlib.aggregate.nonfinite import drop_nonfinite  # noqa: F401
from commlib.aggregate.points import Points  # noqa: F401
from commlib.aggregate.robust import PreAggregator, RobustAggregator  # noqa: F401
