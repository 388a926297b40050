"""Virtual workers: many logical parameter-server workers stepped by one thread of one process.

A process (a Ray actor, or a thread of the in-process backend) hosts a :class:`WorkerGroup`:
one :class:`VirtualPSWorker` per logical worker, each with its own rank on the transport (the
server sees the same frames, the same sender ids and the same checks as from a process of
its own), its own model copy, scheme state, session, fault hooks and RNG. The group steps the
workers round-robin with the same public steps ``PSWorker.run`` uses (``next_frame``,
``accept``, ``ready``, ``compute``), so a logical worker behaves as a real one does; only
waiting differs:

- a fault hook's wait (a hang, a straggler's delay, network delay, simulated compute) parks
  that logical worker alone (``VirtualPSWorker.wait`` records the time owed; the group does
  not step it, and holds what it sends, until that time has passed), so its process-mates go
  on;
- a preemptible stall ends when the server's next frame for that worker arrives, and the
  stalled round is given up (as ``PSWorker.stall`` does);
- a crash (``WorkerCrashed``) throws away that logical worker's object, and with it all of
  its state; its endpoint is disconnected (deliveries to it are refused, so the server sees
  it gone); a restart builds a fresh worker (new session, no scheme state) on a reconnected
  endpoint after ``restart_after`` seconds.

Why one thread and not a thread per logical worker: with hundreds of workers per process,
threads would contend for the GIL and the interpreter's switch interval; here each logical
worker's gradient runs to completion, one after another, and an idle worker costs nothing.

The link to the server (the transport side) is a :class:`GroupLink`: the in-process hub
(``commlib.ps.group_local``) or bundled Ray deliveries (``commlib.ps.group_ray``).
"""
from __future__ import annotations

import heapq
import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from commlib.comm.base import Received, Transport
from commlib.ps.config import PSConfig
from commlib.ps.protocol import Frame
from commlib.ps.worker import PSWorker, WorkerCrashed


class VirtualPSWorker(PSWorker):
    """A PSWorker whose fault-hook waits park it instead of blocking the thread: ``wait`` adds
    to :attr:`owed` (and never reports a preemption; the group ends a preemptible park)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.owed = 0.0
        self.preemptible = False
        super().__init__(*args, **kw)

    def wait(self, seconds: float, preemptible: bool = False) -> bool:
        if seconds > 0:
            self.owed += float(seconds)
            self.preemptible = self.preemptible or bool(preemptible)
        return False

    def clear_owed(self) -> None:
        self.owed, self.preemptible = 0.0, False


class GroupLink(ABC):
    """How a group's logical workers reach the server (one implementation per runtime)."""

    @abstractmethod
    def endpoint(self, w: int) -> Transport:
        """The transport endpoint of logical worker ``w`` (rank ``w + 1``)."""

    @abstractmethod
    def disconnect(self, w: int) -> None:
        """``w`` crashed: deliveries to it are refused and what was queued for it is dropped."""

    @abstractmethod
    def reconnect(self, w: int) -> None:
        """``w`` restarts: reachable again, with nothing queued."""

    @abstractmethod
    def pending(self, w: int) -> bool:
        """True when frames wait for ``w``."""

    @abstractmethod
    def wait(self, timeout: float) -> Set[int]:
        """Block until a frame arrives for some worker of the group (or ``timeout``); return
        the workers that received frames since the last call."""

    def flush(self) -> None:
        """Send what the logical workers queued (links that batch their sends)."""


class _HeldEndpoint(Transport):
    """A logical worker's endpoint: what it sends while it owes wait time (network delay,
    simulated compute) is held by the group and leaves when that time has passed."""

    def __init__(self, base: Transport, group: "WorkerGroup") -> None:
        super().__init__(base.rank, base.world_size, base.max_message_bytes)
        self.base = base
        self.group = group
        self.worker: Optional[VirtualPSWorker] = None

    def _send(self, dst: int, data: bytes) -> bool:
        owed = self.worker.owed if self.worker is not None else 0.0
        if owed > 0:
            self.group.hold(time.monotonic() + owed, self.base, dst, data)
            return True
        return self.base.send(dst, data)

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        return self.base.recv(timeout)

    def _close(self) -> None:
        self.base.close()


#: builds logical worker ``w`` on ``transport``; ``restarted``: after a crash
WorkerFactory = Callable[[int, Transport, bool], VirtualPSWorker]


@dataclass
class _Slot:
    w: int
    worker: Optional[VirtualPSWorker] = None
    busy_until: float = 0.0
    quiet_since: float = 0.0
    last_heard: float = 0.0
    pending: Optional[Tuple[Frame, int]] = None
    preemptible: bool = False
    restart_at: Optional[float] = None
    done: bool = False
    next_at: Optional[float] = None


class WorkerGroup:
    """Step the logical workers ``workers`` (ids) of one process until every one has finished.

    Args:
        link: the group's :class:`GroupLink`.
        make_worker: builds a :class:`VirtualPSWorker` (see :data:`WorkerFactory`).
        workers: the logical worker ids this group hosts.
        config: the run's :class:`PSConfig` (worker timeouts).
        restart_after: worker id -> seconds after its (first) crash until a fresh worker rejoins.
        flush_every: sends are flushed to the server after this many logical workers acted.
    """

    def __init__(self, link: GroupLink, make_worker: WorkerFactory, workers: Sequence[int], config: PSConfig, *,
                 restart_after: Optional[Dict[int, float]] = None, flush_every: int = 32) -> None:
        self.link = link
        self.make_worker = make_worker
        self.config = config
        self.slots: Dict[int, _Slot] = {int(w): _Slot(int(w)) for w in workers}
        self.restart_after = {int(k): float(v) for k, v in (restart_after or {}).items() if int(k) in self.slots}
        self.flush_every = max(1, int(flush_every))
        self.reports: Dict[int, List[Dict[str, Any]]] = {w: [] for w in self.slots}
        self.crashes: Dict[int, int] = {w: 0 for w in self.slots}
        self._timers: List[Tuple[float, int]] = []
        self._held: List[Tuple[float, int, Transport, int, bytes]] = []
        self._order = itertools.count()
        self._stopping_at: Optional[float] = None
        self.passes = 0

    # -- public ----------------------------------------------------------------------------
    def stop(self, grace_s: float) -> None:
        """The server has finished: no more restarts; workers still running after ``grace_s``
        seconds are reported as they are."""
        self._stopping_at = time.monotonic() + max(0.0, float(grace_s))

    def hold(self, at: float, base: Transport, dst: int, data: bytes) -> None:
        """Send ``data`` from ``base`` to ``dst`` at time ``at`` (see :class:`_HeldEndpoint`)."""
        heapq.heappush(self._held, (at, next(self._order), base, dst, data))

    def run(self) -> Dict[int, List[Dict[str, Any]]]:
        """Start every logical worker and step them until all have finished; returns each
        worker's reports (one per incarnation: a crashed one, then its restart's)."""
        now = time.monotonic()
        for slot in self.slots.values():
            self._start(slot, now, restarted=False)
        self.link.flush()
        while not all(s.done for s in self.slots.values()):
            now = time.monotonic()
            if self._stopping_at is not None:
                self._wind_down(now)
            wake = min([t for t, _ in self._timers[:1]] + [h[0] for h in self._held[:1]] + [now + 1.0])
            dirty = self.link.wait(max(0.0, wake - now))
            now = time.monotonic()
            self._release_held(now)
            due = set(dirty)
            while self._timers and self._timers[0][0] <= now:
                t, w = heapq.heappop(self._timers)
                if self.slots[w].next_at == t:
                    self.slots[w].next_at = None
                    due.add(w)
            for i, w in enumerate(sorted(due)):
                self._advance(self.slots[w])
                if (i + 1) % self.flush_every == 0:
                    self.link.flush()
            self.link.flush()
            self.passes += 1
        self._release_held(float("inf"))
        self.link.flush()
        return self.reports

    # -- one logical worker ------------------------------------------------------------------
    def _start(self, slot: _Slot, now: float, restarted: bool) -> None:
        endpoint = _HeldEndpoint(self.link.endpoint(slot.w), self)
        worker = self.make_worker(slot.w, endpoint, restarted)
        endpoint.worker = worker
        slot.worker, slot.pending, slot.restart_at = worker, None, None
        slot.busy_until, slot.quiet_since, slot.last_heard = 0.0, now, now
        worker.start()
        self._schedule(slot, now + self.config.worker_timeout)

    def _schedule(self, slot: _Slot, at: float) -> None:
        if slot.next_at is None or at < slot.next_at:
            slot.next_at = at
            heapq.heappush(self._timers, (at, slot.w))

    def _advance(self, slot: _Slot) -> None:
        """Do what is due for ``slot`` now (the body of ``PSWorker.run``, without blocking)."""
        if slot.done:
            return
        now = time.monotonic()
        if slot.worker is None:  # crashed, a restart is due
            if slot.restart_at is not None and now >= slot.restart_at:
                self.link.reconnect(slot.w)
                self._start(slot, now, restarted=True)
            elif slot.restart_at is not None:
                self._schedule(slot, slot.restart_at)
            return
        worker = slot.worker
        if slot.pending is not None and slot.preemptible and self.link.pending(slot.w):
            slot.pending, slot.busy_until = None, now  # the next round's frame ends the stall
            worker.stats.skipped_rounds += 1
        if now < slot.busy_until:
            self._schedule(slot, slot.busy_until)
            return
        if slot.pending is not None:
            frame, step = slot.pending
            slot.pending = None
            if not self._act(slot, lambda: worker.compute(frame, step)):
                return
            if slot.busy_until > time.monotonic():
                self._schedule(slot, slot.busy_until)
                return
        frame = worker.next_frame(0.0)
        now = time.monotonic()
        if frame is None:
            if now - slot.quiet_since >= self.config.worker_timeout:
                if now - slot.last_heard > self.config.worker_give_up:
                    worker.stats.status = "server lost"
                    self._finish(slot)
                    return
                worker.say_hello()
                slot.quiet_since = now
            self._schedule(slot, slot.quiet_since + self.config.worker_timeout)
            return
        slot.last_heard = slot.quiet_since = now
        step = worker.accept(frame)
        if worker.finished:
            self._finish(slot)
            return
        if step is not None:
            worker.clear_owed()
            ok = self._act(slot, lambda: worker.ready(step), park=False)
            if ok is None:  # crashed
                return
            if ok:
                if worker.owed > 0:  # a hang or a straggler: park, compute when it has passed
                    slot.pending, slot.preemptible = (frame, step), worker.preemptible
                    slot.busy_until = time.monotonic() + worker.owed
                    self._schedule(slot, slot.busy_until)
                    return
                if not self._act(slot, lambda: worker.compute(frame, step)):
                    return
        self._schedule(slot, max(slot.quiet_since, slot.busy_until) + self.config.worker_timeout)
        if slot.busy_until > time.monotonic():
            self._schedule(slot, slot.busy_until)

    def _act(self, slot: _Slot, fn: Callable[[], Any], park: bool = True) -> Any:
        """Run one step of a logical worker; a crash ends it (returns None). With ``park``, the
        time it owes afterwards (network delay, compute time) keeps it busy."""
        worker = slot.worker
        if park:
            worker.clear_owed()
        try:
            out = fn()
        except WorkerCrashed:
            self._crash(slot)
            return None
        if park:
            now = time.monotonic()
            if worker.owed > 0:
                slot.busy_until = now + worker.owed
            slot.quiet_since = max(now, slot.busy_until)
            worker.clear_owed()
            return True
        return out

    def _crash(self, slot: _Slot) -> None:
        slot.worker.transport.close()  # what it still held back (network delay) dies with it
        rep = slot.worker.report()
        rep["status"] = "crashed"
        self.reports[slot.w].append(rep)
        self.crashes[slot.w] += 1
        self.link.disconnect(slot.w)
        slot.worker, slot.pending = None, None
        delay = self.restart_after.pop(slot.w, None)
        if delay is not None and self._stopping_at is None:
            slot.restart_at = time.monotonic() + delay
            self._schedule(slot, slot.restart_at)
        else:
            slot.done = True

    def _finish(self, slot: _Slot) -> None:
        self.reports[slot.w].append(slot.worker.report())
        slot.done = True

    def _wind_down(self, now: float) -> None:
        for slot in self.slots.values():
            if slot.done:
                continue
            if slot.worker is None:  # a restart that will not happen any more
                slot.done = True
            elif now >= self._stopping_at:
                self._finish(slot)

    def _release_held(self, now: float) -> None:
        while self._held and self._held[0][0] <= now:
            _, _, base, dst, data = heapq.heappop(self._held)
            if not base.closed:
                base.send(dst, data)
