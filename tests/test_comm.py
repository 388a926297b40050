"""Transport contract on real transports: in-process threads, torch.distributed (gloo, 3
processes, one of which dies) and MPI (mpirun -n 3). Ray is in test_ps_ray.py (one shared
local cluster for every Ray test)."""
import os
import subprocess
import sys
import threading
import time

import pytest

from commlib.comm import InprocHub, Transport
from commlib.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
N_MSG = 20


def payload(rank: int, i: int) -> bytes:
    size = 1 << 20 if i == 7 else 1 + (i * 37) % 300  # one 1 MiB message among small ones
    return bytes([rank, i % 256]) + bytes((rank * 31 + i + k) % 251 for k in range(size))


def exchange(t: Transport, dying: int = -1) -> None:
    """Every rank but 0 sends N_MSG messages to rank 0, which checks content and per-sender
    order, then answers each live sender; ``dying`` sends half its messages, then dies."""
    if t.rank == 0:
        got = {r: [] for r in range(1, t.world_size)}
        expected = {r: (N_MSG // 2 if r == dying else N_MSG) for r in got}

        def waiting(r):
            return len(got[r]) < expected[r] and not (r == dying and t.is_dead(r))

        deadline = time.monotonic() + 60
        while any(waiting(r) for r in got) and time.monotonic() < deadline:
            m = t.recv(timeout=1.0)
            if m is not None:
                got[m[0]].append(m[1])
        for r, msgs in got.items():
            sent = [payload(r, i) for i in range(expected[r])]
            if r == dying:  # what it had queued when it died is lost; what arrived is intact, in order
                assert msgs == sent[:len(msgs)]
            else:
                assert msgs == sent, f"messages from {r} lost or reordered"
        for r in got:
            if r != dying:
                assert t.send(r, b"ok from 0")
        t0 = time.monotonic()
        assert t.recv(timeout=0.2) is None and time.monotonic() - t0 < 2.0
        if dying > 0:  # the dead peer is noticed: sends to it fail instead of hanging
            deadline = time.monotonic() + 20
            while t.send(dying, b"x") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert t.is_dead(dying)
    else:
        for i in range(N_MSG):
            if t.rank == dying and i == N_MSG // 2:
                os._exit(1)  # a real process death, mid-stream
            assert t.send(0, payload(t.rank, i))
        m = t.recv(timeout=30.0)
        assert m == (0, b"ok from 0")
    for bad in (t.rank, t.world_size, -1):
        with pytest.raises(ConfigError):
            t.send(bad, b"x")
    with pytest.raises(ConfigError):
        t.send((t.rank + 1) % t.world_size, "str is not bytes")


def test_inproc_contract_and_disconnect():
    hub = InprocHub(4)
    errors = []

    def body(r):
        try:
            exchange(hub.endpoint(r))
        except BaseException as exc:  # reported below
            errors.append((r, exc))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    t0, t1 = hub.endpoint(0), hub.endpoint(1)
    hub.disconnect(1)
    assert not t0.send(1, b"x") and t0.is_dead(1)
    hub.reconnect(1)
    assert t0.send(1, b"y") and not t0.is_dead(1) and t1.recv(0.1) == (0, b"y")
    small = InprocHub(2, max_message_bytes=10).endpoint(0)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        small.send(1, bytes(11))
    t0.close()
    with pytest.raises(Exception, match="closed"):
        t0.send(1, b"z")


def _torch_rank(rank, world, port, dying, errdir):
    import torch.distributed as dist

    from commlib.comm.torch_dist import TorchDistTransport, init_from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        owns = init_from_env("gloo")
        t = TorchDistTransport(peers=None if rank == 0 else [0], owns_group=owns, close_timeout=5.0)
        exchange(t, dying=dying)
        t.close()
        assert rank != 0 or not dist.is_initialized()  # rank 0 owned the group and released it
    except BaseException:
        import traceback

        with open(os.path.join(errdir, f"err{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(3)
    os._exit(0)


@pytest.mark.slow
def test_torch_distributed_gloo_three_processes_survive_a_dead_peer(tmp_path):
    import multiprocessing as mp

    from dist_utils import free_port

    port = free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_torch_rank, args=(r, 3, port, 2, str(tmp_path))) for r in range(3)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    errs = "".join(open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("err"))
    assert [p.exitcode for p in procs] == [0, 0, 1], errs


MPI_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from commlib.comm.mpi import MPITransport
from test_comm import exchange
t = MPITransport()
exchange(t)
t.close()
# one file per rank: three processes printing to one pipe can interleave their lines
with open({out!r} + "/rank%d.ok" % t.rank, "w") as f:
    f.write("rank %d ok" % t.rank)
"""


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_contract_under_mpirun(tmp_path):
    mpirun = os.path.join(VENV_BIN, "mpirun")
    if not os.path.exists(mpirun):
        pytest.skip("mpirun is not installed in .venv (pip install 'commlib[mpi]')")
    script = tmp_path / "mpi_exchange.py"
    script.write_text(MPI_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    out = subprocess.run([mpirun, "-n", "3", sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    got = sorted((tmp_path / f).read_text() for f in os.listdir(tmp_path) if f.endswith(".ok"))
    assert got == ["rank 0 ok", "rank 1 ok", "rank 2 ok"], out.stdout + out.stderr


def test_ray_inbox_restores_each_senders_order_and_handles_restarts():
    """Ray runs a threaded actor's calls in any order: the inbox reorders by (stream, seq)."""
    from commlib.comm.ray_transport import LocalInbox

    box = LocalInbox(max_message_bytes=100, gap_timeout=0.2)
    for seq in (2, 0, 3, 1):
        assert box.deliver(1, 77, seq, bytes([seq]))
    assert box.deliver(2, 5, 0, b"other sender")
    got = [box.take(0) for _ in range(5)]
    assert [g for g in got if g[0] == 1] == [(1, bytes([s])) for s in range(4)]
    assert (2, b"other sender") in got and box.take(0) is None
    box.deliver(1, 78, 0, b"restarted")  # a new process of rank 1: a new stream from 0
    box.deliver(1, 77, 4, b"late, from the old process")  # dropped
    assert box.take(0) == (1, b"restarted") and box.take(0) is None
    box.deliver(1, 78, 2, b"after a gap")  # seq 1 was lost with its sender
    assert box.take(0.05) is None
    time.sleep(0.25)
    assert box.take(0) == (1, b"after a gap") and box.gaps == 1
    for bad in (("1", 0, 0, b""), (1, 0, -1, b""), (1, 0, 0, "str"), (1, 0, 0, bytes(101))):
        assert not box.deliver(*bad)
    assert box.refused == 4


def test_every_registered_transport_name_builds_a_transport():
    import commlib.comm.mpi  # noqa: F401  (registers "mpi")
    import commlib.comm.ray_transport  # noqa: F401  (registers "ray")
    import commlib.comm.torch_dist  # noqa: F401  (registers "torch", "gloo", ...)
    from commlib.comm import TRANSPORTS

    assert {"inproc", "mpi", "ray", "torch"} <= set(TRANSPORTS.names())
    for name in TRANSPORTS.names():
        assert issubclass(TRANSPORTS.get(name), Transport), name  # not a mixin such as RayPeers
