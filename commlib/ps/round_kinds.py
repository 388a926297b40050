"""Which synchronous round a parameter server runs: built from ``PSConfig.coding`` through
the code registries (``commlib.coding.GRADIENT_CODES``, ``commlib.coding.SGC_SCHEMES``)."""
from __future__ import annotations

from typing import Any

from commlib.errors import ConfigError
from commlib.ps.coded import CodedServer, build_code, check_coded_scheme
from commlib.ps.config import PSConfig, coding_family
from commlib.ps.rounds import RoundKind, SyncRound
from commlib.ps.sequential import SGCServer, build_scheduler
from commlib.scheme import Scheme


def build_round(cfg: PSConfig, n: int, scheme: Scheme, task: Any) -> RoundKind:
    """The round kind of ``cfg.coding``: plain (None), a gradient code (Tandon et al. 2017) or
    sequential gradient coding (Krishnan et al. 2023), each built from its registry."""
    if cfg.coding is None:
        return SyncRound(n)
    check_coded_scheme(scheme, task)
    if coding_family(cfg.coding) == "gradient":
        return CodedServer(build_code(cfg.coding, n, cfg.straggler_tolerance, cfg.coding_seed))
    if getattr(task, "requires_full_quorum", False):
        raise ConfigError("sequential gradient coding cannot run a task that keeps per-round state on "
                          "both sides (DIFF2)")
    sched = build_scheduler(cfg.coding, n, cfg.straggler_burst, cfg.straggler_window, cfg.straggler_tolerance,
                            cfg.steps, seed=cfg.coding_seed)
    return SGCServer(sched, n, cfg.sgc_mu, cfg.straggler_burst, cfg.straggler_window, cfg.straggler_tolerance)
