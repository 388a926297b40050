import os
import secrets
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("COMMLIB_TMP", os.path.join(ROOT, ".tmp"))
# the job secret every process of a test inherits (network transports refuse to start without one)
os.environ.setdefault("COMMLIB_SECRET", secrets.token_hex(32))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, loopback, token auth) for the tests of a module, shut down at its end;
    actors see tests/ on their PYTHONPATH."""
    ray = pytest.importorskip("ray")
    from commlib.comm.ray_transport import ray_start

    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    started = ray_start(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    if started:
        ray.shutdown()
