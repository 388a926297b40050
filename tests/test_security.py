"""The trust boundary seen from outside: forged and replayed frames, an outsider rank on the
torch transport, listeners bound to loopback, and tampered checkpoints.

Local Ray (outsider, reaping after SIGKILL, resume) is in test_security_ray.py."""
import json
import os
import pickle
import secrets
import subprocess
import sys
import time

import pytest
import torch

from commlib.errors import ConfigError
from commlib.ps.protocol import Frame, FrameFlag, FrameKind
from commlib.wire import Message, Payload

TESTS = os.path.dirname(os.path.abspath(__file__))
TASK = {"name": "classification", "dataset": "digits", "width": 32, "batch": 32, "seed": 1}


def _forged_push(task, worker: int, step: int, seq: int, session: int, incarnation: int = 0,
                 value: float = 50.0) -> bytes:
    """A PUSH with a valid CRC and valid payloads: what an outsider who knows the format sends."""
    from commlib.ps.task import model_keys

    _, params = model_keys(task.build_model())
    payloads = [Payload.dense(torch.full((p.numel(),), value), slot=j) for j, p in enumerate(params)]
    body = Message(payloads, sender=worker, step=step).to_bytes()
    return Frame(FrameKind.PUSH, worker, step=step, seq=seq, session=session, incarnation=incarnation,
                 body=body).to_bytes()


def test_forged_replayed_and_misaddressed_frames_never_reach_the_receiver():
    from commlib.comm import InprocHub
    from commlib.comm.auth import FrameAuth

    key = FrameAuth(secrets.token_hex(32))
    hub = InprocHub(4)
    wire = []  # what an eavesdropper on the network captures
    deliver = hub.deliver
    hub.deliver = lambda src, dst, data: (wire.append((src, dst, bytes(data))), deliver(src, dst, data))[1]
    server, worker = hub.endpoint(0, auth=key), hub.endpoint(1, auth=key)
    outsider = hub.endpoint(2)  # no secret: valid CRC frames, no tag
    wrong_key = hub.endpoint(3, auth=FrameAuth(secrets.token_hex(32)))
    hello = Frame(FrameKind.HELLO, 0, session=7, flags=FrameFlag.FRESH).to_bytes()
    outsider.send(0, Frame(FrameKind.HELLO, 1, session=9, flags=FrameFlag.FRESH).to_bytes())
    wrong_key.send(0, Frame(FrameKind.HELLO, 2, session=9, flags=FrameFlag.FRESH).to_bytes())
    worker.send(0, hello)
    assert server.recv(timeout=1.0) == (1, hello)
    assert server.stats.auth_failures == 2 and server.recv(timeout=0) is None
    # play the worker's captured HELLO back (same stream, same sequence number)
    sealed = next(d for s, _, d in wire if s == 1)
    hub.deliver(1, 0, sealed)
    assert server.recv(timeout=0.5) is None and server.stats.replays == 1
    worker.send(0, b"next")
    assert server.recv(timeout=1.0) == (1, b"next")
    time.sleep(0.002)  # stream ids carry the start time in ms
    fresh = hub.endpoint(1, auth=key)  # a restarted worker process: a newer stream is accepted
    fresh.send(0, b"again")
    assert server.recv(timeout=1.0) == (1, b"again")
    hub.deliver(1, 0, sealed)  # now from a superseded stream (an earlier process of rank 1)
    hub.deliver(3, 0, fresh._sealer.seal(0, b"as rank 3"))  # a rank-1 frame passed off as rank 3's
    hub.deliver(1, 0, fresh._sealer.seal(2, b"for rank 2"))  # sealed for another destination
    flipped = bytearray(fresh._sealer.seal(0, b"payload"))
    flipped[40] ^= 1
    hub.deliver(1, 0, bytes(flipped))
    assert server.recv(timeout=0.5) is None
    assert server.stats.replays == 2 and server.stats.auth_failures == 5
    assert server.stats.messages_received == 3


def test_secret_from_env_or_file_and_refusal_without_one(tmp_path, monkeypatch):
    from commlib.comm.auth import FrameAuth, ensure_secret, load_secret

    env = {}
    with pytest.raises(ConfigError, match="COMMLIB_SECRET"):
        FrameAuth.from_env(env)
    assert FrameAuth.from_env({"COMMLIB_AUTH": "none"}) is None
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret({"COMMLIB_SECRET": "short"})
    f = tmp_path / "secret"
    f.write_text("s" * 32 + "\n")
    assert load_secret({"COMMLIB_SECRET_FILE": str(f)}) == b"s" * 32
    made = ensure_secret(env)
    assert len(made) == 64 and env["COMMLIB_SECRET"] == made and ensure_secret(env) == made


# ------------------------------------------------------------------ torch: an outsider rank
def _listeners(pids):
    """(address, port) of every TCP socket in LISTEN state owned by ``pids`` (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                import ipaddress
                addr = str(ipaddress.IPv6Address(b"".join(words)))
            else:
                addr = ".".join(str(b) for b in raw[::-1])
            out.append((addr, int(port_hex, 16)))
    return out


def _non_loopback(listeners):
    import ipaddress

    bad = []
    for addr, port in listeners:
        ip = ipaddress.ip_address(addr)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            bad.append((addr, port))
    return bad


def _has_second_interface() -> bool:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return any(line.split()[1] != "lo" for line in out.splitlines() if len(line.split()) > 1)


def _torch_job_rank(rank, world, port, out, outsider, steps):
    import torch.distributed  # noqa: F401

    from commlib.comm.torch_dist import TorchDistTransport, init_from_env
    from commlib.ps import ParameterServer, PSConfig, PSWorker, build_task
    from commlib.scheme import Scheme

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if rank == outsider:  # it does not know the job's secret
        os.environ.pop("COMMLIB_SECRET", None)
        os.environ["COMMLIB_AUTH"] = "none"
    torch.set_num_threads(1)
    task = build_task(TASK)
    config = PSConfig(steps=steps, quorum=1, step_timeout=3.0, optimizer={"lr": 0.1, "momentum": 0.9}, start_workers=1, startup_timeout=60.0,
                      shutdown_timeout=2.0, worker_timeout=5.0, worker_give_up=30.0)
    try:
        owns = init_from_env("gloo")
        t = TorchDistTransport(peers=None if rank == 0 else [0], owns_group=owns, close_timeout=3.0)
        with open(os.path.join(out, f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        if rank == 0:
            seen = {}

            def on_step(rec):
                if rec["step"] == 3:  # every rank is up: look at what the job listens on
                    pids = [int(open(os.path.join(out, f"pid{r}")).read()) for r in range(world)
                            if os.path.exists(os.path.join(out, f"pid{r}"))]
                    seen["listeners"] = _listeners(pids)
                time.sleep(0.05)  # give the outsider time to act between rounds

            server = ParameterServer(t, Scheme.from_config({"compressor": "identity"}), task, config,
                                     on_step=on_step)
            res = server.run()
            with open(os.path.join(out, "server.json"), "w") as f:
                json.dump({"applied": [r["applied"] for r in res["workers"]],
                           "rejected": [r["rejected"] for r in res["workers"]],
                           "transport": res["transport"], "acc": server.evaluate().get("accuracy"),
                           "finite": all(bool(torch.isfinite(p).all()) for p in server.model.parameters()),
                           "listeners": seen.get("listeners", [])}, f)
        elif rank != outsider:
            PSWorker(t, Scheme.from_config({"compressor": "identity"}), task, config).run()
        else:
            _outsider(t, task, rank - 1, steps, out)
        t.close()
    except BaseException:
        import traceback

        with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(3)
    os._exit(0)


def _outsider(t, task, worker, steps, out):
    """Say HELLO, then push forged gradients: at once for any PARAMS it gets, and blindly for
    every step. Stops when the server is done."""
    session = 0x5EC0
    t.send(0, Frame(FrameKind.HELLO, worker, session=session, flags=FrameFlag.FRESH).to_bytes())
    seq, sent = 0, 0
    deadline = time.monotonic() + 90
    incarnation = 0
    while time.monotonic() < deadline and not os.path.exists(os.path.join(out, "server.json")):
        got = t.recv(timeout=0.05)
        steps_to_push = range(steps)
        if got is not None:
            try:
                fr = Frame.from_bytes(got[1])
            except Exception:
                fr = None
            if fr is not None and fr.kind == FrameKind.SHUTDOWN:
                break
            if fr is not None and fr.kind == FrameKind.PARAMS:
                incarnation, steps_to_push = fr.incarnation, [fr.step]
        for step in steps_to_push:
            t.send(0, _forged_push(task, worker, step, seq, session, incarnation))
            seq += 1
            sent += 1
    with open(os.path.join(out, "outsider.json"), "w") as f:
        json.dump({"sent": sent}, f)


@pytest.mark.slow
def test_outsider_rank_without_the_secret_gets_nothing_applied_and_job_listens_on_loopback(tmp_path):
    import multiprocessing as mp

    from dist_utils import free_port

    port, world, steps = free_port(), 3, 40
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_torch_job_rank, args=(r, world, port, str(tmp_path), 2, steps))
             for r in range(world)]
    [p.start() for p in procs]
    [p.join(180) for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    errs = "".join(open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("err"))
    assert os.path.exists(tmp_path / "server.json"), errs
    res = json.loads((tmp_path / "server.json").read_text())
    sent = json.loads((tmp_path / "outsider.json").read_text())["sent"] if (tmp_path / "outsider.json").exists() else 0
    print(f"outsider sent {sent} forged pushes; applied per worker {res['applied']}; "
          f"auth failures {res['transport'].get('auth_failures')}; accuracy {res['acc']}; listeners {res['listeners']}")
    assert sent > 0
    assert res["applied"][1] == 0, res  # nothing the outsider sent was used
    assert res["transport"]["auth_failures"] >= sent // 2, res  # refused before decoding, counted
    assert res["applied"][0] == steps and res["finite"] and res["acc"] > 0.5, res
    assert res["listeners"], "the job's listening sockets were not found"
    if not _has_second_interface():
        pytest.skip("this machine has no non-loopback interface: cannot tell loopback binding apart")
    assert _non_loopback(res["listeners"]) == [], res["listeners"]


# ----------------------------------------------------------------------------- checkpoints
class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_train_resume_refuses_a_pickled_checkpoint(tmp_path):
    """``commlib train --resume`` on a checkpoint that would run code when unpickled."""
    from commlib.local.ddp_job import TrainConfig, train_local

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    for r in range(2):
        torch.save({"model": {}, "opt": {}, "epoch": 0, "hook": None, "x": _Exploit(str(marker))},
                   out / f"ckpt_rank{r}.pt")
    cfg = TrainConfig(workers=2, epochs=1, max_steps=2, resume=True, out=str(out), progress=False)
    with pytest.raises(Exception) as err:
        train_local(cfg)
    assert not marker.exists()  # the payload never ran
    assert "plain types" in str(err.value) or "weights_only" in str(err.value), str(err.value)[-2000:]


def test_stale_temp_files_of_dead_savers_are_removed(tmp_path):
    from commlib.ps import checkpoint as ckpt

    path = str(tmp_path / "ck.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, other = f"{path}.tmp.{dead.pid}", f"{path}.tmp.{os.getppid()}", f"{path}.tmp.notapid"
    for p in (stale, live, other):
        with open(p, "wb") as f:
            f.write(b"x" * 100)
    ckpt.save_atomic({"format": ckpt.FORMAT, "t": torch.ones(2)}, path)
    assert not os.path.exists(stale) and os.path.exists(live) and os.path.exists(other)
    assert torch.equal(ckpt.load(path)["t"], torch.ones(2))
    with open(path, "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "x": _Exploit(str(tmp_path / "pwned"))}, f)
    with pytest.raises(ConfigError, match="plain types"):
        ckpt.load(path)
    assert not (tmp_path / "pwned").exists()


def test_resumed_server_waits_for_workers_to_rejoin_before_counting_them(tmp_path):
    """Sessions restored from a checkpoint are not present: a resumed server waits for HELLOs
    (the workers are new processes) and applies no round with fewer than the quorum."""
    import threading

    from commlib.comm import InprocHub
    from commlib.ps import ParameterServer, PSConfig, PSWorker, build_task
    from commlib.scheme import Scheme

    ck = str(tmp_path / "ps.pt")
    n, task_spec = 3, dict(TASK)

    def run(steps, resume, delay):
        hub = InprocHub(n + 1)
        cfg = PSConfig(steps=steps, checkpoint=ck, resume=resume, step_timeout=0.5, max_misses=1,
                       startup_timeout=30.0, worker_timeout=2.0)
        server = ParameterServer(hub.endpoint(0), Scheme.from_config({"compressor": "identity"}),
                                 build_task(task_spec), cfg)
        if resume:
            assert not any(getattr(r, "present", True) for r in server.records)

        def work(w):
            time.sleep(delay)
            PSWorker(hub.endpoint(w + 1), Scheme.from_config({"compressor": "identity"}), build_task(task_spec),
                     cfg).run()

        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(n)]
        [t.start() for t in threads]
        res = server.run()
        [t.join(30) for t in threads]
        return res

    first = run(4, False, 0.0)
    assert first["steps"] == 4
    res = run(10, True, 1.5)  # the new worker processes arrive 1.5 s after the server restarted
    assert res["steps"] == 10 and res["incarnation"] == 1
    assert [h["workers"] for h in res["history"]] == [n] * 6, res["history"]
    assert res["totals"]["drops"] == 0 and res["totals"]["timeouts"] == 0
