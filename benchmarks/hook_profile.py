"""In-process profile of the DDP hook's all-gather path: encode and decode of realistic buckets,
two simulated ranks, no network (the collective is a ``torch.stack`` of the two send buffers).

Each timed piece is the library's own function called as the hook calls it (decode twice: into
the bucket, as with DDP's ``gradient_as_bucket_view=True``, and into the reused output buffer,
as with DDP's default; "clear" is what the hook does while the collective runs), on the MLP of
benchmarks/bandwidth.py (64-w-w-10, w from the parameter count), DGC 99.9%, in DDP's bucket
order (reverse parameter order, 25 MB cap, a tensor above the cap alone). Prints the median
milliseconds per step of each piece (median of ``--repeats`` steps after ``--warmup``).

    python benchmarks/hook_profile.py --models 10M,50M
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bandwidth_worker import width_for  # noqa: E402

from commlib import Scheme, ops  # noqa: E402
from commlib.ddp import packed  # noqa: E402
from commlib.wire import MESSAGE_HEADER_BYTES, Message  # noqa: E402

MODELS = {"10M": 10_000_000, "50M": 50_000_000}


def mlp_shapes(params: int) -> List[Tuple[int, ...]]:
    """Parameter shapes of benchmarks/bandwidth.py's 64-w-w-10 MLP, in module order."""
    w = width_for(params)
    return [(w, 64), (w,), (w, w), (w,), (10, w), (10,)]


def buckets(shapes: Sequence[Tuple[int, ...]], cap_bytes: int = 25 << 20) -> List[List[int]]:
    """DDP-like buckets: parameters in reverse order, a bucket closes when it reaches the cap."""
    out, cur, size = [], [], 0
    for i in reversed(range(len(shapes))):
        n = 4 * torch.Size(shapes[i]).numel()
        if cur and size + n > cap_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


class Timer:
    def __init__(self) -> None:
        self.t: Dict[str, List[float]] = {}

    def run(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.t.setdefault(name, []).append(time.perf_counter() - t0)
        return out


def profile(model: str, steps: int, warmup: int, cfg: dict) -> Dict[str, float]:
    shapes = mlp_shapes(MODELS[model])
    groups = buckets(shapes)
    n = 2
    workers = [Scheme(**cfg).worker(r, n) for r in range(n)]
    server = Scheme(**cfg).server(n)
    gen = torch.Generator().manual_seed(0)
    bufs = [[torch.randn(sum(torch.Size(shapes[i]).numel() for i in g), generator=gen) for g in groups]
            for _ in range(n)]
    outputs = [packed.OutputBuffer() for _ in groups]
    timer = Timer()
    per_step: Dict[str, List[float]] = {}
    for step in range(warmup + steps):
        timer.t.clear()
        for gi, g in enumerate(groups):
            keys = [f"p{i}" for i in g]
            gshapes = [shapes[i] for i in g]
            numels = [torch.Size(s).numel() for s in gshapes]
            sends = []
            for r, wk in enumerate(workers):
                buf = bufs[r][gi]
                buf.normal_(generator=gen)  # a fresh gradient each step, as backward writes it
                grads = list(torch.split(buf, numels))
                cap = (Message.capacity(wk.max_bytes(k, s, buf.dtype) for k, s in zip(keys, gshapes)) + 7) & ~7
                send = torch.empty(cap, dtype=torch.uint8)
                payloads, _ = timer.run("encode", wk.encode_group_into, send, MESSAGE_HEADER_BYTES, keys, grads,
                                        shapes=gshapes)
                timer.run("seal", packed.seal, Message(payloads, sender=r, step=wk.step), send, False)
                sends.append(send)
            rows = torch.stack(sends)
            # DDP's gradient_as_bucket_view=True: the mean is added into the bucket, zeroed in the hook
            # while the collective runs ("clear"), then the callback's decode
            sections = list(torch.split(bufs[0][gi], numels))
            timer.run("clear_bucket", bufs[0][gi].zero_)
            timer.run("decode_into_bucket", packed.gathered_mean, rows, sections, step=workers[0].step,
                      increments=False, checksum=False, max_abs=None, reject=lambda r: None,
                      clear=packed.already_clear)
            # DDP's default: into the reused output buffer, reset where it was written last
            out = outputs[gi]
            t0 = time.perf_counter()
            out.take(numels, rows.device)
            for j in range(len(numels)):
                out.clear(j)
            t1 = time.perf_counter()
            touched = packed.gathered_mean(rows, out.sections, step=workers[0].step, increments=False,
                                           checksum=False, max_abs=None, reject=lambda r: None,
                                           clear=packed.already_clear)
            dirs = server.finish(keys, out.sections, [len(s) <= 1 for s in gshapes])
            out.done([t if d.data_ptr() == o.data_ptr() else None for t, d, o in zip(touched, dirs, out.sections)])
            timer.t.setdefault("clear_output", []).append(t1 - t0)
            timer.t.setdefault("decode_into_output", []).append(time.perf_counter() - t1)
        for wk in workers:
            wk.end_step()
        server.end_step()
        if step >= warmup:
            for k, v in timer.t.items():
                per_step.setdefault(k, []).append(sum(v) / (n if k in ("encode", "seal") else 1))
    return {k: 1000 * statistics.median(v) for k, v in per_step.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="10M,50M")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(compressor="dgc", ratio=0.001, feedback="dgc")
    print(f"ops backend: {ops.native_status()}, torch threads {args.threads}")
    for m in args.models.split(","):
        res = profile(m, args.steps, args.warmup, cfg)
        print(m, "  ".join(f"{k} {v:.2f} ms" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
