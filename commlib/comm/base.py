"""The transport interface: move opaque byte strings between ranks.

A transport knows nothing about models or payloads. The parameter server puts a validated
frame (``commlib.ps.protocol``) around a ``commlib.wire.Message`` and hands the bytes to
``send``; the receiving side gets ``(src, bytes)`` back from ``recv`` and validates every
byte before use. Nothing is ever pickled on the way.

Contract every transport keeps (and ``tests/test_comm.py`` checks on each one):

- ``send(dst, data)`` never blocks on the receiver (it queues) and never raises because the
  peer is slow or gone; it returns False when the peer is known to be unreachable.
- ``recv(timeout)`` returns the next ``(src, data)`` from any peer, or None after ``timeout``
  seconds (``None`` waits forever, 0 polls). Messages from one sender arrive in order.
- Sizes are bounded: a message longer than ``max_message_bytes`` is refused on both ends.
- ``close()`` is idempotent and never hangs.
- With ``auth`` (a :class:`commlib.comm.auth.FrameAuth`, which network transports take from
  the job secret) every message is sealed with HMAC-SHA256 on ``send`` and opened on ``recv``:
  a message that fails authentication or is a replay is dropped and counted
  (``auth_failures``, ``replays``) and never returned. ``auth=None``: no authentication.

A new transport is one file with one subclass, registered in ``TRANSPORTS``.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

from commlib.comm.auth import AUTH_OVERHEAD, FrameAuth, ReplayError
from commlib.errors import CommlibError, ConfigError, PayloadError
from commlib.registry import Registry

#: Default upper bound on one message (1 GiB): a length prefix above it is corrupt.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

Received = Tuple[int, bytes]


class TransportError(CommlibError, RuntimeError):
    """The transport itself failed (not a peer: a broken local endpoint or a bad setup)."""


@dataclass
class TransportStats:
    """Counters of one endpoint (bytes are message bytes, without transport framing)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    send_failures: int = 0  # sends to a peer known to be gone
    dropped: int = 0  # messages refused (over the size bound) or dropped by a full outbox
    auth_failures: int = 0  # received messages whose HMAC, ranks or envelope did not check out
    replays: int = 0  # authentic messages received again (or from a superseded sender stream)
    dead_peers: Set[int] = field(default_factory=set)

    def as_dict(self) -> Dict[str, object]:
        return {"messages_sent": self.messages_sent, "bytes_sent": self.bytes_sent,
                "messages_received": self.messages_received, "bytes_received": self.bytes_received,
                "send_failures": self.send_failures, "dropped": self.dropped,
                "auth_failures": self.auth_failures, "replays": self.replays,
                "dead_peers": sorted(self.dead_peers)}


class Transport(ABC):
    """Point-to-point byte messages between ``world_size`` ranks; this endpoint is ``rank``.

    ``auth``: seal and check every message with this job key (None: no authentication)."""

    def __init__(self, rank: int, world_size: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *,
                 auth: Optional[FrameAuth] = None) -> None:
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank {rank} outside a world of size {world_size}")
        if int(max_message_bytes) < 1:
            raise ConfigError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_message_bytes = int(max_message_bytes)
        self.stats = TransportStats()
        self.closed = False
        self._stats_lock = threading.Lock()
        if auth is not None and not isinstance(auth, FrameAuth):
            raise ConfigError(f"auth must be a FrameAuth or None, got {type(auth).__name__}")
        self.auth = auth
        self._sealer = auth.sealer(self.rank) if auth is not None else None
        self._opener = auth.opener(self.rank) if auth is not None else None
        self._seal_lock = threading.Lock()

    @property
    def wire_max_bytes(self) -> int:
        """The longest message on the wire (``max_message_bytes`` plus the authentication envelope)."""
        return self.max_message_bytes + AUTH_OVERHEAD

    # -- the interface ---------------------------------------------------------------------
    @abstractmethod
    def _send(self, dst: int, data: bytes) -> bool:
        """Queue ``data`` for ``dst``; False when ``dst`` is known to be unreachable."""

    @abstractmethod
    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        """Next message from any peer, or None on timeout."""

    @abstractmethod
    def _close(self) -> None:
        """Release the endpoint's resources (called once)."""

    # -- checked wrappers ----------------------------------------------------------------------
    def send(self, dst: int, data: bytes) -> bool:
        """Send ``data`` (bytes) to rank ``dst`` without waiting for the receiver."""
        if self.closed:
            raise TransportError(f"rank {self.rank}: send on a closed transport")
        if not isinstance(data, (bytes, bytearray)):
            raise ConfigError(f"transports move bytes, got {type(data).__name__}")
        if not 0 <= int(dst) < self.world_size or int(dst) == self.rank:
            raise ConfigError(f"rank {self.rank}: bad destination {dst} (world of {self.world_size})")
        if len(data) > self.max_message_bytes:
            self._count(dropped=1)
            raise ConfigError(f"message of {len(data)} bytes exceeds max_message_bytes={self.max_message_bytes}")
        if self._sealer is not None:
            with self._seal_lock:  # sequence numbers leave in the order they were drawn
                ok = self._send(int(dst), self._sealer.seal(int(dst), data))
        else:
            ok = self._send(int(dst), bytes(data))
        if ok:
            self._count(messages_sent=1, bytes_sent=len(data))
        else:
            self._count(send_failures=1)
        return ok

    def recv(self, timeout: Optional[float] = None) -> Optional[Received]:
        """Next ``(src, data)`` from any peer; None after ``timeout`` seconds without one."""
        if self.closed:
            raise TransportError(f"rank {self.rank}: recv on a closed transport")
        if timeout is not None and timeout < 0:
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self._recv(timeout)
            if got is None or self._opener is None:
                break
            try:
                got = (got[0], self._opener.open(got[0], got[1]))
                break
            except ReplayError:
                self._count(replays=1)
            except PayloadError:
                self._count(auth_failures=1)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        if got is not None:
            self._count(messages_received=1, bytes_received=len(got[1]))
        return got

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def mark_dead(self, peer: int) -> None:
        """Record that ``peer`` is unreachable (transports call it when a link breaks)."""
        with self._stats_lock:
            self.stats.dead_peers.add(int(peer))

    def mark_alive(self, peer: int) -> None:
        """Forget that ``peer`` was unreachable (a restarted peer)."""
        with self._stats_lock:
            self.stats.dead_peers.discard(int(peer))

    def is_dead(self, peer: int) -> bool:
        return int(peer) in self.stats.dead_peers

    def _count(self, **inc: int) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


TRANSPORTS: "Registry[Transport]" = Registry("transport")
