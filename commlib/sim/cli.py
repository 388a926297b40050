"""``commlib simulate``: a parameter-server run with a fault plan, on local Ray by default.

    # compression + error feedback through crashes, a hang, garbled bytes and bursty stragglers
    commlib simulate --workers 6 --steps 200 --quorum 5 --step-timeout 1 \
        --compressor topk --ratio 0.1 --feedback ef21 --lr 0.2 \
        --crash 2@40+2 --hang 3@80:3 --garbage 4@25 --bursty 2,5,1:1.5 --net-delay 0.002:0.002
    # a Byzantine worker against a robust rule (MoNNA server variant: momentum on the workers)
    commlib simulate --workers 5 --aggregator monna --f 1 --attack 4:alie --out runs/sim_byz

Faults: ``--crash W@STEP[+SECONDS]`` (the worker's process dies at STEP; a fresh one rejoins
SECONDS later), ``--hang W@STEP:SECONDS``, ``--attack W:NAME`` (a name in
``commlib.attacks.ATTACKS``: sign-flipping, ipm, alie, optimal-ipm, optimal-alie, mimic,
gaussian, nan, inf, label-flipping, crash), ``--garbage W@STEP`` / ``--garbage-p W:P``
(garbled bytes on the wire), ``--net-delay S[:JITTER]`` (every send), stragglers
``--bursty B,W,LAMBDA[:DELAY]``, ``--iid-stragglers P[:DELAY]`` or ``--exp-delays
SHIFT,RATE,SCALE``; or a JSON ``--plan``. ``--address`` joins a Ray cluster (``--spread``
gives each worker actor a CPU, spread over the nodes); ``--backend inproc`` runs threads.
Workers are virtual by default: ``--processes`` processes (default: one per CPU) each step a
group of logical workers, so hundreds or thousands fit on a laptop; ``--process-per-worker``
starts one actor per worker instead (a crash is then a real process death).
Prints a progress bar and a summary table; writes OUT/sim.json and OUT/sim.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from commlib.errors import ConfigError

if TYPE_CHECKING:  # imported lazily below: `commlib --help` stays light
    from commlib.ps.config import PSConfig
    from commlib.sim.plan import FaultPlan


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to ``commlib``'s subparsers."""
    from commlib.cli import HelpFormatter, plain_text

    p = subparsers.add_parser("simulate", help="parameter-server run with a fault plan (local Ray by default)",
                              description=plain_text(__doc__), formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--mode", choices=("sync", "async"), default="sync")
    g.add_argument("--quorum", type=int, default=None, help="sync: apply a round after this many pushes")
    g.add_argument("--step-timeout", type=float, default=2.0)
    g.add_argument("--max-misses", type=int, default=2)
    g.add_argument("--max-staleness", type=int, default=None, help="async: drop staler pushes")
    g.add_argument("--backend", choices=("ray", "inproc"), default="ray")
    g.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    g.add_argument("--spread", action="store_true",
                   help="Ray: one CPU per worker actor, spread over the cluster's nodes (default: 0 CPUs, packed)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("scale (virtual workers)")
    g.add_argument("--processes", type=int, default=None,
                   help="worker processes, each hosting a group of logical workers (default: the CPUs of the "
                        "local Ray, of the cluster with --address, or of this machine with --backend inproc)")
    g.add_argument("--process-per-worker", action="store_true",
                   help="one Ray actor (one thread in-process) per worker instead of virtual workers")
    g.add_argument("--straggle", choices=("sleep", "skip"), default="sleep",
                   help="a straggler's delay: real time (parks only that worker) or simulated (the round is "
                        "given up at once, as if its push arrived after the round closed)")
    g = p.add_argument_group("scheme and training")
    g.add_argument("--compressor", default="identity")
    g.add_argument("--ratio", type=float, default=None)
    g.add_argument("--feedback", default="none")
    g.add_argument("--aggregator", default="mean")
    g.add_argument("--f", type=int, default=0, help="Byzantine workers the aggregator tolerates")
    g.add_argument("--dataset", default="digits", choices=("digits", "mixture"))
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--optimizer", default=None, help="sgd or ab-sgd (default: sgd for sync, ab-sgd for async)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.0)
    g.add_argument("--rho", type=float, default=None, help="ab-sgd braking strength")
    g.add_argument("--eval-every", type=int, default=10)
    g = p.add_argument_group("faults")
    g.add_argument("--plan", default=None, help="a FaultPlan as JSON (file); the flags below add to it")
    g.add_argument("--crash", action="append", default=[], metavar="W@STEP[+S]")
    g.add_argument("--hang", action="append", default=[], metavar="W@STEP:S")
    g.add_argument("--attack", action="append", default=[], metavar="W:NAME")
    g.add_argument("--garbage", action="append", default=[], metavar="W@STEP")
    g.add_argument("--garbage-p", action="append", default=[], metavar="W:P")
    g.add_argument("--net-delay", default=None, metavar="S[:JITTER]")
    g.add_argument("--bursty", default=None, metavar="B,W,LAMBDA[:DELAY]")
    g.add_argument("--iid-stragglers", default=None, metavar="P[:DELAY]")
    g.add_argument("--exp-delays", default=None, metavar="SHIFT,RATE,SCALE")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/sim")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    return p


def _split(text: str, sep: str, what: str) -> Tuple[str, str]:
    if sep not in text:
        raise ConfigError(f"{what}: expected '{sep}' in {text!r}")
    a, b = text.split(sep, 1)
    return a, b


def _num(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None


def build_plan(args) -> "FaultPlan":
    """The FaultPlan described by ``--plan`` and the fault flags."""
    from commlib.sim.plan import FaultPlan, StragglerSpec, WorkerFaults

    base: Dict[str, Any] = {"n_workers": args.workers, "seed": args.seed, "workers": {}, "stragglers": None}
    if args.plan:
        with open(args.plan) as f:
            base.update(json.load(f))
        if int(base["n_workers"]) != args.workers:
            raise ConfigError(f"--plan is for {base['n_workers']} workers, --workers is {args.workers}")
    workers: Dict[int, Dict[str, Any]] = {int(k): dict(v) for k, v in dict(base["workers"]).items()}

    def w_of(text: str, what: str) -> Dict[str, Any]:
        return workers.setdefault(_num(text, int, what), {})

    for c in args.crash:
        w, rest = _split(c, "@", "--crash")
        step, _, after = rest.partition("+")
        d = w_of(w, "--crash")
        d["crash_at"] = _num(step, int, "--crash")
        if after:
            d["restart_after"] = _num(after, float, "--crash")
    for h in args.hang:
        w, rest = _split(h, "@", "--hang")
        step, secs = _split(rest, ":", "--hang")
        d = w_of(w, "--hang")
        d["hang_at"], d["hang_s"] = _num(step, int, "--hang"), _num(secs, float, "--hang")
    for a in args.attack:
        w, name = _split(a, ":", "--attack")
        w_of(w, "--attack")["attack"] = name
    for g in args.garbage:
        w, step = _split(g, "@", "--garbage")
        w_of(w, "--garbage").setdefault("garbage_at", []).append(_num(step, int, "--garbage"))
    for g in args.garbage_p:
        w, pr = _split(g, ":", "--garbage-p")
        w_of(w, "--garbage-p")["garbage_p"] = _num(pr, float, "--garbage-p")
    if args.net_delay:
        s, _, j = args.net_delay.partition(":")
        for w in range(args.workers):
            d = workers.setdefault(w, {})
            d["delay_s"] = _num(s, float, "--net-delay")
            d["jitter_s"] = _num(j, float, "--net-delay") if j else 0.0
    stragglers = base.get("stragglers")
    chosen = [x for x in (args.bursty, args.iid_stragglers, args.exp_delays) if x]
    if len(chosen) > 1:
        raise ConfigError("choose one straggler model: --bursty, --iid-stragglers or --exp-delays")
    if args.bursty:
        spec, _, delay = args.bursty.partition(":")
        parts = spec.split(",")
        if len(parts) != 3:
            raise ConfigError(f"--bursty: expected B,W,LAMBDA, got {spec!r}")
        B, W, lam = (_num(x, int, "--bursty") for x in parts)
        stragglers = StragglerSpec("bursty", B=B, W=W, lam=lam,
                                   delay_s=_num(delay, float, "--bursty") if delay else 2 * args.step_timeout)
    elif args.iid_stragglers:
        pr, _, delay = args.iid_stragglers.partition(":")
        stragglers = StragglerSpec("iid", p=_num(pr, float, "--iid-stragglers"),
                                   delay_s=_num(delay, float, "--iid-stragglers") if delay else 2 * args.step_timeout)
    elif args.exp_delays:
        parts = args.exp_delays.split(",")
        if len(parts) != 3:
            raise ConfigError(f"--exp-delays: expected SHIFT,RATE,SCALE, got {args.exp_delays!r}")
        shift, rate, scale = (_num(x, float, "--exp-delays") for x in parts)
        stragglers = StragglerSpec("exp", shift=shift, rate=rate, scale=scale)
    if isinstance(stragglers, dict):
        stragglers = StragglerSpec(**stragglers)
    return FaultPlan(args.workers, {w: WorkerFaults(**d) for w, d in workers.items()}, stragglers,
                     int(base.get("seed", args.seed)))


def _scheme(args) -> Dict[str, Any]:
    s: Dict[str, Any] = {"compressor": args.compressor, "feedback": args.feedback, "aggregator": args.aggregator}
    if args.ratio is not None:
        s["ratio"] = args.ratio
    if args.f:
        s["aggregator_options"] = {"f": args.f}
    return s


def _config(args) -> "PSConfig":
    from commlib.ps.config import PSConfig

    opt: Dict[str, Any] = {"lr": args.lr}
    name = args.optimizer or ("sgd" if args.mode == "sync" else "ab-sgd")
    opt["name"] = name
    if args.momentum or name == "ab-sgd":
        opt["momentum"] = args.momentum or 0.9
    if args.rho is not None:
        opt["rho"] = args.rho
    return PSConfig(mode=args.mode, steps=args.steps, quorum=args.quorum, step_timeout=args.step_timeout,
                    max_misses=args.max_misses, max_staleness=args.max_staleness, optimizer=opt,
                    eval_every=args.eval_every, idle_timeout=max(30.0, 10 * args.step_timeout),
                    worker_timeout=max(1.0, 2 * args.step_timeout))


def run(args) -> int:
    """Run ``commlib simulate``; returns the process exit code."""
    from commlib.scheme import Scheme
    from commlib.sim.driver import save_json, simulate
    from commlib.sim.report import plot, summary_table

    plan = build_plan(args)
    scheme = _scheme(args)
    Scheme.from_config(scheme)  # fail fast, before any process starts
    config = _config(args)
    task = {"name": "classification", "dataset": args.dataset, "width": args.width, "batch": args.batch,
            "seed": args.seed}

    print(f"commlib simulate: {args.workers} workers, {args.mode}, {Scheme.from_config(scheme).describe()}, "
          f"backend {args.backend}" + (f" at {args.address}" if args.address else ""))
    for w in range(args.workers):
        if plan.faults(w).describe() != "-":
            print(f"  worker {w}: {plan.faults(w).describe()}")
    if plan.stragglers is not None:
        print(f"  stragglers: {plan.stragglers.describe()}")
    print(f"  starting {args.workers} workers "
          + ("(one process each)" if args.process_per_worker else
             f"(virtual: {args.processes or 'one per CPU'} processes)") + " ...", flush=True)
    bar = None

    def on_step(rec: Dict[str, Any]) -> None:
        nonlocal bar
        if bar is None and not args.no_progress:  # the bar starts with training, after start-up
            from tqdm import tqdm

            bar = tqdm(total=config.steps, desc=f"simulate ({args.backend})", unit="step", dynamic_ncols=True,
                       mininterval=0.5 if sys.stderr.isatty() else 5.0)
        if bar is not None:
            bar.update(rec["step"] - bar.n)
            post = {"loss": f"{rec['loss']:.3f}"}
            if "test_accuracy" in rec:
                post["acc"] = f"{rec['test_accuracy']:.3f}"
            bar.set_postfix(post, refresh=False)

    try:
        result = simulate(plan, task, scheme, config, backend=args.backend, address=args.address,
                          num_cpus=args.num_cpus, on_step=on_step,
                          worker_options={"num_cpus": 1, "scheduling_strategy": "SPREAD"} if args.spread else None,
                          virtual=not args.process_per_worker, processes=args.processes, straggle=args.straggle)
    finally:
        if bar is not None:
            bar.close()
    print()
    print(summary_table(result))
    os.makedirs(args.out, exist_ok=True)
    js = os.path.join(args.out, "sim.json")
    save_json(result, js)
    files: List[str] = [js]
    if not args.no_plot:
        files.append(plot(result, os.path.join(args.out, "sim.png")))
    print("wrote " + "  ".join(files))
    return 0 if result["status"] == "done" else 1
