"""Ray: the transport contract with actors, a parameter-server run on 4 worker actors that
equals the in-process run, and a simulation whose fault plan kills a worker's actor process
mid-run and restarts it. One local Ray (2 CPUs, 127.0.0.1, temp dir under .tmp/ray) serves
every test of this module and is shut down at its end."""
import os
import time

import pytest
import torch

from commlib.ps import InprocJob, PSConfig

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

TASK = {"name": "classification", "dataset": "digits", "width": 32, "batch": 16, "seed": 2}
SCHEME = {"compressor": "topk", "ratio": 0.1, "feedback": "ef21"}


class _ContractActor:
    def __init__(self, rank, world, server_inbox):
        from commlib.comm.ray_transport import LocalInbox, RayTransport

        self.inbox = LocalInbox()
        self.t = RayTransport(rank, world, peers={0: server_inbox}, inbox=self.inbox)

    def deliver(self, src, stream, seq, data):
        return self.inbox.deliver(src, stream, seq, data)

    def run(self):
        from test_comm import exchange

        exchange(self.t)
        return True


def test_ray_transport_contract_and_dead_actor(local_ray):
    from commlib.comm.ray_transport import RayTransport, mailbox_actor
    from test_comm import exchange

    box = mailbox_actor()
    actors = {r: ray.remote(_ContractActor).options(num_cpus=0, max_concurrency=4).remote(r, 4, box)
              for r in (1, 2, 3)}
    t = RayTransport(0, 4, peers=actors, inbox=box)
    runs = [a.run.remote() for a in actors.values()]
    exchange(t)
    assert ray.get(runs, timeout=120) == [True] * 3
    assert ray.get(box.deliver.remote("x", 0, 0, b"y")) is False  # the inbox refuses non-(int, bytes)
    ray.kill(actors[3])
    deadline = time.monotonic() + 30
    while t.send(3, b"anyone?") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.is_dead(3) and not t.is_dead(1)
    assert t.send(1, b"still here")
    ray.kill(box)


def test_ray_parameter_server_four_actors_equals_inproc(local_ray):
    from commlib.ps.ray_runner import run_ray

    cfg = PSConfig(steps=10, optimizer={"name": "sgd", "lr": 0.1}, worker_timeout=5.0)
    res = run_ray(TASK, SCHEME, cfg, 4)
    assert res["status"] == "done" and res["totals"]["applied"] == 40
    assert all(r[-1]["status"] == "shutdown" for r in res["worker_reports"].values())
    job = InprocJob(TASK, SCHEME, cfg, 4)
    job.run()
    ref = job.server.model.state_dict()
    for k in ref:
        assert torch.equal(res["model_state"][k], ref[k]), k


def test_simulation_on_ray_kills_an_actor_process_and_restarts_it(local_ray, tmp_path):
    from commlib.sim import FaultPlan, WorkerFaults, simulate
    from commlib.sim.report import plot, summary_table

    # every push takes >= 40 ms on the wire, so the run outlasts the start of a new actor process
    slow = {"delay_s": 0.04}
    plan = FaultPlan(4, {0: WorkerFaults(**slow), 1: WorkerFaults(crash_at=4, restart_after=0.5, **slow),
                         2: WorkerFaults(**slow), 3: WorkerFaults(garbage_at=[2], **slow)})
    cfg = PSConfig(steps=300, step_timeout=1.0, max_misses=2, eval_every=50, worker_timeout=2.0,
                   optimizer={"name": "sgd", "lr": 0.1})
    res = simulate(plan, TASK, SCHEME, cfg, backend="ray")
    assert res["status"] == "done" and res["steps"] == 300
    assert res["crashes"][1] == 1  # the actor's process died (os._exit), seen by Ray
    assert [r["status"] for r in res["worker_reports"][1]] == ["crashed", "shutdown"]
    w1 = res["workers"][1]
    assert w1["drops"] >= 1 and w1["rejoins"] >= 1 and w1["applied"] > 4
    assert res["resyncs"] == 1  # EF21: the new process rejoined without the old one's state
    assert res["workers"][3]["rejected"] == 1
    table = summary_table(res)
    assert "crash@4+0.5s" in table and "garbage@2" in table
    print(table)
    assert os.path.getsize(plot(res, str(tmp_path / "sim.png"))) > 10_000
