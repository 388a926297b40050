"""Asynchronous parameter server: Adaptive Braking vs SGD with momentum under real staleness.

Every run of a table spends the same number G of gradient evaluations (batch 32 each) on the same
task, a 64-64-64-10 MLP on scikit-learn's bundled digits (no download). Synchronous training with
n workers takes G / n steps on the mean of n gradients; asynchronous training takes G steps, each
on one gradient about n - 1 versions old.

1. **Equal tuning budget** (``benchmarks/async_ps_replica.py``, a one-process event-driven replica
   of the async server, fast enough for grids): synchronous SGD momentum, async SGD momentum and
   async Adaptive Braking (rho = 1) each get the same grid: lr in GRID_LRS (synchronous units: an
   async push applies lr / n) x momentum in GRID_MS (per push) x lr schedule in SCHEDULES
   ("constant", or "cosine": linear warm-up over 5% of the steps then cosine decay to 0,
   ``commlib.optim.schedule``). Reported per method: the best cell, the best cell per schedule, the
   cells within 2 points of the best, the grid mean.
2. **Budget** (replica, n = 16): G in BUDGETS; every method at its part-1 best momentum, the lr
   and schedule re-tuned at every budget over {best / 2, best, 2 best} x SCHEDULES (the same six
   cells for every method).
3. **No async tuning** (replica): the synchronous setting (lr, momentum 0.9) handed unchanged to the
   async server's default conversion (``commlib.ps.config``: momentum capped at 0.75, lr / n per
   push at the same distance per gradient, cosine schedule), for AB and for momentum SGD; and the
   previous default (constant lr) for AB.
4. **Real server** (``commlib.ps`` on the in-process transport: the server and one thread per
   worker, each worker sleeping ``scale * (1 + Exp(1))`` seconds before every gradient, the fault
   plan's "exp" straggler model; staleness is measured): each method at its part-1 best cell, the
   async defaults handed the synchronous best setting, and the previous default (AB, constant lr
   0.05) as "before".

5. **rho and the cosine's scope** (``--rho-sweep``, replica, 3 seeds): part 1's 48-cell grid for
   AB at every rho in RHO_SWEEP (per-tensor cosine) and at WHOLE_MODEL_RHOS with the whole-model
   cosine, and for sync and async SGD momentum. Each method's row is an equal-size grid; "AB, rho
   tuned" (the best over every rho) searched len(RHO_SWEEP) times as many cells.
6. **rho on the real server** (``--rho-real``, 5 or ``--seeds`` seeds): every method's part-5 best
   cell, the async default handed the synchronous best setting and any ``--extra`` cells; the gap
   to synchronous SGD momentum is paired by seed.

Thread timing is not deterministic, so every configuration runs with several seeds and the tables
show the mean. Wall times are not reported (the machine is shared).

    .venv/bin/python benchmarks/async_braking_ps.py [--quick]
    .venv/bin/python benchmarks/async_braking_ps.py --real-budget   # then: part 2 on the real server
    .venv/bin/python benchmarks/async_braking_ps.py --ray           # then: 16-worker rows on local Ray
    .venv/bin/python benchmarks/async_braking_ps.py --braking-factor  # then: AB's factor per quarter
    .venv/bin/python benchmarks/async_braking_ps.py --rho-sweep --workers 16 4   # part 5
    .venv/bin/python benchmarks/async_braking_ps.py --rho-real --workers 16 4 --seeds 10  # part 6

prints the tables, writes benchmarks/results/async_braking_ps.json (``--quick``:
async_braking_ps_quick.json) and a plot (.png): test accuracy vs mean staleness on the real
server, accuracy vs budget (replica, 16 workers), and the replica grid at 16 workers. Parts 5
and 6 write benchmarks/results/async_braking_ps_rho.json and .png (accuracy vs rho).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_ps_replica import JITTER, replica_run  # noqa: E402

from commlib.ps import PSConfig  # noqa: E402
from commlib.sim import FaultPlan, StragglerSpec, simulate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASK = {"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0}
SCHEME = {"compressor": "identity"}
LR = 0.05  # the previous default's reference lr (best of 0.01-0.2 for one worker, momentum 0.9)
GRID_LRS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
GRID_MS = [0.5, 0.75, 0.9]
SCHEDULES = ["constant", "cosine"]
BUDGETS = [1600, 3200, 6400]
TRANSFER_LRS = [0.05, 0.1, 0.2, 0.4, 0.8]
#: grid methods: (mode, rho); rho None = torch SGD (sync)
METHODS: Dict[str, Tuple[str, Any]] = {"sync sgdm": ("sync", None), "async sgdm": ("async", 0.0),
                                       "async ab": ("async", 1.0)}
#: ``--rho-sweep``: AB's braking strength and the cosine's scope as extra grid axes
RHO_SWEEP = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
#: ``--rho-sweep``: the rhos also run with the cosine over the whole model
WHOLE_MODEL_RHOS = [1.0, 1.5]


#: ``--rho-sweep``'s "... wide" methods: momentum SGD on a grid as large as AB's over every rho
#: (12 lr x 12 momentum x 2 schedules = 288 cells = 6 rhos x 48)
WIDE_LRS = [round(0.05 * 2 ** (k / 2), 4) for k in range(12)]
WIDE_MS = [0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97]


def sweep_grid(method: str) -> Tuple[List[float], List[float]]:
    """(lrs, momenta) of a ``--rho-sweep`` method's grid (x SCHEDULES)."""
    return (WIDE_LRS, WIDE_MS) if method.endswith(" wide") else (GRID_LRS, GRID_MS)


def sweep_methods() -> Dict[str, Tuple[str, Any, bool]]:
    """``--rho-sweep``'s methods: name -> (mode, rho, per_tensor); the part-1 methods and AB at
    every rho in RHO_SWEEP (per-tensor cosine) and at WHOLE_MODEL_RHOS with the whole-model cosine."""
    out = {name: (mode, rho, True) for name, (mode, rho) in METHODS.items() if name != "async ab"}
    out.update({f"async ab rho {rho}": ("async", rho, True) for rho in RHO_SWEEP})
    out.update({f"async ab rho {rho} whole-model": ("async", rho, False) for rho in WHOLE_MODEL_RHOS})
    out.update({"sync sgdm wide": ("sync", None, True), "async sgdm wide": ("async", 0.0, True)})
    return out


def grid_spec(method: str, lr: float, m: float, n: int, schedule: str = "constant") -> Dict[str, Any]:
    """A grid cell's optimizer spec; async cells pin the per-push values (lr / n, m)."""
    mode, rho, per_tensor = sweep_methods()[method] if method not in METHODS else (*METHODS[method], True)
    if mode == "sync":
        return {"name": "sgd", "lr": lr, "momentum": m, "schedule": schedule}
    spec = {"name": "ab-sgd", "lr": lr / n, "momentum": m, "rho": rho, "lr_scaling": "none", "schedule": schedule}
    if not per_tensor:
        spec["per_tensor"] = False
    return spec


def ps_run(workers: int, mode: str, optimizer: Dict[str, Any], steps: int, seed: int,
           scale: float = 0.004, backend: str = "inproc") -> Dict[str, Any]:
    """One real parameter-server run on the in-process transport (or on local Ray: one process
    per worker)."""
    plan = FaultPlan(workers, stragglers=StragglerSpec("exp", shift=1.0, rate=1.0, scale=scale), seed=seed)
    slow = backend == "ray"  # actors start slowly on a loaded machine
    cfg = PSConfig(mode=mode, steps=steps, step_timeout=60.0 if slow else 30.0, worker_timeout=10.0 if slow else 5.0,
                   optimizer=optimizer, startup_timeout=600.0 if slow else 120.0)
    res = simulate(plan, dict(TASK, seed=seed), SCHEME, cfg, backend=backend)
    stal = [h["staleness"] for h in res["history"]]
    final = res["evals"][-1]
    return {"status": res["status"], "steps": res["steps"],
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "mean_staleness": statistics.fmean(stal), "std_staleness": statistics.pstdev(stal),
            "max_staleness": max(stal), "staleness_histogram": [stal.count(k) for k in range(max(stal) + 1)]}


def mean_row(rs: List[Dict[str, Any]], **key: Any) -> Dict[str, Any]:
    accs = [r["test_accuracy"] for r in rs]
    row = dict(key, test_accuracy=statistics.fmean(accs), accuracy_min=min(accs), accuracy_max=max(accs),
               mean_staleness=statistics.fmean(r["mean_staleness"] for r in rs),
               max_staleness=max(r["max_staleness"] for r in rs))
    if all("std_staleness" in r for r in rs):
        row["std_staleness"] = statistics.fmean(r["std_staleness"] for r in rs)
    return row


def method_mode(method: str) -> str:
    return METHODS[method][0] if method in METHODS else sweep_methods()[method][0]


def replica_mean(n: int, method: str, lr: float, m: float, schedule: str, evals: int, seeds: List[int]) -> float:
    mode = method_mode(method)
    spec = grid_spec(method, lr, m, n, schedule)
    return statistics.fmean(replica_run(TASK, n, spec, evals, s, mode)["test_accuracy"] for s in seeds)


def tuning_grid(workers: List[int], evals: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Part 1: every method on the same lr x momentum x schedule grid (replica)."""
    cells = []
    for n, method, sched, lr, m in itertools.product(workers, METHODS, SCHEDULES, GRID_LRS, GRID_MS):
        acc = replica_mean(n, method, lr, m, sched, evals, seeds)
        cells.append({"workers": n, "method": method, "schedule": sched, "lr": lr, "momentum": m, "test_accuracy": acc})
        print(f"  replica n={n:<3d} {method:<11s} {sched:<8s} lr {lr:<5} m {m:<4}: acc {acc:.3f}", flush=True)
    return cells


def summarize_grid(cells: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Best cell per (n, method), overall and per schedule, and how wide the good region is."""
    out = []
    for n, method in dict.fromkeys((c["workers"], c["method"]) for c in cells):
        mine = [c for c in cells if c["workers"] == n and c["method"] == method]
        best = max(mine, key=lambda c: c["test_accuracy"])
        row = {"workers": n, "method": method, "best_lr": best["lr"], "best_momentum": best["momentum"],
               "best_schedule": best["schedule"], "best_accuracy": best["test_accuracy"],
               "cells_within_2pts": sum(c["test_accuracy"] >= best["test_accuracy"] - 0.02 for c in mine),
               "cells": len(mine), "grid_mean_accuracy": statistics.fmean(c["test_accuracy"] for c in mine)}
        for sched in SCHEDULES:
            b = max((c for c in mine if c["schedule"] == sched), key=lambda c: c["test_accuracy"])
            row[f"best_{sched}"] = {"lr": b["lr"], "momentum": b["momentum"], "test_accuracy": b["test_accuracy"]}
        out.append(row)
    return out


def budget_sweep(best: Dict[Tuple[int, str], Dict[str, Any]], n: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Part 2: accuracy vs gradient evaluations, each method's lr re-tuned over {lr/2, lr, 2 lr}."""
    out = []
    for evals, method in itertools.product(BUDGETS, METHODS):
        b = best[(n, method)]
        tried = {(lr, sched): replica_mean(n, method, lr, b["best_momentum"], sched, evals, seeds)
                 for lr in (b["best_lr"] / 2, b["best_lr"], 2 * b["best_lr"]) for sched in SCHEDULES}
        lr, sched = max(tried, key=lambda k: tried[k])
        out.append({"workers": n, "evals": evals, "method": method, "momentum": b["best_momentum"],
                    "schedule": sched, "lr": lr, "test_accuracy": tried[(lr, sched)],
                    "tried": [{"lr": k[0], "schedule": k[1], "test_accuracy": v} for k, v in tried.items()]})
        print(f"  budget n={n} G={evals:<6d} {method:<11s}: {tried[(lr, sched)]:.3f} at lr {lr}, {sched}", flush=True)
    return out


def transfer(workers: List[int], evals: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Part 3, no async tuning: the synchronous setting (lr, momentum 0.9) handed to the async
    server's default conversion, for AB and momentum SGD, and to AB with the old constant lr."""
    out = []
    for n, lr in itertools.product(workers, TRANSFER_LRS):
        row: Dict[str, Any] = {"workers": n, "sync_lr": lr}
        for name, mode, spec in (("sync sgdm", "sync", {"name": "sgd", "lr": lr, "momentum": 0.9}),
                                 ("async sgdm", "async", {"lr": lr, "rho": 0.0}),
                                 ("async ab", "async", {"lr": lr}),
                                 ("async ab constant", "async", {"lr": lr, "schedule": "constant"})):
            row[name] = statistics.fmean(replica_run(TASK, n, spec, evals, s, mode)["test_accuracy"] for s in seeds)
        out.append(row)
        print(f"  transfer n={n:<3d} sync lr {lr:<5}: " + "  ".join(
            f"{k} {row[k]:.3f}" for k in ("sync sgdm", "async sgdm", "async ab", "async ab constant")), flush=True)
    return out


def real_configs(best: Dict[Tuple[int, str], Dict[str, Any]], n: int) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Part 4's rows for n workers: name -> (mode, optimizer spec)."""
    before = {"lr": LR, "schedule": "constant"}  # the async default before this benchmark's schedule
    if n == 1:
        return {"sync sgdm lr 0.05": ("sync", {"name": "sgd", "lr": LR, "momentum": 0.9}),
                "async ab, before": ("async", before)}
    rows: Dict[str, Tuple[str, Dict[str, Any]]] = {}
    for method in METHODS:
        b = best[(n, method)]
        rows[f"{method} best"] = (METHODS[method][0], grid_spec(method, b["best_lr"], b["best_momentum"], n,
                                                                b["best_schedule"]))
    s = best[(n, "sync sgdm")]  # the async defaults handed the synchronous best setting
    rows["async ab default, sync best"] = ("async", {"lr": s["best_lr"], "momentum": s["best_momentum"]})
    rows["async sgdm default, sync best"] = ("async", {"lr": s["best_lr"], "momentum": s["best_momentum"],
                                                       "rho": 0.0})
    rows["async ab, before"] = ("async", before)
    return rows


def plot(rows: List[Dict[str, Any]], budget: List[Dict[str, Any]], cells: List[Dict[str, Any]], path: Path,
         real_budget: Optional[List[Dict[str, Any]]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cx, bx) = plt.subplots(1, 3, figsize=(18, 4.8))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        pts = sorted((r["mean_staleness"] if r["mode"] == "async" else r["workers"] - 1, r["test_accuracy"])
                     for r in rows if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k:" if name.startswith("sync") else "-",
                marker="s" if name.startswith("sync") else "o", label=name)
    ax.set_xlabel("mean staleness of applied pushes (async) / n - 1 (sync)")
    ax.set_ylabel("test accuracy")
    ax.set_title("real async parameter server, equal gradient evaluations")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for method in METHODS:
        pts = sorted((r["evals"], r["test_accuracy"]) for r in budget if r["method"] == method)
        line = cx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} (replica)")
        real = sorted((r["evals"], r["test_accuracy"]) for r in real_budget or [] if r["method"] == method)
        if real:
            cx.plot([p[0] for p in real], [p[1] for p in real], marker="s", linestyle="--",
                    color=line[0].get_color(), label=f"{method} (real server)")
    cx.set_xscale("log", base=2)
    cx.set_xlabel("gradient evaluations")
    cx.set_ylabel("test accuracy")
    cx.set_title(f"{budget[0]['workers'] if budget else '-'} workers, lr re-tuned per budget")
    cx.grid(alpha=0.3)
    cx.legend(fontsize=7)
    n = max(c["workers"] for c in cells)
    for method, sched in itertools.product(METHODS, SCHEDULES):
        mine = [c for c in cells if c["workers"] == n and c["method"] == method and c["schedule"] == sched]
        pts = [(lr, max(c["test_accuracy"] for c in mine if c["lr"] == lr)) for lr in GRID_LRS]
        bx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle={"constant": "--", "cosine": "-"}[sched], label=f"{method}, {sched}")
    bx.set_xscale("log")
    bx.set_xlabel("lr (synchronous units; an async push applies lr / n)")
    bx.set_ylabel("test accuracy (best momentum)")
    bx.set_title(f"replica tuning grid, {n} workers")
    bx.set_ylim(0, 1)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(summary, budget, moved, rows, evals, grid_seeds, seeds) -> None:
    print(f"\npart 1: replica, lr {GRID_LRS} x momentum {GRID_MS} x schedule {SCHEDULES}, {evals} gradient "
          f"evaluations, {len(grid_seeds)} seed(s)")
    print(f"{'workers':>7}  {'method':<12}{'best (lr, m, schedule)':>26}{'best acc':>9}{'<=2pts':>8}"
          f"{'best const':>11}{'best cos':>9}{'grid mean':>10}")
    for r in summary:
        cell = f"{r['best_lr']}, {r['best_momentum']}, {r['best_schedule']}"
        print(f"{r['workers']:>7}  {r['method']:<12}{cell:>26}{r['best_accuracy']:>9.3f}"
              f"{r['cells_within_2pts']:>5d}/{r['cells']:<2d}{r['best_constant']['test_accuracy']:>11.3f}"
              f"{r['best_cosine']['test_accuracy']:>9.3f}{r['grid_mean_accuracy']:>10.3f}")
    print(f"\npart 2: replica, accuracy vs gradient evaluations (lr x1/2, x1, x2 and schedule re-tuned), "
          f"{len(grid_seeds)} seed(s)")
    print(f"{'G':>7}" + "".join(f"{m:>14}" for m in METHODS))
    for g in BUDGETS:
        print(f"{g:>7}" + "".join(f"{r['test_accuracy']:>14.3f}" for m in METHODS for r in budget
                                  if r["evals"] == g and r["method"] == m))
    print(f"\npart 3: replica, the synchronous lr (momentum 0.9) through the async default conversion, "
          f"{evals} gradient evaluations, {len(grid_seeds)} seed(s)")
    print(f"{'workers':>7}  {'sync lr':>8}{'sync sgdm':>11}{'async sgdm':>12}{'async ab':>10}{'ab constant':>13}")
    for r in moved:
        print(f"{r['workers']:>7}  {r['sync_lr']:>8}{r['sync sgdm']:>11.3f}{r['async sgdm']:>12.3f}"
              f"{r['async ab']:>10.3f}{r['async ab constant']:>13.3f}")
    print(f"\npart 4: real parameter server, {evals} gradient evaluations per row, {len(seeds)} seed(s)")
    print(f"{'workers':>7}  {'optimizer':<32}{'test acc':>9}{'min':>7}{'max':>7}{'vs sync best':>13}"
          f"{'staleness':>10}{'std':>6}{'max':>5}")
    for r in rows:
        d = r.get("acc_vs_sync_best")
        print(f"{r['workers']:>7}  {r['optimizer']:<32}{r['test_accuracy']:>9.3f}{r['accuracy_min']:>7.3f}"
              f"{r['accuracy_max']:>7.3f}{'' if d is None else f'{d:+.3f}':>13}"
              f"{r['mean_staleness']:>10.1f}{r.get('std_staleness', 0.0):>6.1f}{r['max_staleness']:>5d}")


def ray_part(evals: int) -> int:
    """``--ray``: the 16-worker rows of part 4 that the JSON's grid chose, on local Ray (one
    process per worker: the staleness spread of separate processes), one seed; added to the JSON."""
    import ray

    out = RESULTS / "async_braking_ps.json"
    data = json.loads(out.read_text())
    best = {(r["workers"], r["method"]): r for r in data["grid_summary"]}
    configs = real_configs(best, 16)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for name in ("async ab best", "async sgdm best", "async ab, before"):
        mode, opt = configs[name]
        r = ps_run(16, mode, opt, evals, 0, backend="ray")
        r.update(workers=16, optimizer=name, mode=mode, spec=opt, seed=0, backend="ray")
        rows.append(r)
        print(f"  ray n=16 {name:<28s}: acc {r['test_accuracy']:.3f}  staleness {r['mean_staleness']:.1f} "
              f"(std {r['std_staleness']:.1f}, max {r['max_staleness']})", flush=True)
    data = json.loads(out.read_text())  # read again: another part may have added to it meanwhile
    data["ray"] = rows
    out.write_text(json.dumps(data, indent=1))
    return 0


def real_budget_part(seeds: List[int]) -> int:
    """``--real-budget``: part 2's settings (16 workers, each method at its best lr and schedule per
    budget) on the real server (in-process transport), added to the JSON as ``real_budget``."""
    out = RESULTS / "async_braking_ps.json"
    data = json.loads(out.read_text())
    rows = []
    for b in data["budget"]:
        n, method, evals = b["workers"], b["method"], b["evals"]
        mode = METHODS[method][0]
        spec = grid_spec(method, b["lr"], b["momentum"], n, b["schedule"])
        rs = []
        for seed in seeds:
            r = ps_run(n, mode, spec, evals // n if mode == "sync" else evals, seed)
            r.update(seed=seed)
            rs.append(r)
        rows.append(mean_row(rs, workers=n, evals=evals, method=method, spec=spec, runs=rs))
        print(f"  real n={n} G={evals:<6d} {method:<11s}: acc {rows[-1]['test_accuracy']:.3f} "
              f"[{rows[-1]['accuracy_min']:.3f}, {rows[-1]['accuracy_max']:.3f}]", flush=True)
    data = json.loads(out.read_text())  # read again: another part may have added to it meanwhile
    data["real_budget"] = rows
    out.write_text(json.dumps(data, indent=1))
    plot(data["table"], data["budget"], data["grid_cells"], RESULTS / "async_braking_ps.png", rows)
    return 0


def braking_part() -> int:
    """``--braking-factor``: AB's mean braking factor 1 - rho cos per quarter of a run (replica,
    seed 0) for 1, 4 and 16 workers at two settings, added to the JSON as ``braking_factor``."""
    rows = []
    for n, (lr, m, sched) in itertools.product([1, 4, 16], [(0.8, 0.75, "cosine"), (0.2, 0.9, "constant")]):
        r = replica_run(TASK, n, grid_spec("async ab", lr, m, n, sched), 1600, 0, "async")
        rows.append({"workers": n, "lr": lr, "momentum": m, "schedule": sched, "test_accuracy": r["test_accuracy"],
                     "braking_factor_by_quarter": r["braking_factor_by_quarter"]})
        print(f"  n={n:<3d} lr {lr} m {m} {sched:<8s}: acc {r['test_accuracy']:.3f}  mean factor by quarter "
              + " ".join(f"{f:.2f}" for f in r["braking_factor_by_quarter"]), flush=True)
    out = RESULTS / "async_braking_ps.json"
    data = json.loads(out.read_text())
    data["braking_factor"] = rows
    out.write_text(json.dumps(data, indent=1))
    return 0


def write_json(out: Path, data: Dict[str, Any]) -> None:
    """Write atomically (another part may read the file meanwhile: it never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def _sweep_run(job: Tuple[int, str, str, float, float, int, int]) -> float:
    """One replica run of ``--rho-sweep`` (a pool task): (n, method, schedule, lr, m, evals, seed)."""
    n, method, sched, lr, m, evals, seed = job
    torch.set_num_threads(1)
    return replica_run(TASK, n, grid_spec(method, lr, m, n, sched), evals, seed, method_mode(method))["test_accuracy"]


def rho_sweep_part(workers: List[int], evals: int, seeds: List[int], methods: List[str], jobs: int) -> int:
    """``--rho-sweep``: the part-1 grid (lr x momentum x schedule, 48 cells) for every method of
    :func:`sweep_methods` (AB at every rho in RHO_SWEEP and with the whole-model cosine; momentum
    SGD sync and async, also on the "wide" grid as large as AB's over every rho), replica, written
    to results/async_braking_ps_rho.json as ``replica``. Each method's 48 cells are an equal-size
    grid; "AB, rho tuned" (the best over all rhos) searched len(RHO_SWEEP) times as many cells,
    as many as the "wide" rows."""
    import multiprocessing

    out = RESULTS / "async_braking_ps_rho.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    done = {(c["workers"], c["method"], c["schedule"], c["lr"], c["momentum"]): c
            for c in data.get("replica", {}).get("cells", []) if c["seeds"] == seeds and c["evals"] == evals}
    keys = [(n, method, sched, lr, m) for n, method in itertools.product(workers, methods)
            for sched, lr, m in itertools.product(SCHEDULES, *sweep_grid(method))
            if (n, method, sched, lr, m) not in done]
    tasks = [(n, method, sched, lr, m, evals, seed) for (n, method, sched, lr, m) in keys for seed in seeds]
    cells = list(done.values())

    def save() -> None:
        per = {m: len(SCHEDULES) * len(sweep_grid(m)[0]) * len(sweep_grid(m)[1]) for m in {c["method"] for c in cells}}
        summary = summarize_grid([c for c in cells if sum(d["workers"] == c["workers"] and d["method"] == c["method"]
                                                          for d in cells) == per[c["method"]]])
        for n in workers:  # AB with rho tuned: the best per-tensor AB cell over every rho
            ab = [c for c in cells if c["workers"] == n and c["method"].startswith("async ab rho")
                  and "whole" not in c["method"]]
            if ab:
                b = max(ab, key=lambda c: c["test_accuracy"])
                summary.append({"workers": n, "method": "async ab, rho tuned", "best": b, "cells": len(ab)})
        if out.exists():  # read again: --rho-real may have added to it meanwhile
            data.update({k: v for k, v in json.loads(out.read_text()).items() if k != "replica"})
        data["replica"] = {"evals": evals, "seeds": seeds, "rho": RHO_SWEEP, "jitter": JITTER,
                           "grid": {"lr": GRID_LRS, "momentum": GRID_MS, "schedule": SCHEDULES},
                           "summary": summary, "cells": cells}
        write_json(out, data)

    accs: Dict[Tuple[int, str, str, float, float], List[float]] = {}
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for job, acc in zip(tasks, pool.imap(_sweep_run, tasks)):
            key = job[:5]
            accs.setdefault(key, []).append(acc)
            if len(accs[key]) == len(seeds):
                n, method, sched, lr, m = key
                cells.append({"workers": n, "method": method, "schedule": sched, "lr": lr, "momentum": m,
                              "evals": evals, "seeds": seeds, "test_accuracy": statistics.fmean(accs[key]),
                              "accuracy_by_seed": accs[key]})
                print(f"  replica n={n:<3d} {method:<28s} {sched:<8s} lr {lr:<5} m {m:<4}: "
                      f"acc {cells[-1]['test_accuracy']:.3f}", flush=True)
                save()
    save()
    print(f"\n--rho-sweep: replica, {evals} gradient evaluations, seeds {seeds}, 48 cells per method")
    for r in data["replica"]["summary"]:
        if "best" in r:
            b = r["best"]
            print(f"{r['workers']:>7}  {r['method']:<30s} {b['method']}, {b['lr']}, {b['momentum']}, "
                  f"{b['schedule']}: {b['test_accuracy']:.3f} ({r['cells']} cells)")
        else:
            print(f"{r['workers']:>7}  {r['method']:<30s} {r['best_lr']}, {r['best_momentum']}, "
                  f"{r['best_schedule']}: {r['best_accuracy']:.3f}  <=2pts {r['cells_within_2pts']}/{r['cells']}"
                  f"  const {r['best_constant']['test_accuracy']:.3f} cos {r['best_cosine']['test_accuracy']:.3f}")
    return 0


def rho_real_part(workers: List[int], seeds: List[int], methods: Optional[List[str]], extra: List[str]) -> int:
    """``--rho-real``: every method's best ``--rho-sweep`` cell (or ``methods``'; sync SGDM's
    always) on the real server (in-process transport), the async defaults handed the synchronous
    best setting, and the ``extra`` cells ("method,lr,momentum,schedule": e.g. a best cell's
    neighbours), at each of ``workers``; added to results/async_braking_ps_rho.json as ``real``
    (rows replaced by name)."""
    out = RESULTS / "async_braking_ps_rho.json"
    data = json.loads(out.read_text())
    evals = data["replica"]["evals"]
    best = {(r["workers"], r["method"]): r for r in data["replica"]["summary"] if "best_lr" in r}
    rows = []
    for n in workers:
        configs: Dict[str, Tuple[str, Dict[str, Any]]] = {}
        for (k, method), b in best.items():
            if k == n and (methods is None or method in methods or method == "sync sgdm"):
                configs[f"{method} best"] = (method_mode(method), grid_spec(method, b["best_lr"], b["best_momentum"],
                                                                            n, b["best_schedule"]))
        s = best[(n, "sync sgdm")]
        configs["async ab default, sync best"] = ("async", {"lr": s["best_lr"], "momentum": s["best_momentum"]})
        for cell in extra:
            method, lr, m, sched = cell.split(",")
            configs[f"{method} {lr}, {m}, {sched}"] = (method_mode(method), grid_spec(method, float(lr), float(m), n,
                                                                                       sched))
        for name, (mode, opt) in configs.items():
            old = next((r["runs"] for r in data.get("real", []) if r["workers"] == n and r["optimizer"] == name
                        and r["spec"] == opt), [])  # seeds already run with this spec are kept
            rs = []
            for seed in seeds:
                r = next((o for o in old if o["seed"] == seed), None)
                if r is None:
                    r = ps_run(n, mode, opt, evals // n if mode == "sync" else evals, seed)
                    r.update(seed=seed)
                rs.append(r)
            rows.append(mean_row(rs, workers=n, optimizer=name, mode=mode, spec=opt, evals=evals,
                                 all_done=all(r["status"] == "done" for r in rs), runs=rs))
            print(f"  real n={n:<3d} {name:<36s}: acc {rows[-1]['test_accuracy']:.3f} [{rows[-1]['accuracy_min']:.3f}, "
                  f"{rows[-1]['accuracy_max']:.3f}]  staleness {rows[-1]['mean_staleness']:.1f}", flush=True)
    data = json.loads(out.read_text())  # read again: another part may have added to it meanwhile
    new = {(r["workers"], r["optimizer"]) for r in rows}
    data["real"] = [r for r in data.get("real", []) if (r["workers"], r["optimizer"]) not in new] + rows
    for r in data["real"]:  # paired: the mean over the row's seeds of (accuracy - sync best's on that seed)
        sync = {s["seed"]: s["test_accuracy"] for row in data["real"] if row["workers"] == r["workers"]
                and row["optimizer"] == "sync sgdm best" for s in row["runs"]}
        if all(s["seed"] in sync for s in r["runs"]):
            r["acc_vs_sync_best"] = statistics.fmean(s["test_accuracy"] - sync[s["seed"]] for s in r["runs"])
    write_json(out, data)
    plot_rho(data, RESULTS / "async_braking_ps_rho.png")
    print(f"\n--rho-real: real parameter server, {evals} gradient evaluations; vs sync: paired by seed")
    for r in sorted(data["real"], key=lambda r: (r["workers"], -r["test_accuracy"])):
        d = r.get("acc_vs_sync_best")
        print(f"{r['workers']:>7}  {r['optimizer']:<36s}{len(r['runs']):>3d} seeds {r['test_accuracy']:>7.3f}  "
              f"[{r['accuracy_min']:.3f}, {r['accuracy_max']:.3f}]  vs sync {'' if d is None else f'{d:+.3f}':>7}"
              f"  staleness {r['mean_staleness']:.1f}")
    return 0


def plot_rho(data: Dict[str, Any], path: Path) -> None:
    """``--rho-real``'s plot: accuracy vs rho, per-tensor and whole-model cosine, replica (best cell
    of each rho's 48-cell grid) and real server (that cell), with sync and async SGDM as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {(r["workers"], r["method"]): r for r in data["replica"]["summary"] if "best_lr" in r}
    real = {(r["workers"], r["optimizer"]): r for r in data.get("real", [])}
    workers = sorted({n for n, _ in summary})
    fig, axes = plt.subplots(1, len(workers), figsize=(6.5 * len(workers), 4.5), squeeze=False)
    for ax, n in zip(axes[0], workers):
        for scope, suffix, marker in (("per-tensor", "", "o"), ("whole-model", " whole-model", "^")):
            rhos = [rho for rho in RHO_SWEEP if (n, f"async ab rho {rho}{suffix}") in summary]
            if not rhos:
                continue
            line = ax.plot(rhos, [summary[(n, f"async ab rho {rho}{suffix}")]["best_accuracy"] for rho in rhos],
                           marker=marker, label=f"AB {scope}, replica (3 seeds)")
            pts = [(rho, real[(n, f"async ab rho {rho}{suffix} best")]) for rho in rhos
                   if (n, f"async ab rho {rho}{suffix} best") in real]
            if pts:
                ax.plot([p[0] for p in pts], [p[1]["test_accuracy"] for p in pts], marker=marker, linestyle="--",
                        color=line[0].get_color(), label=f"AB {scope}, real server (that cell)")
        for method, style in (("sync sgdm", "k"), ("async sgdm", "r")):
            if (n, method) in summary:
                ax.axhline(summary[(n, method)]["best_accuracy"], color=style, linestyle=":",
                           label=f"{method} best, replica")
            if (n, f"{method} best") in real:
                ax.axhline(real[(n, f"{method} best")]["test_accuracy"], color=style, linestyle="--",
                           label=f"{method} best, real server")
        ax.set_xlabel("rho")
        ax.set_ylabel("test accuracy (best cell of lr x momentum x schedule)")
        ax.set_title(f"{n} workers, G = {data['replica']['evals']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluations, one seed")
    ap.add_argument("--ray", action="store_true",
                    help="after a full run: part 4's 16-worker best rows on local Ray, added to the JSON")
    ap.add_argument("--real-budget", action="store_true",
                    help="after a full run: part 2's settings on the real server (3 seeds), added to the JSON")
    ap.add_argument("--braking-factor", action="store_true",
                    help="after a full run: AB's mean braking factor per quarter of a run, added to the JSON")
    ap.add_argument("--rho-sweep", action="store_true",
                    help="AB's rho and cosine scope as grid axes (replica, 3 seeds), to async_braking_ps_rho.json")
    ap.add_argument("--rho-real", action="store_true",
                    help="after --rho-sweep: each method's best cell on the real server (5 seeds), added to its JSON")
    ap.add_argument("--workers", type=int, nargs="+", default=[16], help="--rho-sweep/--rho-real: worker counts")
    ap.add_argument("--methods", nargs="+", default=None, help="--rho-sweep/--rho-real: methods (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="--rho-sweep: replica processes")
    ap.add_argument("--seeds", type=int, default=5, help="--rho-real: seeds 0 .. SEEDS - 1")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="--rho-real: more cells, each 'method,lr,momentum,schedule' (lr in synchronous units)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rho_sweep:
        return rho_sweep_part(args.workers, 1600, [0, 1, 2], args.methods or list(sweep_methods()), args.jobs)
    if args.rho_real:
        return rho_real_part(args.workers, list(range(args.seeds)), args.methods, args.extra)
    if args.braking_factor:
        return braking_part()
    if args.real_budget:
        return real_budget_part([0, 1, 2])
    if args.ray:
        return ray_part(1600)
    evals, seeds, grid_seeds = (800, [0], [0]) if args.quick else (1600, [0, 1], [0, 1])
    workers = [4, 16]
    stem = "async_braking_ps_quick" if args.quick else "async_braking_ps"
    if args.quick:
        BUDGETS[:] = [800, 1600]

    print("part 1: equal tuning grid (replica)")
    cells = tuning_grid(workers, evals, grid_seeds)
    summary = summarize_grid(cells)
    best = {(r["workers"], r["method"]): r for r in summary}
    print("part 2: accuracy vs budget (replica)")
    budget = budget_sweep(best, max(workers), grid_seeds)
    print("part 3: no async tuning (replica)")
    moved = transfer(workers, evals, grid_seeds)

    print("part 4: real parameter server")
    runs: List[Dict[str, Any]] = []
    for n in [1] + workers:
        for name, (mode, opt) in real_configs(best, n).items():
            for seed in seeds:
                r = ps_run(n, mode, opt, evals // n if mode == "sync" else evals, seed)
                r.update(workers=n, optimizer=name, mode=mode, spec=opt, seed=seed)
                runs.append(r)
                print(f"  n={n:<3d} {name:<32s} seed {seed}: acc {r['test_accuracy']:.3f}  "
                      f"staleness {r['mean_staleness']:.1f}/{r['max_staleness']}", flush=True)
    rows = []
    for n, name in dict.fromkeys((r["workers"], r["optimizer"]) for r in runs):
        rs = [r for r in runs if r["workers"] == n and r["optimizer"] == name]
        rows.append(mean_row(rs, workers=n, optimizer=name, mode=rs[0]["mode"], spec=rs[0]["spec"],
                             all_done=all(r["status"] == "done" for r in rs)))
    ref = {r["workers"]: r["test_accuracy"] for r in rows if r["optimizer"] == "sync sgdm best"}
    for r in rows:
        if r["workers"] in ref:
            r["acc_vs_sync_best"] = r["test_accuracy"] - ref[r["workers"]]

    print_tables(summary, budget, moved, rows, evals, grid_seeds, seeds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps({"quick": args.quick, "gradient_evaluations": evals, "seeds": seeds,
                               "grid_seeds": grid_seeds, "replica_jitter": JITTER, "task": TASK,
                               "grid": {"lr": GRID_LRS, "momentum": GRID_MS, "schedule": SCHEDULES},
                               "budgets": BUDGETS, "platform": platform.platform(), "torch": torch.__version__,
                               "grid_summary": summary, "grid_cells": cells, "budget": budget, "transfer": moved,
                               "table": rows, "runs": runs}, indent=1))
    plot(rows, budget, cells, RESULTS / f"{stem}.png")
    print(f"wrote {out} and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
