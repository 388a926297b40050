"""MPI transport (mpi4py), launched by mpirun.

    mpirun -n 5 python -m commlib.ps --transport mpi ...

Messages are raw ``MPI.BYTE`` buffers with one tag (the buffer-based, upper-case mpi4py
calls: nothing is pickled). Sends are non-blocking (``Isend``; the buffer is kept alive until
``Test`` says it is done, so a peer that is computing never blocks the sender and two ranks
sending to each other cannot deadlock). ``recv`` polls ``Iprobe`` on any source, so the size
is known (and bounded) before the buffer is allocated, then receives it with ``Recv``.

Fault model: slow, hung and garbling peers are handled by the parameter server above. A
process that dies makes MPICH's and Open MPI's launchers abort the whole job (MPI has no
standard recovery from a dead rank), so crash tolerance needs the Ray or torch transport.
"""
from __future__ import annotations

import threading
import time
from typing import List, Optional, Tuple

from commlib.comm.auth import FrameAuth
from commlib.comm.base import DEFAULT_MAX_MESSAGE_BYTES, TRANSPORTS, Received, Transport
from commlib.errors import ConfigError

TAG = 0x434C  # "CL"


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is in the 'mpi' extra
        raise ConfigError("the MPI transport needs mpi4py (pip install 'commlib[mpi]')") from exc
    return MPI


@TRANSPORTS.register("mpi")
class MPITransport(Transport):
    """Byte messages over an MPI communicator (default ``MPI.COMM_WORLD``).

    Args:
        comm: the communicator.
        poll_interval: longest sleep between two probes while waiting (the wait starts at
            50 microseconds and doubles up to this bound).
        max_pending: completed-send bookkeeping is pruned when more sends than this are pending.
        auth: the job key (default ``"env"``: from ``COMMLIB_SECRET`` / ``COMMLIB_SECRET_FILE``,
            required unless ``COMMLIB_AUTH=none``; see ``commlib/comm/auth.py``); None: no authentication.
    """

    def __init__(self, comm=None, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 poll_interval: float = 0.002, max_pending: int = 256,
                 auth: "FrameAuth | str | None" = "env") -> None:
        MPI = _mpi()
        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), max_message_bytes,
                         auth=FrameAuth.from_env() if auth == "env" else auth)
        if poll_interval <= 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval}")
        self.poll_interval = float(poll_interval)
        self.max_pending = int(max_pending)
        self._pending: List[Tuple[object, bytearray]] = []
        # sends and receives may come from different threads (mpi4py initialises MPI with
        # MPI_THREAD_MULTIPLE): the list of in-flight sends, whose buffers must stay alive, is shared
        self._plock = threading.Lock()

    @classmethod
    def from_env(cls, **kw) -> "MPITransport":
        return cls(**kw)

    def _send(self, dst: int, data: bytes) -> bool:
        buf = bytearray(data)
        req = self.comm.Isend([buf, self._MPI.BYTE], dest=dst, tag=TAG)
        with self._plock:
            self._pending.append((req, buf))
        self._prune()
        return True

    def _prune(self) -> None:
        with self._plock:
            self._pending = [(r, b) for r, b in self._pending if not r.Test()]

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        MPI = self._MPI
        status = MPI.Status()
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 5e-5
        while True:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
                src = status.Get_source()
                n = status.Get_count(MPI.BYTE)
                if not 0 < n <= self.wire_max_bytes:
                    # consume and discard it so the stream goes on; the size alone is bad
                    sink = bytearray(max(n, 0))
                    self.comm.Recv([sink, MPI.BYTE], source=src, tag=TAG)
                    self._count(dropped=1)
                    continue
                buf = bytearray(n)
                self.comm.Recv([buf, MPI.BYTE], source=src, tag=TAG)
                if self._pending:
                    self._prune()
                return src, bytes(buf)
            if self._pending:
                self._prune()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(wait, left))
            else:
                time.sleep(wait)
            wait = min(wait * 2, self.poll_interval)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every pending send completed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending:
            self._prune()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _close(self) -> None:
        if not self.flush(timeout=10.0):
            for req, _ in self._pending:
                try:
                    req.Cancel()
                except Exception:  # an already matched send cannot be cancelled; MPI finalize handles it
                    pass
        with self._plock:
            self._pending = []
