"""GPU check of commlib's native CUDA path (run by scripts/gpu_check.sh after the build).

1. kernels: every native op on CUDA tensors against the same op on the CPU (bit for bit: the
   CUDA kernels are built with --fmad=false, the CPU ones with -ffp-contract=off);
2. hook: a DDP model on the GPU(s) with commlib's hook over NCCL (one process per GPU; a world of
   1 is still a real NCCL process group), DGC 99.9% with checksums; every step's hook output on
   CUDA is compared with the same hook run on the CPU copy of the same gradients (gloo), and the
   training must lower the loss;
3. sparse pack: pack_threshold_ / the fused DGC step / unpack of 8 ranks on CUDA against the
   device's copy bandwidth (y.copy_(x)) and torch.topk, timed with CUDA events.
Prints one summary line per check and exits non-zero when a check fails.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commlib import ops  # noqa: E402
from commlib.ops import native  # noqa: E402
from commlib.wire import Kind, Payload  # noqa: E402

RESULTS: Dict[str, Dict] = {}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        b = b.cpu()
        a = a.cpu()
        if a.dtype.is_floating_point:
            return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                      b.view(torch.uint8) if b.numel() else b)
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_kernels() -> bool:
    """Each op on CUDA == the same op on the CPU, bit for bit, at several sizes and densities."""
    fails: List[str] = []
    count = 0
    for n in (7, 1000, 1 << 20, 10_000_000):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=gen)
        for ratio in (0.001, 0.01):
            thr_c = ops.sampled_threshold(x, ratio)
            cases: Dict[str, Callable[[torch.device], object]] = {}

            cases["sampled_threshold"] = lambda d: ops.sampled_threshold(x.to(d), ratio)
            # the sample's layouts: single entries, blocks of 4, and a strided 1-D view
            cases["sampled_threshold block 1"] = lambda d: ops.sampled_threshold(x.to(d), ratio, block=1, offset=3)
            cases["sampled_threshold block 4"] = lambda d: ops.sampled_threshold(x.to(d), ratio, block=4, offset=5)
            cases["sampled_threshold view"] = lambda d: ops.sampled_threshold(x.to(d)[::3], ratio, offset=7)
            cases["threshold_select"] = lambda d: ops.threshold_select(x.to(d), thr_c)
            cap = Payload.max_bytes(Kind.SPARSE, n, torch.float32)

            def pack(d):
                buf = torch.zeros(cap, dtype=torch.uint8, device=d)
                end, nnz = ops.pack_threshold_(buf, 8, x.to(d), thr_c, max_nnz=int(ratio * n) + 1, slot=3, scale=0.5)
                return end, nnz, buf[:end]
            cases["pack_threshold_"] = pack

            def dgc_state(d):
                g2 = torch.Generator().manual_seed(n + 1)
                return (torch.randn(n, generator=g2).to(d), torch.randn(n, generator=g2).to(d), x.to(d))

            def dgc_thr(d):
                u, v, g = dgc_state(d)
                return ops.dgc_threshold(u, v, g, 0.9, ratio, nesterov=True)
            cases["dgc_threshold"] = dgc_thr

            def dgc_thr_single(d):
                u, v, g = dgc_state(d)
                return ops.dgc_threshold(u, v, g, 0.9, ratio, block=1, offset=11)
            cases["dgc_threshold block 1"] = dgc_thr_single

            def dgc_select(d):
                u, v, g = dgc_state(d)
                idx, vals = ops.dgc_update_select_(u, v, g, 0.9, thr_c, max_nnz=int(ratio * n))
                return idx, vals, u, v

            cases["dgc_update_select_"] = dgc_select

            def dgc_pack(d):
                u, v, g = dgc_state(d)
                buf = torch.zeros(cap, dtype=torch.uint8, device=d)
                end, nnz = ops.dgc_update_pack_(buf, 0, u, v, g, 0.9, thr_c, max_nnz=int(ratio * n))
                return end, nnz, buf[:end], u, v

            cases["dgc_update_pack_"] = dgc_pack

            def unpack(d):
                ranks = 4
                row = (Payload.max_bytes(Kind.SPARSE, n, torch.float32) + 7) & ~7
                bufs = torch.zeros(ranks, row, dtype=torch.uint8)
                for r in range(ranks):
                    ops.pack_threshold_(bufs[r], 0, torch.roll(x, 7919 * r), thr_c)
                out = torch.zeros(n, device=d)
                res = ops.unpack_scatter_add_(out, bufs.to(d), [0, 0, -1, 0], alpha=0.25)
                return out, res.ends, res.nnz

            cases["unpack_scatter_add_"] = unpack

            def scatter(d):
                idx, vals = ops.threshold_select(x, thr_c)
                out = torch.ones(n, device=d)
                ops.scatter_add_(out, idx.to(d), vals.to(d), 0.5)
                return out

            cases["scatter_add_"] = scatter
            for name, fn in cases.items():
                count += 1
                try:
                    a, b = fn(torch.device("cuda")), fn(torch.device("cpu"))
                    if not _same(a, b):
                        fails.append(f"{name} n={n} ratio={ratio}")
                except Exception as exc:  # report, keep checking the others
                    fails.append(f"{name} n={n} ratio={ratio}: {type(exc).__name__}: {exc}")
    RESULTS["kernels"] = {"cases": count, "failed": fails}
    return not fails


# ---- the hook over NCCL ------------------------------------------------------------------------
def _hook_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commlib
    from commlib.ddp.hooks import run_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(dev)
    ddp = DDP(model, device_ids=[rank])
    scheme = dict(compressor="dgc", ratio=0.001, feedback="dgc", checksum=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = commlib.ddp.register(ddp, commlib.Scheme(**scheme), optimizer=opt)
    # two more hook states fed the same gradients, one on CUDA (NCCL), one on the CPU (gloo):
    # their outputs must be equal bit for bit
    cuda_state = commlib.ddp.HookState(commlib.Scheme(**scheme))
    cpu_state = commlib.ddp.HookState(commlib.Scheme(**scheme))
    cpu_params = [p.detach().cpu().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(512, 256, generator=gen).to(dev)
    y = torch.randint(0, 10, (512,), generator=gen).to(dev)
    lossf = nn.CrossEntropyLoss()
    losses, mismatches = [], 0
    for step in range(30):
        opt.zero_grad()
        loss = lossf(ddp(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        g_cuda = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen) * 0.01
        a = run_group(cuda_state, "check", g_cuda.clone().to(dev), list(model.parameters()), True).wait()
        b = run_group(cpu_state, "check", g_cuda.clone(), cpu_params, True).wait()
        mismatches += int(not torch.equal(a.cpu(), b))
    res = {"world": world, "loss_first": losses[0], "loss_last": losses[-1], "hook_mismatches": mismatches,
           "rejected": dict(state.rejected_by_rank), "compression": state.stats.compression,
           "backend": dist.get_backend(), "ops": ops.native_status()}
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def check_hook() -> bool:
    world = torch.cuda.device_count()
    out = str(ROOT / ".tmp" / "gpu_check_hook.json")
    Path(out).parent.mkdir(exist_ok=True)
    port = 29600 + os.getpid() % 1000
    mp.spawn(_hook_rank, args=(world, port, out), nprocs=world, join=True)
    res = json.loads(Path(out).read_text())
    ok = res["hook_mismatches"] == 0 and not res["rejected"] and res["loss_last"] < res["loss_first"]
    RESULTS["hook"] = res
    return ok


# ---- sparse pack on the device -------------------------------------------------------------------
def _cuda_time(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best


def check_pack_speed() -> bool:
    rows = []
    for n in (10_000_000, 100_000_000):
        x = torch.randn(n, device="cuda")
        y = torch.empty_like(x)
        copy = _cuda_time(lambda: y.copy_(x))
        read = _cuda_time(lambda: x.sum())
        for d in (0.001, 0.01):
            thr = ops.sampled_threshold(x, d)
            k = int(d * n)
            buf = torch.empty(Payload.max_bytes(Kind.SPARSE, 2 * k + 1024, torch.float32), dtype=torch.uint8,
                              device="cuda")
            u, v = torch.zeros_like(x), torch.zeros_like(x)
            t_pack = _cuda_time(lambda: ops.pack_threshold_(buf, 0, x, thr))
            t_dgc = _cuda_time(lambda: ops.dgc_update_pack_(buf, 0, u, v, x, 0.9, ops.dgc_threshold(u, v, x, 0.9, d),
                                                            max_nnz=2 * k))
            row = (Payload.max_bytes(Kind.SPARSE, 2 * k + 1024, torch.float32) + 7) & ~7
            bufs = torch.zeros(8, row, dtype=torch.uint8, device="cuda")
            for r in range(8):
                ops.pack_threshold_(bufs[r], 0, torch.roll(x, 7919 * r), thr)
            out = torch.zeros_like(x)
            t_unpack = _cuda_time(lambda: ops.unpack_scatter_add_(out, bufs, [0] * 8))
            t_topk = _cuda_time(lambda: torch.topk(x.abs(), k, sorted=False), reps=5)
            gb = 4 * n / 1e9
            rows.append({"numel": n, "density": d, "copy_GBps": gb / copy, "read_GBps": gb / read,
                         "pack_GBps": gb / t_pack, "pack_of_read": read / t_pack,
                         "dgc_step_ms": 1e3 * t_dgc, "unpack8_of_copy": copy / t_unpack,
                         "pack_vs_topk": t_topk / t_pack})
    RESULTS["sparse_pack"] = {"rows": rows, "device": torch.cuda.get_device_name()}
    return True


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if native.LIB is None or not native.LIB.has_cuda():
        print(f"gpu_check: the native extension has no CUDA path ({ops.native_status()})", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    status = {}
    for name, fn in (("kernels", check_kernels), ("hook", check_hook), ("sparse_pack", check_pack_speed)):
        t = time.monotonic()
        try:
            status[name] = fn()
        except Exception as exc:
            status[name] = False
            RESULTS.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
        RESULTS.setdefault(name, {})["seconds"] = time.monotonic() - t
    print(json.dumps(RESULTS, indent=1))
    print(f"\n== gpu_check summary ({torch.cuda.get_device_name()}, {ops.native_status()}, "
          f"{time.monotonic() - t0:.0f} s) ==")
    k = RESULTS["kernels"]
    print(f"kernels CUDA == CPU: {'PASS' if status['kernels'] else 'FAIL'} ({k.get('cases')} cases; "
          f"failed: {k.get('failed') or k.get('error') or 'none'})")
    h = RESULTS["hook"]
    print(f"hook over NCCL: {'PASS' if status['hook'] else 'FAIL'} ({h})")
    for r in RESULTS["sparse_pack"].get("rows", []):
        print(f"sparse pack n={r['numel']:,} d={r['density']:.1%}: pack {r['pack_GBps']:.0f} GB/s "
              f"({r['pack_of_read']:.0%} of read, copy {r['copy_GBps']:.0f} GB/s), {r['pack_vs_topk']:.0f}x topk, "
              f"DGC step {r['dgc_step_ms']:.2f} ms, unpack 8 ranks {r['unpack8_of_copy']:.0%} of copy")
    if "error" in RESULTS["sparse_pack"]:
        print(f"sparse pack: FAIL ({RESULTS['sparse_pack']['error']})")
    return 0 if all(status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
