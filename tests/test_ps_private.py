"""Differential privacy in the parameter server (in-process transport)."""
import pytest
import torch

from commlib import ConfigError
from commlib.ps import InprocJob, PSConfig
from commlib.ps.private import PrivateTask

INNER = {"name": "classification", "width": 16, "batch": 8}


def _run(task, steps=5, n=3):
    cfg = PSConfig(steps=steps, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.1})
    job = InprocJob(task, {"compressor": "identity"}, cfg, n)
    job.run()
    return {k: v.detach().clone() for k, v in job.server.model.state_dict().items()}


def _weights(res):
    return res


def test_noise_free_private_task_equals_plain_run():
    plain = _run(INNER)
    priv = _run({"name": "private", "task": INNER, "stage": {"name": "dpsgd", "clip": 1e6, "sigma": 0.0}})
    a, b = _weights(plain), _weights(priv)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_noisy_private_task_trains_and_differs():
    plain = _run(INNER)
    priv = _run({"name": "private", "task": INNER, "stage": {"name": "efdpsgd", "clip1": 1.0, "clip2": 2.0,
                                                             "sigma": 1.0}, "seed": 3})
    a, b = _weights(plain), _weights(priv)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_private_task_distinct_worker_seeds_and_refusals():
    t = PrivateTask(INNER, {"name": "dpsgd", "clip": 1.0, "sigma": 1.0}, seed=5)
    t2 = PrivateTask(INNER, {"name": "dpsgd", "clip": 1.0, "sigma": 1.0}, seed=5)
    s0, s1 = t._stage_for(0), t2._stage_for(1)
    assert s0.noise._gen.initial_seed() != s1.noise._gen.initial_seed()
    with pytest.raises(ConfigError, match="mixed per worker"):
        PrivateTask(INNER, {"name": "dpsgd", "clip": 1.0, "sigma": 1.0, "seed": 1})


def _diff2(period, sigma=0.0, clip=1e6):
    return {"name": "private", "task": INNER,
            "stage": {"name": "diff2", "clip1": clip, "clip2": clip, "sigma1": sigma, "sigma2": sigma,
                      "period": period}}


def test_diff2_in_the_ps_restart_every_round_equals_plain_run():
    # period 1: every round is a restart, so with no noise and no clipping ṽ is the plain mean gradient
    plain = _run(INNER)
    d2 = _run(_diff2(1))
    for k in plain:
        assert torch.allclose(plain[k], d2[k], atol=1e-5), k


def test_diff2_in_the_ps_uses_differences_and_the_server_estimator():
    t = PrivateTask(INNER, _diff2(3)["stage"])
    assert t.requires_full_quorum
    w = _run(_diff2(3), steps=7)
    plain = _run(INNER, steps=7)
    assert all(torch.isfinite(v).all() for v in w.values())
    # differences on fresh batches make ṽ differ from the plain mean gradient after the first restart
    assert any(not torch.allclose(plain[k], w[k], atol=1e-6) for k in plain)


def test_diff2_in_the_ps_refuses_a_partial_quorum():
    cfg = PSConfig(steps=2, quorum=2, step_timeout=5.0, optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(ConfigError, match="every worker in every round"):
        InprocJob(_diff2(3), {"compressor": "identity"}, cfg, 3).run()


# ------------------------------------------------------- restarts, rollbacks and accounting
class _ServerCrash(Exception):
    pass


def _crashing_server(job, config, crash_at, after):
    from commlib.ps import ParameterServer

    class Crashing(ParameterServer):
        def _after_update(self, workers, staleness):
            if self.version == crash_at and not after:
                raise _ServerCrash
            super()._after_update(workers, staleness)
            if self.version == crash_at and after:
                raise _ServerCrash

    return Crashing(job.hub.endpoint(0), job.new_scheme(), job.task, config)


@pytest.mark.parametrize("crash_at,after", [(5, False), (5, True)])
def test_diff2_ps_server_restart_mid_period_continues_exactly(tmp_path, crash_at, after):
    # period 3: the crash falls mid-period, so a restarted server needs the estimator ṽ from its
    # checkpoint and the workers their round counters and previous points from their snapshots
    import dataclasses

    from commlib.ps import ParameterServer
    from commlib.ps.task import build_task

    spec = _diff2(3)
    config = PSConfig(steps=9, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.1},
                      checkpoint=str(tmp_path / "s.pt"), worker_timeout=0.3)
    ref = _run(spec, steps=9)
    job = InprocJob(spec, {"compressor": "identity"}, config, 3)
    job.server = _crashing_server(job, config, crash_at, after)
    for w in range(3):
        job.start_worker(w)
    with pytest.raises(_ServerCrash):
        job.server.run()
    # a new server process: its own task object, so nothing of the old estimator survives in memory
    job.server = ParameterServer(job.hub.endpoint(0), job.new_scheme(), build_task(spec),
                                 dataclasses.replace(config, resume=True))
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 9 and res["incarnation"] == 1
    got = {k: v.detach() for k, v in job.server.model.state_dict().items()}
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k


def test_diff2_ps_checkpoint_holds_the_estimator(tmp_path):
    from commlib.ps import checkpoint as ckpt

    path = str(tmp_path / "s.pt")
    cfg = PSConfig(steps=4, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.1}, checkpoint=path)
    InprocJob(_diff2(3), {"compressor": "identity"}, cfg, 2).run()
    saved = ckpt.load(path)["task"]
    assert saved["round"] == 4 and saved["period"] == 3 and saved["estimate"] is not None


@pytest.fixture
def noise_draws(monkeypatch):
    """Counts every draw by the generator state it starts from: a state drawn from twice is a
    noise vector used for two releases."""
    import collections
    import hashlib

    from commlib.privacy import noise as nz

    draws = collections.Counter()
    orig = nz.GaussianNoise.sample

    def sample(self, shape, std=None, dtype=torch.float32, device=None):
        if self._gen is not None:
            draws[hashlib.sha1(self._gen.get_state().numpy().tobytes()).hexdigest()] += 1
        return orig(self, shape, std, dtype, device)

    monkeypatch.setattr(nz.GaussianNoise, "sample", sample)
    return draws


def _replays(draws):
    return sum(c - 1 for c in draws.values() if c > 1)


def test_diff2_ps_worker_rejoin_restarts_the_period_with_fresh_noise(noise_draws):
    from commlib.ps.worker import WorkerCrashed, WorkerHooks

    class Crash(WorkerHooks):
        def before_compute(self, worker, step):
            if step == 4:
                raise WorkerCrashed("fault plan")

    spec = dict(_diff2(3, sigma=0.5, clip=1.0), seed=11)
    cfg = PSConfig(steps=10, step_timeout=0.5, max_misses=2, optimizer={"name": "sgd", "lr": 0.1},
                   worker_timeout=0.3)
    job = InprocJob(spec, {"compressor": "identity"}, cfg, 3, hooks={1: Crash()}, restart_after={1: 0.1})
    seeds_before = {w: job.task._stage_for(w).noise._gen.initial_seed() for w in range(3)}
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 10
    assert res["resyncs"] >= 1 and res["epoch"] >= 1  # both sides restarted DIFF2's period
    seeds_after = {w: job.task.stages[w].noise._gen.initial_seed() for w in range(3)}
    assert all(seeds_after[w] != seeds_before[w] for w in range(3))
    # the restarted process re-says HELLO while the resync is pending: nothing may go out to it
    # before the new epoch, or it would release with its predecessor's first noise draw
    assert _replays(noise_draws) == 0 and sum(noise_draws.values()) >= 28


def test_private_rollback_restores_error_but_never_replays_noise():
    t = PrivateTask(INNER, {"name": "efdpsgd", "clip1": 0.5, "clip2": 1.0, "sigma": 1.0}, seed=2)
    model = t.build_model()
    t.start_worker(0)
    t.loss(model, 0, 2, 0).backward()
    snap = t.worker_state(0)
    err = t.stages[0].error.clone()
    noise_state = t.stages[0].noise.state_dict()["generator"].clone()
    model.zero_grad()
    t.loss(model, 0, 2, 1).backward()  # a release the server never applied
    assert not torch.equal(t.stages[0].error, err)
    t.load_worker_state(0, snap)
    assert torch.equal(t.stages[0].error, err) and t.stages[0].steps == 1
    assert not torch.equal(t.stages[0].noise.state_dict()["generator"], noise_state)
    t.load_worker_state(0, {"stage": None, "prev": None})  # back to before the first release
    assert t.stages[0].error is None and t.stages[0].steps == 0


def test_ps_private_accounting_matches_the_library():
    from commlib.privacy.accounting import epsilon

    spec = {"name": "private", "task": INNER, "stage": {"name": "dpsgd", "clip": 1.0, "sigma": 1.2},
            "seed": 4, "delta": 1e-5}
    cfg = PSConfig(steps=6, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.1})
    res = InprocJob(spec, {"compressor": "identity"}, cfg, 3).run()
    q = PrivateTask(INNER, spec["stage"], delta=1e-5).sample_rate(3)
    for w, reports in res["worker_reports"].items():
        priv = reports[-1]["privacy"]
        assert priv["releases"] == 6
        assert priv["epsilon"] == pytest.approx(epsilon(1.2, 1e-5, q, 6), rel=1e-9)
    with pytest.raises(ConfigError, match="nothing would be private"):
        PrivateTask(INNER, {"name": "dpsgd", "clip": 1.0, "sigma": 0.0}, delta=1e-5)
    with pytest.raises(ConfigError):
        PrivateTask(INNER, {"name": "dpsgd", "clip": 1.0, "sigma": 1.0}, delta=0.0)


class _CrashWhen(Exception):
    pass


@pytest.mark.parametrize("when", ["resync pending", "resync not yet checkpointed"])
def test_private_ps_server_crash_around_a_resync_keeps_noise_fresh_and_diff2_in_step(tmp_path, noise_draws, when):
    # a worker restarts (a new state epoch is due); the server dies either after the checkpoint
    # that records the new process but before the resync, or right after the resync round
    import dataclasses

    from commlib.ps import ParameterServer
    from commlib.ps.task import build_task
    from commlib.ps.worker import WorkerCrashed, WorkerHooks

    class Crash(WorkerHooks):
        def before_compute(self, worker, step):
            if step == 3:
                raise WorkerCrashed("fault plan")

    class Crashing(ParameterServer):
        def _after_update(self, workers, staleness):
            if when == "resync not yet checkpointed" and self.epoch == 1:
                raise _CrashWhen
            super()._after_update(workers, staleness)
            if when == "resync pending" and self.pending_resync:
                raise _CrashWhen

    spec = {"name": "private", "task": {"name": "classification", "width": 8, "batch": 8}, "seed": 3,
            "stage": {"name": "diff2", "clip1": 1.0, "clip2": 1.0, "sigma1": 1.0, "sigma2": 1.0, "period": 3}}
    cfg = PSConfig(steps=10, step_timeout=3.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=0.3,
                   shutdown_timeout=2.0, checkpoint=str(tmp_path / "s.pt"), max_misses=10 ** 6)
    job = InprocJob(spec, {"compressor": "identity"}, cfg, 3, hooks={1: Crash()}, restart_after={1: 0.0})
    job.server = Crashing(job.hub.endpoint(0), job.new_scheme(), job.task, cfg)
    for w in range(3):
        job.start_worker(w)
    with pytest.raises(_CrashWhen):
        job.server.run()
    server_task = build_task(spec)
    job.server = ParameterServer(job.hub.endpoint(0), job.new_scheme(), server_task,
                                 dataclasses.replace(cfg, resume=True))
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 10 and res["epoch"] == 1
    assert _replays(noise_draws) == 0
    rounds = {w: st.round for w, st in job.task.stages.items()}
    assert set(rounds.values()) == {server_task._server.round}, (rounds, server_task._server.round)


def test_ps_private_efdpsgd_is_accounted_unsampled():
    from commlib.privacy.accounting import epsilon

    spec = {"name": "private", "task": INNER, "stage": {"name": "efdpsgd", "clip1": 1.0, "sigma": 3.0,
                                                        "error_clip_ratio": 2.0}, "seed": 4, "delta": 1e-5}
    cfg = PSConfig(steps=4, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.1})
    res = InprocJob(spec, {"compressor": "identity"}, cfg, 2).run()
    for w, reports in res["worker_reports"].items():
        priv = reports[-1]["privacy"]
        assert priv["releases"] == 4
        assert priv["epsilon"] == pytest.approx(epsilon(3.0, 1e-5, 1.0, 4), rel=1e-9)
