"""Ray transport with bundled deliveries: one actor call carries many messages.

With virtual workers (``commlib.ps.worker_group``) one actor hosts hundreds of ranks. Sending
each frame as its own actor call costs a Ray round trip per frame, and the driver's inbox
(a Mailbox actor) one per received frame; at 1,000 workers that is the run's bottleneck.
Here a sender queues messages per destination actor and ships them as one bundle
(``commlib.comm.bundle``) when it next receives, flushes or closes (or has queued
``flush_items``); the receiver fetches everything waiting in one call.

    box = bundle_mailbox_actor()                          # the driver's inbox
    t = BundleRayTransport(0, world, peers={1: g0, 2: g0, 3: g1}, inbox=box)

A peer actor has ``deliver_bundle(blob: bytes) -> bytes``: it returns the ranks it refused
(a crashed virtual worker), which this endpoint then marks dead; an actor that died marks
all of its ranks dead. Ordering per sender is kept as in ``ray_transport`` (per-destination
sequence numbers within a random stream id, put back in order by a ``LocalInbox``). Only
bytes cross actor boundaries, and every bundle is parsed as hostile input.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from commlib.comm.auth import AUTH_OVERHEAD
from commlib.comm.base import DEFAULT_MAX_MESSAGE_BYTES, Received, Transport
from commlib.comm.bundle import Bundled, pack_bundle, unpack_bundle, unpack_ranks
from commlib.comm.ray_transport import LocalInbox, RayPeers, _ray, inbox_actor
from commlib.errors import ConfigError, PayloadError


class _BundleMailboxImpl:
    """The driver's inbox as an actor: takes bundles in, hands out everything waiting."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = int(max_message_bytes) + AUTH_OVERHEAD  # sealed messages on the wire
        self.inbox = LocalInbox(self.max_message_bytes)
        self.refused = 0

    def deliver_bundle(self, blob: bytes) -> bytes:
        try:
            items = unpack_bundle(blob, self.max_message_bytes)
        except PayloadError:
            self.refused += 1
            return b""
        for it in items:
            self.inbox.deliver(it.src, it.stream, it.seq, it.data)
        return b""

    def take_bundle(self, timeout: Optional[float], max_items: int) -> bytes:
        """Up to ``max_items`` waiting messages as a bundle (waits ``timeout`` for the first)."""
        items: List[Bundled] = []
        got = self.inbox.take(timeout)
        while got is not None:
            items.append(Bundled(got[0], 0, 0, 0, got[1]))
            if len(items) >= max_items:
                break
            got = self.inbox.take(0)
        return pack_bundle(items) if items else b""

    def ping(self) -> bool:
        return True


def bundle_mailbox_actor(**options: Any):
    """A new bundle Mailbox actor handle (threaded: ``take_bundle`` waits while bundles arrive)."""
    return inbox_actor(_BundleMailboxImpl, **options)


class BundleRayTransport(RayPeers, Transport):
    """The driver's endpoint (rank 0 by default) to actors that host many ranks each.

    Args:
        rank, world_size: this endpoint.
        peers: rank -> actor handle with ``deliver_bundle`` (many ranks may share a handle).
        inbox: a :func:`bundle_mailbox_actor` the peers deliver to.
        flush_items: ship a destination actor's queue once it holds this many messages.
        take_items: most messages fetched from the inbox per call.
        transport_kw: passed on to :class:`commlib.comm.base.Transport`.
    """

    def __init__(self, rank: int, world_size: int, peers: Dict[int, Any], inbox: Any, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, flush_items: int = 512,
                 take_items: int = 1024, **transport_kw: Any) -> None:
        super().__init__(rank, world_size, max_message_bytes, **transport_kw)
        self._ray = _ray()
        self._inbox = inbox
        self.flush_items, self.take_items = int(flush_items), int(take_items)
        if self.flush_items < 1 or self.take_items < 1:
            raise ConfigError("flush_items and take_items must be >= 1")
        self._queued: Dict[Any, List[Bundled]] = {}
        self._calls: Dict[Any, Tuple[Any, List[int]]] = {}
        self._got: List[Received] = []
        self.bundles_sent = 0
        self.bundles_received = 0
        self._init_peers(peers)

    def _send(self, dst: int, data: bytes) -> bool:
        handle = self._live_peer(dst)
        if handle is None:
            return False
        with self._lock:
            queue = self._queued.setdefault(handle, [])
            queue.append(Bundled(self.rank, dst, self._stream, self._next_seq(dst), data))
            if len(queue) >= self.flush_items:
                self._ship(handle)
        return True

    def _ship(self, handle: Any) -> None:
        """Send ``handle``'s queue as one bundle (lock held)."""
        items = self._queued.pop(handle, None)
        if not items:
            return
        ref = handle.deliver_bundle.remote(pack_bundle(items))
        self._calls[ref] = (handle, sorted({it.dst for it in items}))
        self.bundles_sent += 1

    def flush_sends(self, timeout: float = 0.0) -> bool:
        """Ship every queue, then look at finished deliveries (waiting up to ``timeout``);
        True when none is outstanding."""
        with self._lock:
            for handle in list(self._queued):
                self._ship(handle)
            self._reap(timeout)
            return not self._calls

    def _reap(self, timeout: float) -> None:
        """Finished deliveries: refused ranks and ranks of a dead actor are marked dead (lock held)."""
        if not self._calls:
            return
        refs = list(self._calls)
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            handle, ranks = self._calls.pop(ref)
            try:
                refused = unpack_ranks(self._ray.get(ref), self.world_size)
            except PayloadError:
                continue
            except Exception:  # RayActorError and friends: the actor and all its ranks are gone
                refused = [r for r in ranks if self._peers.get(r) is handle]
            for r in refused:
                if r in ranks:  # an actor speaks only for the ranks it was sent to
                    self.mark_dead(r)

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        self.flush_sends(0.0)
        if not self._got:
            raw = self._ray.get(self._inbox.take_bundle.remote(timeout, self.take_items))
            if not raw:
                return None
            try:
                items = unpack_bundle(raw, self.wire_max_bytes)
            except PayloadError:
                self._count(dropped=1)
                return None
            self.bundles_received += 1
            self._got = [(it.src, it.data) for it in reversed(items)]
        return self._got.pop()

    def _close(self) -> None:
        try:
            self.flush_sends(timeout=5.0)
        except Exception:  # Ray already shut down: nothing to flush
            pass
