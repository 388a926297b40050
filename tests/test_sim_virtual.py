"""Virtual workers (many logical PS workers per process): bundles as hostile input; a grouped
run equals the one-thread-per-worker run bit for bit; a crash or a hang of one logical
worker leaves its process-mates alone; 64 virtual workers on a local Ray with faults."""
import os

import pytest
import torch

from commlib.comm.bundle import Bundled, pack_bundle, pack_ranks, unpack_bundle, unpack_ranks
from commlib.errors import PayloadError
from commlib.ps import InprocJob, PSConfig
from commlib.ps.group_local import GroupInprocJob, split_workers
from commlib.sim import FaultPlan, WorkerFaults
from commlib.sim.driver import hooks_options
from commlib.sim.hooks import FaultHooks

TASK = {"name": "classification", "dataset": "digits", "width": 32, "batch": 16, "seed": 2}


def test_bundle_roundtrip_and_hostile_bytes():
    items = [Bundled(1, 0, 7, 0, b"abc"), Bundled(2, 0, 9, 5, b""), Bundled(3, 0, 1, 2, bytes(range(256)))]
    blob = pack_bundle(items)
    assert unpack_bundle(blob, 1 << 20) == items
    assert unpack_bundle(pack_bundle([]), 10) == []
    bad = [blob[:-1], blob + b"\0", b"XXXX" + blob[4:], blob[:6],
           blob[:4] + (10 ** 6).to_bytes(4, "little") + blob[8:],  # more items declared than fit
           blob[:8] + blob[8:28] + (1 << 40).to_bytes(8, "little") + blob[36:]]  # an overlong item
    for b in bad:
        with pytest.raises(PayloadError):
            unpack_bundle(b, 1 << 20)
    with pytest.raises(PayloadError):
        unpack_bundle(blob, 100)  # an item over max_message_bytes
    with pytest.raises(PayloadError):
        unpack_bundle("text", 10)
    assert unpack_ranks(pack_ranks([3, 1]), 4) == [3, 1]
    for b in (b"\1\0\0", pack_ranks([4])):
        with pytest.raises(PayloadError):
            unpack_ranks(b, 4)
    assert split_workers(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_workers(2, 5) == [[0], [1]]


def _hooks(plan, steps, restarted=False):
    delays = plan.delays(steps + 1)
    out = {}
    for w in range(plan.n_workers):
        o = hooks_options(plan, w, delays=delays, restarted=restarted)
        if o:
            out[w] = FaultHooks(worker=w, **o)
    return out


def _cfg(**kw):
    base = dict(steps=12, step_timeout=0.6, max_misses=3, worker_timeout=5.0, optimizer={"name": "sgd", "lr": 0.2})
    base.update(kw)
    return PSConfig(**base)


def test_virtual_workers_equal_one_thread_per_worker_bit_for_bit():
    # a deterministic plan: two coordinated ALIE attackers, a label flipper, a garbled push
    # (rejected; the round closes at step_timeout without it and the worker rolls back EF21)
    plan = FaultPlan(9, {3: WorkerFaults(attack="alie"), 7: WorkerFaults(attack="alie"),
                         1: WorkerFaults(attack="label-flipping"), 5: WorkerFaults(garbage_at=[4])})
    scheme = {"compressor": "topk", "ratio": 0.2, "feedback": "ef21", "aggregator": "trimmed-mean",
              "aggregator_options": {"f": 2}}
    cfg = _cfg()
    ref = InprocJob(TASK, scheme, cfg, 9, hooks=_hooks(plan, cfg.steps))
    r_ref = ref.run()
    grouped = GroupInprocJob(TASK, scheme, cfg, 9, groups=2, hooks=_hooks(plan, cfg.steps))
    r_grp = grouped.run()
    assert r_ref["status"] == r_grp["status"] == "done" and r_grp["groups"] == 2
    a, b = ref.server.model.state_dict(), grouped.server.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("applied", "rejected", "timeouts", "late"):
        assert [r[key] for r in r_ref["workers"]] == [r[key] for r in r_grp["workers"]], key
    assert r_grp["workers"][5]["rejected"] == 1 and r_grp["totals"]["applied"] == 9 * 12 - 1
    assert r_grp["worker_reports"][5][-1]["rollbacks"] >= 1
    assert len({r[-1]["session"] for r in r_grp["worker_reports"].values()}) == 9  # nine identities


def test_crash_of_one_logical_worker_leaves_its_process_mates_running():
    plan = FaultPlan(5, {1: WorkerFaults(crash_at=3), 3: WorkerFaults(crash_at=4, restart_after=0.3)})
    cfg = _cfg(steps=20, max_misses=2)
    job = GroupInprocJob(TASK, {"compressor": "topk", "ratio": 0.2, "feedback": "ef21"}, cfg, 5, groups=1,
                         hooks=_hooks(plan, cfg.steps), restart_hooks=_hooks(plan, cfg.steps, restarted=True),
                         restart_after={3: 0.3})
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 20
    reps = res["worker_reports"]
    assert [r["status"] for r in reps[1]] == ["crashed"] and res["crashes"][1] == 1
    assert [r["status"] for r in reps[3]] == ["crashed", "shutdown"] and res["crashes"][3] == 1
    assert reps[3][0]["session"] != reps[3][1]["session"]  # the restart is a new process of worker 3 only
    for w in (0, 2, 4):  # its process-mates: one incarnation each, in every round
        assert [r["status"] for r in reps[w]] == ["shutdown"] and res["crashes"][w] == 0
        assert res["workers"][w]["applied"] == 20 and res["workers"][w]["timeouts"] == 0
    assert res["workers"][1]["applied"] == 3 and res["workers"][1]["drops"] == 1
    assert res["workers"][3]["rejoins"] >= 1 and res["workers"][3]["applied"] > 4
    assert res["resyncs"] == 1  # EF21: worker 3's fresh process rejoined without state


def test_hang_delays_only_the_hung_worker():
    plan = FaultPlan(4, {2: WorkerFaults(hang_at=3, hang_s=3.0)})
    cfg = _cfg(steps=40, quorum=3, step_timeout=10.0, max_misses=100)
    job = GroupInprocJob(TASK, {}, cfg, 4, groups=1, hooks=_hooks(plan, cfg.steps))
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 40
    pushes = {w: res["worker_reports"][w][-1]["pushes"] for w in range(4)}
    # its process-mates went on while worker 2 slept (a blocked thread would have stopped all four)
    assert all(pushes[w] >= pushes[2] + 5 for w in (0, 1, 3)), pushes
    assert all(res["workers"][w]["applied"] >= 30 for w in (0, 1, 3))
    assert res["worker_reports"][2][-1]["status"] == "shutdown"  # it answered SHUTDOWN after the hang


def test_straggle_skip_gives_rounds_up_without_sleeping():
    from commlib.sim import StragglerSpec, simulate

    plan = FaultPlan(6, stragglers=StragglerSpec("iid", p=0.3, delay_s=30.0), seed=1)
    cfg = _cfg(steps=10, quorum=3, step_timeout=20.0, max_misses=100)
    res = simulate(plan, TASK, {}, cfg, backend="inproc", virtual=True, processes=2, straggle="skip")
    assert res["status"] == "done" and res["steps"] == 10
    # straggling rounds were given up at once and counted (a sleeping straggler skips none)
    skipped = sum(r[-1]["skipped_rounds"] for r in res["worker_reports"].values())
    assert skipped >= 1
    assert all(r[-1]["status"] == "shutdown" for r in res["worker_reports"].values())


ray = pytest.importorskip("ray")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_virtual_workers_equal_inproc(local_ray):
    from commlib.ps.group_ray import run_ray_groups

    scheme = {"compressor": "topk", "ratio": 0.1, "feedback": "ef21"}
    cfg = PSConfig(steps=8, optimizer={"name": "sgd", "lr": 0.1}, worker_timeout=5.0)
    res = run_ray_groups(TASK, scheme, cfg, 4, processes=2)
    assert res["status"] == "done" and res["totals"]["applied"] == 32
    assert len({g["pid"] for g in res["groups"]}) == 2 and res["bundles"]["sent"] >= 8
    job = InprocJob(TASK, scheme, cfg, 4)
    job.run()
    ref = job.server.model.state_dict()
    for k in ref:
        assert torch.equal(res["model_state"][k], ref[k]), k


@pytest.mark.slow
@pytest.mark.ray
def test_64_virtual_workers_on_local_ray_with_faults(local_ray):
    from commlib.sim import StragglerSpec, simulate

    plan = FaultPlan(64, {60: WorkerFaults(attack="alie"), 61: WorkerFaults(attack="alie"),
                          5: WorkerFaults(crash_at=3, restart_after=0.5), 9: WorkerFaults(crash_at=2),
                          20: WorkerFaults(hang_at=4, hang_s=1.0), 33: WorkerFaults(garbage_at=[3])},
                     StragglerSpec("bursty", B=1, W=3, lam=2, delay_s=0.5), seed=0)
    cfg = PSConfig(steps=15, quorum=56, step_timeout=3.0, max_misses=2, worker_timeout=6.0, eval_every=5,
                   optimizer={"name": "sgd", "lr": 0.1})
    scheme = {"aggregator": "trimmed-mean", "aggregator_options": {"f": 4}}
    res = simulate(plan, TASK, scheme, cfg, backend="ray", virtual=True, processes=2)
    assert res["status"] == "done" and res["steps"] == 15
    assert len(res["groups"]) == 2 and sum(g["workers"] for g in res["groups"]) == 64
    reps = res["worker_reports"]
    assert [r["status"] for r in reps[5]] == ["crashed", "shutdown"] and res["crashes"][5] == 1
    assert [r["status"] for r in reps[9]] == ["crashed"] and res["workers"][9]["applied"] == 2
    others = [w for w in range(64) if w not in (5, 9)]
    assert all([r["status"] for r in reps[w]] == ["shutdown"] for w in others)
    # the server checked every frame against its sender rank: only the garbled one failed
    assert res["totals"]["rejected"] == 1 and res["unknown_frames"] == 0
    assert res["workers"][33]["rejected"] == 1 and res["workers"][5]["rejoins"] >= 1
    assert len({reps[w][-1]["session"] for w in range(64)}) == 64
    assert res["totals"]["applied"] >= 15 * 56
