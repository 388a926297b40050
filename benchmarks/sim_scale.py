"""Simulation at scale: ``commlib simulate`` with hundreds to 1,000 virtual workers, start to
finish (Ray start, actors, workers, training, shutdown), plus a profile of where the time goes.

Runs (each its own ``commlib simulate`` process, timed from outside):

* ``256``: 256 workers, 8 ALIE attackers, 2 crashes (one restarts), bursty stragglers
  (B=2, W=4, lambda=8, 1 s real sleep), trimmed mean with f=16, quorum 240, 30 steps.
* ``1000``: the same faults with 1,000 workers (quorum 980), 20 steps.
* ``64``: a quick check (``--quick``): 64 workers, 2 attackers, 1 crash, 10 steps.

The sweep (``--sweep``) runs 16, 64, 256 and 1,000 workers without faults on one Ray session:
round time, pushes applied per second and MB/s applied, mean and trimmed mean (f = n/16),
plotted to ``benchmarks/results/sim_scale_sweep.png``.

The profile (``--profile``) times the pieces one process pays for, in-process: building one
logical worker (model, scheme state), one worker step (validate PARAMS, load, gradient,
encode, frame), the server's validation of one push, trimmed mean over an (n, d) stack, and,
on a local Ray, one actor call per frame against one bundled call for n frames; and the same
in-process run of n workers with a thread per worker against 2 groups of virtual workers.

    .venv/bin/python benchmarks/sim_scale.py                    # 256 and 1000, then the profile
    .venv/bin/python benchmarks/sim_scale.py --quick            # 64 workers, small profile
    .venv/bin/python benchmarks/sim_scale.py --runs 256 --address auto   # on a Ray cluster
    .venv/bin/python benchmarks/sim_scale.py --runs --no-profile --sweep  # round time vs workers, plot

Prints a table per part and writes ``benchmarks/results/sim_scale.json`` (``sim_scale_quick.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (workers, steps, quorum, attackers, crashes as W@STEP[+S], bursty B,W,LAMBDA:DELAY, f)
RUNS = {
    "64": (64, 10, 58, 2, ["5@3+1"], "1,3,2:0.5", 4),
    "256": (256, 30, 240, 8, ["10@5+2", "100@12"], "2,4,8:1", 16),
    "1000": (1000, 20, 980, 8, ["10@5+2", "500@8"], "2,4,8:1", 16),
}


def simulate_argv(name: str, out: Path, args: argparse.Namespace) -> List[str]:
    """The ``commlib simulate`` command line of run ``name``."""
    n, steps, quorum, attackers, crashes, bursty, f = RUNS[name]
    argv = [sys.executable, "-m", "commlib.cli", "simulate", "--workers", str(n), "--steps", str(steps),
            "--quorum", str(quorum), "--step-timeout", str(args.step_timeout), "--aggregator", "trimmed-mean",
            "--f", str(f), "--bursty", bursty, "--eval-every", str(steps), "--lr", "0.1",
            "--out", str(out), "--no-progress", "--no-plot", "--backend", args.backend]
    for w in range(n - attackers, n):
        argv += ["--attack", f"{w}:alie"]
    for c in crashes:
        argv += ["--crash", c]
    if args.processes:
        argv += ["--processes", str(args.processes)]
    if args.address:
        argv += ["--address", args.address]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    return argv


def run_one(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    out = ROOT / ".tmp" / "sim_scale" / name
    argv = simulate_argv(name, out, args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    print("$ " + " ".join(argv[1:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - t0
    row: Dict[str, Any] = {"run": name, "workers": RUNS[name][0], "steps_wanted": RUNS[name][1],
                           "wall_s": round(wall, 1), "rc": proc.returncode,
                           "command": "commlib simulate " + " ".join(argv[4:])}
    try:
        res = json.loads((out / "sim.json").read_text())
    except (OSError, ValueError):
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
        return row
    hist = res.get("history") or []
    groups = res.get("groups") or []
    timings = res.get("timings") or {}
    per_step = (hist[-1]["time"] - hist[0]["time"]) / (len(hist) - 1) if len(hist) > 1 else float("nan")
    row.update(status=res["status"], steps=res["steps"], processes=len(groups),
               to_first_step_s=round(timings.get("to_first_step_s", float("nan")), 1),
               per_step_s=round(per_step, 3), applied=res["totals"]["applied"],
               timeouts=res["totals"]["timeouts"], rejected=res["totals"]["rejected"],
               crashes=sum(int(v) for v in res["crashes"].values()), resyncs=res["resyncs"],
               test_acc=round(res["evals"][-1]["accuracy"], 3) if res.get("evals") else None,
               driver_peak_rss_mb=timings.get("driver_peak_rss_mb"),
               group_peak_rss_mb=[g.get("peak_rss_mb") for g in groups],
               peak_rss_sum_mb=round((timings.get("driver_peak_rss_mb") or 0)
                                     + sum(g.get("peak_rss_mb") or 0 for g in groups), 1))
    return row


def _timeit(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def profile(ns: List[int], quick: bool, with_ray: bool) -> List[Dict[str, Any]]:
    """Seconds per piece of work (see the module docstring)."""
    import torch

    from commlib.aggregate import AGGREGATORS
    from commlib.comm.inproc import InprocHub
    from commlib.ps import PSConfig, build_task
    from commlib.ps.protocol import Frame, FrameKind
    from commlib.ps.protocol import SERVER_SENDER
    from commlib.ps.worker_group import VirtualPSWorker
    from commlib.scheme import Scheme
    from commlib.wire import Message, Payload

    torch.set_num_threads(1)
    task = build_task({"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0})
    hub = InprocHub(3)
    rows: List[Dict[str, Any]] = []
    reps = 20 if quick else 100

    def make():
        return VirtualPSWorker(hub.endpoint(1), Scheme(), task, PSConfig())

    worker = make()
    d = sum(worker.numels)
    rows.append({"piece": "build one logical worker (model + scheme state)", "n": 1, "d": d,
                 "seconds": _timeit(make, reps)})
    body = Message([Payload.dense(p.detach().reshape(-1).clone(), slot=j) for j, p in enumerate(worker.params)],
                   sender=SERVER_SENDER, step=0).to_bytes()
    server_end = hub.endpoint(0)

    def worker_step():
        frame = Frame(FrameKind.PARAMS, 0, step=0, seq=worker.seq, aux=worker.seq, session=worker.session,
                      body=body)
        got = Frame.from_bytes(frame.to_bytes())
        step = worker.accept(got)
        worker.compute(got, step)
        return server_end.recv(0)

    rows.append({"piece": "worker step: PARAMS check + load, gradient, encode, PUSH frame", "n": 1, "d": d,
                 "seconds": _timeit(worker_step, reps)})
    push = worker_step()[1]

    def server_check():
        Frame.from_bytes(push).message(worker.numels, sender=0)

    rows.append({"piece": "server: validate one PUSH (header, CRC, payload checks)", "n": 1, "d": d,
                 "seconds": _timeit(server_check, reps)})
    from commlib.sim.hooks import FaultHooks

    for n in ns:  # an omniscient ALIE attack with 8 attackers: n - 8 honest gradients, once per step
        attacker = VirtualPSWorker(InprocHub(n + 1).endpoint(n), Scheme(), task, PSConfig())
        hooks = FaultHooks(worker=n - 1, attack="alie", byzantine_ids=list(range(n - 8, n)))
        steps = iter(range(10 ** 6))  # a new step each time: no shared rows to reuse
        rows.append({"piece": "attack rows: ALIE from the n - 8 honest gradients", "n": n, "d": d,
                     "seconds": _timeit(lambda: hooks.byzantine(attacker, next(steps), None), 2 if quick else 3)})
    for n in ns:
        stack = torch.randn(n, d)
        agg = AGGREGATORS.build("trimmed-mean", f=16)
        rows.append({"piece": "server: trimmed mean (f=16) over (n, d)", "n": n, "d": d,
                     "seconds": _timeit(lambda: agg(stack), 3 if quick else 5)})
    rows += threads_vs_groups(ns[0], 6 if quick else 10)
    if with_ray:
        rows += _profile_ray(ns, push)
    return rows


def threads_vs_groups(n: int, steps: int) -> List[Dict[str, Any]]:
    """The same in-process run with a thread per worker (``InprocJob``) and with 2 groups of
    virtual workers (``GroupInprocJob``): seconds per step after the first."""
    from commlib.ps import GroupInprocJob, InprocJob, PSConfig

    task = {"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0}
    cfg = PSConfig(steps=steps, step_timeout=60.0, worker_timeout=120.0, optimizer={"name": "sgd", "lr": 0.1})
    scheme = {"aggregator": "trimmed-mean", "aggregator_options": {"f": 16}}
    rows = []
    for label, make in (("thread per worker", lambda: InprocJob(task, scheme, cfg, n)),
                        ("2 groups of virtual workers", lambda: GroupInprocJob(task, scheme, cfg, n, groups=2))):
        t0 = time.perf_counter()
        res = make().run()
        hist = res["history"]
        rows.append({"piece": f"in-process run, {label}: s per step", "n": n, "d": "-",
                     "seconds": (hist[-1]["time"] - hist[0]["time"]) / (len(hist) - 1),
                     "total_s": round(time.perf_counter() - t0, 1)})
    return rows


def _profile_ray(ns: List[int], push: bytes) -> List[Dict[str, Any]]:
    """One actor call per frame against one bundle of n frames, to a mailbox actor."""
    import ray

    from commlib.comm.bundle import Bundled, pack_bundle
    from commlib.comm.ray_bundle import bundle_mailbox_actor
    from commlib.comm.ray_transport import mailbox_actor, ray_start

    rows = []
    ray_start(num_cpus=2)
    try:
        single, bundled = mailbox_actor(), bundle_mailbox_actor()
        ray.get([single.ping.remote(), bundled.ping.remote()])
        for n in ns:
            t0 = time.perf_counter()
            ray.get([single.deliver.remote(1 + i, 0, 0, push) for i in range(n)])
            rows.append({"piece": "Ray: n frames, one actor call each", "n": n, "d": len(push),
                         "seconds": time.perf_counter() - t0})
            t0 = time.perf_counter()
            ray.get(bundled.deliver_bundle.remote(pack_bundle(Bundled(1 + i, 0, 1, 0, push) for i in range(n))))
            rows.append({"piece": "Ray: n frames in one bundle", "n": n, "d": len(push),
                         "seconds": time.perf_counter() - t0})
    finally:
        ray.shutdown()
    return rows


def sweep(ns: List[int], steps: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Round time and the server's applied throughput against the number of virtual workers,
    with no faults, on one Ray session (``run_ray_groups``): mean, and trimmed mean f = n/16."""
    from commlib.comm.ray_transport import ray_start
    from commlib.ps import PSConfig
    from commlib.ps.group_ray import run_ray_groups

    task = {"name": "classification", "dataset": "digits", "width": 64, "batch": 32, "seed": 0}
    env = {"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}}
    ray_start(args.address, args.num_cpus, runtime_env=env)
    rows = []
    for agg in ("mean", "trimmed-mean"):
        for n in ns:
            scheme = {"aggregator": agg}
            if agg != "mean":
                scheme["aggregator_options"] = {"f": max(1, n // 16)}
            cfg = PSConfig(steps=steps, step_timeout=120.0, worker_timeout=240.0, optimizer={"name": "sgd", "lr": 0.1})
            res = run_ray_groups(task, scheme, cfg, n, processes=args.processes, address=args.address)
            hist = res["history"]
            span = hist[-1]["time"] - hist[0]["time"]
            pushes = sum(h["workers"] for h in hist[1:])
            push_bytes = res["transport"]["bytes_received"] / max(1, res["transport"]["messages_received"])
            rows.append({"aggregator": agg, "workers": n, "status": res["status"],
                         "round_s": round(span / (len(hist) - 1), 4),
                         "pushes_per_s": round(pushes / span, 1),
                         "mb_per_s": round(pushes * push_bytes / span / 1e6, 1),
                         "to_first_step_s": round(res["timings"].get("to_first_step_s", float("nan")), 1),
                         "processes": len(res["groups"])})
            print(rows[-1], flush=True)
    return rows


def plot_sweep(rows: List[Dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for agg in sorted({r["aggregator"] for r in rows}):
        rs = [r for r in rows if r["aggregator"] == agg]
        axes[0].plot([r["workers"] for r in rs], [r["round_s"] for r in rs], "o-", label=agg)
        axes[1].plot([r["workers"] for r in rs], [r["pushes_per_s"] for r in rs], "o-", label=agg)
    for ax, ylabel in ((axes[0], "round time (s)"), (axes[1], "pushes applied per second")):
        ax.set_xscale("log")
        ax.set_xlabel("virtual workers")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("commlib simulate: virtual workers on a local Ray (2 processes), no faults", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    cells = [[str(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 64-worker run and a small profile")
    p.add_argument("--runs", nargs="*", default=None, choices=sorted(RUNS), help="default: 256 1000")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--sweep", nargs="*", type=int, default=None, metavar="N",
                   help="round time and throughput for these worker counts (default with no N: 16 64 256 1000)")
    p.add_argument("--sweep-steps", type=int, default=10)
    p.add_argument("--no-ray-profile", action="store_true", help="skip the Ray call-overhead part of the profile")
    p.add_argument("--backend", default="ray", choices=("ray", "inproc"))
    p.add_argument("--processes", type=int, default=None)
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--step-timeout", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runs = args.runs if args.runs is not None else (["64"] if args.quick else ["256", "1000"])
    rows = [run_one(r, args) for r in runs]
    cols = ["run", "status", "steps", "processes", "wall_s", "to_first_step_s", "per_step_s", "applied", "timeouts",
            "rejected", "crashes", "resyncs", "test_acc", "driver_peak_rss_mb", "peak_rss_sum_mb"]
    print(_table(rows, cols))
    for r in rows:
        if "error" in r:
            print(f"run {r['run']} failed (rc {r['rc']}):\n{r['error']}")
    swept: List[Dict[str, Any]] = []
    if args.sweep is not None:
        swept = sweep(args.sweep or [16, 64, 256, 1000], args.sweep_steps, args)
        print()
        print(_table(swept, ["aggregator", "workers", "status", "processes", "round_s", "pushes_per_s", "mb_per_s",
                             "to_first_step_s"]))
        print(f"wrote {plot_sweep(swept, HERE / 'results' / 'sim_scale_sweep.png')}")
    prof: List[Dict[str, Any]] = []
    if not args.no_profile:
        prof = profile([64, 256] if args.quick else [256, 1000], args.quick, with_ray=not args.no_ray_profile)
        for r in prof:
            r["ms"] = round(r["seconds"] * 1e3, 3)
        print()
        print(_table(prof, ["piece", "n", "d", "ms"]))
    name = "sim_scale_quick.json" if args.quick else "sim_scale.json"
    out = Path(args.out) if args.out else HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({"runs": rows, "sweep": swept, "profile": prof, "cpus": os.cpu_count(), "loadavg": load,
                               "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    print(f"wrote {out}")
    return 0 if all(r.get("status") == "done" for r in rows + swept) else 1


if __name__ == "__main__":
    sys.exit(main())
