"""torch.distributed point-to-point transport (gloo on CPU, NCCL on GPU), launched by torchrun.

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m commlib.ps --transport torch ...

Each message is two point-to-point sends on the process group: a 2 x int64 header
``[MAGIC, length]`` (tag 11) and the body as a ``uint8`` tensor of that length (tag 12). The
receiver checks the magic and bounds the length before it allocates the body.

How it stays responsive with a slow or dead peer (measured on gloo, torch 2.13):

- gloo's ``Work.is_completed()`` never turns true for send/recv before ``wait()``, and
  ``wait(timeout)`` on a recv *closes the connection* when it expires. So this transport never
  uses gloo timeouts: one receiver thread per peer blocks in ``recv`` and feeds a local queue,
  and ``recv(timeout)`` waits on that queue.
- A gloo send completes only when the receiver posts the matching recv. Sends therefore go
  through one sender thread per destination with a bounded outbox (``max_outbox`` messages;
  when a hung peer lets it fill up, the oldest message is dropped and counted), so a stuck
  peer delays nobody else.
- When a peer process dies, gloo fails its pending and later operations with "Connection
  closed by peer"; the threads of that peer stop, it is marked dead and ``send`` returns False.
  The other peers are unaffected.

Authentication and binding: every message is sealed with HMAC-SHA256 under the job secret
(``COMMLIB_SECRET`` / ``COMMLIB_SECRET_FILE``, see ``commlib/comm/auth.py``); a rank without
it can join the process group but nothing it sends is accepted. torch's rendezvous store has
no authentication of its own. :func:`init_from_env` binds gloo's listening sockets to
``COMMLIB_BIND_ADDR`` (default: ``MASTER_ADDR`` when that is a loopback address, else torch's
choice from the host name or ``GLOO_SOCKET_IFNAME``), and outside torchrun it runs the
rendezvous store itself on a socket bound to that address (torch's own store listens on all
interfaces). Under torchrun the store is torchrun's (``--rdzv-endpoint``): it listens on all
interfaces and torch offers no option to change that, so its port must be firewalled.

The process group's own timeout bounds a single blocking wait; :func:`init_from_env` sets it
to a week (a silent peer is the parameter server's business, not gloo's). On NCCL the
tensors live on ``cuda:LOCAL_RANK``; NCCL itself does not survive a dead peer (its watchdog
tears the group down), so fault tolerance on NCCL is limited to slow, hung and garbled
peers. Under torchrun a process that exits with an error makes the elastic agent stop (or,
with ``--max-restarts``, restart) the whole group; see README "Parameter server".
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import socket
import threading
import time
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from commlib.comm.auth import FrameAuth
from commlib.comm.base import DEFAULT_MAX_MESSAGE_BYTES, TRANSPORTS, Received, Transport, TransportError
from commlib.errors import ConfigError

BIND_ENV = "COMMLIB_BIND_ADDR"

MAGIC = 0x434C_5450_5446_3031  # "CLTPTF01"
TAG_HEADER = 11
TAG_BODY = 12
_STOP = object()
_GOODBYE = b""  # a zero-length message: "this endpoint is closing" (never given to recv)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_address(env=None) -> Optional[str]:
    """Where this rank's listening sockets bind: ``COMMLIB_BIND_ADDR``, else ``MASTER_ADDR`` when it
    is a loopback address (a single-machine job), else None (torch's default)."""
    env = os.environ if env is None else env
    if env.get(BIND_ENV):
        return env[BIND_ENV]
    master = env.get("MASTER_ADDR", "")
    return "127.0.0.1" if master and is_loopback(master) else None


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} for the rendezvous store ({exc})") from None
    return sock


def init_process_group_bound(backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
                             bind: Optional[str], timeout: datetime.timedelta, **kw) -> None:
    """``init_process_group`` whose rendezvous store (rank 0) and gloo sockets listen on ``bind``
    only (None: torch's defaults). The store is a ``TCPStore`` on a socket we bound ourselves."""
    store = None
    if bind is not None:
        if rank == 0:
            sock = _listening_socket(bind, int(master_port))
            # the store takes the descriptor over (Python must not close it under the store)
            store = dist.TCPStore(master_addr, int(master_port), world_size, True, timeout=timeout,
                                  master_listen_fd=sock.detach())
        else:
            store = dist.TCPStore(master_addr, int(master_port), world_size, False, timeout=timeout)
    if bind is not None and backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
        kw["pg_options"] = opts
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kw)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kw)


def init_from_env(backend: Optional[str] = None, timeout_s: float = 7 * 24 * 3600.0) -> bool:
    """Initialise the default process group from torchrun's environment (if not done yet),
    with listening sockets bound as :func:`bind_address` says.

    Returns True when this call created the group (the transport then destroys it on close).
    """
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("the torch transport needs torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kw = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    timeout = datetime.timedelta(seconds=timeout_s)
    bind = bind_address()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already runs the store: only the gloo sockets can be bound here
        if bind is not None and backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
            kw["pg_options"] = opts
        dist.init_process_group(backend, timeout=timeout, **kw)
    else:
        init_process_group_bound(backend, rank, world, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                 int(os.environ.get("MASTER_PORT", "29500")), bind, timeout, **kw)
    return True


@TRANSPORTS.register("torch", "torch-dist", "gloo", "nccl")
class TorchDistTransport(Transport):
    """Byte messages over a torch.distributed process group (already initialised).

    Args:
        group: process group (default: the default group).
        peers: ranks this endpoint receives from (default: every other rank). A parameter
            server worker only hears from the server, so it passes ``peers=[0]``.
        device: where message tensors live (default: ``cuda:LOCAL_RANK`` on NCCL, else CPU).
        max_outbox: messages queued per destination before the oldest is dropped.
        owns_group: destroy the process group on close.
        close_timeout: longest wait in ``close`` for queued messages and the peers' goodbyes.
        auth: the job key (default ``"env"``: :meth:`FrameAuth.from_env`, which refuses to start
            without a secret unless ``COMMLIB_AUTH=none``); None: no authentication.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *, peers: Optional[Iterable[int]] = None,
                 device: Optional[torch.device] = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_outbox: int = 64, owns_group: bool = False, close_timeout: float = 10.0,
                 auth: "FrameAuth | str | None" = "env") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("TorchDistTransport needs an initialised process group (see init_from_env)")
        super().__init__(dist.get_rank(group), dist.get_world_size(group), max_message_bytes,
                         auth=FrameAuth.from_env() if auth == "env" else auth)
        if int(max_outbox) < 1:
            raise ConfigError(f"max_outbox must be >= 1, got {max_outbox}")
        self.group = group
        self.backend = dist.get_backend(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        self.max_outbox = int(max_outbox)
        self.owns_group = bool(owns_group)
        self.close_timeout = float(close_timeout)
        self._inbox: "queue.Queue[Received]" = queue.Queue()
        self._outboxes: Dict[int, "queue.Queue"] = {}
        self._inflight: Dict[int, int] = {}
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        peer_list = [r for r in range(self.world_size) if r != self.rank] if peers is None else sorted(set(int(p) for p in peers))
        for p in peer_list:
            if not 0 <= p < self.world_size or p == self.rank:
                raise ConfigError(f"bad peer {p} for rank {self.rank} of {self.world_size}")
        self.peers = peer_list
        self._rx = [threading.Thread(target=self._rx_loop, args=(p,), daemon=True, name=f"commlib-rx{p}")
                    for p in peer_list]
        for t in self._rx:
            t.start()

    @classmethod
    def from_env(cls, backend: Optional[str] = None, **kw) -> "TorchDistTransport":
        """Initialise the process group from torchrun's environment and wrap it."""
        owns = init_from_env(backend)
        return cls(owns_group=owns, **kw)

    # -- receiving ----------------------------------------------------------------------------
    def _rx_loop(self, src: int) -> None:
        hdr = torch.zeros(2, dtype=torch.int64, device=self.device)
        try:
            while not self._stopping.is_set():
                dist.recv(hdr, src=src, group=self.group, tag=TAG_HEADER)
                magic, length = (int(v) for v in hdr.cpu().tolist())
                if magic == MAGIC and length == 0:  # the peer closed its end: this thread is done
                    return
                if magic != MAGIC or not 0 < length <= self.wire_max_bytes:
                    # the stream from this peer can no longer be trusted to be in step
                    self._count(dropped=1)
                    raise TransportError(f"rank {self.rank}: bad message header from {src}: "
                                         f"magic={magic:#x} length={length}")
                body = torch.empty(length, dtype=torch.uint8, device=self.device)
                dist.recv(body, src=src, group=self.group, tag=TAG_BODY)
                self._inbox.put((src, body.cpu().numpy().tobytes()))
        except Exception:  # connection closed (peer died), bad header, or shutting down
            if not self._stopping.is_set():
                self.mark_dead(src)

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        try:
            if timeout == 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- sending ------------------------------------------------------------------------------
    def _send(self, dst: int, data: bytes) -> bool:
        if self.is_dead(dst):
            return False
        with self._cv:
            box = self._outboxes.get(dst)
            if box is None:
                box = self._outboxes[dst] = queue.Queue()
                self._inflight[dst] = 0
                threading.Thread(target=self._tx_loop, args=(dst, box), daemon=True, name=f"commlib-tx{dst}").start()
            while box.qsize() >= self.max_outbox:  # a hung peer: drop its oldest message
                try:
                    box.get_nowait()
                    self._inflight[dst] -= 1
                    self._count(dropped=1)
                except queue.Empty:
                    break
            self._inflight[dst] += 1
            box.put(data)
        return True

    def _tx_loop(self, dst: int, box: "queue.Queue") -> None:
        while True:
            data = box.get()
            if data is _STOP:
                return
            try:
                if not self.is_dead(dst):
                    hdr = torch.tensor([MAGIC, len(data)], dtype=torch.int64, device=self.device)
                    w1 = dist.isend(hdr, dst, group=self.group, tag=TAG_HEADER)
                    if data:
                        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
                        dist.isend(body, dst, group=self.group, tag=TAG_BODY).wait()
                    w1.wait()
                    if self.device.type == "cuda":  # NCCL's wait only orders the stream: wait for real
                        torch.cuda.current_stream(self.device).synchronize()
            except Exception:
                if not self._stopping.is_set():
                    self.mark_dead(dst)
            finally:
                with self._cv:
                    self._inflight[dst] -= 1
                    self._cv.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message was taken by its (live) receiver; False on timeout."""
        with self._cv:
            return self._cv.wait_for(
                lambda: all(n <= 0 or self.is_dead(d) for d, n in self._inflight.items()), timeout=timeout)

    # -- shutdown -----------------------------------------------------------------------------
    def _close(self) -> None:
        """Flush, say goodbye to every peer we hear from (their receiver threads for us end),
        wait for their goodbyes (ours end), then release the group. Bounded by ``close_timeout``."""
        deadline = time.monotonic() + self.close_timeout
        self.flush(timeout=self.close_timeout)
        for p in self.peers:
            if not self.is_dead(p):
                self._send(p, _GOODBYE)
        self.flush(timeout=max(0.0, deadline - time.monotonic()))
        for t in self._rx:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        with self._cv:
            for box in self._outboxes.values():
                box.put(_STOP)
        if self.owns_group and dist.is_initialized() and not any(t.is_alive() for t in self._rx):
            # (with a receiver still blocked in gloo, destroying the group under it could abort
            # the process; the operating system reclaims everything at exit instead)
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # a peer already gone: nothing left to release cleanly
                pass
