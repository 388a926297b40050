"""Asynchronous parameter server: Adaptive Braking vs SGD with momentum under real staleness.

Real runs of commlib's parameter server (``commlib.ps``) on the in-process transport: the
server and one thread per worker, each worker sleeping a random compute time before every
gradient (shifted exponential, ``scale * (1 + Exp(1))`` seconds: the fault plan's "exp"
straggler model). Staleness is measured, not set (``benchmarks/async_braking.py`` sets a fixed
delay instead): with n workers it concentrates around n - 1.

Every row spends the same number G of gradient evaluations (batch 32 each) on the same task, a
64-64-64-10 MLP on scikit-learn's bundled digits (no download):

* ``sync n=1``      one worker, G synchronous steps (no staleness at all);
* ``sync``          n workers, synchronous, G/n rounds of the mean of n gradients (lr 0.05,
                    momentum 0.9): the synchronous run with the same workers and evaluations;
* ``async ...``     n workers, G pushes applied on arrival. ``lr`` is the synchronous lr; the
                    default async optimizer (``ab rho=1, lr/n``) divides it by n
                    (``lr_scaling="workers"``); the ``unscaled`` rows apply each push at the
                    synchronous lr, as the server did before; ``2.5 lr/n`` tests robustness to
                    a too large lr.

Thread timing is not deterministic, so each configuration runs with several seeds and the
table shows the mean. Wall times are not reported (the machine is shared).

    .venv/bin/python benchmarks/async_braking_ps.py [--quick]

prints a table, writes benchmarks/results/async_braking_ps.json (``--quick``:
async_braking_ps_quick.json) and a plot of test accuracy vs mean staleness (.png).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from commlib.ps import PSConfig
from commlib.sim import FaultPlan, StragglerSpec, simulate

RESULTS = Path(__file__).resolve().parent / "results"
TASK = {"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0}
SCHEME = {"compressor": "identity"}
LR = 0.05  # the synchronous learning rate (best of 0.01-0.2 for sync SGD momentum 0.9 here)
SYNC = {"name": "sgd", "lr": LR, "momentum": 0.9}
# name -> async optimizer spec (lr is the synchronous lr; the server scales it unless told not to)
ASYNC: Dict[str, Dict[str, Any]] = {
    "async sgdm unscaled": {"name": "ab-sgd", "lr": LR, "momentum": 0.9, "rho": 0.0, "lr_scaling": "none"},
    "async ab rho=2 unscaled": {"name": "ab-sgd", "lr": LR, "momentum": 0.9, "rho": 2.0, "lr_scaling": "none"},
    "async sgdm lr/n": {"name": "ab-sgd", "lr": LR, "momentum": 0.9, "rho": 0.0},
    "async ab (default)": {},
    "async sgdm 2.5 lr/n": {"name": "ab-sgd", "lr": 2.5 * LR, "momentum": 0.9, "rho": 0.0},
    "async ab 2.5 lr/n": {"name": "ab-sgd", "lr": 2.5 * LR},
}

ONE_WORKER = ("async sgdm unscaled", "async ab (default)")


def one_run(workers: int, mode: str, optimizer: Dict[str, Any], steps: int, seed: int,
            scale: float) -> Dict[str, Any]:
    plan = FaultPlan(workers, stragglers=StragglerSpec("exp", shift=1.0, rate=1.0, scale=scale), seed=seed)
    cfg = PSConfig(mode=mode, steps=steps, step_timeout=30.0, worker_timeout=5.0, optimizer=optimizer)
    res = simulate(plan, dict(TASK, seed=seed), SCHEME, cfg, backend="inproc")
    stal = [h["staleness"] for h in res["history"]]
    final = res["evals"][-1]
    return {"workers": workers, "mode": mode, "seed": seed, "status": res["status"], "steps": res["steps"],
            "test_accuracy": final["accuracy"], "test_loss": final["loss"],
            "mean_staleness": statistics.fmean(stal), "max_staleness": max(stal),
            "staleness_histogram": [stal.count(k) for k in range(max(stal) + 1)]}


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["optimizer"] for r in rows if r["optimizer"].startswith("async")]
    for name in dict.fromkeys(names):
        pts = sorted((r["mean_staleness"], r["test_accuracy"]) for r in rows if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    pts = sorted((r["workers"] - 1, r["test_accuracy"]) for r in rows if r["optimizer"] == "sync")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", marker="s", label="sync, same workers (x = n - 1)")
    ax.set_xlabel("mean staleness of applied pushes (async) / n - 1 (sync)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits MLP, equal gradient evaluations per row")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluations, one seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    evals, seeds = (800, [0]) if args.quick else (1600, [0, 1])
    worker_counts = [1, 4, 16]
    runs: List[Dict[str, Any]] = []

    def record(name: str, n: int, mode: str, opt: Dict[str, Any], steps: int) -> None:
        for seed in seeds:
            r = one_run(n, mode, opt, steps, seed, scale=0.004)
            r["optimizer"] = name
            runs.append(r)
            print(f"  n={n:<3d} {name:<24s} seed {seed}: acc {r['test_accuracy']:.3f}  "
                  f"staleness {r['mean_staleness']:.1f}/{r['max_staleness']}", flush=True)

    record("sync n=1", 1, "sync", SYNC, evals)
    for n in worker_counts:
        if n > 1:
            record("sync", n, "sync", SYNC, evals // n)
        for name, opt in ASYNC.items():
            if n == 1 and name not in ONE_WORKER:
                continue  # with one worker the lr scaling is the identity: these rows would repeat
            record(name, n, "async", opt, evals)
    rows = []
    keys: List[Tuple[int, str]] = list(dict.fromkeys((r["workers"], r["optimizer"]) for r in runs))
    for n, name in keys:
        rs = [r for r in runs if r["workers"] == n and r["optimizer"] == name]
        accs = [r["test_accuracy"] for r in rs]
        rows.append({"workers": n, "optimizer": name, "test_accuracy": statistics.fmean(accs),
                     "accuracy_min": min(accs), "accuracy_max": max(accs),
                     "test_loss": statistics.fmean(r["test_loss"] for r in rs),
                     "mean_staleness": statistics.fmean(r["mean_staleness"] for r in rs),
                     "max_staleness": max(r["max_staleness"] for r in rs),
                     "all_done": all(r["status"] == "done" for r in rs)})
    sync_of = {r["workers"]: r["test_accuracy"] for r in rows if r["optimizer"] == "sync"}
    sync_of[1] = next(r["test_accuracy"] for r in rows if r["optimizer"] == "sync n=1")
    for r in rows:
        r["acc_vs_sync_same_workers"] = r["test_accuracy"] - sync_of[r["workers"]]
    print()
    print(f"parameter server, {evals} gradient evaluations per row, {len(seeds)} seed(s), digits MLP, lr {LR}")
    print(f"{'workers':>7}  {'optimizer':<24}{'test acc':>9}{'min':>7}{'max':>7}{'vs sync':>9}"
          f"{'staleness':>10}{'max':>5}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['optimizer']:<24}{r['test_accuracy']:>9.3f}{r['accuracy_min']:>7.3f}"
              f"{r['accuracy_max']:>7.3f}{r['acc_vs_sync_same_workers']:>+9.3f}"
              f"{r['mean_staleness']:>10.1f}{r['max_staleness']:>5d}")
    stem = "async_braking_ps_quick" if args.quick else "async_braking_ps"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps({"quick": args.quick, "gradient_evaluations": evals, "seeds": seeds, "task": TASK,
                               "lr": LR, "async_optimizers": ASYNC, "platform": platform.platform(),
                               "torch": torch.__version__, "table": rows, "runs": runs}, indent=1))
    plot(rows, RESULTS / f"{stem}.png")
    print(f"wrote {out} and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
