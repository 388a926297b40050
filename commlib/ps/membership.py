"""Who the workers are and what the server applied from each: the exactly-once bookkeeping of
a parameter server (sessions, ``last_applied``/``durable``), liveness (drops and rejoins) and
the per-worker counters that ``ParameterServer.result()`` reports; and the end of a run
(SHUTDOWN to every worker, then wait for their BYE).

Exactly once: the server records, per worker process (``session``), the sequence number of the
last push it applied; a push with a number not above it is a duplicate and ignored. PARAMS
frames carry that number (``ack``) and the one in the last checkpoint (``durable``); workers roll
their scheme state back to the push the server actually kept (``commlib/ps/worker.py``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from commlib.comm.base import Transport
from commlib.errors import PayloadError
from commlib.ps.protocol import Frame, FrameFlag, FrameKind

#: WorkerRecord fields a checkpoint keeps
BOOKKEEPING = ("session", "last_applied", "durable")
#: per-worker counters summed in ``ParameterServer.result()["totals"]``
TOTALS = ("applied", "late", "rejected", "duplicates", "stale", "outdated", "timeouts", "drops", "rejoins")


@dataclass
class WorkerRecord:
    """What the server knows about one worker, and what happened to it."""

    session: int = 0  # id of the worker's current process (0: never heard of)
    present: bool = True  # heard from in this incarnation (False: restored from a checkpoint only)
    last_applied: int = -1  # seq of the last push applied (this session)
    durable: int = -1  # last_applied as of the last checkpoint
    live: bool = True
    misses: int = 0  # consecutive rounds missed (sync)
    last_seen: float = 0.0
    applied: int = 0
    late: int = 0
    rejected: int = 0
    duplicates: int = 0
    stale: int = 0  # async: over max_staleness
    outdated: int = 0  # computed for another session, incarnation or state epoch
    timeouts: int = 0
    drops: int = 0
    rejoins: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    loss: float = float("nan")

    def summary(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean_staleness"] = self.staleness_sum / self.applied if self.applied else 0.0
        return d


@dataclass
class NewProcess:
    """What a HELLO from a new process of a worker means for the scheme state."""

    had_history: bool  # the previous process had pushes applied
    claims_state: bool  # the new process says it holds scheme state
    replaced: bool  # a previous process existed


class Membership:
    """The records of ``n`` workers (rank ``w + 1`` of ``transport``) and the event log.

    ``clock()`` gives ``(seconds since the start, server step)`` for each event."""

    def __init__(self, n: int, transport: Transport, clock: Callable[[], Tuple[float, int]]) -> None:
        self.n = int(n)
        self.transport = transport
        self.clock = clock
        self.records = [WorkerRecord() for _ in range(self.n)]
        self.events: List[Dict[str, Any]] = []

    def __getitem__(self, w: int) -> WorkerRecord:
        return self.records[w]

    def event(self, kind: str, worker: int) -> None:
        """Record a fault-handling event (drops, rejoins, rejections, resyncs) for reports."""
        elapsed, step = self.clock()
        self.events.append({"time": round(elapsed, 4), "step": step, "worker": worker, "kind": kind})

    def reachable(self, w: int) -> bool:
        """A process of ``w`` spoke to this incarnation and its link is not reported broken."""
        rec = self.records[w]
        return bool(rec.session) and rec.present and not self.transport.is_dead(w + 1)

    def present_count(self) -> int:
        """Workers whose process said HELLO to this incarnation."""
        return sum(1 for r in self.records if r.session and r.present)

    def reject(self, w: int) -> None:
        """A bad frame or payload from ``w`` (counted, used as missing)."""
        self.records[w].rejected += 1
        self.event("rejected", w)

    def heard(self, w: int) -> bool:
        """Note a valid frame from ``w``; True when this brings a dropped worker back (a rejoin)."""
        rec = self.records[w]
        rec.last_seen = time.monotonic()
        rec.misses = 0
        rec.present = True
        if not rec.live:
            rec.live = True
            rec.rejoins += 1
            self.event("rejoin", w)
            return True
        return False

    def bye(self, w: int) -> None:
        self.records[w].live = False

    def _drop(self, w: int) -> None:
        rec = self.records[w]
        rec.live = False
        rec.drops += 1
        self.event("drop", w)

    def note_dead(self) -> None:
        """Drop the live workers whose link the transport reports broken (a dead process)."""
        for w, rec in enumerate(self.records):
            if rec.live and rec.session and self.transport.is_dead(w + 1):
                self._drop(w)

    def missed(self, w: int, max_misses: int) -> None:
        """``w`` did not push in a round; dropped after ``max_misses`` rounds in a row."""
        rec = self.records[w]
        rec.timeouts += 1
        rec.misses += 1
        if rec.misses >= max_misses and rec.live:
            self._drop(w)

    def drop_silent(self, since: float, timeout: float) -> None:
        """Drop (as timed out) the live workers not heard from for ``timeout`` seconds."""
        now = time.monotonic()
        for w, rec in enumerate(self.records):
            if rec.live and rec.session and now - max(rec.last_seen, since) > timeout:
                rec.timeouts += 1
                self._drop(w)

    def alive_among(self, workers: Sequence[int]) -> int:
        """How many of ``workers`` the transport does not report dead: the dead set is small, so
        this costs O(dead) rather than O(len(workers)) (it runs for every received frame)."""
        dead = [p - 1 for p in tuple(self.transport.stats.dead_peers)]
        if not dead:
            return len(workers)
        listed = workers if isinstance(workers, (set, frozenset, dict)) else set(workers)
        return len(workers) - sum(1 for w in dead if w in listed)

    def new_process(self, frame: Frame, revived: bool) -> Optional[NewProcess]:
        """A HELLO: None when it comes from the worker's current process, else register the new
        process (a rejoin when it replaces one that was not dropped)."""
        w, rec = frame.worker, self.records[frame.worker]
        if frame.session == rec.session:
            return None
        self.transport.mark_alive(w + 1)  # we just heard from it (a restarted peer)
        out = NewProcess(had_history=rec.session != 0 and rec.last_applied >= 0,
                         claims_state=not (frame.flags & FrameFlag.FRESH) and frame.seq >= 0,
                         replaced=rec.session != 0)
        if rec.session != 0 and not revived:
            rec.rejoins += 1  # a new process replaced one that was not dropped yet
            self.event("rejoin", w)
        rec.session = frame.session
        rec.last_applied = rec.durable = -1 if frame.flags & FrameFlag.FRESH else frame.seq
        return out

    def check_push(self, frame: Frame, incarnation: int, epoch: int, newest_step: int) -> str:
        """Common checks of a PUSH frame: "" when it may be used, else why not (counted)."""
        rec = self.records[frame.worker]
        if frame.session != rec.session:  # from an earlier process of this worker
            rec.outdated += 1
            return "session"
        if frame.incarnation != incarnation or frame.epoch != epoch:
            rec.outdated += 1
            return "outdated"
        if frame.seq <= rec.last_applied:
            rec.duplicates += 1
            return "duplicate"
        if frame.step > newest_step:
            rec.rejected += 1  # computed on parameters that were never sent
            return "future"
        return ""

    def applied(self, frame: Frame, staleness: int = 0) -> None:
        """The push in ``frame`` went into an update ``staleness`` versions after it was computed."""
        rec = self.records[frame.worker]
        rec.last_applied = frame.seq
        rec.applied += 1
        rec.loss = frame.loss
        rec.staleness_sum += staleness
        rec.staleness_max = max(rec.staleness_max, staleness)

    def mean_loss(self, workers: Sequence[int]) -> float:
        losses = [self.records[w].loss for w in workers if not math.isnan(self.records[w].loss)]
        return sum(losses) / len(losses) if losses else float("nan")

    # -- the end ---------------------------------------------------------------------------
    def shutdown(self, timeout: float) -> None:
        """Tell every worker to stop; wait (bounded) for the live ones to say BYE. A worker that
        says HELLO meanwhile (a late restart) is told to stop too."""
        for w, rec in enumerate(self.records):
            if rec.session and not self.transport.is_dead(w + 1):
                self.transport.send(w + 1, Frame(FrameKind.SHUTDOWN, w, session=rec.session).to_bytes())
        waiting = {w for w, rec in enumerate(self.records)
                   if rec.live and rec.session and not self.transport.is_dead(w + 1)}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            got = self.transport.recv(timeout=max(0.0, deadline - time.monotonic()))
            if got is None:
                break
            src, data = got
            try:
                frame = Frame.from_bytes(data, max_body=self.transport.max_message_bytes)
            except PayloadError:
                continue
            if frame.worker != src - 1:
                continue
            if frame.kind == FrameKind.BYE:
                waiting.discard(frame.worker)
            elif frame.kind == FrameKind.HELLO:
                self.transport.send(src, Frame(FrameKind.SHUTDOWN, frame.worker, session=frame.session).to_bytes())
                waiting.add(frame.worker)

    # -- checkpoints ------------------------------------------------------------------------
    def make_durable(self) -> None:
        """What the server applied so far is now in a checkpoint (or needs none)."""
        for rec in self.records:
            rec.durable = rec.last_applied

    def state_dict(self) -> List[Dict[str, int]]:
        return [{k: getattr(r, k) for k in BOOKKEEPING} for r in self.records]

    def load_state_dict(self, saved: Sequence[Mapping[str, Any]]) -> None:
        """Restore the bookkeeping of a checkpoint: records are not present until their worker
        says HELLO to the new incarnation."""
        for rec, s in zip(self.records, saved):
            rec.session = int(s["session"])
            rec.last_applied = rec.durable = int(s["last_applied"])
            rec.present = False

    def summaries(self, t0: float) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
        """Per-worker summaries (``last_seen`` in seconds since ``t0``) and their totals."""
        recs = [r.summary() for r in self.records]
        for r in recs:  # seconds since the start of training (None: never heard of)
            r["last_seen"] = round(r["last_seen"] - t0, 3) if r["last_seen"] else None
        return recs, {k: sum(r[k] for r in recs) for k in TOTALS}
