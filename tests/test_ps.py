"""Parameter server on the in-process transport: equality with the DDP runtime, quorum, async
staleness, faults (garbled bytes, Byzantine NaN, duplicates, hangs, crashes), the EF21
server/worker invariant under all of them, and exactly-once server restarts."""
import dataclasses
import threading
import time

import pytest
import torch

from commlib import Scheme
from commlib.comm.inproc import InprocHub
from commlib.errors import ConfigError
from commlib.ps import InprocJob, ParameterServer, PSConfig, PSWorker, WorkerHooks, run_inproc
from commlib.ps import checkpoint as ckpt
from commlib.ps.worker import WorkerCrashed
from ddp_jobs import Net, job_train
from dist_utils import run
from ps_task import DDPJobTask

EF21 = {"compressor": "topk", "ratio": 0.1, "feedback": "ef21"}


def cfg(**kw):
    base = dict(steps=8, step_timeout=10.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=0.5,
                shutdown_timeout=2.0)
    base.update(kw)
    return PSConfig(**base)


def weights(job_or_server):
    server = getattr(job_or_server, "server", job_or_server)
    return {k: v.detach().clone() for k, v in server.model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def run_job(scheme, config, n=3, **kw):
    job = InprocJob(DDPJobTask(), scheme, config, n, **kw)
    result = job.run()
    return job, result


def ef21_invariant(job):
    """EF21 (Richtarik et al. 2021, Alg. 1): the server's g equals the mean of the workers' g_i,
    where g_i is worker i's state after the last push the server applied."""
    server = job.server
    for key in server.keys:
        gs = []
        for w, rec in enumerate(server.records):
            snap = job.workers[w].snapshots[rec.last_applied]["scheme"]["state"]
            gs.append(snap[key]["g"] if key in snap else torch.zeros_like(server.half.state[key]["g"]))
        mean = torch.stack(gs).mean(0)
        assert torch.allclose(server.half.state[key]["g"], mean, atol=1e-5, rtol=1e-4), key


class Sleepy(WorkerHooks):
    """Seeded straggling: sleep 0 or ``slow`` seconds before each step."""

    def __init__(self, seed, p=0.4, slow=0.08):
        self.g = torch.Generator().manual_seed(seed)
        self.p, self.slow = p, slow

    def before_compute(self, worker, step):
        if torch.rand(1, generator=self.g).item() < self.p:
            time.sleep(self.slow)


# --------------------------------------------------------------------------- DDP equality
@pytest.mark.slow
@pytest.mark.parametrize("scheme,exact", [({"compressor": "identity"}, False), (EF21, True)])
def test_sync_ps_equals_ddp_runtime(tmp_path, scheme, exact):
    """Same scheme, data and seed: the synchronous PS gives DDP's weights (gloo, 3 ranks)."""
    steps, world = 6, 3
    out = str(tmp_path / "ddp_{rank}.pt")
    run(job_train, world, scheme, steps, out, {"lr": 0.05}, tmpdir=tmp_path)
    ddp = torch.load(out.format(rank=0), weights_only=False)["model"]
    job, res = run_job(scheme, cfg(steps=steps), n=world)
    assert res["status"] == "done" and res["steps"] == steps
    ps = weights(job)
    for k in ddp:
        if exact:  # all-gather path: the same decode_group on the same bytes, bit for bit
            assert torch.equal(ps[k], ddp[k]), k
        else:  # DDP's all-reduce pre-divides by n before summing: rounding differs
            assert torch.allclose(ps[k], ddp[k], atol=1e-6, rtol=1e-5), k
    assert not same(ps, Net().state_dict())


# ------------------------------------------------------------------------------- quorum
def test_quorum_goes_on_without_the_slowest_and_keeps_ef21_consistent():
    hooks = {w: Sleepy(w, p=0.5, slow=0.06) for w in range(4)}
    job, res = run_job(EF21, cfg(steps=25, quorum=3), n=4, hooks=hooks)
    assert res["status"] == "done" and res["steps"] == 25
    assert all(h["workers"] >= 3 for h in res["history"])
    assert res["totals"]["applied"] < 4 * 25  # the 4th push of a round is not waited for
    assert res["totals"]["late"] > 0
    assert sum(r[-1]["rollbacks"] for r in res["worker_reports"].values()) > 0
    ef21_invariant(job)


def test_step_timeout_applies_partial_round_and_drops_a_silent_worker():
    class Mute(WorkerHooks):
        def silent(self, worker, step):
            return step >= 2

    job, res = run_job(EF21, cfg(steps=8, step_timeout=0.2, max_misses=2, probe_every=3), n=3, hooks={2: Mute()})
    rec = res["workers"][2]
    assert res["status"] == "done" and res["steps"] == 8
    assert rec["applied"] == 2 and rec["timeouts"] >= 2 and rec["drops"] == 1
    ef21_invariant(job)


# -------------------------------------------------------------------------------- async
def _pull(worker):
    frame = worker._next_frame(5.0)
    assert frame is not None
    assert worker._reconcile(frame) and worker._load_params(frame)
    return frame


@pytest.mark.parametrize("max_staleness", [None, 1])
def test_async_staleness_is_measured_and_bounded(max_staleness):
    """b pushes twice while a computes on version 0: a's push has staleness 2."""
    task, scheme = DDPJobTask(), Scheme("identity")
    hub = InprocHub(3)
    config = cfg(mode="async", steps=3, max_staleness=max_staleness, shutdown_timeout=0.2)
    server = ParameterServer(hub.endpoint(0), scheme, task, config)
    th = threading.Thread(target=server.run)
    th.start()
    a, b = (PSWorker(hub.endpoint(r), scheme, task, config) for r in (1, 2))
    a._hello(True)
    b._hello(True)
    fa, fb = _pull(a), _pull(b)
    assert fa.step == fb.step == 0
    for _ in range(2):
        b._push(fb, b.seq + 1)
        fb = _pull(b)
    assert fb.step == 2
    a._push(fa, a.seq + 1)  # computed on version 0, arrives at version 2
    if max_staleness is not None:  # dropped; a learns it, rolls back and recomputes on version 2
        fa = _pull(a)
        assert fa.step == 2 and a.stats.rollbacks == 1 and a.seq == -1
        a._push(fa, a.seq + 1)
    th.join(10)
    rec = server.records[0]
    assert server.version == 3
    if max_staleness is None:
        assert [h["staleness"] for h in server.history] == [0, 0, 2]
        assert rec.staleness_max == 2 and rec.stale == 0
    else:
        assert [h["staleness"] for h in server.history] == [0, 0, 0]
        assert rec.stale == 1 and rec.applied == 1 and rec.staleness_max == 0


def test_async_run_with_adaptive_braking_and_stragglers():
    from commlib.optim import AdaptiveBrakingSGD

    hooks = {w: Sleepy(w, p=0.5, slow=0.03) for w in range(3)}
    job, res = run_job(EF21, cfg(mode="async", steps=30, max_staleness=4, optimizer={"name": "ab-sgd", "lr": 0.05}),
                       n=3, hooks=hooks)
    assert isinstance(job.server.optimizer, AdaptiveBrakingSGD)
    assert res["status"] == "done" and res["steps"] == 30
    recs = res["workers"]
    assert sum(r["applied"] for r in recs) == 30
    assert all(r["staleness_max"] <= 4 for r in recs)
    assert max(h["staleness"] for h in res["history"]) > 0  # three workers interleave
    ef21_invariant(job)


# --------------------------------------------------------------------------------- faults
class Garble(WorkerHooks):
    def __init__(self, at):
        self.at = set(at)

    def before_send(self, worker, step, data):
        if step in self.at:
            self.at.discard(step)
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0xFF
            return bytes(buf)
        return data


class NaNByzantine(WorkerHooks):
    def byzantine(self, worker, step, grads):
        return [torch.full_like(g, float("nan")) for g in grads] if step == 2 else None


@pytest.mark.parametrize("hook", [Garble([3]), NaNByzantine()], ids=["garbled-bytes", "nan-payload"])
def test_bad_message_is_rejected_counted_and_training_goes_on(hook):
    job, res = run_job(EF21, cfg(steps=8, step_timeout=0.3), n=3, hooks={1: hook})
    assert res["status"] == "done" and res["steps"] == 8
    assert res["workers"][1]["rejected"] == 1
    assert res["workers"][1]["applied"] == 7
    assert res["worker_reports"][1][-1]["rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in weights(job).values())
    ef21_invariant(job)


def test_duplicate_push_is_ignored_exactly_once():
    class Twice(WorkerHooks):
        def before_send(self, worker, step, data):
            if step in (2, 5):
                worker.transport.send(0, data)  # the network delivers this push twice
            return data

    ref_job, _ = run_job(EF21, cfg(steps=8), n=3)
    job, res = run_job(EF21, cfg(steps=8), n=3, hooks={0: Twice()})
    assert res["workers"][0]["duplicates"] == 2
    assert same(weights(job), weights(ref_job))


def test_hung_worker_is_timed_out_dropped_and_rejoins():
    class Hang(WorkerHooks):
        def __init__(self):
            self.done = False

        def before_compute(self, worker, step):
            if step == 2 and not self.done:
                self.done = True
                time.sleep(0.5)

    job, res = run_job(EF21, cfg(steps=200, step_timeout=0.15, max_misses=2, probe_every=2), n=3, hooks={2: Hang()})
    rec = res["workers"][2]
    assert res["status"] == "done" and res["steps"] == 200
    assert rec["timeouts"] >= 2 and rec["drops"] >= 1 and rec["rejoins"] >= 1
    assert rec["late"] >= 1  # its push for step 2 came after the round
    assert rec["applied"] >= 5  # it takes part again after the rejoin
    ef21_invariant(job)


def test_crashed_worker_is_dropped_and_a_fresh_process_rejoins_with_a_state_resync():
    class Crash(WorkerHooks):
        def before_compute(self, worker, step):
            if step == 3:
                raise WorkerCrashed("fault plan")

    job, res = run_job(EF21, cfg(steps=40, step_timeout=0.15, max_misses=2), n=3, hooks={1: Crash()},
                       restart_after={1: 0.2})
    assert res["status"] == "done" and res["steps"] == 40
    assert res["crashes"][1] == 1
    assert [r["status"] for r in res["worker_reports"][1]] == ["crashed", "shutdown"]
    assert res["resyncs"] == 1 and res["epoch"] == 1  # EF21's sum held the dead process's g_i
    assert res["workers"][1]["rejoins"] >= 1 and res["workers"][1]["applied"] > 3
    assert all(r[-1]["resyncs"] == 1 for w, r in res["worker_reports"].items())
    ef21_invariant(job)


def test_plain_sgd_rejoin_needs_no_resync():
    class Crash(WorkerHooks):
        def before_compute(self, worker, step):
            if step == 2:
                raise WorkerCrashed("fault plan")

    job, res = run_job({"compressor": "topk", "ratio": 0.1, "feedback": "ef"}, cfg(steps=25, step_timeout=0.15),
                       n=3, hooks={0: Crash()}, restart_after={0: 0.1})
    assert res["status"] == "done" and res["resyncs"] == 0 and res["workers"][0]["rejoins"] >= 1


# ---------------------------------------------------------------------- server restarts
class ServerCrash(Exception):
    pass


class CrashingServer(ParameterServer):
    """Dies right after the optimizer step that reaches ``crash_at`` (before or after its checkpoint)."""

    def __init__(self, *a, crash_at, after_checkpoint, **kw):
        super().__init__(*a, **kw)
        self.crash_at, self.after = crash_at, after_checkpoint

    def _after_update(self, workers, staleness):
        if self.version == self.crash_at and not self.after:
            raise ServerCrash
        super()._after_update(workers, staleness)
        if self.version == self.crash_at and self.after:
            raise ServerCrash


@pytest.mark.parametrize("crash_at,after,every,schedule", [(4, False, 1, "constant"), (4, True, 1, "constant"),
                                                           (8, False, 3, "constant"), (9, True, 3, "constant"),
                                                           (8, False, 3, "cosine")])
def test_server_restart_from_checkpoint_loses_and_repeats_nothing(tmp_path, crash_at, after, every, schedule):
    """... also with an lr schedule: the resumed server takes the lr of its restored version."""
    path = str(tmp_path / "server.pt")
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.5, "schedule": schedule}
    config = cfg(steps=10, checkpoint=path, checkpoint_every=every, optimizer=opt)
    ref_job, ref = run_job(EF21, cfg(steps=10, optimizer=opt), n=3)
    job = InprocJob(DDPJobTask(), EF21, config, 3)
    job.server = CrashingServer(job.hub.endpoint(0), job.new_scheme(), job.task, config,
                                crash_at=crash_at, after_checkpoint=after)
    for w in range(3):
        job.start_worker(w)
    with pytest.raises(ServerCrash):
        job.server.run()
    saved = ckpt.load(path)
    assert saved["version"] == (crash_at if after else crash_at - 1) // every * every
    job.server = ParameterServer(job.hub.endpoint(0), job.new_scheme(), job.task,
                                 dataclasses.replace(config, resume=True))
    assert job.server.incarnation == 1 and ckpt.load(path)["incarnation"] == 1  # persisted at once
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 10 and res["incarnation"] == 1
    assert same(weights(job), weights(ref_job)), "an update was lost or applied twice"
    assert ref["totals"]["applied"] == 30
    ef21_invariant(job)


def test_checkpoint_is_complete_and_loads_with_weights_only(tmp_path):
    path = str(tmp_path / "s.pt")
    job, res = run_job({"compressor": "topk", "ratio": 0.1, "feedback": "ef21", "aggregator": "trimmed-mean",
                        "aggregator_options": {"f": 1}}, cfg(steps=3, checkpoint=path), n=3)
    ck = torch.load(path, weights_only=True)
    assert set(ck) >= {"model", "optimizer", "scheme_server", "aggregator", "version", "workers", "incarnation"}
    assert ck["version"] == 3 and [w["last_applied"] for w in ck["workers"]] == [2, 2, 2]
    assert set(ck["scheme_server"]["state"]) == set(job.server.keys)
    assert not [f for f in (tmp_path).iterdir() if ".tmp" in f.name]  # no torn temporary left


# ------------------------------------------------------------------------ configuration
def test_configuration_errors_are_clear():
    hub = InprocHub(3)
    with pytest.raises(ConfigError, match="mean aggregator"):
        ParameterServer(hub.endpoint(0), Scheme(aggregator="trimmed-mean", aggregator_options={"f": 0}),
                        DDPJobTask(), PSConfig(mode="async"))
    with pytest.raises(ConfigError, match="quorum"):
        ParameterServer(hub.endpoint(0), Scheme(), DDPJobTask(), PSConfig(quorum=5))
    with pytest.raises(ConfigError, match="double momentum"):
        ParameterServer(hub.endpoint(0), Scheme("topk", 0.1, "dgc"), DDPJobTask(),
                        PSConfig(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}))
    with pytest.raises(ConfigError):
        ParameterServer(hub.endpoint(0), Scheme(aggregator="krum", aggregator_options={"f": 1}), DDPJobTask(),
                        PSConfig(quorum=2))  # n > 2f fails for the quorum the server may run with
    with pytest.raises(ConfigError, match="rank 0"):
        PSWorker(hub.endpoint(0), Scheme(), DDPJobTask())
    for bad in ({"mode": "gossip"}, {"steps": 0}, {"max_staleness": -1}, {"step_timeout": 0}):
        with pytest.raises(ConfigError):
            PSConfig(**bad)
    with pytest.raises(ConfigError, match="unknown parameter-server options"):
        PSConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="unknown optimizer"):
        ParameterServer(hub.endpoint(0), Scheme(), DDPJobTask(), PSConfig(optimizer={"name": "adamw"}))


def test_monna_server_variant_runs_with_worker_momentum():
    from commlib.aggregate import WorkerMomentum

    job, res = run_job({"aggregator": "monna", "aggregator_options": {"f": 1}}, cfg(steps=6), n=4)
    assert res["status"] == "done"
    assert all(isinstance(job.workers[w].momentum, WorkerMomentum) for w in range(4))
    assert set(job.workers[0].momentum.momenta) == set(job.server.keys)


def test_run_inproc_with_a_task_spec_learns():
    res = run_inproc({"name": "classification", "dataset": "digits", "width": 32, "batch": 32},
                     {"compressor": "topk", "ratio": 0.2, "feedback": "ef21"},
                     PSConfig(steps=60, eval_every=30, optimizer={"lr": 0.2}), 3)
    assert res["status"] == "done" and len(res["evals"]) == 2
    assert res["evals"][-1]["accuracy"] > 0.3 and res["evals"][-1]["loss"] < res["history"][0]["loss"]


def test_sync_round_looks_up_liveness_per_round_not_per_frame():
    # the quorum of a round counts the reachable workers; doing that for every received frame
    # (O(n) each) cost O(n^2) per round, about a million lookups at 1,000 workers
    n, steps = 24, 2
    job = InprocJob(DDPJobTask(), {"compressor": "identity"}, cfg(steps=steps), n)
    server = job.make_server()
    calls = [0]
    is_dead = server.transport.is_dead

    def counting(peer):
        calls[0] += 1
        return is_dead(peer)

    server.transport.is_dead = counting
    res = job.run()
    assert res["steps"] == steps and res["totals"]["applied"] == n * steps
    assert calls[0] <= 8 * n * (steps + 1), calls[0]  # a few passes over the workers per round
