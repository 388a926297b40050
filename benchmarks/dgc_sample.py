"""DGC's threshold sample: single entries with a stride (the reference code's) vs blocks of 16
consecutive entries (commlib's default, ``DGCTopK(sample_block=16)``; docs/algorithms.md §1).

1. **Cost**: ``ops.dgc_threshold`` (the fused DGC path's threshold: momentum-corrected v at the
   sample only) on one tensor of ``--numel`` entries, 1% sample, ratio 0.001, the two layouts
   interleaved, median of ``--repeats``; and one ``dgc_update_pack_`` pass for scale.
2. **Quality**: on the largest layer of benchmarks/bandwidth.py's MLP (``--model`` parameters),
   ``--steps`` steps of momentum-corrected gradients (DGC's v, masked at the exact top-k after
   each step): the number of entries at or above each layout's threshold, as a multiple of k.
   Below ``lower`` = 0.8 k the selection takes an adaptation round (one more pass over v).

    .venv/bin/python benchmarks/dgc_sample.py [--quick]

prints a table and writes benchmarks/results/dgc_sample.json (``--quick``: dgc_sample_quick.json).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth_worker import width_for  # noqa: E402

from commlib import ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"single entries (block 1)": 1, "blocks of 16": 16}
RATIO, SAMPLE_RATIO, MOMENTUM = 0.001, 0.01, 0.9


def cost(numel: int, repeats: int) -> Dict[str, Dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    u, v, g = (torch.randn(numel, generator=gen) * s for s in (0.01, 0.03, 0.01))
    times: Dict[str, List[float]] = {name: [] for name in LAYOUTS}
    for rep in range(repeats + 2):
        order = list(LAYOUTS.items()) if rep % 2 else list(LAYOUTS.items())[::-1]
        for name, block in order:
            t0 = time.perf_counter()
            ops.dgc_threshold(u, v, g, MOMENTUM, RATIO, sample_ratio=SAMPLE_RATIO, block=block)
            if rep >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - t0) * 1e3)
    k = math.ceil(RATIO * numel)
    buf = torch.zeros(64 + 8 * 2 * k, dtype=torch.uint8)
    thr = ops.dgc_threshold(u, v, g, MOMENTUM, RATIO)
    packs = []
    for _ in range(max(3, repeats // 3)):
        uu, vv = u.clone(), v.clone()
        t0 = time.perf_counter()
        ops.dgc_update_pack_(buf, 0, uu, vv, g, MOMENTUM, thr, max_nnz=k)
        packs.append((time.perf_counter() - t0) * 1e3)
    out = {name: {"threshold_ms": statistics.median(ts)} for name, ts in times.items()}
    out["dgc_update_pack_ms"] = {"median": statistics.median(packs)}
    return out


def quality(params: int, steps: int) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    w = width_for(params)
    model = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    lossf = nn.CrossEntropyLoss()
    weight = model[2].weight
    n = weight.numel()
    k = math.ceil(RATIO * n)
    u, v = torch.zeros(n), torch.zeros(n)
    counts: Dict[str, List[float]] = {name: [] for name in LAYOUTS}
    for step in range(steps):
        x, y = torch.randn(32, 64) * (1 + step % 3), torch.randint(0, 10, (32,))
        model.zero_grad()
        lossf(model(x), y).backward()
        g = weight.grad.reshape(-1)
        for name, block in LAYOUTS.items():
            thr = ops.dgc_threshold(u, v, g, MOMENTUM, RATIO, sample_ratio=SAMPLE_RATIO, block=block)
            if step >= 5:  # v has built up
                vv = v + (MOMENTUM * u + g)
                counts[name].append(int((vv.abs() >= thr).sum()) / k)
        u.mul_(MOMENTUM).add_(g)
        v.add_(u)
        sel = torch.topk(v.abs(), k).indices
        u[sel] = 0
        v[sel] = 0
    return {name: {"mean": statistics.fmean(c), "sd": statistics.pstdev(c), "min": min(c), "max": max(c),
                   "below_lower": sum(x < 0.8 for x in c) / len(c), "steps": len(c)} for name, c in counts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensor and model, fewer repeats")
    ap.add_argument("--numel", type=int, default=49_500_000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", type=int, default=10_000_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.numel, args.repeats, args.model, args.steps = 4_000_000, 4, 1_000_000, 10
    torch.set_num_threads(args.threads)
    c = cost(args.numel, args.repeats)
    q = quality(args.model, args.steps)
    print(f"DGC threshold sample, {args.numel:,} entries, 1% sample, ratio {RATIO}, {args.threads} thread(s), "
          f"backend {ops.backend()}")
    print("| layout | dgc_threshold (ms) | count / k: mean | sd | min | < 0.8 k |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in LAYOUTS:
        r = q[name]
        print(f"| {name} | {c[name]['threshold_ms']:.2f} | {r['mean']:.3f} | {r['sd']:.3f} | {r['min']:.3f} | "
              f"{r['below_lower']:.0%} |")
    print(f"one dgc_update_pack_ pass over the same tensor: {c['dgc_update_pack_ms']['median']:.2f} ms")
    out = RESULTS / ("dgc_sample_quick.json" if args.quick else "dgc_sample.json")
    meta = {"numel": args.numel, "repeats": args.repeats, "model_params": args.model, "steps": args.steps,
            "threads": args.threads, "backend": ops.backend(), "torch": torch.__version__,
            "machine": platform.machine()}
    out.write_text(json.dumps({"meta": meta, "cost": c, "quality": q}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
