"""Resume on Ray after the driver is killed: a parameter-server job on local Ray is SIGKILLed
mid-run (driver, server and, through the reaper, every Ray process with it), then resumed
from its checkpoint on a new local Ray. The weights equal those of an uninterrupted run, and
no round after the resume is applied with fewer workers than all n (the server waits for the
re-joining workers instead of counting the sessions restored from its checkpoint). On Ray the
actors are up before the server starts, so this run passes even without that server fix; the
in-process test with late workers (tests/test_security.py) is the one that catches it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from commlib.ps import InprocJob, PSConfig
from commlib.ps.checkpoint import load_plain

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = {"name": "classification", "dataset": "digits", "width": 16, "batch": 16, "seed": 4}
SCHEME = {"compressor": "identity"}  # stateless workers: fresh actors give the same pushes
N, STEPS = 3, 24
DRIVER = r"""
import json, sys, torch
from commlib.ps import PSConfig
from commlib.ps.ray_runner import run_ray
args = json.loads(sys.argv[1])
cfg = PSConfig(**args["config"])
hooks = {w: {"factory": "test_ps_ray_resume:slow_hooks", "options": {}} for w in range(args["n"])}
res = run_ray(args["task"], args["scheme"], cfg, args["n"], hooks=hooks)
torch.save({"model": res["model_state"], "workers": [h["workers"] for h in res["history"]],
            "status": res["status"], "steps": res["steps"]}, args["out"])
"""


def slow_hooks(worker):
    from commlib.ps import WorkerHooks

    class Slow(WorkerHooks):  # each step takes >= 0.15 s, so the kill lands mid-run
        def before_compute(self, worker, step):
            time.sleep(0.15)

    return Slow()


def _driver(tmp_path, config, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT,
                                                       os.environ.get("PYTHONPATH", "")]))
    arg = json.dumps({"task": TASK, "scheme": SCHEME, "config": config, "n": N, "out": str(out)})
    return subprocess.Popen([sys.executable, "-c", DRIVER, arg], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_ray_resume_after_driver_kill_equals_uninterrupted_run(tmp_path):
    ck = str(tmp_path / "server.pt")
    base = {"steps": STEPS, "step_timeout": 30.0, "worker_timeout": 3.0,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "checkpoint": ck}
    first = _driver(tmp_path, base, tmp_path / "first.pt")
    deadline = time.monotonic() + 180
    killed_at = None
    while time.monotonic() < deadline and first.poll() is None:
        if os.path.exists(ck):
            try:
                v = int(load_plain(ck)["version"])
            except Exception:  # caught between writes: the rename is atomic, but retry anyway
                v = -1
            if v >= 6:
                os.kill(first.pid, signal.SIGKILL)  # the driver only: the reaper must take Ray down
                killed_at = v
                break
        time.sleep(0.05)
    out = first.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_at is not None, f"the first run never reached step 6 (or ended first):\n{out[-3000:]}"
    assert killed_at < STEPS
    second = _driver(tmp_path, dict(base, resume=True), tmp_path / "second.pt")
    out = second.communicate(timeout=300)[0].decode(errors="replace")
    assert second.returncode == 0, out[-3000:]
    got = torch.load(tmp_path / "second.pt", weights_only=True)
    assert got["status"] == "done" and got["steps"] == STEPS
    # no round applied with fewer than the quorum after the resume
    assert got["workers"] and min(got["workers"]) == N, got["workers"]

    job = InprocJob(TASK, SCHEME, PSConfig(**{k: v for k, v in base.items() if k != "checkpoint"}), N)
    job.run()
    ref = job.server.model.state_dict()
    for k in ref:
        assert torch.equal(got["model"][k], ref[k]), k
