"""Ray actor transport: every rank has an inbox, ``send`` is a fire-and-forget actor call.

    ray_start()                                  # a local Ray (127.0.0.1 only), or ray_start(address=...)
    box = Mailbox.remote()                       # the inbox of a rank that is not an actor (the driver)
    t = RayTransport(0, world, peers={1: w1, 2: w2}, inbox=box)

A peer is any actor with a ``deliver(src: int, stream: int, seq: int, data: bytes)`` method: a
Mailbox actor, or a worker actor that owns a :class:`LocalInbox` and forwards ``deliver`` to it
(its actor must allow concurrent calls, ``max_concurrency >= 2``, so deliveries arrive while it
computes). Only ``int`` and ``bytes`` cross actor boundaries; the inbox refuses anything else,
puts each sender's messages back in order (Ray runs a threaded actor's calls concurrently),
and the receiver validates the bytes as on any other transport.

A dead peer shows up as a failed delivery (``RayActorError``), found when the transport reaps
its recent calls; the peer is then marked dead and ``send`` returns False until
:meth:`RayTransport.set_peer` installs a restarted actor for that rank.

Local Ray and authentication. Ray 2.60's gRPC servers (GCS, raylet, workers) and its agents
listen on all interfaces whatever ``_node_ip_address`` says (it even replaces 127.0.0.1 by the
host's address), and the dashboard agent starts even without the dashboard. So
:func:`ray_start` without an address turns on Ray's own token authentication
(``RAY_AUTH_MODE=token`` and a fresh 256-bit ``RAY_AUTH_TOKEN`` per job, unless the caller set
a mode or a token): a process without the token can neither join through the GCS nor use the
agents' HTTP APIs (job submission). It starts no dashboard (``include_dashboard=False``), and a
watchdog (``commlib/comm/ray_reaper.py``) kills every process of that Ray when the driver
exits or is killed. Frames between ranks are also sealed with the job secret
(``commlib/comm/auth.py``). Joining a cluster by ``address=`` never changes the authentication
mode (use the token the cluster requires). Ray's files go under ``$COMMLIB_TMP/ray`` (default
``.tmp/ray``).
"""
from __future__ import annotations

import os
import queue
import secrets
import struct
import threading
import time
from typing import Any, Dict, List, Optional

from commlib.comm.auth import AUTH_OVERHEAD, FrameAuth
from commlib.comm.base import DEFAULT_MAX_MESSAGE_BYTES, TRANSPORTS, Received, Transport
from commlib.errors import ConfigError


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is in the 'ray' extra
        raise ConfigError("the Ray transport needs ray (pip install 'commlib[ray]')") from exc
    return ray


def ray_temp_dir() -> str:
    """Where a local Ray keeps its sessions: ``$COMMLIB_TMP/ray`` (default ``./.tmp/ray``)."""
    base = os.environ.get("COMMLIB_TMP") or os.path.join(os.getcwd(), ".tmp")
    path = os.path.abspath(os.path.join(base, "ray"))
    os.makedirs(path, exist_ok=True)
    return path


_REAPER = None


def local_ray_env(env=None) -> Dict[str, str]:
    """Turn on Ray's token authentication for a local cluster (``RAY_AUTH_MODE=token`` with a
    fresh ``RAY_AUTH_TOKEN`` for this job) unless the caller chose a mode or a token already."""
    env = os.environ if env is None else env
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"].lower() == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k in env}


def _reload_ray_auth_config() -> None:
    """Ray reads ``RAY_AUTH_MODE`` into its C++ config when it is imported; make an already
    imported Ray see the mode and token set after that (what Ray's own test helpers do)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: it reads the environment at init
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ray_start(address: Optional[str] = None, num_cpus: Optional[int] = None, **init_kw: Any) -> bool:
    """Start (or join) Ray once per process; returns True when this call initialised it.

    ``address=None`` starts a local cluster with token authentication, no dashboard, and a
    watchdog that kills every process of it when this process ends (see the module
    docstring); ``address="auto"`` or ``"ray://host:10001"``/``"host:6379"`` joins one.
    """
    global _REAPER
    ray = _ray()
    if ray.is_initialized():
        return False
    kw: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    kw.update(init_kw)
    if address is None:
        if local_ray_env().get("RAY_AUTH_MODE", "").lower() == "token":
            _reload_ray_auth_config()
        kw.setdefault("_node_ip_address", "127.0.0.1")
        kw.setdefault("_temp_dir", ray_temp_dir())
        kw.setdefault("dashboard_host", "127.0.0.1")
        if num_cpus is not None:
            kw["num_cpus"] = int(num_cpus)
        ray.init(**kw)
        if _REAPER is None or _REAPER.poll() is not None:
            from commlib.comm.ray_reaper import start_reaper

            _REAPER = start_reaper(os.path.dirname(os.path.abspath(ray.__file__)))
    else:
        auth_error = getattr(ray.exceptions, "AuthenticationError", ConnectionError)  # Ray >= 2.5x
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, auth_error) as exc:  # Ray's messages name only the address, or the token
            mode = os.environ.get("RAY_AUTH_MODE", "(not set)")
            raise ConfigError(
                f"could not join the Ray cluster at {address!r} ({exc}). Check the address and that this "
                f"process has the cluster's authentication: RAY_AUTH_MODE={mode}, RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH as the cluster was started with") from exc
    return True


def _check_delivery(src: Any, stream: Any, seq: Any, data: Any, max_bytes: int) -> None:
    if not (type(src) is int and type(stream) is int and type(seq) is int and isinstance(data, (bytes, bytearray))):
        raise ConfigError("deliver(src: int, stream: int, seq: int, data: bytes) got "
                          f"({', '.join(type(x).__name__ for x in (src, stream, seq, data))})")
    if seq < 0 or len(data) > max_bytes:
        raise ConfigError(f"bad delivery: seq {seq}, {len(data)} bytes (max {max_bytes})")


class LocalInbox:
    """The queue a peer actor delivers into (lives in the receiving actor's process).

    Ray runs the calls of a threaded actor concurrently, in no guaranteed order, so every
    sender endpoint numbers its messages per destination (``seq``, within a random ``stream``
    id of that endpoint) and the inbox puts them back in order. A new stream from the same
    rank (a restarted peer) replaces the old one; a gap that stays open for ``gap_timeout``
    seconds (a message lost with a dying sender) is skipped and counted.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES + AUTH_OVERHEAD, gap_timeout: float = 30.0) -> None:
        self.max_message_bytes = int(max_message_bytes)
        self.gap_timeout = float(gap_timeout)
        self._q: "queue.Queue[Received]" = queue.Queue()
        self._lock = threading.Lock()
        self._stream: Dict[int, int] = {}
        self._next: Dict[int, int] = {}
        self._held: Dict[int, Dict[int, bytes]] = {}
        self._held_since: Dict[int, float] = {}
        self._retired: set = set()
        self.refused = 0
        self.gaps = 0

    def deliver(self, src: int, stream: int, seq: int, data: bytes) -> bool:
        try:
            _check_delivery(src, stream, seq, data, self.max_message_bytes)
        except ConfigError:
            self.refused += 1
            return False
        with self._lock:
            if (src, stream) in self._retired:
                return True  # a late message from a replaced sender process
            if self._stream.get(src) != stream:
                if src in self._stream:
                    self._retired.add((src, self._stream[src]))
                self._stream[src], self._next[src], self._held[src] = stream, 0, {}
            if seq >= self._next[src]:
                self._held[src][seq] = bytes(data)
                self._release(src)
        return True

    def _release(self, src: int) -> None:
        """Queue every message of ``src`` that is next in line (lock held)."""
        held = self._held[src]
        while self._next[src] in held:
            self._q.put((src, held.pop(self._next[src])))
            self._next[src] += 1
        if held:
            self._held_since.setdefault(src, time.monotonic())
        else:
            self._held_since.pop(src, None)

    def _skip_old_gaps(self) -> None:
        now = time.monotonic()
        with self._lock:
            for src, since in list(self._held_since.items()):
                if now - since > self.gap_timeout:
                    self._next[src] = min(self._held[src])
                    self.gaps += 1
                    self._held_since.pop(src)
                    self._release(src)

    def pending(self) -> int:
        """Messages ready to be taken."""
        return self._q.qsize()

    def take(self, timeout: Optional[float]) -> Optional[Received]:
        if self._held_since:
            self._skip_old_gaps()
        try:
            if timeout == 0:
                return self._q.get_nowait()
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


_SRC = struct.Struct("<I")


class _MailboxImpl:
    """An inbox as its own actor (for a rank that is not an actor, e.g. the driver)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.inbox = LocalInbox(max_message_bytes + AUTH_OVERHEAD)

    def deliver(self, src: int, stream: int, seq: int, data: bytes) -> bool:
        return self.inbox.deliver(src, stream, seq, data)

    def take(self, timeout: Optional[float]) -> bytes:
        """The next message as ``u32 src`` + data (b"" on timeout): only bytes cross to the caller."""
        got = self.inbox.take(timeout)
        return b"" if got is None else _SRC.pack(got[0]) + got[1]

    def ping(self) -> bool:
        return True


def inbox_actor(impl: type, **options: Any):
    """A new actor of class ``impl`` holding an inbox: no CPU reserved, threaded (so a taker can
    wait while deliveries run); ``options`` override Ray's actor options."""
    ray = _ray()
    opts = {"num_cpus": 0, "max_concurrency": 8}
    opts.update(options)
    return ray.remote(impl).options(**opts).remote()


def mailbox_actor(**options: Any):
    """A new Mailbox actor handle (threaded, so ``take`` can wait while ``deliver`` runs)."""
    return inbox_actor(_MailboxImpl, **options)


class RayPeers:
    """The peer actors of a Ray transport and this endpoint's numbered message stream to each
    (actor calls run in any order: the receiving inbox puts ``seq`` back in order)."""

    def _init_peers(self, peers: Dict[int, Any]) -> None:
        self._lock = threading.Lock()
        self._stream = int.from_bytes(os.urandom(4), "little")  # this endpoint's message stream id
        self._seq: Dict[int, int] = {}
        self._peers: Dict[int, Any] = {}
        for r, h in peers.items():
            self.set_peer(r, h)

    def _live_peer(self, dst: int) -> Optional[Any]:
        """The actor hosting ``dst``, or None when there is none or ``dst`` is dead."""
        handle = self._peers.get(dst)
        return None if handle is None or self.is_dead(dst) else handle

    def _next_seq(self, dst: int) -> int:
        """The next sequence number of this endpoint's stream to ``dst`` (lock held)."""
        seq = self._seq.get(dst, 0)
        self._seq[dst] = seq + 1
        return seq

    def set_peer(self, rank: int, handle: Any) -> None:
        """Install (or replace, after a restart) the actor hosting ``rank``."""
        if not 0 <= int(rank) < self.world_size or int(rank) == self.rank:
            raise ConfigError(f"bad peer rank {rank}")
        with self._lock:
            self._peers[int(rank)] = handle
            self._seq[int(rank)] = 0  # a new actor's inbox starts our stream from the beginning
        self.mark_alive(int(rank))


@TRANSPORTS.register("ray")
class RayTransport(RayPeers, Transport):
    """One rank's endpoint: ``peers`` maps rank -> actor handle with ``deliver``; ``inbox`` is a
    :class:`LocalInbox` (inside an actor) or a Mailbox actor handle (in the driver). ``auth``:
    the job key (default ``"env"``: from ``COMMLIB_SECRET``, required unless ``COMMLIB_AUTH=none``;
    ``commlib/comm/auth.py``): a process inside the Ray cluster that calls ``deliver`` without
    it gets nothing accepted."""

    _REAP_EVERY = 32

    def __init__(self, rank: int, world_size: int, peers: Dict[int, Any], inbox: Any, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 auth: "FrameAuth | str | None" = "env") -> None:
        super().__init__(rank, world_size, max_message_bytes,
                         auth=FrameAuth.from_env() if auth == "env" else auth)
        self._ray = _ray()
        self._inbox = inbox
        self._local = isinstance(inbox, LocalInbox)
        self._calls: List[Any] = []
        self._call_dst: Dict[Any, int] = {}
        self._init_peers(peers)

    def _send(self, dst: int, data: bytes) -> bool:
        handle = self._live_peer(dst)
        if handle is None:
            return False
        with self._lock:
            ref = handle.deliver.remote(self.rank, self._stream, self._next_seq(dst), data)
            self._calls.append(ref)
            self._call_dst[ref] = dst
            if len(self._calls) >= self._REAP_EVERY:
                self._reap(0)
        return True

    def _reap(self, timeout: float) -> None:
        """Look at finished deliveries; a failed one marks its peer dead (lock held)."""
        if not self._calls:
            return
        ready, rest = self._ray.wait(self._calls, num_returns=len(self._calls), timeout=timeout)
        for ref in ready:
            dst = self._call_dst.pop(ref)
            try:
                self._ray.get(ref)
            except Exception:  # RayActorError and friends: the peer's actor is gone
                if self._peers.get(dst) is not None:
                    self.mark_dead(dst)
        self._calls = list(rest)

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        if self._local:
            return self._inbox.take(timeout)
        raw = self._ray.get(self._inbox.take.remote(timeout))
        if not isinstance(raw, (bytes, bytearray)) or (raw and len(raw) <= _SRC.size):
            self._count(dropped=1)
            return None
        if not raw:
            return None
        return _SRC.unpack_from(raw)[0], bytes(raw[_SRC.size:])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every delivery finished (or failed); False on timeout."""
        with self._lock:
            self._reap(timeout)
            return not self._calls

    def _close(self) -> None:
        try:
            self.flush(timeout=5.0)
        except Exception:  # Ray already shut down: nothing to flush
            pass
