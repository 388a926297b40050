"""Apply a fault plan to a real parameter-server run: Ray (local by default, or a cluster by
address) or the in-process backend.

    from commlib.sim import FaultPlan, WorkerFaults, simulate
    res = simulate(FaultPlan(4, {1: WorkerFaults(crash_at=10, restart_after=2.0)}),
                   task={"name": "classification"}, scheme={"compressor": "topk", "ratio": 0.05, "feedback": "ef21"},
                   config=PSConfig(steps=60, quorum=3, step_timeout=1.0), backend="ray")
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

from commlib.errors import ConfigError
from commlib.ps.config import PSConfig
from commlib.sim.plan import FaultPlan

BACKENDS = ("ray", "inproc")
HOOKS_FACTORY = "commlib.sim.hooks:FaultHooks"


def hooks_options(plan: FaultPlan, w: int, *, restarted: bool = False, delays=None,
                  straggle: str = "sleep") -> Optional[Dict[str, Any]]:
    """The JSON options of worker ``w``'s FaultHooks (None when it has no fault at all)."""
    f = plan.faults(w)
    col = [] if delays is None else [float(x) for x in delays[:, w]]
    opts: Dict[str, Any] = {
        "crash_at": None if restarted else f.crash_at,
        "hang_at": None if restarted else f.hang_at, "hang_s": f.hang_s,
        "attack": f.attack, "attack_options": dict(f.attack_options), "byzantine_ids": plan.byzantine(),
        "compute_delays": col if any(col) else [],
        "garbage_at": [] if restarted else list(f.garbage_at), "garbage_p": f.garbage_p,
        "delay_s": f.delay_s, "jitter_s": f.jitter_s, "seed": plan.seed + (7919 if restarted else 0),
    }
    if straggle != "sleep":
        opts["straggle"] = straggle
    quiet = (opts["crash_at"] is None and opts["hang_at"] is None and not f.attack and not opts["compute_delays"]
             and not opts["garbage_at"] and not f.garbage_p and not f.delay_s and not f.jitter_s)
    return None if quiet else opts


def simulate(plan: FaultPlan, task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, *,
             backend: str = "ray", address: Optional[str] = None, num_cpus: Optional[int] = None,
             worker_options: Optional[Mapping[str, Any]] = None,
             on_step: Optional[Callable[[Dict[str, Any]], None]] = None, virtual: bool = False,
             processes: Optional[int] = None, straggle: str = "sleep") -> Dict[str, Any]:
    """Run the job with the plan's faults; returns the server's result plus ``plan``, ``crashes``
    and ``worker_reports``.

    ``virtual``: many logical workers per process (``commlib.ps.worker_group``): ``processes``
    Ray actors (default: the cluster's CPUs) or threads in-process (default: this machine's
    CPUs); otherwise one actor (one thread in-process) per worker. ``straggle``: "sleep"
    (a straggler's delay passes in real time) or "skip" (simulated: the round is given up at once).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if len(plan.byzantine()) >= plan.n_workers:
        raise ConfigError("every worker is Byzantine: an attack needs at least one honest worker")
    delays = plan.delays(config.steps + 1)
    n = plan.n_workers
    opts = {w: hooks_options(plan, w, delays=delays, straggle=straggle) for w in range(n)}
    re_opts = {w: hooks_options(plan, w, restarted=True, delays=delays, straggle=straggle) for w in range(n)}
    restart_after = {w: f.restart_after for w, f in plan.workers.items()
                     if f.crash_at is not None and f.restart_after is not None}
    if virtual:
        result = _simulate_virtual(n, opts, re_opts, restart_after, task, scheme, config, backend=backend,
                                   address=address, num_cpus=num_cpus, worker_options=worker_options,
                                   on_step=on_step, processes=processes)
    elif backend == "ray":
        from commlib.ps.ray_runner import run_ray

        spec = lambda o: None if o is None else {"factory": HOOKS_FACTORY, "options": o}  # noqa: E731
        result = run_ray(dict(task), dict(scheme), config, n, address=address, num_cpus=num_cpus,
                         hooks={w: spec(o) for w, o in opts.items() if o},
                         restart_hooks={w: spec(o) for w, o in re_opts.items()},
                         restart_after=restart_after, worker_options=worker_options, on_step=on_step)
        result.pop("model_state", None)
    else:
        from commlib.ps.local import run_inproc
        from commlib.sim.hooks import FaultHooks

        make = lambda w, o: None if o is None else FaultHooks(worker=w, **o)  # noqa: E731
        result = run_inproc(dict(task), dict(scheme), config, n,
                            hooks={w: make(w, o) for w, o in opts.items() if o},
                            restart_hooks={w: make(w, o) for w, o in re_opts.items()},
                            restart_after=restart_after, on_step=on_step)
    result["plan"] = plan.to_dict()
    result["backend"] = backend
    result["config"] = config.to_dict()
    result["task"] = dict(task)
    result["scheme_config"] = dict(scheme)
    return result


def _simulate_virtual(n: int, opts: Dict[int, Any], re_opts: Dict[int, Any], restart_after: Dict[int, float],
                      task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, *, backend: str,
                      address: Optional[str], num_cpus: Optional[int], worker_options: Optional[Mapping[str, Any]],
                      on_step: Optional[Callable[[Dict[str, Any]], None]],
                      processes: Optional[int]) -> Dict[str, Any]:
    """The plan's run with virtual workers (groups of logical workers per process)."""
    if backend == "ray":
        from commlib.ps.group_ray import run_ray_groups

        spec = lambda o: None if o is None else {"factory": HOOKS_FACTORY, "options": o}  # noqa: E731
        result = run_ray_groups(dict(task), dict(scheme), config, n, processes=processes, address=address,
                                num_cpus=num_cpus, hooks={w: spec(o) for w, o in opts.items() if o},
                                restart_hooks={w: spec(o) for w, o in re_opts.items() if o},
                                restart_after=restart_after, worker_options=worker_options, on_step=on_step)
        result.pop("model_state", None)
        return result
    from commlib.ps.group_local import run_inproc_groups
    from commlib.sim.hooks import FaultHooks

    make = lambda w, o: None if o is None else FaultHooks(worker=w, **o)  # noqa: E731
    return run_inproc_groups(dict(task), dict(scheme), config, n, groups=int(processes or os.cpu_count() or 1),
                             hooks={w: make(w, o) for w, o in opts.items() if o},
                             restart_hooks={w: make(w, o) for w, o in re_opts.items() if o},
                             restart_after=restart_after, on_step=on_step)


def save_json(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
