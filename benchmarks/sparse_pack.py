"""Sparse hot path: selection packed into a wire Payload, DGC threshold + selection, the fused
DGC step, and unpacking 8 ranks' payloads with one scatter-add -- native extension vs the
pure-torch path vs torch.topk, against two bandwidth ceilings measured in the same run.

    .venv/bin/python benchmarks/sparse_pack.py [--quick] [--sizes 1e6,1e7] [--densities 0.001,0.01]
                                               [--threads N] [--no-torch]

For each size (1M, 10M, 50M, 100M float32; --quick: 1M, 10M) and density (0.1%, 1%, 10%):
  read      x.sum()                          read-only pass: the ceiling of any selection
  copy      y.copy_(x) into a preallocated y  read + write: the ceiling of the unpack
  pack      pack_threshold_(buf, 0, x, thr)  select |x| >= thr and write a full Payload (thr given)
  select    threshold_select(x, thr)         the same, returning (indices, values) tensors
  dgc       sampled_threshold(x, d) + pack   DGC: threshold from a 1% sample (blocks of 16), then pack
  dgc_step  dgc_threshold + dgc_update_pack_ momentum correction + selection + masking + pack
  unpack8   unpack_scatter_add_ of 8 ranks' payloads (density d each) into a dense output
  topk      torch.topk(x.abs(), k)           exact top-k at the same k as the threshold selects
GB/s = 4 * numel / best time (the dense tensor's bytes, for every row, so rows compare).
Rows are printed for the native path (`native`) and the pure-torch path (`torch`); ratios are
to the read ceiling (selections) or the copy ceiling (unpack), and speed-ups to torch.topk.
Writes benchmarks/results/sparse_pack.json.

Notes (2-core AMD EPYC Zen 4 VM with AVX-512, torch 2.13 CPU, shared with other jobs: load
average 5-10 during this work).  Timings are the best of many calls (`timeit`), the ceilings are
measured in the same run, and --rounds repeats the whole table; even so the numbers of a loaded
machine scatter by 2-10x (see "OpenMP under load").  Profiling used per-thread CPU time
(time.thread_time, one thread) and C micro-benchmarks of single loops, which the load barely moves.

Profile before optimising, and what changed (before -> after):
- select + pack (single thread, 50M floats, 0.1%): AVX-512 compress 92% of x.sum's bandwidth,
  AVX2 permute-table 90%, branch-free scalar 30% (the scalar path is the fallback only);
  1% density 76%, 10% density 42-53% (there the compaction and the copy-out of 8 bytes per
  selected entry add traffic).  Nothing to gain at 0.1%: the pass is bound by reading x.
- sampled threshold (DGC), 50M floats, 500K samples, one thread: 6.4 ms, of which the strided
  gather is ~5.3 ms: one cache miss per sample and a TLB miss every ~10 (torch's own
  x[::100].sum() takes 4.6 ms).  Software prefetch: no gain (5.3 -> 6.1 ms in a C
  micro-benchmark, removed); 2 MB pages: 5.3 -> 3.4 ms (the caller's allocation, e.g. torch's
  THP_MEM_ALLOC_ENABLE=1); four interleaved strided streams instead of one: 1.3-1.6x on the
  gather (kept).  The radix select adds one pass over the 4*s-byte sample, in cache.
- scatter-add / unpack, 1M sorted entries into 10M floats: 4.6 -> 2.7 ns per entry at 10%
  density and 16 -> 5.5-10 ns at 1% with a software prefetch of the output 32 entries ahead
  (each entry is a cache miss of its own below ~6% density); index validation 1.2 -> 0.8 ms per
  1M entries with branch-free reductions.  8 ranks are merged per 32 KiB block of the output,
  so each output line is read and written once however many ranks there are.
- OpenMP under load: every parallel region ends waiting for all its threads, and on this VM a
  worker thread may wait a 4 ms scheduler tick (or several) to run.  The first version opened
  2-20 regions per op (per-rank validation, copy-out, sample filter) and its best 10M pack under
  load was 11.98 ms (~12x the unloaded time, always a multiple of the tick).  Now: work is
  handed out in chunks (dynamic schedule), each op opens one region (two for large copy-outs),
  and only for >= 128K elements per thread (>= 512K entries for copy-out and validation, >= 64K
  for sample gathers); below that the calling thread does it alone.

Memory: pack/select/dgc allocate their outputs only: candidates are collected in the calling
thread's scratch (8 bytes per selected entry, grown on demand, kept and reused across calls;
commlib.ops.release_scratch() frees it), the sampled threshold uses 4 bytes per sampled entry of
the same scratch, unpack and scatter-add allocate nothing but per-rank bookkeeping.  The torch
path allocates |x| (4n bytes), a mask (n bytes) and nonzero's int64 indices; torch.topk
allocates |x| too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import commlib.ops as ops  # noqa: E402
from commlib.ops import native, torch_ops, torch_pack  # noqa: E402
from commlib.wire import Kind, Payload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_pack.json"
RANKS = 8


def timeit(fn: Callable[[], object], budget: float = 1.0, max_reps: int = 200) -> float:
    """Best (minimum) seconds of fn() over repeated calls after one warm-up call.

    The minimum, not the median: this machine is shared, and other jobs only ever add time.
    Repeats until the time budget is spent (at least 3 calls; one for calls over 2 s).
    """
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > 2.0:  # slow baselines: one timed call is enough
            break
    return min(times)


def rank_buffers(x: torch.Tensor, thr: float, cap: int) -> torch.Tensor:
    """(RANKS, cap) uint8: rank r's payload is x rolled by r*7919 positions, selected at thr."""
    bufs = torch.zeros(RANKS, cap, dtype=torch.uint8)
    for r in range(RANKS):
        xr = torch.roll(x, r * 7919)
        torch_pack.pack_threshold_(bufs[r], 0, xr, thr) if native.LIB is None else \
            native.pack_threshold_(bufs[r], 0, xr, thr)
    return bufs


Timings = Dict[Tuple[float, str, str], Tuple[float, int, str]]  # (density, op, path) -> (s, nnz, ceiling)


def bench_size(n: int, densities: List[float], with_torch: bool) -> Tuple[Dict[str, float], Timings]:
    """One round at one size: ceiling times and every op's best time."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    y = torch.empty_like(x)
    ceil = {"read": timeit(lambda: x.sum()), "copy": timeit(lambda: y.copy_(x))}
    del y
    impls = {"native": (native, native)} if native.LIB is not None else {}
    if with_torch:
        impls["torch"] = (torch_ops, torch_pack)
    got: Timings = {}
    for d in densities:
        thr = torch_ops.sampled_threshold(x, d, sample_ratio=0.05)
        nnz = int(torch_ops.threshold_select(x[: min(n, 1 << 22)], thr)[0].numel() * n / min(n, 1 << 22))
        cap = Payload.max_bytes(Kind.SPARSE, int(nnz * 1.3) + 1024, torch.float32)
        buf = torch.empty(cap, dtype=torch.uint8)
        u, v, g = torch.zeros(n), torch.zeros(n), x.clone()
        for path, (sel, pack) in impls.items():
            k = pack.pack_threshold_(buf, 0, x, thr)[1]
            got[d, "pack", path] = (timeit(lambda: pack.pack_threshold_(buf, 0, x, thr)), k, "read")
            got[d, "select", path] = (timeit(lambda: sel.threshold_select(x, thr)), k, "read")

            def dgc() -> None:
                pack.pack_threshold_(buf, 0, x, sel.sampled_threshold(x, d))
            got[d, "dgc", path] = (timeit(dgc), k, "read")

            def dgc_step() -> None:
                t = sel.dgc_threshold(u, v, g, 0.9, d)
                pack.dgc_update_pack_(buf, 0, u, v, g, 0.9, t, max_nnz=int(nnz * 1.3))
            u.zero_(), v.zero_()
            got[d, "dgc_step", path] = (timeit(dgc_step), k, "read")
        k = max(1, nnz)
        got[d, "topk", "torch"] = (timeit(lambda: torch.topk(x.abs(), k, sorted=False)), k, "read")
        del u, v, g, buf
        bufs = rank_buffers(x, thr, cap)
        out = torch.zeros(n)
        offs = [0] * RANKS
        for path, (_, pack) in impls.items():
            got[d, "unpack8", path] = (timeit(lambda: pack.unpack_scatter_add_(out, bufs, offs, alpha=1 / RANKS)),
                                       RANKS * nnz, "copy")
        del bufs, out
    return ceil, got


def merge(best: Dict, new: Dict) -> None:
    """Keep the smaller time per key (values are seconds or tuples starting with seconds)."""
    for key, val in new.items():
        old = best.get(key)
        sec = val[0] if isinstance(val, tuple) else val
        if old is None or sec < (old[0] if isinstance(old, tuple) else old):
            best[key] = val


def rows_of(n: int, ceil_s: Dict[str, float], timings: Timings) -> Tuple[Dict[str, float], List[Dict]]:
    gb = 4 * n / 1e9
    ceil = {k: gb / v for k, v in ceil_s.items()}
    rows = [{"numel": n, "density": d, "op": op, "path": path, "seconds": sec, "nnz": k, "gbps": gb / sec,
             "ceiling": c, "of_ceiling": gb / sec / ceil[c]} for (d, op, path), (sec, k, c) in timings.items()]
    return ceil, rows


def table(rows: List[Dict], ceilings: Dict[int, Dict[str, float]]) -> str:
    topk = {(r["numel"], r["density"]): r["seconds"] for r in rows if r["op"] == "topk"}
    lines = [f"{'numel':>11} {'density':>7} {'op':>9} {'path':>6} {'ms':>9} {'GB/s':>7} {'of ceil':>12} {'vs topk':>8}"]
    for n, c in ceilings.items():
        lines.append(f"{n:>11,} {'':>7} {'read':>9} {'':>6} {4 * n / 1e6 / c['read']:>9.2f} {c['read']:>7.2f}"
                     f" {'(x.sum)':>12}")
        lines.append(f"{n:>11,} {'':>7} {'copy':>9} {'':>6} {4 * n / 1e6 / c['copy']:>9.2f} {c['copy']:>7.2f}"
                     f" {'(y.copy_)':>12}")
        for r in (r for r in rows if r["numel"] == n):
            speed = topk[(n, r["density"])] / r["seconds"]
            lines.append(f"{n:>11,} {r['density']:>7.3%} {r['op']:>9} {r['path']:>6} {r['seconds'] * 1e3:>9.2f}"
                         f" {r['gbps']:>7.2f} {r['of_ceiling']:>7.0%} {r['ceiling']:>4}"
                         f" {speed:>7.1f}x")
    return "\n".join(lines)


def targets(rows: List[Dict]) -> List[Dict]:
    """The issue's CPU targets, checked on every size at the densities they name."""
    found = []
    topk = {(r["numel"], r["density"]): r["seconds"] for r in rows if r["op"] == "topk"}
    for r in rows:
        if r["path"] != "native":
            continue
        if r["op"] == "pack" and r["density"] == 0.001:
            found.append({"target": "select+pack 0.1% >= 50% of read", "numel": r["numel"],
                          "value": r["of_ceiling"], "ok": r["of_ceiling"] >= 0.5})
            speed = topk[(r["numel"], r["density"])] / r["seconds"]
            found.append({"target": ">= 50x torch.topk (0.1%)", "numel": r["numel"], "value": speed, "ok": speed >= 50})
        if r["op"] == "dgc" and r["density"] == 0.001:
            found.append({"target": "DGC threshold+select 0.1% >= 40% of read", "numel": r["numel"],
                          "value": r["of_ceiling"], "ok": r["of_ceiling"] >= 0.4})
        if r["op"] == "unpack8" and r["density"] == 0.001:
            found.append({"target": "unpack 8 ranks 0.1% >= 50% of copy", "numel": r["numel"],
                          "value": r["of_ceiling"], "ok": r["of_ceiling"] >= 0.5})
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M and 10M floats only (< 2 minutes)")
    ap.add_argument("--sizes", help="comma-separated numels (overrides the defaults)")
    ap.add_argument("--densities", default="0.001,0.01,0.1")
    ap.add_argument("--no-torch", action="store_true", help="skip the pure-torch path rows")
    ap.add_argument("--threads", type=int, help="torch/OpenMP threads (default: torch's default)")
    ap.add_argument("--rounds", type=int, default=1, help="measure everything this many times, keep the best")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes else
             [1_000_000, 10_000_000] if args.quick else [1_000_000, 10_000_000, 50_000_000, 100_000_000])
    densities = [float(d) for d in args.densities.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"commlib.ops backend: {ops.backend()} ({ops.native_status()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows: List[Dict] = []
    ceilings: Dict[int, Dict[str, float]] = {}
    t0 = time.perf_counter()
    best_ceil: Dict[int, Dict[str, float]] = {n: {} for n in sizes}
    best: Dict[int, Timings] = {n: {} for n in sizes}
    for _ in range(args.rounds):  # the best of several rounds: load on this machine comes and goes
        for n in sizes:
            c, t = bench_size(n, densities, not args.no_torch)
            merge(best_ceil[n], c)
            merge(best[n], t)
    for n in sizes:
        ceilings[n], r = rows_of(n, best_ceil[n], best[n])
        rows += r
    text = table(rows, ceilings)
    print(text)
    checks = targets(rows)
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'MISS'}  {c['target']:<42} numel={c['numel']:>11,}  {c['value']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": ops.backend(), "status": ops.native_status(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rounds": args.rounds,
            "seconds": time.perf_counter() - t0}
    out.write_text(json.dumps({"meta": meta, "ceilings_gbps": {str(k): v for k, v in ceilings.items()},
                               "rows": rows, "targets": checks, "table": text}, indent=1))
    print(f"wrote {out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
