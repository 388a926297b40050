"""The local Ray that commlib starts, seen by an outsider process on the same machine: it can
neither join through the GCS nor submit a job to the dashboard agent, and every process of
that Ray is gone a few seconds after the driver is killed with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from test_security import _listeners, _non_loopback

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = """
import json, os, sys, time
from commlib.comm.ray_transport import ray_start
ray_start(num_cpus=1)
import ray
with open(sys.argv[1] + ".part", "w") as f:
    json.dump({"gcs": ray.get_runtime_context().gcs_address, "pid": os.getpid()}, f)
os.replace(sys.argv[1] + ".part", sys.argv[1])
time.sleep(600)
"""

OUTSIDER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote
def pwn(path):
    open(path, "w").write("ran")
    return 1
print("JOINED", ray.get(pwn.remote(sys.argv[2]), timeout=60), flush=True)
"""


def _outsider_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "COMMLIB_SECRET"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=ROOT)  # no ~/.ray/auth_token of this user either
    return env


def _ray_processes(driver_pid):
    from commlib.comm.ray_reaper import _stat, descendants

    return {pid: start for pid, start in descendants([driver_pid]).items()
            if open(f"/proc/{pid}/cmdline", "rb").read().find(b"ray_reaper") < 0 and _stat(pid)}


def _agent_ports(pids):
    out = []
    for pid in pids:
        try:
            name = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if name.startswith(b"ray::DashboardAgent"):
            out += _listeners([pid])
    return out


def test_local_ray_refuses_an_outsider_and_dies_with_its_driver(tmp_path):
    info = tmp_path / "driver.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(info)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not info.exists() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
        assert info.exists(), "the local Ray did not start"
        gcs = json.loads(info.read_text())["gcs"]
        time.sleep(3)  # let the agents come up
        procs = _ray_processes(driver.pid)
        listeners = _listeners(list(procs))
        # 1. join through the GCS and run a task, without the token
        marker = tmp_path / "ran"
        out = subprocess.run([sys.executable, "-c", OUTSIDER, gcs, str(marker)], env=_outsider_env(tmp_path),
                             capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        joined = "JOINED" in out.stdout or marker.exists()
        # 2. submit a job to the dashboard agent's HTTP API
        job_marker = tmp_path / "job_ran"
        accepted = []
        for addr, port in _agent_ports(list(procs)):
            host = "127.0.0.1" if addr in ("0.0.0.0", "::") else addr
            body = json.dumps({"entrypoint": f"touch {job_marker}", "submission_id": f"x{port}"}).encode()
            req = urllib.request.Request(f"http://{host}:{port}/api/job_agent/jobs/", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    accepted.append((port, resp.status))
            except Exception:  # 401 / not HTTP / refused
                pass
        time.sleep(5 if accepted else 0)
        print(f"outsider joined: {joined}; agent accepted jobs: {accepted} (ran: {job_marker.exists()}); "
              f"listeners: {len(listeners)}, non-loopback: {len(_non_loopback(listeners))}")
        # 3. kill the driver: every Ray process it started must go
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        left = procs
        deadline = time.monotonic() + 15
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = {p: s for p, s in procs.items() if os.path.exists(f"/proc/{p}")}
        names = [open(f"/proc/{p}/cmdline", "rb").read()[:60] for p in left if os.path.exists(f"/proc/{p}")]
        print(f"Ray processes left 15 s after SIGKILL: {len(left)} {names}")
        for p in left:  # leave the machine clean whatever the outcome
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        assert procs, "no Ray process was found under the driver"
        assert not joined, out.stdout + out.stderr
        assert not accepted and not job_marker.exists()
        assert not left, names
    finally:
        if driver.poll() is None:
            driver.kill()
