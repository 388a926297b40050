"""Bandwidth benchmark: a real 2-node torchrun gloo job across emulated hosts on slow links.

Two hosts are Linux network namespaces joined by a veth pair (``benchmarks/netns.sh``); a tc
token-bucket filter (tbf, burst 256 kB) on each host's egress limits the link to 1 Gbit/s,
100 Mbit/s or 10 Mbit/s, or leaves it unshaped. Each namespace runs one torchrun node
(``--nnodes=2 --node_rank=i --master_addr=<node 0's veth address>``, gloo, GLOO_SOCKET_IFNAME
set to the veth) executing ``benchmarks/bandwidth_worker.py``, which trains a 64-w-w-10 MLP on
scikit-learn's digits with each scheme in turn, in one process group: DDP's plain all-reduce,
commlib's hook with compression off, torch's fp16 and PowerSGD (rank 1, 4) hooks, commlib DGC
at 99.9% sparsity (native ops, and pure torch in a second job with COMMLIB_NATIVE=0), DGC
selection + EF21, DGC selection + EControl. The worker asks this script to change the link rate
between runs (files in a control directory); dense warm-up steps of timing-only runs go
unshaped, so a 50M-parameter PowerSGD or EF21 run does not spend minutes on its dense start.

Latency is not emulated: this kernel has no netem (the script checks and records it), so the
links have the rate limit only, and sub-millisecond round trips.

Needs root (network namespaces, veth, tc). Without it the script says so and exits with 2.

    sudo .venv/bin/python benchmarks/bandwidth.py            # default: 1M/10M/50M, 4 links, ~10 min
    sudo .venv/bin/python benchmarks/bandwidth.py --quick    # 1M model, unshaped + 100 Mbit/s, ~2 min
    sudo .venv/bin/python benchmarks/bandwidth.py --breakdown --out benchmarks/results/bandwidth_breakdown.json
        # the hook's targets only: 10M/50M, 1 Gbit/s + 100 Mbit/s, all-reduce / hook without compression / DGC

Targets checked (section "Targets" of the output): at 50M parameters and 100 Mbit/s the DGC step
is at most 1.25x the pure compute step (forward + backward + optimizer, measured in the same
run), the hook's decode at most 5% and its encode at most 15% of that compute step; at 1 Gbit/s
the hook with compression off is at most 1.05x DDP's all-reduce (10M and 50M).

prints a table, writes benchmarks/results/bandwidth.json and benchmarks/results/bandwidth.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETNS = HERE / "netns.sh"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from bandwidth_worker import SCHEMES, width_for  # noqa: E402

TARGET_ACC = 0.90  # "time to reach a fixed accuracy": first evaluation with test accuracy >= this
MODELS = {"1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000}
#: the default run's (link, models): the 50M model only where the targets are (1 Gbit/s: the hook's
#: overhead; 100 Mbit/s: the speed-ups), to stay near 10 minutes on a 2-core machine
DEFAULT_CELLS = {"unshaped": ("1M", "10M"), "1gbit": ("1M", "10M", "50M"), "100mbit": ("1M", "10M", "50M"),
                 "10mbit": ("1M", "10M")}
RATES = {"unshaped": None, "1gbit": 1e9, "100mbit": 1e8, "10mbit": 1e7}
RATE_LABEL = {"unshaped": "unshaped", "1gbit": "1 Gbit/s", "100mbit": "100 Mbit/s", "10mbit": "10 Mbit/s"}
DENSE = ("allreduce", "commlib-identity", "torch-fp16")
ALL = ("allreduce", "ddp-floor", "commlib-identity", "torch-fp16", "torch-powersgd-1", "torch-powersgd-4",
       "dgc", "dgc-torch", "dgc-strided", "dgc-ef21", "econtrol")
QUICK = ("allreduce", "commlib-identity", "torch-fp16", "torch-powersgd-1", "dgc", "dgc-torch")
LR, MOMENTUM = 0.1, 0.9
MASTER_PORT = 29517


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def est_comm_s(scheme: str, params: int, rate: Optional[float]) -> float:
    """Seconds a dense scheme's step spends on a link of ``rate`` bit/s (2 nodes: a ring all-reduce
    sends the whole buffer once per rank); 0 for compressed schemes and unshaped links."""
    if rate is None or scheme not in DENSE:
        return 0.0
    return (2 if scheme == "torch-fp16" else 4) * params * 8 / rate


def build_plan(quick: bool, cells: Dict[str, Tuple[str, ...]], max_step_s: float,
               conv_steps: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(runs, skipped cells) for ``cells`` (link -> models). A run either trains ``conv_steps``
    steps with evaluations (the 1M model on the link where time to accuracy is measured: 100 Mbit/s,
    or unshaped with --quick) or is timing-only (a few steps after an unshaped warm-up)."""
    schemes = QUICK if quick else ALL
    conv_links = {"unshaped"} if quick else {"100mbit"}
    runs: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    for link, models in cells.items():
        rate = RATES[link]
        for model in models:
            params = MODELS[model]
            width = width_for(params)
            for scheme in schemes:
                if scheme == "dgc-torch" and link != "100mbit":
                    continue  # the pure-torch path is compared where the targets are (100 Mbit/s)
                if scheme == "dgc-strided" and (link, model) != ("100mbit", "50M"):
                    continue  # the threshold sample's layout matters where the encode target is
                base = {"scheme": scheme, "model": model, "width": width, "link": link,
                        "rate": None if rate is None else link, "lr": LR, "momentum": MOMENTUM, "seed": 0}
                est = est_comm_s(scheme, params, rate)
                conv = model == "1M" and link in conv_links and not (scheme == "commlib-identity" and rate
                                                                      and rate < 1e9)
                if SCHEMES[scheme].get("timing_only"):
                    conv = False  # its replicas drift apart: timed, never evaluated
                if conv:
                    runs.append(dict(base, steps=conv_steps, warmup=3, eval_every=10, target=TARGET_ACC))
                    continue
                if est > max_step_s or (scheme == "commlib-identity" and est > 2.0):
                    why = (f"estimated {est:.0f} s per step on this link (limit --max-step-s {max_step_s:g})"
                           if scheme != "commlib-identity" else
                           "same traffic as all-reduce; the hook's overhead is measured where the link is not the "
                           "bottleneck")
                    skipped.append({"link": link, "model": model, "scheme": scheme, "why": why,
                                    "est_comm_s": est})
                    continue
                budget = {"1M": 3.0, "10M": 3.0, "50M": 5.0}[model] * (0.5 if quick else 1.0)
                # warm-up, 2 steps: DDP rebuilds its buckets after step 1, so step 2 is the first in which
                # commlib's hook allocates its reused buffers for the final buckets (a one-time cost);
                # torch's PowerSGD runs 2 plain steps first
                runs.append(dict(base, steps={"1M": 60, "10M": 14, "50M": 8}[model],
                                 warmup=2, warmup_rate=None, max_s=budget,
                                 min_steps=2 if est > 1 or model == "50M" else 3))
    return runs, skipped


def mark_compute(runs: List[Dict[str, Any]]) -> None:
    """The compute-only time of each model is measured once, after the first run of it that will run."""
    for model in MODELS:
        first = next((r for r in runs if r["model"] == model and "env" not in SCHEMES[r["scheme"]]), None)
        if first is not None:
            first["compute_steps"] = 5


# ---------------------------------------------------------------------------------------------
# namespaces, link control, jobs
# ---------------------------------------------------------------------------------------------
class Testbed:
    """The namespaces of one benchmark run; removed by close() (also on SIGINT/SIGTERM)."""

    def __init__(self, hosts: int, burst: str) -> None:
        self.prefix = f"clbw{os.getpid()}h"
        self.hosts = hosts
        self.burst = burst
        self.procs: List[subprocess.Popen] = []
        self.up = False

    def ns(self, i: int) -> str:
        return f"{self.prefix}{i}"

    @staticmethod
    def ip(i: int) -> str:
        return f"10.231.0.{i + 1}"

    def _sh(self, *args: str) -> None:
        subprocess.run(["bash", str(NETNS), *args], check=True)

    def open(self) -> None:
        self.sweep_stale()
        self.up = True
        self._sh("up", self.prefix, str(self.hosts))

    def sweep_stale(self) -> None:
        """Remove namespaces left by an earlier run of this script that was killed (its pid is gone)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for pid in sorted({m.group(1) for m in map(re.compile(r"^clbw(\d+)h").match, names) if m}):
            if not os.path.exists(f"/proc/{pid}"):
                self._sh("down", f"clbw{pid}h", str(self.hosts))

    def shape(self, rate: Optional[str]) -> None:
        self._sh("shape", self.prefix, str(self.hosts), rate or "none", self.burst)

    def close(self) -> None:
        for p in self.procs:  # only the processes this script started (each leads its own group)
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()
        if self.up:
            self._sh("down", self.prefix, str(self.hosts))
            self.up = False

    def popen(self, i: int, argv: List[str], env: Dict[str, str], log) -> subprocess.Popen:
        cmd = ["ip", "netns", "exec", self.ns(i), "env", *[f"{k}={v}" for k, v in env.items()], *argv]
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(p)
        return p

    def netem_available(self) -> bool:
        r = subprocess.run(["tc", "-n", self.ns(0), "qdisc", "add", "dev", "cl0", "root", "netem", "delay", "10ms"],
                           capture_output=True)
        if r.returncode == 0:
            subprocess.run(["tc", "-n", self.ns(0), "qdisc", "del", "dev", "cl0", "root"], capture_output=True)
        return r.returncode == 0


_THROUGHPUT_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
_THROUGHPUT_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf = b"x" * (1 << 16)
end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end: c.sendall(buf)
c.close()
"""


def link_check(bed: Testbed, seconds: float = 1.0) -> float:
    """Measured TCP goodput host0 -> host1 in bit/s (the current shaping)."""
    port = str(MASTER_PORT + 1)
    srv = subprocess.Popen(["ip", "netns", "exec", bed.ns(1), sys.executable, "-c", _THROUGHPUT_SERVER,
                            bed.ip(1), port], stdout=subprocess.PIPE, text=True, start_new_session=True)
    bed.procs.append(srv)
    srv.stdout.readline()
    subprocess.run(["ip", "netns", "exec", bed.ns(0), sys.executable, "-c", _THROUGHPUT_CLIENT, bed.ip(1), port,
                    str(seconds)], check=True, timeout=60)
    out = srv.stdout.readline().split()
    srv.wait(timeout=30)
    bed.procs.remove(srv)
    return 8 * int(out[0]) / float(out[1])


def serve_rate_requests(bed: Testbed, control: Path, stop: threading.Event, log: List[Dict[str, Any]]) -> None:
    """Apply the workers' rate requests (req-N -> tc) and acknowledge them (ack-N)."""
    seq = 1
    while not stop.is_set():
        req = control / f"req-{seq:04d}"
        if req.exists():
            rate = req.read_text().strip()
            bed.shape(None if rate == "none" else rate)
            log.append({"seq": seq, "rate": rate, "t": time.time()})
            (control / f"ack-{seq:04d}").write_text("ok")
            seq += 1
            continue
        time.sleep(0.02)


def cannot_emulate(script: str) -> Optional[str]:
    """Why hosts cannot be emulated here (not root, no netns/veth/tc), or None."""
    if os.geteuid() != 0:
        return (f"{script}: needs root: it creates network namespaces, veth pairs and tc rate limits.\n"
                f"Run it as root, e.g. `sudo .venv/bin/python benchmarks/{script}`. Nothing was run.")
    chk = subprocess.run(["bash", str(NETNS), "check"], capture_output=True, text=True)
    if chk.returncode != 0:
        return f"{script}: cannot emulate hosts here: {chk.stderr.strip()}. Nothing was run."
    return None


def run_job(bed: Testbed, runs: List[Dict[str, Any]], env_extra: Dict[str, str], tag: str, workdir: Path,
            timeout_s: float, worker: Path = HERE / "bandwidth_worker.py",
            progress: str = "median step") -> Dict[str, Any]:
    """One torchrun job over the namespaces (a node per host) running ``worker`` on ``runs``;
    rank 0's records. Lines of node 0's log with ``progress`` in them are echoed."""
    plan = workdir / f"plan-{tag}.json"
    out = workdir / f"out-{tag}.json"
    control = workdir / f"control-{tag}"
    control.mkdir()
    plan.write_text(json.dumps(runs))
    bed.shape(None)
    stop = threading.Event()
    rate_log: List[Dict[str, Any]] = []
    server = threading.Thread(target=serve_rate_requests, args=(bed, control, stop, rate_log), daemon=True)
    server.start()
    # the workers import this checkout's commlib (not whatever an editable install points at)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "cl0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": pythonpath, **env_extra}
    procs, logs = [], []
    t0 = time.monotonic()
    try:
        for i in range(bed.hosts):
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={bed.hosts}", f"--node_rank={i}",
                    "--nproc_per_node=1", f"--master_addr={bed.ip(0)}", f"--master_port={MASTER_PORT}",
                    "--max-restarts=0", str(worker), "--plan", str(plan), "--out", str(out),
                    "--ifname", "cl0", "--control", str(control), "--threads", "1"]
            log = open(workdir / f"node{i}-{tag}.log", "w")
            logs.append(log)
            procs.append(bed.popen(i, argv, env, log))
        shown = 0
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"job {tag!r} ran past {timeout_s:.0f} s")
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(3)  # let the other node notice and exit
                break
            shown = _echo_progress(workdir / f"node0-{tag}.log", shown, worker.stem, progress)
            time.sleep(0.5)
        _echo_progress(workdir / f"node0-{tag}.log", shown, worker.stem, progress)
        codes = [p.poll() for p in procs]
        if any(c != 0 for c in codes):
            tails = "\n".join(f"--- node {i} ---\n" + (workdir / f"node{i}-{tag}.log").read_text()[-3000:]
                              for i in range(bed.hosts))
            raise RuntimeError(f"job {tag!r} failed (exit codes {codes})\n{tails}")
    finally:
        stop.set()
        server.join(timeout=5)
        for log in logs:
            log.close()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            if p in bed.procs:
                bed.procs.remove(p)
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - t0
    result["rate_changes"] = len(rate_log)
    return result


def _echo_progress(log: Path, shown: int, name: str = "bandwidth_worker", marker: str = "median step") -> int:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return shown
    for line in lines[shown:]:
        if line.startswith(f"[{name}]") and marker in line:
            print("  " + line[len(f"[{name}] "):], flush=True)
    return len(lines)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def steps_to_target(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str], int]:
    """(scheme, model) -> steps to reach the target, from any run with evaluations (training is
    deterministic for a given seed: the link changes the time of a step, not its result)."""
    out: Dict[Tuple[str, str], int] = {}
    for r in records:
        if r.get("reached"):
            out.setdefault((r["scheme"], r["model"]), r["reached"]["step"])
    for (scheme, model), steps in list(out.items()):  # same algorithm, same results (tests: bit-identical)
        for alias, spec in SCHEMES.items():
            if spec.get("same_as") == scheme:
                out.setdefault((alias, model), steps)
    return out


def build_rows(records: List[Dict[str, Any]], skipped: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by = {(r["link"], r["model"], r["scheme"]): r for r in records}
    compute = {r["model"]: 1000 * r["compute_step_s"] for r in records if r.get("compute_step_s")}
    est_ar = {(s["link"], s["model"]): s["est_comm_s"] for s in skipped if s["scheme"] == "allreduce"}
    s2t = steps_to_target(records)
    rows = []
    for r in records:
        ar = by.get((r["link"], r["model"], "allreduce"))
        est = est_ar.get((r["link"], r["model"]))
        st = sorted(r["step_s"])
        row = {"link": r["link"], "model": r["model"], "params": r["params"], "scheme": r["scheme"],
               "label": r["label"], "step_ms": 1000 * r["median_step_s"], "steps_measured": len(r["step_s"]),
               "step_ms_p10_p90": [1000 * st[len(st) // 10], 1000 * st[(9 * len(st)) // 10]],
               "cpu_ms": 1000 * r["median_cpu_step_s"],
               "wire_bytes_per_step": r["tx_bytes_per_step"], "payload_bytes_per_step": r["payload_bytes_per_step"],
               "speedup_vs_allreduce": ar["median_step_s"] / r["median_step_s"]
               if ar and not SCHEMES[r["scheme"]].get("timing_only") else None,
               # all-reduce not run on this link: at least its wire time (bytes / rate), compute left out
               "speedup_vs_allreduce_at_least": est / r["median_step_s"]
               if est and not ar and not SCHEMES[r["scheme"]].get("timing_only") else None,
               "final_test_acc": r["final_test_acc"], "time_to_target_s": None, "time_to_target": None,
               "ops_backend": r["ops_backend"], "breakdown_ms": None, "compute_ms": compute.get(r["model"])}
        pc = r.get("paired_compute_step_s")
        if pc:  # each measured step against the compute step taken right after it
            row["paired_compute_ms"] = 1000 * statistics.median(pc)
            row["paired_ratio"] = statistics.median(t / c for t, c in zip(r["step_s"], pc))
        if r.get("reached"):
            row["time_to_target_s"] = r["reached"]["train_s"]
            row["time_to_target"] = "measured"
        elif r.get("evals"):
            row["time_to_target"] = f"not reached in {r['steps']} steps"
        elif (r["scheme"], r["model"]) in s2t:
            row["time_to_target_s"] = s2t[(r["scheme"], r["model"])] * r["median_step_s"]
            row["time_to_target"] = "projected"
        if r.get("breakdown_s_per_step"):
            row["breakdown_ms"] = {k: 1000 * v for k, v in r["breakdown_s_per_step"].items()}
        rows.append(row)
    return rows


def _find(rows, link, model, scheme):
    return next((r for r in rows if (r["link"], r["model"], r["scheme"]) == (link, model, scheme)), None)


def evaluate_targets(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's targets, each with the numbers it was judged on (None: not measured in this run)."""
    t: Dict[str, Any] = {}
    dgc = _find(rows, "100mbit", "1M", "dgc")
    ar = _find(rows, "100mbit", "1M", "allreduce")
    ar0 = _find(rows, "unshaped", "1M", "allreduce")
    dgc0 = _find(rows, "unshaped", "1M", "dgc")
    ps1 = _find(rows, "100mbit", "1M", "torch-powersgd-1")
    if dgc and ar0:
        ratio = dgc["step_ms"] / ar0["step_ms"]
        t["dgc_100mbit_within_1.2x_of_unshaped_allreduce"] = {
            "dgc_100mbit_ms": dgc["step_ms"], "allreduce_unshaped_ms": ar0["step_ms"], "ratio": ratio,
            "dgc_unshaped_ms": dgc0["step_ms"] if dgc0 else None, "met": ratio <= 1.2}
    if dgc and ar:
        sp = ar["step_ms"] / dgc["step_ms"]
        t["dgc_15x_faster_than_allreduce_at_100mbit"] = {"speedup": sp, "met": sp >= 15}
    if dgc and ps1:
        t["dgc_faster_than_powersgd1_at_100mbit"] = {"dgc_ms": dgc["step_ms"], "powersgd1_ms": ps1["step_ms"],
                                                     "met": dgc["step_ms"] < ps1["step_ms"]}
    if dgc and ar and dgc["final_test_acc"] is not None and ar["final_test_acc"] is not None:
        diff = dgc["final_test_acc"] - ar["final_test_acc"]
        t["dgc_equal_final_accuracy"] = {"dgc": dgc["final_test_acc"], "allreduce": ar["final_test_acc"],
                                         "difference": diff, "met": diff >= -0.02,
                                         "rule": "final test accuracy within 2 points of all-reduce's"}
    d50 = _find(rows, "100mbit", "50M", "dgc")
    compute = next((r["compute_ms"] for r in rows if r["model"] == "50M" and r.get("compute_ms")), None)
    if d50 and d50.get("paired_ratio"):
        # paired: every step against the compute step right after it (the machine's speed drifts
        # by tens of percent within minutes; a compute time taken once does not hold for a run)
        compute = d50["paired_compute_ms"]
    if d50 and compute:
        b = d50["breakdown_ms"] or {}
        ratio = d50.get("paired_ratio") or d50["step_ms"] / compute
        t["dgc_50M_100mbit_within_1.25x_of_compute"] = {"dgc_ms": d50["step_ms"], "compute_ms": compute,
                                                        "ratio": ratio, "paired": bool(d50.get("paired_ratio")),
                                                        "met": ratio <= 1.25}
        floor = _find(rows, "100mbit", "50M", "ddp-floor")
        if floor:  # not a target: how much of the step DDP itself costs with these settings
            fr = floor.get("paired_ratio") or floor["step_ms"] / compute
            t["dgc_50M_100mbit_within_1.25x_of_compute"].update(floor_ms=floor["step_ms"], floor_ratio=fr,
                                                                commlib_part_ratio=ratio - fr)
        if "decode" in b:
            t["dgc_50M_100mbit_decode_within_5pct_of_compute"] = {
                "decode_ms": b["decode"], "fraction": b["decode"] / compute, "met": b["decode"] <= 0.05 * compute}
        if "encode" in b:
            t["dgc_50M_100mbit_encode_within_15pct_of_compute"] = {
                "encode_ms": b["encode"], "fraction": b["encode"] / compute, "met": b["encode"] <= 0.15 * compute}
    for model in MODELS:
        a, h = _find(rows, "1gbit", model, "allreduce"), _find(rows, "1gbit", model, "commlib-identity")
        if a and h:
            ov = h["step_ms"] / a["step_ms"] - 1
            t[f"hook_overhead_1gbit_{model}"] = {"allreduce_ms": a["step_ms"], "commlib_identity_ms": h["step_ms"],
                                                 "ratio": h["step_ms"] / a["step_ms"], "met": ov <= 0.05}
    return t


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


def markdown_table(rows: List[Dict[str, Any]], skipped: List[Dict[str, Any]]) -> str:
    head = ("| link | model | scheme | step (ms) | CPU (ms) | wire bytes/step | speed-up vs all-reduce | "
            f"time to {TARGET_ACC:.0%} test acc (s) | final test acc |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    order = {k: i for i, k in enumerate(RATES)}
    morder = {k: i for i, k in enumerate(MODELS)}
    sorder = {k: i for i, k in enumerate(ALL)}
    for r in sorted(rows, key=lambda r: (order[r["link"]], morder[r["model"]], sorder[r["scheme"]])):
        tt = "–"
        if r["time_to_target_s"] is not None:
            tt = f"{r['time_to_target_s']:.1f}" + (" (proj.)" if r["time_to_target"] == "projected" else "")
        elif r["time_to_target"]:
            tt = r["time_to_target"]
        sp = f"{r['speedup_vs_allreduce']:.1f}x" if r["speedup_vs_allreduce"] else (
            f"≥ {r['speedup_vs_allreduce_at_least']:.0f}x" if r.get("speedup_vs_allreduce_at_least") else "–")
        acc = f"{r['final_test_acc']:.3f}" if r["final_test_acc"] is not None else "–"
        lines.append(f"| {RATE_LABEL[r['link']]} | {r['model']} | {r['label']} | {r['step_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} | "
                     f"{_fmt_bytes(r['wire_bytes_per_step'])} | {sp} | {tt} | {acc} |")
    for s in skipped:
        est = f"skipped (≥ {s['est_comm_s']:.0f} s on the wire)" if s["scheme"] != "commlib-identity" else \
            "skipped (as all-reduce)"
        lines.append(f"| {RATE_LABEL[s['link']]} | {s['model']} | {SCHEMES[s['scheme']]['label']} | {est} | – | – | "
                     f"– | – | – |")
    return head + "\n".join(lines) + "\n"


def breakdown_table(rows: List[Dict[str, Any]], records: List[Dict[str, Any]]) -> str:
    compute = {r["model"]: r.get("compute_step_s") for r in records if r.get("compute_step_s")}
    out = ["| link | model | scheme | step (ms) | compute fwd+bwd+opt (ms) | hook encode (ms) | collective / link (ms) | "
           "decode (ms) | step / compute |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["breakdown_ms"]
        if not b:
            continue
        # the paired compute (a step beside every measured step) where the run took it
        c = r["paired_compute_ms"] / 1000 if r.get("paired_compute_ms") else compute.get(r["model"])
        ratio = r.get("paired_ratio") or (r["step_ms"] / (1000 * c) if c else None)
        out.append(f"| {RATE_LABEL[r['link']]} | {r['model']} | {r['label']} | {r['step_ms']:.1f} | "
                   f"{'–' if c is None else f'{1000 * c:.1f}'} | {b.get('encode', 0):.1f} | "
                   f"{b.get('collective', 0):.1f} | {b.get('decode', 0):.1f} | "
                   f"{'–' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M model, unshaped + 100 Mbit/s, 6 schemes (~2 min)")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the hook's targets: 10M/50M on 1 Gbit/s and 100 Mbit/s; all-reduce, DDP's floor, "
                         "the hook without compression, DGC (--models/--links/--schemes still narrow it)")
    ap.add_argument("--models", default=None, help="comma list of 1M,10M,50M (default: all; quick: 1M)")
    ap.add_argument("--links", default=None, help="comma list of unshaped,1gbit,100mbit,10mbit")
    ap.add_argument("--schemes", default=None, help=f"comma list of {','.join(ALL)}")
    ap.add_argument("--hosts", type=int, default=2, help="emulated hosts (one torchrun node each)")
    ap.add_argument("--burst", default="256kb", help="tbf burst")
    ap.add_argument("--conv-steps", type=int, default=150, help="steps of the runs that measure time to accuracy")
    ap.add_argument("--max-step-s", type=float, default=6.0,
                    help="skip a dense scheme on a link where one step would take longer than this")
    ap.add_argument("--bucket-view", action="store_true",
                    help="build DDP with gradient_as_bucket_view=True (every scheme): the gradients are the "
                         "buckets' views, so DDP copies no gradient in or out of its buckets")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds one torchrun job may take")
    ap.add_argument("--out", default=str(RESULTS / "bandwidth.json"))
    args = ap.parse_args(argv)

    why = cannot_emulate("bandwidth.py")
    if why:
        print(why, file=sys.stderr)
        return 2

    if args.breakdown:
        cells: Dict[str, Tuple[str, ...]] = {"1gbit": ("10M", "50M"), "100mbit": ("10M", "50M")}
        args.schemes = args.schemes or "allreduce,ddp-floor,commlib-identity,dgc"
    elif args.quick:
        cells = {"unshaped": ("1M",), "100mbit": ("1M",)}
    else:
        cells = dict(DEFAULT_CELLS)
    if args.links:
        cells = {k: cells.get(k, tuple(MODELS)) for k in args.links.split(",")}
    if args.models:
        cells = {k: tuple(args.models.split(",")) for k in cells}
    bad = [k for k in cells if k not in RATES] + [m for ms in cells.values() for m in ms if m not in MODELS]
    if bad:
        ap.error(f"unknown link or model: {', '.join(bad)} (links: {', '.join(RATES)}; models: {', '.join(MODELS)})")
    links = list(cells)
    conv_steps = 110 if args.quick and args.conv_steps == 150 else args.conv_steps
    runs, skipped = build_plan(args.quick, cells, args.max_step_s, conv_steps)
    if args.schemes:
        keep = set(args.schemes.split(","))
        runs = [r for r in runs if r["scheme"] in keep]
        skipped = [s for s in skipped if s["scheme"] in keep]
    if args.bucket_view:
        runs = [dict(r, bucket_view=True) for r in runs]
    if args.breakdown:  # the targets' cells: a compute step beside every measured step
        runs = [dict(r, paired_compute=True) if not r.get("eval_every") else r for r in runs]
    mark_compute(runs)
    jobs = [("native", [r for r in runs if "env" not in SCHEMES[r["scheme"]]], {}),
            ("torch-ops", [r for r in runs if "env" in SCHEMES[r["scheme"]]], {"COMMLIB_NATIVE": "0"})]
    jobs = [j for j in jobs if j[1]]

    bed = Testbed(args.hosts, args.burst)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    t_start = time.monotonic()
    load_before = os.getloadavg()
    records: List[Dict[str, Any]] = []
    meta: Dict[str, Any] = {}
    try:
        bed.open()
        checks = {}
        for link in links:
            bed.shape(None if RATES[link] is None else link)
            checks[link] = link_check(bed)
        bed.shape(None)
        meta["netem_available"] = bed.netem_available()
        print(f"{args.hosts} hosts in network namespaces {bed.prefix}0..{args.hosts - 1}; measured TCP goodput: "
              + ", ".join(f"{RATE_LABEL[k]} {v / 1e6:.0f} Mbit/s" for k, v in checks.items())
              + ("" if meta["netem_available"] else "; no netem in this kernel: latency is not emulated"), flush=True)
        with tempfile.TemporaryDirectory(prefix="commlib-bw-") as tmp:
            for tag, job_runs, env in jobs:
                print(f"job {tag}: {len(job_runs)} runs{' (COMMLIB_NATIVE=0)' if env else ''}", flush=True)
                res = run_job(bed, job_runs, env, tag, Path(tmp), args.timeout)
                for plan_run, rec in zip(job_runs, res["records"], strict=True):
                    rec["link"] = plan_run["link"]
                    records.append(rec)
                meta[f"job_{tag}"] = {"ops_backend": res["ops_backend"], "native_status": res["native_status"],
                                      "wall_s": res["wall_s"], "rate_changes": res["rate_changes"]}
    finally:
        bed.close()
    import torch

    rows = build_rows(records, skipped)
    targets = evaluate_targets(rows)
    meta.update({"cells": {k: list(v) for k, v in cells.items()}, "hosts": args.hosts, "burst": args.burst,
                 "gradient_as_bucket_view": bool(args.bucket_view),
                 "target_acc": TARGET_ACC, "quick": args.quick,
                 "link_goodput_bit_s": checks, "torch": torch.__version__, "python": platform.python_version(),
                 "kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_before": load_before,
                 "loadavg_after": os.getloadavg(), "wall_s": time.monotonic() - t_start,
                 "task": "sklearn digits, 64-w-w-10 ReLU MLP, batch 32 per rank, SGD lr 0.1 (momentum 0.9; DGC: "
                         "momentum correction 0.9 on the worker; EF21/EControl: no momentum)"})
    table = markdown_table(rows, skipped)
    prof = breakdown_table(rows, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "targets": targets, "rows": rows, "skipped": skipped,
                               "records": records}, indent=1))
    md = out.with_suffix(".md")
    md.write_text(f"# Bandwidth benchmark\n\n{_notes(meta)}\n\n{table}\n## Where commlib's hook spends a step\n\n"
                  f"{prof}\n## Targets\n\n{_targets_md(targets)}\n")
    print()
    print(table)
    print(prof)
    print(_targets_md(targets))
    print(f"{meta['wall_s']:.0f} s in all; load average {load_before[0]:.1f} before, {meta['loadavg_after'][0]:.1f} "
          f"after, on {os.cpu_count()} CPUs. Wrote {out} and {md}.")
    return 0


def _notes(meta: Dict[str, Any]) -> str:
    gp = ", ".join(f"{RATE_LABEL[k]}: {v / 1e6:.0f} Mbit/s" for k, v in meta["link_goodput_bit_s"].items())
    return (f"{meta['hosts']} hosts (network namespaces, veth, tc tbf burst {meta['burst']}), one torchrun node each, "
            f"gloo. DDP gradient_as_bucket_view={meta.get('gradient_as_bucket_view', False)}. "
            f"Task: {meta['task']}. Step = median wall time of the measured steps on rank 0; CPU = median "
            "CPU time of rank 0's training thread per step (forward, backward, the hook's encode, optimizer; far "
            "below the step when the link or a loaded machine is the bottleneck); wire bytes = bytes "
            f"rank 0's veth sent per step (TCP/IP headers and gloo control included). Time to "
            f"{meta['target_acc']:.0%}: training time until the first evaluation (every 10 steps) at or above it; "
            "'proj.' = steps to reach it in the run with evaluations x this link's median step. Measured TCP goodput "
            f"per link: {gp}. Latency not emulated (no netem). Models per link: "
            + "; ".join(f"{RATE_LABEL[k]} {', '.join(v)}" for k, v in meta["cells"].items())
            + ". Skipped cells: a dense scheme whose wire time alone would exceed the per-step limit. "
            f"Load average {meta['loadavg_before'][0]:.1f} before, "
            f"{meta['loadavg_after'][0]:.1f} after, {meta['cpus']} CPUs.")


def _targets_md(targets: Dict[str, Any]) -> str:
    lines = []
    for name, t in targets.items():
        nums = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if k != "met")
        lines.append(f"- {name}: {'met' if t['met'] else 'MISSED'} ({nums})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
