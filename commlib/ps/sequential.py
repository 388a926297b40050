"""Sequential gradient coding in the synchronous parameter server: SR-SGC and M-SGC
(Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv 2211.13802; the schedulers live in
:mod:`commlib.coding.sgc`).

Jobs and rounds. Job ``t`` is the full gradient at the parameters the server holds when
round ``t`` starts, ``theta_t``, over ``P`` equal data partitions
(``Task.partition_loss(model, p, P, step=t)``). In round ``r`` the scheduler gives every
worker a list of mini-tasks; a mini-task of job ``j`` asks for ``sum_p c_p g_p(theta_j)``. Job
``r - T`` is due at the end of round ``r``: the server decodes it (float64) and steps with the
mean ``g / P``, so the server runs SGD with a fixed gradient delay ``T`` (the first ``T`` rounds
apply nothing):

    theta_{r+1} = theta_r - lr * (1/P) sum_p grad L_p(theta_{r-T}; batch of job r-T)   (r >= T)

Protocol (PARAMS / PUSH frames of ``commlib/ps/protocol.py``, ``step`` = round number):

* PARAMS(r) to worker w carries an *assignment*: slot 0 is a float64 descriptor (below), then
  the parameters of every model version the tasks need that w may not hold, ``theta_r`` always
  first. A worker keeps the versions it received (the last ``T + 1`` rounds suffice), so in a
  round without stragglers only ``theta_r`` travels; a version is sent again to a worker that
  has not pushed in that version's round (it may have skipped that frame) or whose process is
  new. Workers keep the versions from ``keep_from = r - T`` on: no later task needs older ones.
* PUSH(r) carries one float64 dense payload per task, in task order.
* A REPAIR-flagged PARAMS/PUSH pair carries fallback tasks (below); a repair assignment has a
  ``tag`` the PUSH echoes in its ``aux`` field, so an answer to an earlier repair is never
  filed under a newer one; repair frames carry every version their tasks need.

Descriptor (float64, every value an exact integer except the coefficients)::

    [MAGIC, P, keep_from, tag, k versions, m tasks, v_1 .. v_k,
     then per task: job, q, p_1 .. p_q, c_1 .. c_q]

When a round ends. The server waits at least ``(1 + sgc_mu)`` times the first push's
arrival time (the straggler rule of the authors' simulator), then until the workers still
missing form a straggler row the (B, W, lambda) model admits after the recorded pattern, so
the scheduler's guarantee holds; every live worker having pushed, or ``step_timeout``, also
ends it. Pushes of an earlier round that arrive late are still used for decoding (the
pattern keeps the worker as a straggler of that round).

Fallback. A due job that is not decodable (a pattern outside the model: a crashed worker, a
replayed trace) is counted; the server waits up to ``step_timeout`` for late pushes, then
sends the scheduler's missing tasks to the workers that answered this round (REPAIR frames)
and decodes from their results; when every missing task belongs to a dead worker it sends the
repairs at once. Nothing is approximated: every applied gradient is exact.

The coded path is linear: identity compressor, no error feedback, mean aggregator.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn as nn

from commlib.coding.sgc import SGC_SCHEMES, MiniTask, SequentialScheduler
from commlib.coding.stragglers import admits
from commlib.errors import ConfigError, PayloadError
from commlib.ps.config import coding_family
from commlib.ps.protocol import SERVER_SENDER, Frame, FrameFlag, FrameKind
from commlib.ps.rounds import RoundKind, ServerAPI
from commlib.ps.sgc_wire import (  # noqa: F401  (the wire format, re-exported)
    MAGIC,
    Assignment,
    decode_assignment,
    decode_results,
    encode_assignment,
)
from commlib.wire import Message, Payload


def build_scheduler(coding: str, n: int, B: int, W: int, lam: int, num_jobs: Optional[int],
                    code: str = "auto", seed: int = 0) -> SequentialScheduler:
    """The scheduler of ``PSConfig(coding=...)`` (``commlib.coding.SGC_SCHEMES``: SR-SGC, M-SGC)
    for n workers under the (B, W, lam) bursty straggler model."""
    if coding_family(coding) != "sequential":
        raise ConfigError(f"sequential coding must be one of {SGC_SCHEMES.names()}, got {coding!r}")
    return SGC_SCHEMES.get(coding)(n, B, W, lam, num_jobs=num_jobs, code=code, seed=seed)


# ------------------------------------------------------------------------------ worker half
class SGCWorker:
    """The worker half: keeps recent parameter versions and computes assigned mini-tasks."""

    def __init__(self, numels: Sequence[int]) -> None:
        self.numels = list(numels)
        self.versions: Dict[int, List[torch.Tensor]] = {}
        self.assignment: Optional[Assignment] = None
        self.tasks_done = 0
        self.partition_grads = 0

    def load(self, msg: Message, params: Sequence[nn.Parameter], round: int) -> None:
        """Take an assignment: cache its versions, load ``theta_round`` into the model."""
        a = decode_assignment(msg, self.numels)
        if round not in a.versions:
            raise PayloadError(f"assignment of round {round} lacks the round's parameters")
        lacking = sorted({job for job, _ in a.tasks if job not in a.versions and job not in self.versions})
        if lacking:
            raise PayloadError(f"assignment needs parameters of versions {lacking}, which this worker lacks")
        self.versions.update({v: [t.clone() for t in ts] for v, ts in a.versions.items()})
        for v in [v for v in self.versions if v < a.keep_from]:  # no later task needs them
            del self.versions[v]
        self._set(params, round)
        self.assignment = a

    @staticmethod
    def _copy(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v.to(p.dtype).view(p.shape))

    def _set(self, params: Sequence[nn.Parameter], version: int) -> None:
        self._copy(params, self.versions[version])

    def payloads(self, task: Any, model: nn.Module, params: Sequence[nn.Parameter],
                 flip_labels: bool = False) -> Tuple[List[Payload], float]:
        """One float64 result per assigned task, and the mean partition loss."""
        if self.assignment is None:
            raise ConfigError("no assignment loaded")
        P, tasks = self.assignment.P, self.assignment.tasks
        current = [p.detach().clone() for p in params]
        grads: Dict[Tuple[int, int], torch.Tensor] = {}
        losses: List[float] = []
        for job in sorted({j for j, _ in tasks}):
            self._set(params, job)  # arXiv 2211.13802: job j's gradient is taken at theta_j
            for p in sorted({p for j, c in tasks if j == job for p in c}):
                model.zero_grad(set_to_none=True)
                loss = task.partition_loss(model, p, P, job, flip_labels=flip_labels)
                loss.backward()
                losses.append(float(loss.detach()))
                grads[(job, p)] = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).detach()
                                             .reshape(-1).to(torch.float64) for q in params])
        self._copy(params, current)
        self.partition_grads += len(grads)
        out = []
        for k, (job, coefs) in enumerate(tasks):
            acc = None
            for p, c in sorted(coefs.items()):
                term = grads[(job, p)] * c  # the mini-task: sum_p c_p g_p(theta_job)
                acc = term if acc is None else acc + term
            out.append(Payload.dense(acc, slot=k))
        self.tasks_done += len(tasks)
        return out, (sum(losses) / len(losses) if losses else float("nan"))


# ------------------------------------------------------------------------------ server half
class SGCServer(RoundKind):
    """The server half, a synchronous round kind: the scheduler, recent parameter versions, and
    the round loop."""

    answers_hello = False  # the next round's assignment reaches a worker that said HELLO
    stateful = True

    def __init__(self, sched: SequentialScheduler, n: int, mu: float, B: int, W: int, lam: int) -> None:
        super().__init__(n)
        self.sched = sched
        self.n, self.mu, self.B, self.W, self.lam = int(n), float(mu), int(B), int(W), int(lam)
        self.versions: Dict[int, List[torch.Tensor]] = {}  # round -> theta at its start
        self.confirmed: Dict[int, Set[int]] = {w: set() for w in range(n)}  # rounds each worker pushed
        self.repairs: Dict[int, Tuple[int, List[MiniTask]]] = {}  # worker -> (tag, fallback tasks it was sent)
        self._tag = 0  # repair assignments sent so far (the tag of the next is _tag + 1)
        self.on_time = 0  # jobs decodable at their deadline
        self.fallbacks = 0  # jobs outside the straggler model (waited for late results / repairs)
        self.repair_tasks = 0
        self.repairs_at_once = 0  # fallbacks whose missing tasks all belonged to dead workers
        self.late_results = 0  # pushes of an earlier round used for decoding
        self.unusable = 0  # late pushes whose round plan was already dropped
        self.versions_sent = 0
        self.rounds_cut_early = 0  # rounds that ended without waiting for every live worker

    @property
    def round(self) -> int:
        return self.sched.current_round

    def newest_step(self, ps: ServerAPI) -> int:
        return self.round

    # -- frames --------------------------------------------------------------------------
    def forget(self, w: int) -> None:
        """Worker ``w`` is a new process: it holds no parameter versions."""
        self.confirmed[w] = set()

    def _assignment_body(self, w: int, r: int, tasks: Sequence[MiniTask], tag: int) -> bytes:
        held = set() if tag else self.confirmed[w]  # repairs carry every version they need
        need = [r] + sorted({t.job for t in tasks if t.job != r and t.job not in held})
        self.versions_sent += len(need)
        msg = encode_assignment(self.sched.num_partitions, tasks, {v: self.versions[v] for v in need},
                                sender=SERVER_SENDER, step=r, keep_from=r - self.sched.T, tag=tag)
        return msg.to_bytes()

    def _send(self, ps: ServerAPI, w: int, r: int, tasks: Sequence[MiniTask], tag: int = 0) -> bool:
        rec = ps.members[w]
        if rec.session == 0 or ps.transport.is_dead(w + 1):
            return False
        frame = Frame(FrameKind.PARAMS, w, step=r, seq=rec.last_applied, aux=rec.durable, session=rec.session,
                      incarnation=ps.incarnation, epoch=ps.epoch,
                      flags=FrameFlag.REPAIR if tag else FrameFlag.NONE,
                      body=self._assignment_body(w, r, tasks, tag))
        ps.transport.send(w + 1, frame.to_bytes())
        return True

    def _take(self, ps: ServerAPI, frame: Frame, r: int) -> Optional[str]:
        """Use a PUSH: "round" (answers round r), "late", "repair", or None (not usable, counted)."""
        w = frame.worker
        if ps.check_push(frame):
            return None
        rec = ps.members[w]
        repair = bool(frame.flags & FrameFlag.REPAIR)
        if repair:
            tag, tasks = self.repairs.get(w, (0, []))
            if frame.step != r or not tasks or frame.aux != tag:  # an answer to an earlier repair
                rec.late += 1
                return None
        else:
            try:
                tasks = self.sched.assignment(frame.step)[w]
            except ConfigError:  # a round whose plan was dropped: too late to matter
                rec.late += 1
                self.unusable += 1
                return None
        numel = sum(ps.numels)
        try:
            results = decode_results(frame.message([numel] * len(tasks), sender=w), len(tasks), numel)
        except PayloadError:
            ps.members.reject(w)
            return None
        if repair:
            for t, res in zip(tasks, results):
                self.sched.submit(t, res)
            del self.repairs[w]
        else:
            self.sched.receive(frame.step, w, results)
            self.confirmed[w].add(frame.step)
        ps.members.applied(frame)
        if repair:
            return "repair"
        if frame.step != r:
            self.late_results += 1
            return "late"
        return "round"

    # -- one round -----------------------------------------------------------------------
    def run_round(self, ps: ServerAPI) -> None:
        cfg = ps.config
        r = self.round
        self.versions[r] = [p.detach().reshape(-1).clone() for p in ps.params]
        for old in [v for v in self.versions if v < r - self.sched.T]:
            del self.versions[old]
        for held in self.confirmed.values():  # workers drop versions below r - T too
            held.difference_update([v for v in held if v < r - self.sched.T])
        plan = self.sched.assignment(r)
        busy = [w for w in range(self.n) if plan[w]]
        t0 = time.monotonic()
        for w in busy:
            self._send(ps, w, r, plan[w])
        ps.members.note_dead()
        got: Set[int] = set()
        first: Optional[float] = None
        deadline = t0 + cfg.step_timeout
        while True:
            alive = [w for w in busy if w not in got and not ps.transport.is_dead(w + 1)]
            if not alive:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            wait = deadline - now
            if first is not None:  # at least (1 + mu) x the first arrival, then an admissible row
                mu_point = t0 + (1.0 + self.mu) * (first - t0)
                if now >= mu_point:
                    row = np.zeros(self.n, dtype=bool)
                    row[[w for w in busy if w not in got]] = True
                    if admits(self.sched.recent_pattern(self.W), row, self.B, self.W, self.lam):
                        self.rounds_cut_early += 1
                        break
                else:
                    wait = mu_point - now
            frame = ps.receive(min(0.5, max(wait, 0.001)))
            if frame is not None and self._take(ps, frame, r) == "round":
                got.add(frame.worker)
                if first is None:
                    first = time.monotonic()
        for w in busy:
            if w not in got:
                ps.members[w].timeouts += 1
        self.sched.end_round(r)
        job = self.sched.due(r)
        if job is None:
            ps.note_progress()  # a round with no job due (the first T rounds)
            return
        if self.sched.decodable(job):
            self.on_time += 1
        elif not self._fall_back(ps, job, r, sorted(got)):
            ps.stopped = "no live workers"
            return
        g = self.sched.decode(job)  # float64 sum_p g_p(theta_job)
        dirs = list(torch.split(g / self.sched.num_partitions, ps.numels))
        ps.apply(dirs, sorted(got), staleness=self.sched.T)  # job r - T, computed T rounds ago

    def _fall_back(self, ps: ServerAPI, job: int, r: int, answered: List[int]) -> bool:
        """Make ``job`` decodable outside the straggler model: late pushes, then repair tasks."""
        cfg = ps.config
        self.fallbacks += 1
        # late results can only come from live workers: when every missing task belongs to a
        # dead one (or one with no process), send the repairs at once
        owners = {t.worker for t in self.sched.missing(job)}
        if all(ps.transport.is_dead(w + 1) or ps.members[w].session == 0 for w in owners):
            self.repairs_at_once += 1
            deadline = time.monotonic()
        else:
            deadline = time.monotonic() + cfg.step_timeout
        self.repairs = {}
        try:
            while not self.sched.decodable(job):
                if ps.idle_for() > cfg.idle_timeout:
                    return False
                if time.monotonic() >= deadline:
                    if not self._send_repairs(ps, job, r, answered):
                        return False
                    deadline = time.monotonic() + cfg.step_timeout
                    answered = [w for w in answered if w not in self.repairs] + list(self.repairs)
                frame = ps.receive(min(0.5, max(0.005, deadline - time.monotonic())))
                if frame is not None:
                    self._take(ps, frame, r)
        finally:
            self.repairs = {}
        return True

    def _send_repairs(self, ps: ServerAPI, job: int, r: int, answered: List[int]) -> bool:
        """Spread ``job``'s missing tasks over live workers (those that answered round r first),
        each batch under a new tag; False when no worker is left to ask."""
        helpers = [w for w in answered if not ps.transport.is_dead(w + 1) and ps.members[w].session] or \
                  [w for w in range(self.n) if not ps.transport.is_dead(w + 1) and ps.members[w].session]
        if not helpers:
            return False
        batches: Dict[int, List[MiniTask]] = {}
        for i, task in enumerate(self.sched.missing(job)):
            batches.setdefault(helpers[i % len(helpers)], []).append(task)
        self.repairs = {}
        for w, tasks in batches.items():
            self._tag += 1
            if self._send(ps, w, r, tasks, tag=self._tag):
                self.repairs[w] = (self._tag, tasks)
                self.repair_tasks += len(tasks)
        return bool(self.repairs)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Checkpoint-safe (``torch.load(weights_only=True)``): numpy arrays become tensors."""
        return {"sched": _tensors(self.sched.state_dict()), "versions": {v: [t.clone() for t in ts]
                                                                 for v, ts in self.versions.items()},
                "counters": self.counters(), "tag": self._tag}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sched.load_state_dict(state["sched"])
        self.versions = {int(v): [t.clone() for t in ts] for v, ts in state["versions"].items()}
        for k, v in state["counters"].items():
            if hasattr(self, k):
                setattr(self, k, v)
        self._tag = int(state["tag"])
        self.confirmed = {w: set() for w in range(self.n)}  # a new incarnation: resend what is needed

    def counters(self) -> Dict[str, int]:
        return {k: getattr(self, k) for k in ("on_time", "fallbacks", "repair_tasks", "late_results",
                                              "unusable", "versions_sent", "rounds_cut_early",
                                              "repairs_at_once")}

    def summary(self) -> Dict[str, Any]:
        s = self.sched
        return {"code": type(s).__name__, "load": s.load, "delay_T": s.T, "partitions": s.num_partitions,
                "rounds": s.current_round, "decoded": self.on_time + self.fallbacks,
                "stragglers_recorded": int(s.pattern.sum()), **self.counters()}


def _tensors(obj: Any) -> Any:
    """``obj`` with every numpy array replaced by a tensor (for weights-only checkpoints)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj

