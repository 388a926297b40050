"""Asynchronous parameter server: Adaptive Braking vs SGD with momentum under real staleness.

Two parts, every run spending the same number G of gradient evaluations (batch 32 each) on the
same task, a 64-64-64-10 MLP on scikit-learn's bundled digits (no download):

1. **Equal tuning budget** (``benchmarks/async_ps_replica.py``, a one-process event-driven replica
   of the async server, fast enough for grids): synchronous SGD momentum, async SGD momentum and
   async Adaptive Braking (rho = 1) each get the same grid, lr in GRID_LRS (synchronous units: an
   async push applies lr / n) x momentum in GRID_MS (per push). Reported per method: the best
   cell, and the sensitivity (cells within 2 points of the method's best; accuracy at half and
   twice the best lr). A fixed-delay row (every push exactly n - 1 versions old) shows what a pure
   delay simulator gives at the best settings. The grid uses 3 seeds. Part 1b hands the
   synchronous setting (lr, momentum 0.9) unchanged to the async default conversion, for AB and
   for momentum SGD: no async tuning at all.
2. **Real server** (``commlib.ps`` on the in-process transport: the server and one thread per
   worker, each worker sleeping ``scale * (1 + Exp(1))`` seconds before every gradient, the fault
   plan's "exp" straggler model; staleness is measured, it concentrates around n - 1): the
   reference synchronous run (lr 0.05, momentum 0.9, G/n rounds), the synchronous run at the
   grid's best setting, the async default before (AB, momentum 0.9 at lr / n) and now (momentum
   capped at 0.75, lr keeping lr / (1 - m) per gradient: ``commlib.ps.config.async_step_size``),
   each async method at its grid-best setting and at twice that lr.

Thread timing is not deterministic, so every configuration runs with several seeds and the tables
show the mean. Wall times are not reported (the machine is shared).

    .venv/bin/python benchmarks/async_braking_ps.py [--quick]

prints the tables, writes benchmarks/results/async_braking_ps.json (``--quick``:
async_braking_ps_quick.json) and a plot (.png): test accuracy vs mean staleness on the real
server, and the replica grid's accuracy vs lr at 16 workers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_ps_replica import JITTER, replica_run  # noqa: E402

from commlib.ps import PSConfig  # noqa: E402
from commlib.sim import FaultPlan, StragglerSpec, simulate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASK = {"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0}
SCHEME = {"compressor": "identity"}
LR = 0.05  # the reference synchronous lr (best of 0.01-0.2 for one worker, momentum 0.9)
GRID_LRS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
GRID_MS = [0.5, 0.75, 0.9]
#: grid methods: (mode, rho); rho None = torch SGD (sync)
METHODS: Dict[str, Tuple[str, Any]] = {"sync sgdm": ("sync", None), "async sgdm": ("async", 0.0),
                                       "async ab": ("async", 1.0)}


def grid_spec(method: str, lr: float, m: float, n: int) -> Dict[str, Any]:
    """A grid cell's optimizer spec; async cells pin the per-push values (lr / n, m)."""
    mode, rho = METHODS[method]
    if mode == "sync":
        return {"name": "sgd", "lr": lr, "momentum": m}
    return {"name": "ab-sgd", "lr": lr / n, "momentum": m, "rho": rho, "lr_scaling": "none"}


def ps_run(workers: int, mode: str, optimizer: Dict[str, Any], steps: int, seed: int,
           scale: float = 0.004) -> Dict[str, Any]:
    """One real parameter-server run on the in-process transport."""
    plan = FaultPlan(workers, stragglers=StragglerSpec("exp", shift=1.0, rate=1.0, scale=scale), seed=seed)
    cfg = PSConfig(mode=mode, steps=steps, step_timeout=30.0, worker_timeout=5.0, optimizer=optimizer)
    res = simulate(plan, dict(TASK, seed=seed), SCHEME, cfg, backend="inproc")
    stal = [h["staleness"] for h in res["history"]]
    final = res["evals"][-1]
    return {"status": res["status"], "steps": res["steps"],
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "mean_staleness": statistics.fmean(stal), "max_staleness": max(stal),
            "staleness_histogram": [stal.count(k) for k in range(max(stal) + 1)]}


def mean_row(rs: List[Dict[str, Any]], **key: Any) -> Dict[str, Any]:
    accs = [r["test_accuracy"] for r in rs]
    return dict(key, test_accuracy=statistics.fmean(accs), accuracy_min=min(accs), accuracy_max=max(accs),
                mean_staleness=statistics.fmean(r["mean_staleness"] for r in rs),
                max_staleness=max(r["max_staleness"] for r in rs))


def tuning_grid(workers: List[int], evals: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Part 1: every method on the same lr x momentum grid (replica)."""
    cells = []
    for n, method, lr, m in itertools.product(workers, METHODS, GRID_LRS, GRID_MS):
        mode = METHODS[method][0]
        rs = [replica_run(TASK, n, grid_spec(method, lr, m, n), evals, s, mode) for s in seeds]
        cells.append(mean_row(rs, workers=n, method=method, lr=lr, momentum=m))
        print(f"  replica n={n:<3d} {method:<11s} lr {lr:<5} m {m:<4}: acc {cells[-1]['test_accuracy']:.3f}",
              flush=True)
    return cells


def summarize_grid(cells: List[Dict[str, Any]], evals: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Best cell per (n, method) plus its sensitivity, and the best async cells at a fixed delay."""
    out = []
    for n, method in dict.fromkeys((c["workers"], c["method"]) for c in cells):
        mine = [c for c in cells if c["workers"] == n and c["method"] == method]
        best = max(mine, key=lambda c: c["test_accuracy"])
        at = {c["lr"]: c["test_accuracy"] for c in mine if c["momentum"] == best["momentum"]}
        row = {"workers": n, "method": method, "best_lr": best["lr"], "best_momentum": best["momentum"],
               "best_accuracy": best["test_accuracy"],
               "cells_within_2pts": sum(c["test_accuracy"] >= best["test_accuracy"] - 0.02 for c in mine),
               "cells": len(mine), "acc_at_half_lr": at.get(best["lr"] / 2), "acc_at_twice_lr": at.get(best["lr"] * 2),
               "grid_mean_accuracy": statistics.fmean(c["test_accuracy"] for c in mine)}
        if METHODS[method][0] == "async":  # the same setting with every push exactly n - 1 versions old
            spec = grid_spec(method, best["lr"], best["momentum"], n)
            rs = [replica_run(TASK, n, spec, evals, s, "async", jitter=0.0) for s in seeds]
            row["fixed_delay_accuracy"] = statistics.fmean(r["test_accuracy"] for r in rs)
        out.append(row)
    return out


TRANSFER_LRS = [0.05, 0.1, 0.2, 0.4]


def transfer(workers: List[int], evals: int, seeds: List[int]) -> List[Dict[str, Any]]:
    """Part 1b, no async tuning at all: the synchronous setting (lr, momentum 0.9) handed to the
    async server's default conversion (``lr_scaling="workers"``), for AB and for momentum SGD."""
    out = []
    for n, lr in itertools.product(workers, TRANSFER_LRS):
        row: Dict[str, Any] = {"workers": n, "sync_lr": lr}
        for name, mode, spec in (("sync sgdm", "sync", {"name": "sgd", "lr": lr, "momentum": 0.9}),
                                 ("async sgdm", "async", {"lr": lr, "rho": 0.0}),
                                 ("async ab", "async", {"lr": lr})):
            rs = [replica_run(TASK, n, spec, evals, s, mode) for s in seeds]
            row[name] = statistics.fmean(r["test_accuracy"] for r in rs)
        out.append(row)
        print(f"  transfer n={n:<3d} sync lr {lr:<5}: " + "  ".join(
            f"{k} {row[k]:.3f}" for k in ("sync sgdm", "async sgdm", "async ab")), flush=True)
    return out


def print_transfer(rows: List[Dict[str, Any]], evals: int, seeds: List[int]) -> None:
    print(f"part 1b: replica, the synchronous lr (momentum 0.9) through the async default conversion, "
          f"{evals} gradient evaluations, {len(seeds)} seed(s)")
    print(f"{'workers':>7}  {'sync lr':>8}{'sync sgdm':>11}{'async sgdm':>12}{'async ab':>10}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['sync_lr']:>8}{r['sync sgdm']:>11.3f}{r['async sgdm']:>12.3f}{r['async ab']:>10.3f}")


def real_configs(best: Dict[Tuple[int, str], Dict[str, Any]], n: int) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Part 2's rows for n workers: name -> (mode, optimizer spec)."""
    rows: Dict[str, Tuple[str, Dict[str, Any]]] = {
        "sync sgdm lr 0.05": ("sync", {"name": "sgd", "lr": LR, "momentum": 0.9}),
        "async ab, old default": ("async", {"lr": LR, "async_momentum": 0.9}),
        "async sgdm, old default": ("async", {"lr": LR, "async_momentum": 0.9, "rho": 0.0}),
        "async ab, default": ("async", {"lr": LR}),
        "async sgdm, default": ("async", {"lr": LR, "rho": 0.0}),
    }
    if n == 1:
        return {k: v for k, v in rows.items() if k in ("sync sgdm lr 0.05", "async ab, default")}
    b = best[(n, "sync sgdm")]
    rows["sync sgdm best"] = ("sync", grid_spec("sync sgdm", b["best_lr"], b["best_momentum"], n))
    for method in ("async sgdm", "async ab"):
        b = best[(n, method)]
        rows[f"{method} best"] = ("async", grid_spec(method, b["best_lr"], b["best_momentum"], n))
        rows[f"{method} 2x best lr"] = ("async", grid_spec(method, 2 * b["best_lr"], b["best_momentum"], n))
    return rows


def plot(rows: List[Dict[str, Any]], cells: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in dict.fromkeys(r["optimizer"] for r in rows if r["optimizer"].startswith("async")):
        pts = sorted((r["mean_staleness"], r["test_accuracy"]) for r in rows if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for name, style in (("sync sgdm lr 0.05", "k--"), ("sync sgdm best", "k:")):
        pts = sorted((r["workers"] - 1, r["test_accuracy"]) for r in rows if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="s", label=f"{name} (x = n - 1)")
    ax.set_xlabel("mean staleness of applied pushes (async) / n - 1 (sync)")
    ax.set_ylabel("test accuracy")
    ax.set_title("real async parameter server, equal gradient evaluations")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    n = max(c["workers"] for c in cells)
    for method, m in itertools.product(METHODS, GRID_MS):
        pts = sorted((c["lr"], c["test_accuracy"]) for c in cells
                     if c["workers"] == n and c["method"] == method and c["momentum"] == m)
        bx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle={"sync sgdm": ":", "async sgdm": "--", "async ab": "-"}[method], label=f"{method} m={m}")
    bx.set_xscale("log")
    bx.set_xlabel("lr (synchronous units; an async push applies lr / n)")
    bx.set_ylabel("test accuracy")
    bx.set_title(f"replica tuning grid, {n} workers")
    bx.set_ylim(0, 1)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluations, one seed")
    ap.add_argument("--only-transfer", action="store_true",
                    help="run part 1b only and add it to the existing JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    evals, seeds, grid_seeds = (800, [0], [0]) if args.quick else (1600, [0, 1], [0, 1, 2])
    workers = [4, 16]
    stem = "async_braking_ps_quick" if args.quick else "async_braking_ps"
    out = RESULTS / f"{stem}.json"
    if args.only_transfer:
        data = json.loads(out.read_text())
        data["transfer"] = transfer(workers, evals, grid_seeds)
        out.write_text(json.dumps(data, indent=1))
        print_transfer(data["transfer"], evals, grid_seeds)
        return 0

    print("part 1: equal tuning grid (replica)")
    cells = tuning_grid(workers, evals, grid_seeds)
    summary = summarize_grid(cells, evals, grid_seeds)
    best = {(r["workers"], r["method"]): r for r in summary}
    moved = transfer(workers, evals, grid_seeds)

    print("part 2: real parameter server")
    runs: List[Dict[str, Any]] = []
    for n in [1] + workers:
        for name, (mode, opt) in real_configs(best, n).items():
            for seed in seeds:
                r = ps_run(n, mode, opt, evals // n if mode == "sync" else evals, seed)
                r.update(workers=n, optimizer=name, mode=mode, spec=opt, seed=seed)
                runs.append(r)
                print(f"  n={n:<3d} {name:<26s} seed {seed}: acc {r['test_accuracy']:.3f}  "
                      f"staleness {r['mean_staleness']:.1f}/{r['max_staleness']}", flush=True)
    rows = []
    for n, name in dict.fromkeys((r["workers"], r["optimizer"]) for r in runs):
        rs = [r for r in runs if r["workers"] == n and r["optimizer"] == name]
        rows.append(mean_row(rs, workers=n, optimizer=name, spec=rs[0]["spec"],
                             all_done=all(r["status"] == "done" for r in rs)))
    ref = {r["workers"]: r["test_accuracy"] for r in rows if r["optimizer"] == "sync sgdm lr 0.05"}
    for r in rows:
        r["acc_vs_sync_lr_0.05"] = r["test_accuracy"] - ref[r["workers"]]

    print()
    print(f"part 1: replica, lr x momentum grid {GRID_LRS} x {GRID_MS}, {evals} gradient evaluations, "
          f"{len(grid_seeds)} seed(s)")
    print(f"{'workers':>7}  {'method':<12}{'best lr':>8}{'m':>6}{'best acc':>9}{'<=2pts':>8}{'lr/2':>7}"
          f"{'2 lr':>7}{'grid mean':>10}{'fixed delay':>12}")
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"  # noqa: E731
    for r in summary:
        print(f"{r['workers']:>7}  {r['method']:<12}{r['best_lr']:>8}{r['best_momentum']:>6}{r['best_accuracy']:>9.3f}"
              f"{r['cells_within_2pts']:>5d}/{r['cells']:<2d}{fmt(r['acc_at_half_lr']):>7}{fmt(r['acc_at_twice_lr']):>7}"
              f"{r['grid_mean_accuracy']:>10.3f}{fmt(r.get('fixed_delay_accuracy')):>12}")
    print()
    print_transfer(moved, evals, grid_seeds)
    print()
    print(f"part 2: real parameter server, {evals} gradient evaluations per row, {len(seeds)} seed(s)")
    print(f"{'workers':>7}  {'optimizer':<26}{'test acc':>9}{'min':>7}{'max':>7}{'vs sync 0.05':>13}"
          f"{'staleness':>10}{'max':>5}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['optimizer']:<26}{r['test_accuracy']:>9.3f}{r['accuracy_min']:>7.3f}"
              f"{r['accuracy_max']:>7.3f}{r['acc_vs_sync_lr_0.05']:>+13.3f}"
              f"{r['mean_staleness']:>10.1f}{r['max_staleness']:>5d}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "gradient_evaluations": evals, "seeds": seeds,
                               "grid_seeds": grid_seeds, "replica_jitter": JITTER, "task": TASK,
                               "reference_lr": LR, "grid": {"lr": GRID_LRS, "momentum": GRID_MS},
                               "platform": platform.platform(), "torch": torch.__version__,
                               "grid_summary": summary, "grid_cells": cells, "transfer": moved, "table": rows, "runs": runs},
                              indent=1))
    plot(rows, cells, RESULTS / f"{stem}.png")
    print(f"wrote {out} and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
