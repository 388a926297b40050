"""In-process transport: one queue per rank, ranks are threads of one process (tests, debugging).

    hub = InprocHub(world_size=3)
    server = hub.endpoint(0); worker = hub.endpoint(1)
    worker.send(0, b"..."); server.recv(timeout=1.0)  # -> (1, b"...")

Bytes are copied on send (the receiver never shares memory with the sender), so the path a
message takes is the same as over a network: bytes in, bytes out, validated by the receiver.
``hub.disconnect(rank)`` makes a rank unreachable (a crashed peer); ``hub.reconnect(rank)``
brings it back with an empty queue (a restarted peer).
"""
from __future__ import annotations

import queue
import threading
from typing import Dict, List, Optional

from commlib.comm.auth import FrameAuth
from commlib.comm.base import DEFAULT_MAX_MESSAGE_BYTES, TRANSPORTS, Received, Transport
from commlib.errors import ConfigError


class InprocHub:
    """The shared switchboard of an in-process world."""

    def __init__(self, world_size: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if int(world_size) < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        self.world_size = int(world_size)
        self.max_message_bytes = int(max_message_bytes)
        self._queues: List["queue.Queue[Received]"] = [queue.Queue() for _ in range(self.world_size)]
        self._down: set = set()
        self._lock = threading.Lock()

    def endpoint(self, rank: int, auth: Optional[FrameAuth] = None) -> "InprocTransport":
        """The transport of ``rank`` (several endpoints of one rank share its queue). In-process
        messages need no authentication; ``auth`` is there to test it without a network."""
        return InprocTransport(self, rank, auth=auth)

    def deliver(self, src: int, dst: int, data: bytes) -> bool:
        with self._lock:
            if dst in self._down:
                return False
            self._queues[dst].put((src, bytes(data)))
        return True

    def take(self, rank: int, timeout: Optional[float]) -> Optional[Received]:
        try:
            if timeout == 0:
                return self._queues[rank].get_nowait()
            return self._queues[rank].get(timeout=timeout)
        except queue.Empty:
            return None

    def disconnect(self, rank: int) -> None:
        """Make ``rank`` unreachable and drop what was queued for it (a crashed process)."""
        with self._lock:
            self._down.add(int(rank))
            self._queues[int(rank)] = queue.Queue()

    def reconnect(self, rank: int) -> None:
        """Make ``rank`` reachable again, with an empty queue (a restarted process)."""
        with self._lock:
            self._down.discard(int(rank))
            self._queues[int(rank)] = queue.Queue()

    def pending(self, rank: int) -> int:
        return self._queues[int(rank)].qsize()


@TRANSPORTS.register("inproc")
class InprocTransport(Transport):
    """One rank's endpoint on an :class:`InprocHub`."""

    def __init__(self, hub: InprocHub, rank: int, *, auth: Optional[FrameAuth] = None) -> None:
        super().__init__(rank, hub.world_size, hub.max_message_bytes, auth=auth)
        self.hub = hub

    def _send(self, dst: int, data: bytes) -> bool:
        ok = self.hub.deliver(self.rank, dst, data)
        (self.mark_alive if ok else self.mark_dead)(dst)
        return ok

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        return self.hub.take(self.rank, timeout)

    def _close(self) -> None:
        pass


def make_world(world_size: int, **kw) -> Dict[int, InprocTransport]:
    """All endpoints of a new in-process world, by rank."""
    hub = InprocHub(world_size, **kw)
    return {r: hub.endpoint(r) for r in range(world_size)}
