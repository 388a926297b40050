"""Simulation: a fault plan (crashes, hangs, Byzantine attacks, garbled bytes, network delay,
stragglers from a bursty (B, W, lambda) model or a distribution) applied to a real
parameter-server run, on a local Ray (default), a Ray cluster by address, or in-process; with
many logical workers per process (virtual workers, ``commlib.ps.worker_group``) or one each.

    commlib simulate --workers 5 --crash 1@40+3 --attack 2:sign-flipping --bursty 2,4,1 ...
"""
from commlib.sim.driver import simulate  # noqa: F401
from commlib.sim.plan import FaultPlan, StragglerSpec, WorkerFaults  # noqa: F401
