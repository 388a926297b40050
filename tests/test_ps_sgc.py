"""Sequential gradient coding in the sync parameter server (commlib/ps/sequential.py; SR-SGC
and M-SGC, Krishnan et al., ICLR 2023): a run with injected bursty stragglers gives exactly the
weights of SGD with gradient delay T computed directly (float64 to 1e-12), patterns outside
the model (a dead worker, two bursts too close) fall back and stay exact, malformed
assignments and results are refused, a server restart continues exactly, and one run on
local Ray."""
import time

import numpy as np
import pytest
import torch

from commlib.coding import MultiplexedSGC, satisfies
from commlib.errors import ConfigError, PayloadError
from commlib.ps import InprocJob, PSConfig, WorkerHooks
from commlib.ps.sequential import build_scheduler, decode_assignment, decode_results, encode_assignment
from commlib.ps.worker import WorkerCrashed
from commlib.wire import Message, Payload
from test_ps_coded import PLAIN, TinyTask, run_on_local_ray, weights

BWL = dict(straggler_burst=1, straggler_window=2, straggler_tolerance=1)  # (B, W, lam) = (1, 2, 1)


def cfg(**kw):
    base = dict(steps=6, step_timeout=10.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=0.5,
                shutdown_timeout=2.0, max_misses=10 ** 6, sgc_mu=0.5)
    base.update(kw)
    return PSConfig(**base)


def delayed_sgd(task, P, T, steps, lr=0.05):
    """Obviously-correct reference: theta_{r+1} = theta_r - lr/P * sum_p grad L_p(theta_{r-T}; job r-T),
    no update in the first T rounds (arXiv 2211.13802: job t is decoded at round t + T)."""
    model = task.build_model()
    thetas = []
    for r in range(steps + T):
        thetas.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if r < T:
            continue
        job = r - T
        probe = task.build_model()
        probe.load_state_dict(thetas[job])
        probe.zero_grad()
        sum(task.partition_loss(probe, p, P, job) for p in range(P)).div(P).backward()
        with torch.no_grad():
            for prm, g in zip(model.parameters(), probe.parameters()):
                prm -= lr * g.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Slow(WorkerHooks):
    """Sleep before computing in the given rounds (a straggler), or crash at a round."""

    def __init__(self, rounds=(), delay=0.0, crash_at=None):
        self.rounds, self.delay, self.crash_at = set(rounds), delay, crash_at

    def before_compute(self, worker, step):
        if self.crash_at is not None and step >= self.crash_at:
            raise WorkerCrashed("fault plan")
        if step in self.rounds:
            time.sleep(self.delay)


def _reference(coding, n, steps, **bwl):
    bwl = bwl or BWL
    sched = build_scheduler(coding, n, bwl["straggler_burst"], bwl["straggler_window"],
                            bwl["straggler_tolerance"], steps)
    return delayed_sgd(TinyTask(torch.float64), sched.num_partitions, sched.T, steps), sched


def _close(a, b, tol=1e-12):
    return all(torch.allclose(a[k], b[k], rtol=0, atol=tol) for k in a)


@pytest.mark.parametrize("coding", ["m-sgc", "sr-sgc"])
def test_sgc_ps_with_bursty_stragglers_equals_delayed_sgd(coding):
    n, steps = 4, 8
    want, sched = _reference(coding, n, steps)
    pattern = np.zeros((steps + sched.T, n), dtype=bool)
    for r, w in [(1, 2), (3, 0), (5, 3), (7, 1)]:  # one straggler every other round: inside (1, 2, 1)
        pattern[r, w] = True
    assert satisfies(pattern, 1, 2, 1)
    hooks = {w: Slow(np.flatnonzero(pattern[:, w]).tolist(), 0.5) for w in range(n)}
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding=coding, **BWL), n, hooks=hooks)
    res = job.run()
    c = res["coding"]
    assert res["status"] == "done" and res["steps"] == steps
    assert c["decoded"] == steps and c["fallbacks"] == 0 and c["on_time"] == steps
    assert c["rounds"] == steps + sched.T and c["rounds_cut_early"] >= 1  # moved on without a sleeper
    assert _close(want, weights(job)), "the decoded gradients are not the delayed full gradients"
    assert res["history"][-1]["staleness"] == sched.T


def test_sgc_ps_dead_worker_outside_the_model_falls_back_with_repairs_and_stays_exact():
    n, steps = 4, 6
    want, _ = _reference("m-sgc", n, steps)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="m-sgc", step_timeout=0.3, **BWL), n,
                    hooks={2: Slow(crash_at=2)})
    res = job.run()
    c = res["coding"]
    assert res["status"] == "done" and res["steps"] == steps
    assert c["fallbacks"] >= 1 and c["repair_tasks"] >= 1  # worker 2 straggles forever: outside (1, 2, 1)
    assert c["repairs_at_once"] >= c["fallbacks"] - 1  # no step_timeout wait for a dead worker's results
    assert _close(want, weights(job))


def test_sgc_ps_two_bursts_too_close_wait_for_late_results():
    # worker 0 straggles in rounds 1 and 2 (a burst of 2 > B = 1): the server cannot cut round 2
    # early, so it waits out step_timeout for late results or repairs; the result stays exact
    n, steps = 4, 5
    want, _ = _reference("sr-sgc", n, steps)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="sr-sgc", step_timeout=0.4, **BWL), n,
                    hooks={0: Slow([1, 2], 0.6)})
    res = job.run()
    assert res["status"] == "done" and res["steps"] == steps
    assert _close(want, weights(job))


def test_sgc_ps_server_restart_continues_exactly(tmp_path):
    import dataclasses

    from commlib.ps import ParameterServer

    n, steps = 4, 7
    want, _ = _reference("m-sgc", n, steps)
    config = cfg(steps=steps, coding="m-sgc", checkpoint=str(tmp_path / "s.pt"), worker_timeout=0.3, **BWL)

    class Crash(Exception):
        pass

    class Crashing(ParameterServer):
        def _after_update(self, workers, staleness):
            super()._after_update(workers, staleness)
            if self.version == 3:
                raise Crash

    job = InprocJob(TinyTask(torch.float64), PLAIN, config, n)
    job.server = Crashing(job.hub.endpoint(0), job.new_scheme(), job.task, config)
    for w in range(n):
        job.start_worker(w)
    with pytest.raises(Crash):
        job.server.run()
    job.server = ParameterServer(job.hub.endpoint(0), job.new_scheme(), job.task,
                                 dataclasses.replace(config, resume=True))
    res = job.run()
    assert res["status"] == "done" and res["steps"] == steps and res["incarnation"] == 1
    assert _close(want, weights(job))


def test_sr_sgc_dead_workers_repairs_carry_the_versions_they_need():
    # two workers die (outside (1, 2, 1)): repair tasks of job r - T go to workers that already
    # dropped that version from the assignment of round r; repair frames must carry it
    n, steps = 4, 5
    want, _ = _reference("sr-sgc", n, steps)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="sr-sgc", step_timeout=0.3, **BWL), n,
                    hooks={0: Slow(crash_at=2), 1: Slow(crash_at=2)})
    res = job.run()
    assert res["status"] == "done" and res["steps"] == steps and res["coding"]["repair_tasks"] >= 1
    assert sum(r[-1]["rejected_frames"] for w, r in res["worker_reports"].items() if w > 1) == 0
    assert _close(want, weights(job))


def test_sgc_answer_to_an_earlier_repair_is_not_filed_under_a_newer_one():
    # workers 3 and 4 die; 0 and 1 answer their first repair after step_timeout, so the server
    # re-sends the missing tasks in another order: the late answers carry the old tag
    from collections import Counter

    class Crash(WorkerHooks):
        def before_compute(self, worker, step):
            if step >= 2:
                raise WorkerCrashed("fault plan")

    class SlowFirstRepair(WorkerHooks):
        def __init__(self):
            self.calls, self.slept = Counter(), False

        def work(self, worker, step, load):
            self.calls[step] += 1
            if self.calls[step] == 2 and not self.slept:  # this worker's first repair
                self.slept = True
                time.sleep(0.5)

    n, steps = 5, 4
    bwl = dict(straggler_burst=1, straggler_window=2, straggler_tolerance=2)
    want, _ = _reference("m-sgc", n, steps, **bwl)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="m-sgc", step_timeout=0.3, **bwl), n,
                    hooks={3: Crash(), 4: Crash(), 0: SlowFirstRepair(), 1: SlowFirstRepair()})
    res = job.run()
    assert res["status"] == "done" and res["steps"] == steps
    assert _close(want, weights(job)), "a repair answer was filed under the wrong task"


def test_sgc_restarted_worker_gets_the_versions_its_new_process_lacks():
    # M-SGC (1, 3, 1): T = 2, so round r needs theta_{r-2..r}; a new process holds none of them
    n, steps = 4, 6
    bwl = dict(straggler_burst=1, straggler_window=3, straggler_tolerance=1)
    want, _ = _reference("m-sgc", n, steps, **bwl)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="m-sgc", step_timeout=0.5, **bwl), n,
                    hooks={1: Slow(crash_at=3)}, restart_after={1: 0.0})
    res = job.run()
    assert res["status"] == "done" and res["crashes"][1] == 1
    assert res["worker_reports"][1][-1]["rejected_frames"] == 0
    assert _close(want, weights(job))


def test_private_tasks_are_refused_with_gradient_coding():
    spec = {"name": "private", "task": {"name": "classification", "width": 16, "batch": 8},
            "stage": {"name": "dpsgd", "clip": 1.0, "sigma": 1.0}}
    for coding in ("m-sgc", "frc"):
        kw = BWL if coding == "m-sgc" else {"straggler_tolerance": 1}
        with pytest.raises(ConfigError, match="extra releases"):
            InprocJob(spec, PLAIN, cfg(coding=coding, **kw), 4).make_server()


def test_assignment_round_trip_and_malformed_descriptors_are_refused():
    sched = MultiplexedSGC(4, 1, 2, 1, num_jobs=5)
    sched.end_round(0)
    tasks = sched.assignment(1)[2]
    numels = [6, 1]
    versions = {1: [torch.randn(6), torch.randn(1)], 0: [torch.randn(6), torch.randn(1)]}
    msg = encode_assignment(sched.num_partitions, tasks, versions, sender=7, step=1, keep_from=0, tag=3)
    back = Message.from_bytes(msg.to_bytes(), require_checksum=True)
    a = decode_assignment(back, numels)
    assert a.P == sched.num_partitions and sorted(a.versions) == [0, 1] and (a.keep_from, a.tag) == (0, 3)
    assert a.tasks == [(t.job, dict(t.coefficients)) for t in tasks]
    assert torch.equal(a.versions[0][0], versions[0][0])
    desc = msg.payloads[0].values

    def refuse(values, extra=None):
        pls = [Payload.dense(values, slot=0)] + (extra if extra is not None else msg.payloads[1:])
        with pytest.raises(PayloadError):
            decode_assignment(Message(pls, sender=7, step=1), numels)

    refuse(desc[:-1])  # truncated
    refuse(torch.cat([desc, desc[-1:]]))  # trailing value
    bad = desc.clone(); bad[0] = 1.0; refuse(bad)  # magic
    bad = desc.clone(); bad[8] = 0.5; refuse(bad)  # a non-integer job id
    bad = desc.clone(); bad[10] = float(sched.num_partitions); refuse(bad)  # partition out of range
    bad = desc.clone(); bad[3] = -1.0; refuse(bad)  # a negative repair tag
    refuse(desc, msg.payloads[1:-1])  # a parameter payload missing
    refuse(desc.to(torch.float32))  # descriptor must be float64
    with pytest.raises(PayloadError):
        decode_results(Message([Payload.dense(torch.zeros(7, dtype=torch.float64))], sender=0, step=1), 2, 7)
    with pytest.raises(PayloadError):
        decode_results(Message([Payload.dense(torch.zeros(7))], sender=0, step=1), 1, 7)  # float32


def test_sgc_ps_garbled_push_is_rejected_and_the_run_stays_exact():
    from commlib.sim.hooks import FaultHooks

    n, steps = 4, 5
    want, _ = _reference("m-sgc", n, steps)
    job = InprocJob(TinyTask(torch.float64), PLAIN, cfg(steps=steps, coding="m-sgc", step_timeout=0.5, **BWL), n,
                    hooks={1: FaultHooks(worker=1, garbage_at=[2])})
    res = job.run()
    assert res["status"] == "done" and res["totals"]["rejected"] >= 1
    assert _close(want, weights(job))


def test_sgc_configuration_errors():
    with pytest.raises(ConfigError):
        PSConfig(coding="m-sgc", straggler_burst=2, straggler_window=2)
    with pytest.raises(ConfigError):
        PSConfig(coding="m-sgc", mode="async")
    with pytest.raises(ConfigError):
        PSConfig(coding="sr-sgc", sgc_mu=-1)
    with pytest.raises(ConfigError, match="B \\| \\(W-1\\)"):  # SR-SGC needs B | (W - 1)
        InprocJob(TinyTask(), PLAIN, cfg(coding="sr-sgc", straggler_burst=2, straggler_window=4,
                                         straggler_tolerance=1), 4).make_server()
    with pytest.raises(ConfigError, match="feedback"):
        InprocJob(TinyTask(), {"compressor": "identity", "feedback": "ef"}, cfg(coding="m-sgc", **BWL), 4).make_server()
    with pytest.raises(ConfigError, match="lam < n"):
        InprocJob(TinyTask(), PLAIN, cfg(coding="m-sgc", straggler_tolerance=4), 4).make_server()


@pytest.mark.slow
@pytest.mark.ray
def test_sgc_ps_on_local_ray_with_bursty_stragglers():
    task = {"name": "classification", "dataset": "digits", "width": 16, "batch": 8, "seed": 1}
    n, steps = 4, 5
    config = cfg(steps=steps, coding="m-sgc", **BWL)
    delays = {1: [0.0, 1.0, 0.0, 0.0, 1.0], 3: [0.0, 0.0, 1.0, 0.0, 0.0]}  # inside (1, 2, 1)
    res = run_on_local_ray(task, config, n, delays)
    assert res["status"] == "done" and res["steps"] == steps
    assert res["coding"]["decoded"] == steps and res["coding"]["fallbacks"] == 0
    assert res["coding"]["rounds_cut_early"] >= 1  # did not wait out a 1 s straggler
    ref = InprocJob(task, PLAIN, config, n)  # the same coded run in-process, no stragglers
    ref.run()
    for k, v in ref.server.model.state_dict().items():
        assert torch.allclose(res["model_state"][k], v, rtol=0, atol=1e-6), k
