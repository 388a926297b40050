"""The sharded parameter server across processes (commlib/ps/shard_net.py, shard_wire.py,
shard_procs.py, shard_launch.py, shard_ray.py): shard processes over gloo and on local Ray give
the same weights as one in-process server, the shards' exchange refuses hostile bytes and goes
on, and a killed shard process fails the run with a clear error and the run resumes per shard
from the checkpoints to the uninterrupted run's weights."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from commlib.comm.auth import FrameAuth
from commlib.comm.inproc import InprocHub
from commlib.errors import CommlibError, ConfigError, PayloadError, WorkerFailure
from commlib.ps import PSConfig
from commlib.ps import checkpoint as ckpt
from commlib.ps.shard_launch import ShardedProcessJob
from commlib.ps.shard_net import CH_EXCHANGE, NetShardExchange, ShardLayout, ShardRouter, _ROUTE, ROUTE_MAGIC
from commlib.ps.shard_wire import pack_agree, pack_sum, read_agree, read_head, read_sum
from commlib.ps.sharded_local import run_inproc_sharded

TASK = {"name": "classification", "dataset": "mixture", "width": 32, "depth": 2, "batch": 16}  # (no sklearn import per process)
MEAN = {"compressor": "identity"}
KRUM = {"compressor": "identity", "aggregator": "krum", "aggregator_options": {"f": 1}}


def cfg(**kw):
    base = dict(steps=4, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=2.0,
                shutdown_timeout=2.0, shards=3)
    base.update(kw)
    return PSConfig(**base)


def reference(scheme, n, config):
    """One in-process server (one shard: equal to the unsharded server bit for bit, tests/test_ps_shards.py)."""
    res = run_inproc_sharded(TASK, scheme, dataclasses.replace(config, shards=1, checkpoint=None, resume=False), n, 1)
    assert res["steps"] == config.steps
    return res["model_state"]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in b) and set(a) == set(b)


# Every process runs torch with one thread (conftest; the launcher's and torchrun's ranks too):
# the Gram matrices' matmuls then add in one order everywhere, so the results are bit for bit.
@pytest.mark.slow
@pytest.mark.parametrize("scheme,n", [(MEAN, 4), (KRUM, 5)], ids=["mean", "krum"])
def test_three_shard_processes_over_gloo_equal_one_inprocess_server_bit_for_bit(scheme, n):
    res = ShardedProcessJob(TASK, scheme, cfg(), n, procs=2).run()
    assert res["status"] == "done" and res["steps"] == 4
    assert all(s["totals"]["applied"] == 4 * n for s in res["shards"])
    assert all(s["exchange"]["rejected"] == 0 and s["exchange"]["router_rejected"] == 0 for s in res["shards"])
    assert all(s["physical"]["auth_failures"] == 0 for s in res["shards"])
    assert same(res["model_state"], reference(scheme, n, cfg()))


@pytest.mark.slow
@pytest.mark.parametrize("launcher,scheme", [("torchrun", MEAN), pytest.param("mpirun", KRUM, marks=pytest.mark.mpi)],
                         ids=["torchrun-mean", "mpirun-krum"])
def test_launched_two_shards_and_a_worker_rank_equal_one_inprocess_server(tmp_path, launcher, scheme):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    args = ["-m", "commlib.ps", "--transport", "torch" if launcher == "torchrun" else "mpi", "--shards", "2",
            "--workers", "5", "--task", json.dumps(TASK), "--scheme", json.dumps(scheme),
            "--ps", json.dumps(cfg().to_dict()), "--out", str(tmp_path)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"] + args
    else:
        mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
        if not os.path.exists(mpirun):
            pytest.skip("mpirun is not installed next to this Python")
        cmd = [mpirun, "-n", "3", sys.executable] + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "done" and [s["totals"]["applied"] for s in result["shards"]] == [20, 20]
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert same(model, reference(scheme, 5, cfg()))


@pytest.mark.slow
@pytest.mark.ray
def test_two_shard_actors_on_local_ray_equal_one_inprocess_server_for_krum(local_ray):
    from commlib.ps.shard_ray import run_ray_sharded

    res = run_ray_sharded(TASK, KRUM, cfg(shards=2), 5, procs=1)
    assert res["status"] == "done" and res["steps"] == 4
    assert same(res["model_state"], reference(KRUM, 5, cfg()))


def _world(k=2, n=3, procs=1, secret="s" * 32):
    lay = ShardLayout(k, n, procs)
    hub = InprocHub(lay.world)
    auth = FrameAuth(secret)
    return lay, hub, [ShardRouter(hub.endpoint(r, auth=auth), lay) for r in range(lay.world)]


def test_hostile_exchange_messages_are_refused_and_the_exchange_completes():
    lay, hub, routers = _world()
    ex = [NetShardExchange(routers[i], timeout=10) for i in range(2)]
    evil = routers[1].physical  # shard 1's own authenticated endpoint, sending garbage first
    head = _ROUTE.pack(ROUTE_MAGIC, CH_EXCHANGE, 1, 0)
    good = pack_sum(1, 0, torch.ones(3, 3, dtype=torch.float64))
    nan = pack_sum(1, 0, torch.full((3, 3), float("nan"), dtype=torch.float64))
    for junk in [b"", b"CLSX", good[:-1], good + b"\0", good[:20], nan,
                 pack_sum(1, 0, torch.ones(3, 3, dtype=torch.float32)),  # another dtype
                 pack_sum(1, 0, torch.ones(3, 2, dtype=torch.float64)),  # another shape
                 pack_sum(0, 0, torch.ones(3, 3, dtype=torch.float64)),  # claims to be shard 0
                 pack_sum(1, 7, torch.ones(3, 3, dtype=torch.float64)),  # a call far ahead
                 pack_agree(1, 0, [0])]:  # the wrong op for this call
        evil.send(0, head + junk)
    evil.send(0, _ROUTE.pack(b"XXXX", CH_EXCHANGE, 1, 0) + good)  # bad route header
    routers[2].physical.send(0, _ROUTE.pack(ROUTE_MAGIC, CH_EXCHANGE, 2, 0) + good)  # a worker process
    forged = InprocHub.endpoint(hub, 1, auth=FrameAuth("x" * 32))  # not the job's key
    forged.send(0, head + good)
    out = {}

    def shard(i):
        t = torch.full((3, 3), float(i + 1), dtype=torch.float64)
        out[i] = (ex[i].allreduce(i, t), ex[i].agree(i, {0, 2} if i == 0 else {2, 1}))

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert torch.equal(out[0][0], torch.full((3, 3), 3.0, dtype=torch.float64)) and torch.equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] == {2}
    assert ex[0].rejected == 11 and ex[1].rejected == 0  # everything but the route-level ones
    assert routers[0].rejected == 2  # bad route magic; exchange from a worker process
    assert routers[0].physical.stats.auth_failures == 1  # the forged one never got past the HMAC
    for r in routers:
        r.close()


def test_a_shard_that_never_sends_its_part_ends_the_exchange_with_a_clear_error():
    lay, hub, routers = _world()
    ex = NetShardExchange(routers[0], timeout=0.5)
    with pytest.raises(CommlibError, match=r"shard\(s\) \[1\] sent no valid part of exchange 0"):
        ex.agree(0, {1})
    for r in routers:
        r.close()


def test_exchange_wire_readers_take_any_bytes_without_crashing():
    like = torch.zeros(4, 4, dtype=torch.float64)
    msgs = [pack_sum(0, 3, torch.randn(4, 4, dtype=torch.float64)), pack_agree(0, 3, [0, 5, 9])]
    g = torch.Generator().manual_seed(0)
    for msg in msgs:
        for cut in range(len(msg) + 1):  # every truncation
            for reader in (lambda d: read_sum(d, like), lambda d: read_agree(d, 10)):
                try:
                    read_head(msg[:cut])
                    reader(msg[:cut])
                except PayloadError:
                    pass
        for _ in range(300):  # random byte flips
            b = bytearray(msg)
            b[int(torch.randint(len(b), (1,), generator=g))] ^= int(torch.randint(1, 256, (1,), generator=g))
            try:
                read_head(bytes(b))
                read_sum(bytes(b), like)
                read_agree(bytes(b), 10)
            except PayloadError:
                pass
    assert read_agree(msgs[1], 10) == {0, 5, 9}
    with pytest.raises(PayloadError):
        read_agree(pack_agree(0, 0, [0, 5, 10]), 10)  # an id outside the job


def _kill_when_checkpointed(job, shard, step, path, done):
    while not done.is_set():
        try:
            if ckpt.load(path)["version"] >= step:
                os.kill(job.pids[shard], signal.SIGKILL)
                return
        except (ConfigError, KeyError, OSError):
            pass
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_shard_process_fails_the_run_and_every_shard_resumes_from_its_checkpoint(tmp_path):
    path = str(tmp_path / "ps.ckpt")
    config = cfg(steps=24, checkpoint=path)
    job = ShardedProcessJob(TASK, MEAN, config, 3, procs=1)
    job.start()
    done = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(job, 1, 2, path + ".shard1", done))
    killer.start()
    with pytest.raises(WorkerFailure) as err:
        job.wait()
    done.set()
    killer.join()
    text = str(err.value)
    assert "shard 1 (killed by SIGKILL)" in text and "gone" in text, text
    steps = [ckpt.load(f"{path}.shard{i}")["version"] for i in range(3)]
    assert max(steps) - min(steps) <= 1 and max(steps) < 24  # a round is applied by all shards or none
    res = ShardedProcessJob(TASK, MEAN, dataclasses.replace(config, resume=True), 3, procs=1).run()
    assert res["status"] == "done" and res["steps"] == 24
    assert same(res["model_state"], reference(MEAN, 3, config))


def test_sharding_refuses_async_coding_and_private_tasks_before_starting():
    with pytest.raises(ConfigError, match="sync mode without gradient coding"):
        cfg(mode="async")
    with pytest.raises(ConfigError, match="sync mode without gradient coding"):
        cfg(coding="frc", straggler_tolerance=1)
    with pytest.raises(ConfigError, match="server-side simulated attack"):
        ShardedProcessJob(TASK, {"compressor": "identity", "attack": {"attack": "alie", "ranks": [0]}}, cfg(), 3)
    private = {"name": "private", "task": TASK, "stage": {"name": "dpsgd", "clip": 1.0, "sigma": 0.5}}
    with pytest.raises(ConfigError, match="task PrivateTask"):
        ShardedProcessJob(private, MEAN, cfg(), 3)


def test_ps_modules_stay_small_and_their_module_level_imports_have_no_cycle():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "commlib" / "ps"
    graph = {}
    for path in root.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, f"{path.name} is over 400 lines"
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only (lazy imports are deliberate)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("commlib.ps"):
                deps.add(node.module)
                deps.update(f"commlib.ps.{a.name}" for a in node.names if node.module == "commlib.ps")
        graph[f"commlib.ps.{path.stem}"] = {d for d in deps if d != "commlib.ps"} - {f"commlib.ps.{path.stem}"}
    graph["commlib.ps.__init__"] = set()  # the package re-exports; its members do not import it back
    state = {}

    def visit(m, trail):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(trail + [m])
        state[m] = "open"
        for d in graph.get(m, ()):
            visit(d, trail + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def test_shards_one_step_apart_go_back_to_the_previous_checkpoint_to_resume_together(tmp_path):
    from commlib.ps.shard_procs import align_resume

    lay, hub, routers = _world()
    paths = [str(tmp_path / f"ck.shard{i}") for i in range(2)]
    for step in (1, 2, 3):  # shard 0 applied round 3; shard 1 died before its checkpoint of it
        ckpt.save_atomic({"format": ckpt.FORMAT, "version": step}, paths[0], keep_previous=True)
        if step < 3:
            ckpt.save_atomic({"format": ckpt.FORMAT, "version": step}, paths[1], keep_previous=True)
    ex = [NetShardExchange(routers[i], timeout=10) for i in range(2)]
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, align_resume(ex[i], paths[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert got == {0: 2, 1: 2}
    assert [ckpt.load(p)["version"] for p in paths] == [2, 2]
    # two steps apart cannot happen (a round is applied by all shards or none): refused, not guessed
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 4}, paths[0], keep_previous=True)
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 5}, paths[0], keep_previous=True)
    errors = {}

    def align(i):
        try:
            align_resume(ex[i], paths[i])
        except ConfigError as exc:
            errors[i] = str(exc)

    threads = [threading.Thread(target=align, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(errors) == [0, 1] and "steps [5, 2]" in errors[0]  # every shard refuses
    for r in routers:
        r.close()


def test_an_unsharded_runner_refuses_a_sharded_config():
    from commlib.ps import ParameterServer, build_task
    from commlib.scheme import Scheme

    with pytest.raises(ConfigError, match="shards=3: run the sharded runners"):
        ParameterServer(InprocHub(3).endpoint(0), Scheme.from_config(MEAN), build_task(TASK), cfg())


def _align_all(routers, paths):
    """align_resume on every shard at once: {shard: common step} and {shard: ConfigError text}."""
    from commlib.ps.shard_procs import align_resume

    ex = [NetShardExchange(routers[i], timeout=10) for i in range(len(paths))]
    got, errors = {}, {}

    def align(i):
        try:
            got[i] = align_resume(ex[i], paths[i])
        except ConfigError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # anything else is a bug: recorded, so the test says which
            errors[i] = f"UNEXPECTED {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=align, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return got, errors


def test_a_shard_that_died_before_its_first_checkpoint_resumes_with_the_others_from_the_start(tmp_path):
    # shard 0 wrote its first checkpoint (step 1, no PATH.prev); shard 1 died in round 1 before
    # writing any: the previous state of shard 0 is "no checkpoint", so both start from step 0
    lay, hub, routers = _world()
    paths = [str(tmp_path / f"ck.shard{i}") for i in range(2)]
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 1}, paths[0], keep_previous=True)
    got, errors = _align_all(routers, paths)
    assert errors == {} and got == {0: -1, 1: -1}
    assert not os.path.exists(paths[0]) and not os.path.exists(paths[1])
    # two checkpoints ahead of a shard that has none: refused by both, nothing removed
    for step in (1, 2):
        ckpt.save_atomic({"format": ckpt.FORMAT, "version": step}, paths[0], keep_previous=True)
    got, errors = _align_all(routers, paths)
    assert got == {} and sorted(errors) == [0, 1] and all("UNEXPECTED" not in e for e in errors.values()), errors
    assert ckpt.load(paths[0])["version"] == 2 and ckpt.load(paths[0] + ".prev")["version"] == 1
    for r in routers:
        r.close()


def test_shards_that_cannot_reach_one_step_all_refuse_and_none_changes_its_checkpoint(tmp_path):
    # shard 2's previous checkpoint is not the common step: no shard may go back (that would
    # lose shard 0's newest checkpoint for a resume that cannot happen), and every shard says so
    lay, hub, routers = _world(k=3)
    paths = [str(tmp_path / f"ck.shard{i}") for i in range(3)]
    for i, steps in enumerate([(2, 3), (2,), (1, 3)]):
        for s in steps:
            ckpt.save_atomic({"format": ckpt.FORMAT, "version": s}, paths[i], keep_previous=True)
    got, errors = _align_all(routers, paths)
    assert got == {} and sorted(errors) == [0, 1, 2], errors
    assert all("UNEXPECTED" not in e for e in errors.values()), errors
    assert [ckpt.load(p)["version"] for p in paths] == [3, 2, 3]
    assert ckpt.load(paths[0] + ".prev")["version"] == 2
    for r in routers:
        r.close()


def test_finite_parts_whose_sum_overflows_end_the_exchange_instead_of_handing_on_inf():
    # each part passes the finite check, but their sum is Inf: no rule may see it (a Gram matrix
    # with Inf gives NaN distances and NaN weights); every shard stops with a clear error
    lay, hub, routers = _world()
    ex = [NetShardExchange(routers[i], timeout=10) for i in range(2)]
    out = {}

    def shard(i):
        try:
            out[i] = ex[i].allreduce(i, torch.full((3, 3), 1e308, dtype=torch.float64))
        except CommlibError as exc:
            out[i] = exc

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(isinstance(out[i], CommlibError) and "NaN or Inf" in str(out[i]) for i in range(2)), out
    for r in routers:
        r.close()


def test_an_unreadable_previous_checkpoint_makes_every_shard_refuse_together(tmp_path):
    lay, hub, routers = _world()
    paths = [str(tmp_path / f"ck.shard{i}") for i in range(2)]
    for i, steps in enumerate([(2, 3), (2,)]):
        for s in steps:
            ckpt.save_atomic({"format": ckpt.FORMAT, "version": s}, paths[i], keep_previous=True)
    with open(paths[0] + ".prev", "wb") as f:
        f.write(b"not a checkpoint")
    got, errors = _align_all(routers, paths)
    assert got == {} and sorted(errors) == [0, 1] and all("UNEXPECTED" not in e for e in errors.values()), errors
    assert [ckpt.load(p)["version"] for p in paths] == [3, 2]
    for r in routers:
        r.close()


def test_a_save_removes_stale_temporary_files_of_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ck.shard0")
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 1}, path, keep_previous=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{path}.prev.tmp.{dead.pid}"  # a save that died between its link and its rename
    open(stale, "wb").close()
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 2}, path, keep_previous=True)
    assert not os.path.exists(stale)
    assert ckpt.load(path + ".prev")["version"] == 1 and ckpt.load(path)["version"] == 2


def test_a_shard_refuses_a_checkpoint_written_for_other_keys(tmp_path):
    # e.g. --shards changed between the run and its resume: shard 1's file holds other keys'
    # values and optimizer state; loading it would silently mix trained and untrained keys
    from commlib.ps import ParameterServer, build_task
    from commlib.ps.shards import ShardSpec
    from commlib.scheme import Scheme

    path = str(tmp_path / "ck.shard1")

    def server(spec, **kw):
        config = PSConfig(steps=2, shards=1, checkpoint=path, **kw)
        return ParameterServer(InprocHub(3).endpoint(0), Scheme.from_config(MEAN), build_task(TASK), config, shard=spec)

    server(ShardSpec(1, 2, range(2, 4), None)).save_checkpoint(path)
    server(ShardSpec(1, 2, range(2, 4), None), resume=True)  # the same layout resumes
    with pytest.raises(ConfigError, match="checkpoint was written for shard"):
        server(ShardSpec(1, 3, range(3, 5), None), resume=True)
    with pytest.raises(ConfigError, match="checkpoint was written for shard"):
        server(None, resume=True)


def test_a_sharded_mpi_rank_refuses_an_mpi_without_thread_multiple():
    # the router's pump receives while the server thread sends: MPI must allow calls from both
    code = ("import mpi4py; mpi4py.rc.thread_level = 'serialized'\n"
            "from commlib.errors import ConfigError\n"
            "from commlib.ps.shard_launch import _physical\n"
            "from commlib.ps.shard_net import ShardLayout\n"
            "try:\n    _physical('mpi', ShardLayout(1, 1, 1), None)\n"
            "except ConfigError as exc:\n    print('REFUSED', exc)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "REFUSED" in out.stdout and "MPI_THREAD_MULTIPLE" in out.stdout, out.stdout + out.stderr
