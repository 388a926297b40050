"""``commlib simulate --address`` joins a Ray cluster it did not start: a head node started with
``ray start --head`` (token authentication, as the README's cluster recipe), the simulation run
by address, its summary checked; the cluster is then torn down by its own process group (never
``ray stop``, which would kill every Ray of the machine)."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError("the Ray head did not open its GCS port")


def test_simulate_joins_a_ray_cluster_by_address(tmp_path):
    port = _free_port()
    temp = Path(os.environ.get("COMMLIB_TMP") or ROOT / ".tmp") / f"rayhead{os.getpid()}"
    temp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                             "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_port(port, head)
        out = tmp_path / "run"
        r = subprocess.run([sys.executable, "-m", "commlib.cli", "simulate", "--address", f"127.0.0.1:{port}",
                            "--workers", "4", "--steps", "4", "--attack", "3:alie", "--aggregator",
                            "trimmed-mean", "--f", "1", "--no-plot", "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        summary = json.loads((out / "sim.json").read_text())
        assert summary["status"] == "done" and summary["steps"] == 4, summary
        assert f"at 127.0.0.1:{port}" in r.stdout  # it ran on the given cluster, not a local one
        # a driver with a wrong token, or with token mode and no token at all, is refused clearly
        wrong = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))
        none = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        for name, bad in (("wrong", wrong), ("none", dict(none, HOME=str(tmp_path)))):
            r2 = subprocess.run([sys.executable, "-m", "commlib.cli", "simulate", "--address", f"127.0.0.1:{port}",
                                 "--workers", "2", "--steps", "1", "--no-plot", "--out", str(tmp_path / name)],
                                env=bad, capture_output=True, text=True, timeout=120)
            assert r2.returncode != 0 and not (tmp_path / name / "sim.json").exists()
            assert "could not join the Ray cluster" in r2.stderr and "RAY_AUTH_TOKEN" in r2.stderr, r2.stderr[-2000:]
            assert "Traceback" not in r2.stderr  # a clear error, not a stack
    finally:
        try:  # `ray start --block` takes about 30 s to wind down on SIGTERM: give it 5, then kill the group
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
