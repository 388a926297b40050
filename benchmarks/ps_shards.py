"""The sharded parameter server in-process: round time and server throughput against the number
of workers (16, 64, 256) and of shards (1, 2, 4).

Every run is a ``commlib.ps.sharded_local.ShardedInprocJob`` (the shards and the workers are
threads of this process, each shard on its own in-process transport) on the digits
classifier (width 256, 3 layers, 6 parameters), identity compressor, plain SGD, with the mean
and with Krum (f = n/16: a distance-based rule whose Gram matrix the shards sum). Columns:

* ``round_s``: mean time per round (from the first applied round to the last);
* ``pushes_per_s``: worker pushes applied per second (one per worker per round, all shards);
* ``frames_per_s``: PUSH frames the shards applied per second (``shards`` per push);
* ``mb_per_s``: bytes the shards received per second.

One process on this machine: the shards share its cores with the workers, so sharding buys
no parallel CPU here; the table shows the cost of the protocol (k frames per push, the
round agreement and the Gram exchange), not a cluster's scaling.

    .venv/bin/python benchmarks/ps_shards.py                 # the full grid, table, JSON, plot
    .venv/bin/python benchmarks/ps_shards.py --workers 16 --shards 1 2 --steps 3

Writes ``benchmarks/results/ps_shards.json`` and ``ps_shards.png``.
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


def one(n: int, k: int, aggregator: str, steps: int) -> Dict[str, Any]:
    from commlib.ps import PSConfig
    from commlib.ps.sharded_local import ShardedInprocJob

    scheme: Dict[str, Any] = {"compressor": "identity"}
    if aggregator != "mean":
        scheme.update(aggregator=aggregator, aggregator_options={"f": max(1, n // 16)})
    cfg = PSConfig(steps=steps, step_timeout=120.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=5.0,
                   shutdown_timeout=10.0, startup_timeout=120.0)
    job = ShardedInprocJob(TASK, scheme, cfg, n, k)
    t0 = time.perf_counter()
    res = job.run(join_timeout=300.0)
    wall = time.perf_counter() - t0
    hist = res["shards"][0]["history"]
    rounds = len(hist) - 1
    span = hist[-1]["time"] - hist[0]["time"] if rounds > 0 else float("nan")
    applied = sum(s["totals"]["applied"] for s in res["shards"])
    received = sum(s["transport"]["bytes_received"] for s in res["shards"])
    elapsed = max(s["elapsed_s"] for s in res["shards"])
    return {"workers": n, "shards": k, "aggregator": aggregator, "steps": res["steps"], "wall_s": round(wall, 2),
            "round_s": round(span / rounds, 4) if rounds > 0 else None,
            "pushes_per_s": round(applied / k / elapsed, 1), "frames_per_s": round(applied / elapsed, 1),
            "mb_per_s": round(received / elapsed / 1e6, 2), "exchanges": res["exchanges"]}


def plot(rows: List[Dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for agg in sorted({r["aggregator"] for r in rows}):
        for k in sorted({r["shards"] for r in rows}):
            rs = [r for r in rows if r["aggregator"] == agg and r["shards"] == k]
            style = "o-" if agg == "mean" else "s--"
            axes[0].plot([r["workers"] for r in rs], [r["round_s"] for r in rs], style, label=f"{agg}, {k} shards")
            axes[1].plot([r["workers"] for r in rs], [r["pushes_per_s"] for r in rs], style, label=f"{agg}, {k} shards")
    for ax, ylabel in ((axes[0], "round time (s)"), (axes[1], "worker pushes applied per second")):
        ax.set_xscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("sharded parameter server, in-process (shards and workers share one machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--aggregators", nargs="+", default=["mean", "krum"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "ps_shards.json"))
    args = ap.parse_args()
    rows = []
    cols = ["workers", "shards", "aggregator", "round_s", "pushes_per_s", "frames_per_s", "mb_per_s", "wall_s"]
    print(" ".join(f"{c:>13}" for c in cols))
    for agg in args.aggregators:
        for n in args.workers:
            for k in args.shards:
                row = one(n, k, agg, args.steps)
                rows.append(row)
                print(" ".join(f"{str(row[c]):>13}" for c in cols), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({"rows": rows, "task": TASK, "cpus": os.cpu_count(), "loadavg": load}, indent=1))
    print(f"wrote {out} and {plot(rows, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
