"""Stragglers: total wall time of the same number of jobs (gradient steps) with no coding
(wait for all), ignore-stragglers (quorum n - lam, approximate gradient), GC (Tandon et al.
2017, s = lam), SR-SGC and M-SGC (Krishnan et al., ICLR 2023, arXiv 2211.13802) at matched
straggler tolerance: every scheme is set up for the same (B, W, lam)-bursty model.

Straggler delays: BurstyStragglerModel(n, B, W, lam) (a straggling worker is late by
``--delay`` x the time of one full-data gradient, U), or ``--trace FILE``: a JSON
``{"delays": [[seconds per worker] per round]}`` replayed as is (in units of U for the timing
simulation, in seconds for the PS runs; rows are reused cyclically). ``--save-trace FILE``
writes the sampled delays in that format.

Two sources of rows (column ``source``):

* ``timing-sim`` (all five schemes): a round-based timing simulation driven by the real
  schedulers of ``commlib.coding`` (GradientCode, SelectiveRepeatSGC, MultiplexedSGC). In each
  round a worker's finish time is (its load that round, from the scheduler's mini-task sizes)
  x U x (1 + jitter) + its straggler delay. The master ends the round at the earliest finish
  time at which: wait-for-all: everyone arrived; ignore: n - lam arrived; GC: the arrived set
  is decodable; SR-SGC/M-SGC: at least ``(1 + mu)`` x the round's first finish time (the
  straggler rule of the authors' simulator, ``--mu``), and then until the workers still
  missing form a straggler row the (B, W, lam) model admits after the recorded pattern (so
  the scheduler's guarantee applies).
  If the due job is then not decodable (a pattern outside the model, e.g. a replayed trace),
  the round waits for every worker of that round and the missing tasks are submitted (a
  fallback, counted). Time is virtual (nothing sleeps); the job count includes SGC's T extra
  rounds to drain the pipeline.
* ``ps-<backend>`` (all five schemes): real runs of the synchronous parameter server
  (``commlib.ps``; GC = ``PSConfig(coding="auto", straggler_tolerance=lam)``, SR-SGC / M-SGC
  = ``PSConfig(coding="sr-sgc" | "m-sgc", straggler_burst=B, straggler_window=W,
  straggler_tolerance=lam, sgc_mu=mu)``) on Ray (default) or in-process, with the same delay
  matrix injected through ``commlib.sim.hooks.FaultHooks``: a straggler sleeps its delay
  before computing, and every worker then sleeps ``--ps-unit`` x its load of that round
  (``work_s``), so a scheme pays for the data it processes as in the timing simulation. The
  model is small, so real compute is not what differs. SGC runs include the T rounds that
  drain the pipeline; the SGC server ends a round by the same rule as the timing simulation.

    .venv/bin/python benchmarks/stragglers.py --quick [--backend inproc] [--trace delays.json]

Defaults: n = 12 workers, (B, W, lam) = (1, 2, 2), delay 0.5 U, 2000 jobs, 40 PS steps, U = 2 s
in the PS runs, on Ray; ``--quick``: n = 6, 200 jobs, 10 PS steps, U = 0.5 s, in-process. Prints a
table; writes benchmarks/results/stragglers.{json,png} (quick: stragglers_quick.{json,png}).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from commlib.coding import (BurstyStragglerModel, MultiplexedSGC, SelectiveRepeatSGC, admits,
                            make_gradient_code)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ZERO = torch.zeros(1, dtype=torch.float64)


# ------------------------------------------------------------------------- delays
def sample_delays(rounds: int, n: int, B: int, W: int, lam: int, delay: float, seed: int,
                  p_start: float, p_continue: float) -> np.ndarray:
    """(rounds, n) straggler delays from the (B, W, lam)-bursty model."""
    model = BurstyStragglerModel(n, B, W, lam, seed=seed, p_start=p_start, p_continue=p_continue)
    return model.sample(rounds).astype(np.float64) * delay


def load_trace(path: str) -> np.ndarray:
    with open(path) as f:
        d = np.asarray(json.load(f)["delays"], dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0 or np.any(d < 0) or not np.all(np.isfinite(d)):
        raise SystemExit(f"{path}: 'delays' must be a non-empty (rounds, n) array of finite seconds >= 0")
    return d


def row_of(delays: np.ndarray, r: int) -> np.ndarray:
    return delays[r % delays.shape[0]]


# ------------------------------------------------------------------ timing simulation
def finish_times(loads: np.ndarray, delays: np.ndarray, U: float, jitter: np.ndarray) -> np.ndarray:
    return loads * U * (1.0 + jitter) + delays


def sim_uncoded(delays: np.ndarray, jobs: int, n: int, U: float, keep: int, rng: np.random.Generator) -> Dict[str, Any]:
    """Wait for ``keep`` workers each round (keep = n: wait-for-all; n - lam: ignore stragglers)."""
    total, exact = 0.0, 0
    for r in range(jobs):
        t = finish_times(np.full(n, 1.0 / n), row_of(delays, r), U, rng.uniform(0, 0.1, n))
        order = np.sort(t)
        total += order[keep - 1]
        exact += int(np.sum(t <= order[keep - 1]) >= n)
    return {"load": 1.0 / n, "wall": total, "on_time": jobs, "exact": exact, "fallbacks": 0}


def sim_gc(delays: np.ndarray, jobs: int, n: int, s: int, U: float, rng: np.random.Generator) -> Dict[str, Any]:
    """GC: the round ends once the arrived workers are decodable (Tandon et al. 2017)."""
    code = make_gradient_code(n, s, "auto")
    total, fallbacks = 0.0, 0
    for r in range(jobs):
        d = row_of(delays, r)
        t = finish_times(np.full(n, code.load), d, U, rng.uniform(0, 0.1, n))
        order = np.argsort(t)
        for k in range(1, n + 1):
            if code.decodable(order[:k].tolist()):
                break
        total += t[order[k - 1]]
        fallbacks += int(d[order[:k]].max() > 0)  # had to wait for a straggler (> s of them)
    return {"load": code.load, "wall": total, "on_time": jobs - fallbacks, "exact": jobs, "fallbacks": fallbacks}


def sim_sgc(sched, delays: np.ndarray, U: float, B: int, W: int, lam: int, mu: float,
            rng: np.random.Generator) -> Dict[str, Any]:
    """SR-SGC / M-SGC driven round by round by the real scheduler (see the module docstring)."""
    n = sched.n
    total, fallbacks, on_time, max_load = 0.0, 0, 0, 0.0
    for r in range(sched.num_rounds):
        plan = sched.assignment(r)
        loads = np.array([sum(float(t.size) for t in plan[w]) for w in range(n)])
        max_load = max(max_load, float(loads.max()))
        busy = [w for w in range(n) if plan[w]]
        t = finish_times(loads, row_of(delays, r), U, rng.uniform(0, 0.1, n))
        order = sorted(busy, key=lambda w: t[w])
        hist = sched.pattern
        cut = len(order)
        first = int(np.sum(t[order] <= (1.0 + mu) * t[order[0]])) if order else 0
        for k in range(max(1, first), len(order) + 1):
            row = np.zeros(n, dtype=bool)
            row[order[k:]] = True
            if admits(hist, row, B, W, lam):
                cut = k
                break
        arrived = order[:cut]
        for w in arrived:
            sched.receive(r, w, [ZERO] * len(plan[w]))
        sched.end_round(r)
        wait = t[arrived[-1]] if arrived else 0.0
        job = sched.due(r)
        if job is not None:
            if sched.decodable(job):
                on_time += 1
            else:  # outside the model: wait for this round's workers, get the missing tasks
                fallbacks += 1
                wait = float(t[busy].max())
                for task in sched.missing(job):
                    sched.submit(task, ZERO)
            sched.decode(job)
        total += wait
    return {"load": max_load, "wall": total, "on_time": on_time, "exact": on_time + fallbacks,
            "fallbacks": fallbacks}


def timing_rows(delays: np.ndarray, args: argparse.Namespace) -> List[Dict[str, Any]]:
    n, B, W, lam, J, U = args.n, args.B, args.W, args.lam, args.jobs, 1.0
    rows = []

    def add(name: str, res: Dict[str, Any], seconds: float) -> None:
        rows.append({"scheme": name, "source": "timing-sim", **res, "sim_cpu_s": seconds})

    for name, fn in [
        ("wait-for-all", lambda rng: sim_uncoded(delays, J, n, U, n, rng)),
        (f"ignore-stragglers (quorum {n - lam})", lambda rng: sim_uncoded(delays, J, n, U, n - lam, rng)),
        (f"GC (s={lam})", lambda rng: sim_gc(delays, J, n, lam, U, rng)),
        ("SR-SGC", lambda rng: sim_sgc(SelectiveRepeatSGC(n, B, W, lam, num_jobs=J), delays, U, B, W, lam, args.mu, rng)),
        ("M-SGC", lambda rng: sim_sgc(MultiplexedSGC(n, B, W, lam, num_jobs=J), delays, U, B, W, lam, args.mu, rng)),
    ]:
        t0 = time.perf_counter()
        try:
            res = fn(np.random.default_rng(args.seed + 1))
        except Exception as exc:  # e.g. SR-SGC needs B | (W-1): report the row as not applicable
            print(f"{name}: not run ({type(exc).__name__}: {exc})")
            continue
        add(name, res, time.perf_counter() - t0)
    return rows


# ------------------------------------------------------------------------- PS runs
def ps_rows(delays: np.ndarray, args: argparse.Namespace) -> List[Dict[str, Any]]:
    from commlib.ps import PSConfig
    from commlib.sim.driver import HOOKS_FACTORY
    from commlib.sim.hooks import FaultHooks

    n, lam, steps = args.n, args.lam, args.ps_steps
    T_max = args.W - 2 + args.B  # the longest SGC delay (M-SGC); SR-SGC's is B
    secs = np.stack([row_of(delays, r) for r in range(steps + T_max + 1)]) * args.ps_unit
    task = {"name": "classification", "dataset": "digits", "width": 16, "batch": 8, "seed": 0}
    scheme = {"compressor": "identity", "feedback": "none", "aggregator": "mean"}
    base = dict(steps=steps, step_timeout=60.0, max_misses=10 ** 6, worker_timeout=5.0,
                optimizer={"name": "sgd", "lr": 0.05}, shutdown_timeout=max(5.0, 2 * float(secs.max())))
    bwl = dict(straggler_tolerance=lam, straggler_burst=args.B, straggler_window=args.W, sgc_mu=args.mu)
    runs = [("wait-for-all", PSConfig(**base)),
            (f"ignore-stragglers (quorum {n - lam})", PSConfig(quorum=n - lam, **base)),
            (f"GC (s={lam})", PSConfig(coding="auto", straggler_tolerance=lam, **base)),
            ("SR-SGC", PSConfig(coding="sr-sgc", **bwl, **base)),
            ("M-SGC", PSConfig(coding="m-sgc", **bwl, **base))]
    # a straggler sleeps its delay before computing; everyone then works ps_unit x its load
    # and a stall ends when the next round's parameters arrive (the round is given up): each
    # round's straggling is its own, as in the timing simulation and the (B, W, lam) model
    opts = {w: {"compute_delays": [float(x) for x in secs[:, w]], "work_s": args.ps_unit, "preempt": True}
            for w in range(n)}
    rows = []
    for name, cfg in runs:
        t0 = time.perf_counter()
        if name == "SR-SGC" and (args.W - 1) % args.B:
            print(f"  PS run {name}: not run (SR-SGC needs B | (W-1))")
            continue
        if args.backend == "ray":
            from commlib.ps.ray_runner import run_ray

            res = run_ray(task, scheme, cfg, n, num_cpus=args.num_cpus,
                          hooks={w: {"factory": HOOKS_FACTORY, "options": o} for w, o in opts.items()})
        else:
            from commlib.ps.local import run_inproc

            res = run_inproc(task, scheme, cfg, n, hooks={w: FaultHooks(worker=w, **o) for w, o in opts.items()})
        coding = res.get("coding") or {}
        hist = res["history"]
        wall = hist[-1]["time"] if hist else float("nan")  # first PARAMS to the last update
        exact = coding.get("decoded", sum(1 for h in hist if h["workers"] == n))
        rows.append({"scheme": name, "source": f"ps-{args.backend}",
                     "load": coding.get("load", 1.0 / n), "wall": wall, "on_time": res["steps"] - coding.get("fallbacks", 0),
                     "exact": exact, "fallbacks": coding.get("fallbacks", 0), "run_s": time.perf_counter() - t0,
                     "final_test_accuracy": (res["evals"][-1].get("accuracy") if res["evals"] else None),
                     "coding": coding})
        print(f"  PS run {name}: {wall:.2f}s")
    return rows


# ------------------------------------------------------------------------- output
def with_speedups(rows: List[Dict[str, Any]]) -> None:
    for src in {r["source"] for r in rows}:
        base = next(r["wall"] for r in rows if r["source"] == src and r["scheme"] == "wait-for-all")
        for r in rows:
            if r["source"] == src:
                r["speedup_vs_wait_all"] = base / r["wall"] if r["wall"] > 0 else float("nan")


def table(rows: List[Dict[str, Any]], jobs: Dict[str, int]) -> str:
    head = f"{'scheme':<34}{'source':<12}{'load/worker':>12}{'wall':>10}{'speed-up':>10}{'on time':>10}{'exact':>8}{'fallbacks':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        unit = "U" if r["source"] == "timing-sim" else "s"
        lines.append(f"{r['scheme']:<34}{r['source']:<12}{r['load']:>12.4f}{r['wall']:>9.2f}{unit}"
                     f"{r['speedup_vs_wait_all']:>9.3f}x{r['on_time']:>6}/{jobs[r['source']]:<3}{r['exact']:>8}{r['fallbacks']:>10}")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r["source"] for r in rows})
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), squeeze=False)
    for ax, src in zip(axes[0], sources):
        rs = [r for r in rows if r["source"] == src]
        ax.bar(range(len(rs)), [r["speedup_vs_wait_all"] for r in rs], color="tab:blue")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["scheme"].split(" (")[0] for r in rs], rotation=20)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speed-up vs wait-for-all")
        ax.set_title(src)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", choices=("ray", "inproc"), default=None,
                    help="PS runs on Ray (default) or in-process threads (default with --quick)")
    ap.add_argument("--no-ps", action="store_true", help="timing simulation only")
    ap.add_argument("--n", type=int, default=None, help="workers (default 12, quick 6)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--W", type=int, default=2)
    ap.add_argument("--lam", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=None, help="jobs in the timing simulation (default 2000, quick 200)")
    ap.add_argument("--ps-steps", type=int, default=None, help="steps of each PS run (default 40, quick 10)")
    ap.add_argument("--delay", type=float, default=0.5, help="straggler delay in units of U (one full gradient)")
    ap.add_argument("--ps-unit", type=float, default=None,
                    help="seconds per unit U (one full gradient) in the PS runs (default 2.0, quick 0.5): large "
                         "enough that the real compute and messaging jitter of 13 processes on 2 cores is small "
                         "against the simulated work, as the (1 + mu) straggler rule assumes")
    ap.add_argument("--mu", type=float, default=0.2,
                    help="SGC master waits at least (1+mu) x the first finish time of a round")
    ap.add_argument("--p-start", type=float, default=0.3)
    ap.add_argument("--p-continue", type=float, default=0.7)
    ap.add_argument("--trace", help="JSON {'delays': [[...]]} to replay instead of the bursty model")
    ap.add_argument("--save-trace", help="write the sampled delays as a trace JSON")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.n = args.n or (6 if args.quick else 12)
    args.jobs = args.jobs or (200 if args.quick else 2000)
    args.ps_steps = args.ps_steps or (10 if args.quick else 40)
    args.ps_unit = args.ps_unit or (0.5 if args.quick else 2.0)
    args.backend = args.backend or ("inproc" if args.quick else "ray")
    if args.trace:
        delays = load_trace(args.trace)
        args.n = delays.shape[1]
        source = f"trace {args.trace}"
    else:
        delays = sample_delays(max(args.jobs + 16, args.ps_steps + 1), args.n, args.B, args.W, args.lam,
                               args.delay, args.seed, args.p_start, args.p_continue)
        source = (f"bursty (B={args.B}, W={args.W}, lam={args.lam}, p_start={args.p_start}, "
                  f"p_continue={args.p_continue}), delay {args.delay} U")
    if args.save_trace:
        with open(args.save_trace, "w") as f:
            json.dump({"delays": delays.tolist()}, f)
    print(f"n={args.n}, stragglers: {source}; {args.jobs} jobs (timing-sim), {args.ps_steps} steps (PS)")
    rows = timing_rows(delays, args)
    jobs = {"timing-sim": args.jobs}
    if not args.no_ps:
        rows += ps_rows(delays, args)
        jobs[f"ps-{args.backend}"] = args.ps_steps
    with_speedups(rows)
    print(table(rows, jobs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"n": args.n, "B": args.B, "W": args.W, "lam": args.lam, "stragglers": source, "jobs": jobs,
           "delay_U": args.delay, "ps_unit_s": args.ps_unit, "seed": args.seed, "rows": rows,
           "straggler_fraction": float(np.mean(delays > 0))}
    stem = "stragglers_quick" if args.quick else "stragglers"  # a quick run keeps the full results
    with open(RESULTS / f"{stem}.json", "w") as f:
        json.dump(out, f, indent=1, default=float)
    plot(rows, RESULTS / f"{stem}.png")
    return out


if __name__ == "__main__":
    main()
