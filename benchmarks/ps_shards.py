"""The sharded parameter server: server throughput and round time against the number of
workers (16, 64, 256, 1000) and of shards (1, 2, 4).

``--runtime procs`` (the default): every shard is a process of its own and the workers are
virtual workers hosted by ``--procs`` worker processes (one by default), all joined by gloo on
loopback (``commlib.ps.shard_launch.ShardedProcessJob``): the shards' agreement and Gram
matrices travel between the shard processes over the authenticated transport.
``--runtime inproc``: shards and workers are threads of this process
(``commlib.ps.sharded_local.ShardedInprocJob``).

Task: the digits classifier (width 256, 3 layers, 6 parameters, 85k coordinates), identity
compressor, plain SGD; the mean, and Krum (f = n/16: a distance-based rule whose n x n Gram
matrix the shards sum; up to 256 workers by default, its Gram matrix is O(n^2 d)). Columns:

* ``round_s``: mean time per round (from the first applied round to the last);
* ``pushes_per_s``: worker pushes applied per second (one per worker per round; a push is
  applied as one frame on each shard);
* ``mb_per_s``: bytes the shards received and applied per second (all shards);
* ``wall_s``: the whole run, process start to result.

A 2-core machine shared with other jobs cannot show sharding scaling out: the k shard
processes and the worker process compete for the same 2 cores, and the worker process computes
every worker's gradient one after another, so the round time is bounded by the workers, not by
the server. The table shows what sharding costs here (k frames per push, the exchange), and that
it runs at 1000 workers; a cluster is where shards buy throughput.

    .venv/bin/python benchmarks/ps_shards.py                          # the grid, table, JSON, plot
    .venv/bin/python benchmarks/ps_shards.py --workers 16 --shards 1 2 --steps 3
    .venv/bin/python benchmarks/ps_shards.py --runtime inproc --out benchmarks/results/ps_shards.json

Writes ``benchmarks/results/ps_shards_procs.json`` (``--runtime inproc``: ``ps_shards.json``) and
the plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TASK = {"name": "classification", "dataset": "digits", "width": 256, "depth": 2, "batch": 16}


def one(n: int, k: int, aggregator: str, steps: int, runtime: str, procs: int, timeout: float) -> Dict[str, Any]:
    from commlib.ps import PSConfig
    from commlib.ps.shard_launch import ShardedProcessJob
    from commlib.ps.sharded_local import ShardedInprocJob

    scheme: Dict[str, Any] = {"compressor": "identity"}
    if aggregator != "mean":
        scheme.update(aggregator=aggregator, aggregator_options={"f": max(1, n // 16)})
    cfg = PSConfig(steps=steps, step_timeout=300.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=60.0,
                   shutdown_timeout=30.0, startup_timeout=600.0, shards=k if runtime == "procs" else 1)
    t0 = time.perf_counter()
    if runtime == "procs":
        job = ShardedProcessJob(TASK, scheme, cfg, n, procs=procs)
        job.start()
        res = job.wait(timeout=timeout)
    else:
        res = ShardedInprocJob(TASK, scheme, cfg, n, k).run(join_timeout=timeout)
    wall = time.perf_counter() - t0
    hist = res["shards"][0]["history"]
    rounds = len(hist) - 1
    span = hist[-1]["time"] - hist[0]["time"] if rounds > 0 else float("nan")
    applied = sum(s["totals"]["applied"] for s in res["shards"])
    received = sum(s["transport"]["bytes_received"] for s in res["shards"])
    elapsed = max(s["elapsed_s"] for s in res["shards"])
    exchanges = res["shards"][0]["exchange"]["exchanges"] if runtime == "procs" else res["exchanges"]
    return {"workers": n, "shards": k, "aggregator": aggregator, "runtime": runtime, "procs": procs,
            "steps": res["steps"], "wall_s": round(wall, 2), "round_s": round(span / rounds, 4) if rounds > 0 else None,
            "pushes_per_s": round(applied / k / elapsed, 1), "frames_per_s": round(applied / elapsed, 1),
            "mb_per_s": round(received / elapsed / 1e6, 2), "exchanges": exchanges}


def plot(rows: List[Dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    metrics = (("round_s", "round time (s)"), ("pushes_per_s", "worker pushes applied per second"),
               ("mb_per_s", "MB the shards received per second"))
    for agg in sorted({r["aggregator"] for r in rows}):
        for k in sorted({r["shards"] for r in rows}):
            rs = [r for r in rows if r["aggregator"] == agg and r["shards"] == k]
            style = "o-" if agg == "mean" else "s--"
            for ax, (key, _) in zip(axes, metrics):
                ax.plot([r["workers"] for r in rs], [r[key] for r in rs], style, label=f"{agg}, {k} shards")
    for ax, (_, ylabel) in zip(axes, metrics):
        ax.set_xscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    runtime = rows[0].get("runtime", "inproc")
    fig.suptitle(f"sharded parameter server, {'shard processes over gloo' if runtime == 'procs' else 'in-process'}"
                 " (2-core machine shared with other jobs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", choices=("procs", "inproc"), default="procs")
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256, 1000])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--aggregators", nargs="+", default=["mean", "krum"])
    ap.add_argument("--krum-max-workers", type=int, default=256, help="skip Krum above this many workers")
    ap.add_argument("--procs", type=int, default=1, help="procs runtime: worker processes")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or HERE / "results" / ("ps_shards_procs.json" if args.runtime == "procs" else "ps_shards.json"))
    rows, skipped = [], []
    cols = ["workers", "shards", "aggregator", "round_s", "pushes_per_s", "mb_per_s", "wall_s"]
    print(" ".join(f"{c:>13}" for c in cols))

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        out.write_text(json.dumps({"rows": rows, "not_run": skipped, "task": TASK, "cpus": os.cpu_count(),
                                   "loadavg_at_end": load, "runtime": args.runtime}, indent=1))

    for agg in args.aggregators:
        for n in args.workers:
            for k in args.shards:
                if agg != "mean" and n > args.krum_max_workers:
                    skipped.append({"workers": n, "shards": k, "aggregator": agg, "why": "--krum-max-workers"})
                    continue
                try:
                    row = one(n, k, agg, args.steps, args.runtime, args.procs, args.timeout)
                except Exception as exc:  # a run that failed or ran out of time: recorded, not shown as a number
                    why = f"{type(exc).__name__}: {exc}"[:300]
                    skipped.append({"workers": n, "shards": k, "aggregator": agg, "why": why})
                    print(f"{n:>13} {k:>13} {agg:>13}  not run: {skipped[-1]['why'][:100]}", flush=True)
                    save()
                    continue
                rows.append(row)
                print(" ".join(f"{str(row[c]):>13}" for c in cols), flush=True)
                save()
    save()
    print(f"wrote {out} and {plot(rows, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
