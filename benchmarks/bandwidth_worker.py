"""One rank of the bandwidth benchmark: run under torchrun (gloo), train a plan of
(model size, scheme) runs one after the other in the same process group, and write what each
step cost.

    torchrun --nnodes=2 --node_rank=I --nproc_per_node=1 --master_addr=ADDR --master_port=PORT \\
        benchmarks/bandwidth_worker.py --plan plan.json --out result.json --ifname cl0

benchmarks/bandwidth.py builds the plan and starts one such node in each network namespace;
the worker also runs on one machine without namespaces (``torchrun --standalone``, ``--ifname lo``).

Task: scikit-learn's digits (shipped, 1437 train / 360 test images), a 64-w-w-10 ReLU MLP whose
width w sets the parameter count, per-rank batch 32, each rank a different shard every step.

Per step it records the wall time (zero_grad .. optimizer step: DDP waits for every bucket's
communication inside backward), the CPU time of the training thread (which also runs the hook;
much below the wall time when the machine is loaded or the link is slow), the bytes this rank's
network interface sent during the step
(``/sys/class/net/IF/statistics/tx_bytes``: headers and gloo's control traffic included), and the
bytes it handed to collectives (commlib.local.traffic.TrafficCounter). For commlib schemes it
also splits the hook's time into encode (feedback + selection + packing, on the training thread),
collective (issued .. done) and decode (validation + unpack + server half).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commlib
from commlib import ops
from commlib.local import data as datasets
from commlib.local.models import MLP, accuracy, num_params
from commlib.local.traffic import TrafficCounter

#: name -> how the run communicates. "scheme": a commlib Scheme config; "baseline": a torch hook.
#: "momentum": "worker" = DGC's momentum correction on the worker (the optimizer gets none), a number =
#: the optimizer's momentum for this scheme (EF21 and EControl: plain SGD, as analysed in their
#: papers; with momentum 0.9 at 0.1% density both oscillate on this task), absent = the run's momentum.
SCHEMES: Dict[str, Dict[str, Any]] = {
    "allreduce": {"baseline": "allreduce", "label": "all-reduce (DDP default)"},
    # timing only: DDP with a hook that communicates nothing (each rank keeps its own gradient), so
    # its step is compute plus DDP's own per-bucket work (copies in and out of the buckets, the hook
    # call): the floor under any hook's step with the same DDP settings
    "ddp-floor": {"baseline": "noop", "label": "DDP floor (hook without communication)", "timing_only": True},
    "commlib-identity": {"scheme": {"compressor": "identity"}, "label": "commlib hook, no compression"},
    "torch-fp16": {"baseline": "fp16", "label": "torch fp16 hook"},
    "torch-powersgd-1": {"baseline": "powersgd", "rank": 1, "label": "torch PowerSGD rank 1"},
    "torch-powersgd-4": {"baseline": "powersgd", "rank": 4, "label": "torch PowerSGD rank 4"},
    "dgc": {"scheme": {"compressor": "dgc", "ratio": 0.001, "feedback": "dgc"}, "momentum": "worker",
            "label": "commlib DGC 99.9% (native ops)"},
    "dgc-torch": {"scheme": {"compressor": "dgc", "ratio": 0.001, "feedback": "dgc"}, "momentum": "worker",
                  "label": "commlib DGC 99.9% (pure torch)", "env": {"COMMLIB_NATIVE": "0"}, "same_as": "dgc"},
    # the reference code's threshold sample (single entries with a stride) instead of commlib's
    # blocks of 16 entries: what the block sample saves in the hook's encode
    "dgc-strided": {"scheme": {"compressor": "dgc", "ratio": 0.001, "feedback": "dgc",
                               "compressor_options": {"sample_block": 1}}, "momentum": "worker",
                    "label": "commlib DGC 99.9%, single-entry threshold sample"},
    "dgc-ef21": {"scheme": {"compressor": "dgc", "ratio": 0.001, "feedback": "ef21"}, "momentum": 0.0,
                 "label": "commlib DGC 99.9% + EF21"},
    "econtrol": {"scheme": {"compressor": "dgc", "ratio": 0.001, "feedback": "econtrol",
                            "feedback_options": {"eta": 0.1}}, "momentum": 0.0,
                 "label": "commlib DGC 99.9% + EControl"},
}


def width_for(params: int, d_in: int = 64, classes: int = 10) -> int:
    """Width w of the 2-hidden-layer MLP with about ``params`` parameters: w^2 + (d_in + classes + 2) w + classes."""
    b = d_in + classes + 2
    return max(1, round((-b + (b * b + 4 * (params - classes)) ** 0.5) / 2))


class TxBytes:
    """Bytes sent by one network interface of this namespace (0 when it cannot be read)."""

    def __init__(self, ifname: Optional[str]) -> None:
        self.path = f"/sys/class/net/{ifname}/statistics/tx_bytes" if ifname else None
        if self.path and not os.path.exists(self.path):
            self.path = None

    def read(self) -> int:
        if self.path is None:
            return 0
        with open(self.path) as f:
            return int(f.read())


class HookProbe:
    """Times commlib's hook: encode (its synchronous part), collective (issue .. done) and
    decode (done .. bucket result ready). Wraps the public dist collectives the hook calls."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        self.t: Dict[str, float] = defaultdict(float)
        self._done: List[float] = []
        self._orig: Dict[str, Callable] = {}

    def install(self) -> None:
        probe = self
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn

            def wrapped(*args, _fn=fn, **kwargs):
                issued = time.perf_counter()
                work = _fn(*args, **kwargs)
                if kwargs.get("async_op") and work is not None:
                    def done(f, issued=issued):
                        now = time.perf_counter()
                        probe.t["collective"] += now - issued
                        probe._done.append(now)
                        return None
                    work.get_future().then(done)
                return work

            setattr(dist, name, wrapped)

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)
        self._orig.clear()

    def hook(self, state, bucket):
        t0 = time.perf_counter()
        fut = commlib.ddp.hook(state, bucket)
        self.t["encode"] += time.perf_counter() - t0
        probe = self

        def ready(f):
            now = time.perf_counter()
            if probe._done:
                probe.t["decode"] += now - probe._done.pop(0)
            return f.value()

        return fut.then(ready)

    def take(self) -> Dict[str, float]:
        out = dict(self.t)
        self.t.clear()
        self._done.clear()
        return out


def _install(spec: Dict[str, Any], ddp: DDP, opt: torch.optim.Optimizer, seed: int,
             probe: Optional[HookProbe]):
    """Register the run's communication hook; return commlib's HookState or None."""
    if "scheme" in spec:
        scheme = commlib.Scheme(**spec["scheme"])
        commlib.ddp.check_optimizer(scheme, opt)
        if probe is None:
            return commlib.ddp.register(ddp, scheme, optimizer=opt)
        state = commlib.ddp.HookState(scheme, model=ddp.module)
        ddp.register_comm_hook(state, probe.hook)
        return state
    kind = spec["baseline"]
    if kind == "allreduce":
        return None
    if kind == "noop":
        ddp.register_comm_hook(None, _no_communication)
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if kind == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "powersgd":
        st = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=spec["rank"],
                                         start_powerSGD_iter=2, random_seed=seed)
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return None


def _no_communication(_, bucket):  # no return annotation: DDP checks it, and this module's are strings
    """A DDP comm hook that returns the bucket as it is (the "ddp-floor" timing baseline)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


class LinkControl:
    """Asks benchmarks/bandwidth.py (outside the namespaces) to change the emulated link's rate,
    through files in a directory both can see: rank 0 writes ``req-N`` (the rate, or "none") and
    waits for ``ack-N``; then every rank meets at a barrier. Without a directory (a run on one
    machine) nothing is shaped and requests are only recorded."""

    def __init__(self, directory: Optional[str], rank: int, timeout_s: float = 120.0) -> None:
        self.dir = directory
        self.rank = rank
        self.timeout_s = timeout_s
        self.seq = 0
        self.current = "none"  # the driver starts every job on an unshaped link

    def ensure(self, rate: Optional[str]) -> None:
        rate = rate or "none"
        if rate == self.current:
            return
        self.seq += 1
        if self.dir and self.rank == 0:
            tmp = os.path.join(self.dir, f".req-{self.seq:04d}")
            with open(tmp, "w") as f:
                f.write(rate)
            os.replace(tmp, os.path.join(self.dir, f"req-{self.seq:04d}"))
            ack = os.path.join(self.dir, f"ack-{self.seq:04d}")
            deadline = time.monotonic() + self.timeout_s
            while not os.path.exists(ack):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the driver did not apply rate {rate!r} within {self.timeout_s:.0f} s")
                time.sleep(0.02)
        dist.barrier()
        self.current = rate

    @property
    def applied(self) -> bool:
        return self.dir is not None


def _agree(flag: bool) -> bool:
    """Rank 0's decision, the same on every rank (a one-int broadcast outside the timed region)."""
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


class _LocalCompute:
    """A local copy of the model (no DDP, no communication) and its timed fwd+bwd+SGD step."""

    def __init__(self, model: nn.Module, lossf: nn.Module) -> None:
        rng = torch.get_rng_state()  # MLP() seeds torch's generator: leave the run's stream as it was
        self.model = MLP(model.net[0].in_features, model.net[0].out_features, 10, 2, seed=1)
        torch.set_rng_state(rng)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.0)
        self.lossf = lossf

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=False)
        self.lossf(self.model(x), y).backward()
        self.opt.step()
        return time.perf_counter() - t0


def compute_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median forward + backward + SGD step time of a local copy of the model (no communication)."""
    local = _LocalCompute(model, nn.CrossEntropyLoss())
    times = [local.step(x, y) for _ in range(steps)]
    return statistics.median(times[1:] or times)


def run_one(run: Dict[str, Any], rank: int, world: int, data, tx: TxBytes, link: LinkControl) -> Dict[str, Any]:
    """Train one (model, scheme) run; every rank returns its own record.

    Run keys: scheme, width, bucket_view (DDP's gradient_as_bucket_view), steps (at most), warmup (steps
    left out of the statistics, run at ``warmup_rate``), rate (the link during measured steps), lr,
    momentum, batch, eval_every and target (test accuracy every k steps, time to reach ``target``), max_s
    and min_steps (stop the measured phase once it took max_s seconds and has min_steps steps),
    compute_steps, seed.
    """
    spec = SCHEMES[run["scheme"]]
    for k, v in spec.get("env", {}).items():
        if os.environ.get(k) != v:
            raise RuntimeError(f"scheme {run['scheme']!r} must run in a job started with {k}={v}")
    run = dict(run, momentum=spec["momentum"]) if isinstance(spec.get("momentum"), float) else run
    xtr, ytr, xte, yte = data
    seed = int(run.get("seed", 0))
    width = int(run["width"])
    # DDP broadcasts the model from rank 0 when it is built: do that on the warm-up link, not on
    # whatever slow link the previous run left (200 MB at 10 Mbit/s would take minutes)
    link.ensure(run.get("warmup_rate", run.get("rate")))
    model = MLP(xtr.shape[1], width, 10, 2, seed=seed)
    dense_bytes = 4 * num_params(model)
    cap = float(run.get("bucket_cap_mb", 25.0))
    if spec.get("baseline") == "powersgd":
        cap = max(cap, dense_bytes / 2**20 + 1)  # one bucket: torch's PowerSGD hook hangs on gloo otherwise
    ddp = DDP(model, bucket_cap_mb=cap, gradient_as_bucket_view=bool(run.get("bucket_view", False)))
    worker_momentum = spec.get("momentum") == "worker"
    if worker_momentum:
        spec = dict(spec, scheme=dict(spec["scheme"], feedback_options={"momentum": run["momentum"]}))
    opt = torch.optim.SGD(ddp.parameters(), lr=run["lr"], momentum=0.0 if worker_momentum else run["momentum"])
    probe = HookProbe() if "scheme" in spec and run.get("profile", True) else None
    state = _install(spec, ddp, opt, seed, probe)
    lossf = nn.CrossEntropyLoss()
    batch = int(run.get("batch", 32))
    steps, warmup, every = int(run["steps"]), int(run.get("warmup", 3)), int(run.get("eval_every", 0))
    max_s, min_steps = run.get("max_s"), int(run.get("min_steps", 2))
    target = run.get("target")
    per_rank = xtr.shape[0] // world
    per_epoch = max(1, per_rank // batch)
    counter = TrafficCounter(world)
    rec: Dict[str, Any] = {"scheme": run["scheme"], "label": spec["label"], "model": run.get("model"),
                           "params": num_params(model), "width": width, "warmup": warmup,
                           "rate": run.get("rate") or "none",
                           "warmup_rate": run.get("warmup_rate", run.get("rate")) or "none",
                           "rate_applied": link.applied, "lr": run["lr"],
                           "momentum": 0.0 if worker_momentum else run["momentum"],
                           "worker_momentum": run["momentum"] if worker_momentum else None,
                           "ops_backend": ops.backend() if "scheme" in spec else None}
    times: List[float] = []
    cpu: List[float] = []
    # paired compute: after every measured step, one fwd+bwd+opt step of a local copy (no DDP) on
    # the same batch, so each step has a compute time taken seconds apart from it, not minutes
    local = _LocalCompute(model, lossf) if run.get("paired_compute") else None
    paired: List[float] = []
    tx_steps: List[int] = []
    payload_steps: List[float] = []
    ring_steps: List[float] = []
    parts: Dict[str, float] = defaultdict(float)
    evals: List[Dict[str, float]] = []
    reached: Optional[Dict[str, float]] = None
    train_time = 0.0
    dist.barrier()
    if probe is not None:
        probe.install()
    counter.install()
    done = 0
    try:
        for step in range(steps):
            if step == warmup:
                link.ensure(run.get("rate"))
            if max_s is not None and step > warmup and _agree(len(times) >= min_steps and sum(times) >= max_s):
                break
            epoch, s = divmod(step, per_epoch)
            if s == 0:
                idx = datasets.shard(xtr.shape[0], rank, world, epoch, seed)
            b = idx[s * batch:(s + 1) * batch]
            p0, w0, tx0 = counter.payload_bytes, counter.wire_bytes, tx.read()
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.zero_grad(set_to_none=False)
            loss = lossf(ddp(xtr[b]), ytr[b])
            loss.backward()
            if spec.get("baseline") == "allreduce":
                counter.count_plain_allreduce(dense_bytes)  # DDP's C++ all-reduce bypasses the counter
            opt.step()
            dt = time.perf_counter() - t0
            dc = time.thread_time() - c0
            tx1 = tx.read()
            train_time += dt
            done = step + 1
            got = probe.take() if probe is not None else {}
            if step >= warmup:
                times.append(dt)
                cpu.append(dc)
                if local is not None:
                    paired.append(local.step(xtr[b], ytr[b]))
                tx_steps.append(tx1 - tx0)
                payload_steps.append(counter.payload_bytes - p0)
                ring_steps.append(counter.wire_bytes - w0)
                for k, v in got.items():
                    parts[k] += v
            if every and ((step + 1) % every == 0 or step + 1 == steps):  # not timed
                acc = accuracy(model, xte, yte)
                evals.append({"step": step + 1, "train_s": train_time, "test_acc": acc, "loss": loss.item()})
                if target is not None and reached is None and acc >= target:
                    reached = {"step": step + 1, "train_s": train_time}
    finally:
        counter.uninstall()
        if probe is not None:
            probe.uninstall()
    n = max(1, len(times))
    rec.update({
        "steps": done, "step_s": times, "median_step_s": _median(times), "mean_step_s": sum(times) / n,
        "median_cpu_step_s": _median(cpu),
        "tx_bytes_per_step": sum(tx_steps) / n, "payload_bytes_per_step": sum(payload_steps) / n,
        "ring_wire_bytes_per_step": sum(ring_steps) / n, "dense_bytes": dense_bytes,
        "breakdown_s_per_step": {k: v / n for k, v in parts.items()} if parts else None,
        "paired_compute_step_s": paired or None,
        "evals": evals, "final_test_acc": evals[-1]["test_acc"] if evals else None,
        "target_acc": target, "reached": reached, "train_s": train_time,
        "hook_stats": state.stats.as_dict() if state is not None else None,
    })
    if run.get("compute_steps"):
        rec["compute_step_s"] = compute_time(model, xtr[:batch], ytr[:batch], int(run["compute_steps"]))
    del ddp, opt, state
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="JSON list of runs (see benchmarks/bandwidth.py)")
    ap.add_argument("--out", required=True, help="rank 0 writes the records here (JSON)")
    ap.add_argument("--ifname", default=os.environ.get("GLOO_SOCKET_IFNAME"),
                    help="interface whose tx_bytes count the traffic (default: $GLOO_SOCKET_IFNAME)")
    ap.add_argument("--control", default=None,
                    help="directory for link-rate requests to benchmarks/bandwidth.py (absent: no shaping)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.plan) as f:
        plan = json.load(f)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = datasets.digits(seed=0)
    tx = TxBytes(args.ifname)
    link = LinkControl(args.control, rank)
    records = []
    try:
        for run in plan:
            if rank == 0:
                print(f"[bandwidth_worker] {run.get('rate') or 'unshaped'} {run.get('model')} {run['scheme']} ...",
                      flush=True)
            rec = run_one(run, rank, world, data, tx, link)
            records.append(rec)
            if rank == 0:
                print(f"[bandwidth_worker] {rec['rate']:>8} {rec['model']:>4} {rec['scheme']:<18} median step "
                      f"{1000 * rec['median_step_s']:9.1f} ms  tx/step {rec['tx_bytes_per_step'] / 1e3:10.1f} kB"
                      + (f"  acc {rec['final_test_acc']:.3f}" if rec["final_test_acc"] is not None else ""),
                      flush=True)
                with open(args.out, "w") as f:  # rewritten after every run: a later failure keeps the rest
                    json.dump({"world": world, "ops_backend": ops.backend(), "native_status": ops.native_status(),
                               "records": records}, f, indent=1)
        link.ensure(None)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Results are written. gloo's C++ destructors at interpreter exit can abort a finished rank
    # ("terminate called without an active exception") when a transport thread is still parked:
    # flush and leave without running them (as python -m commlib.ps does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
