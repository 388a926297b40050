"""A parameter-server worker: pull parameters, compute a gradient on its data, push Payloads.

The worker half of the scheme (``SchemeWorker``: feedback around a compressor) is the same
object the DDP runtime uses. Exactly-once bookkeeping (see ``commlib/ps/server.py``):

- every push carries a sequence number ``seq``; every PARAMS frame acknowledges the last push
  the server applied (``ack``) and the last one that is in its checkpoint (``durable``);
- the worker keeps a snapshot of its scheme state after each push that is not yet durable;
  when PARAMS shows that pushes after ``ack`` were not applied (dropped as late, too stale,
  rejected, or lost with a crashed server), the worker restores the snapshot taken after
  ``ack`` and recomputes, so its error-feedback state always matches what the server applied;
- when the server starts a new state epoch (a worker rejoined without its state while the
  scheme keeps per-worker increments, EF21/EControl), every worker clears its scheme state and
  starts over (EF21's first, uncompressed step); the server does the same.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from commlib.aggregate import MoNNA
from commlib.comm.base import Transport
from commlib.errors import ConfigError, PayloadError
from commlib.ps.config import PSConfig, coding_family
from commlib.ps.protocol import SERVER_RANK, SERVER_SENDER, Frame, FrameFlag, FrameKind
from commlib.ps.task import Task, model_keys
from commlib.ps.worker_hooks import (  # noqa: F401  (re-exported: the names callers import from here)
    RoundSkipped,
    WorkerCrashed,
    WorkerHooks,
    WorkerStats,
    new_session,
)
from commlib.scheme import Scheme
from commlib.wire import DEFAULT_MAX_NUMEL, Kind, Message, Payload


class PSWorker:
    """One worker of a parameter-server run. Rank ``worker_id + 1`` on the transport."""

    def __init__(self, transport: Transport, scheme: Scheme, task: Task, config: Optional[PSConfig] = None, *,
                 hooks: Optional[WorkerHooks] = None, session: Optional[int] = None,
                 model: Optional[nn.Module] = None, keys: Optional[range] = None) -> None:
        if transport.rank == SERVER_RANK:
            raise ConfigError("rank 0 is the server; workers are ranks 1..n")
        self.transport = transport
        self.scheme = scheme
        self.task = task
        self.config = config or PSConfig()
        self.hooks = hooks or WorkerHooks()
        self.worker_id = transport.rank - 1
        self.n_workers = transport.world_size - 1
        self.model = model if model is not None else task.build_model()
        self.keys, self.params = model_keys(self.model)
        if keys is not None:  # one shard's keys of a model shared with the other shards' workers
            self.keys, self.params = self.keys[keys.start:keys.stop], self.params[keys.start:keys.stop]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        # an SGC assignment carries a few model versions: bound what its size claims may expand to
        self._assignment_cap = max(DEFAULT_MAX_NUMEL, 64 * sum(self.numels))
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.sw = scheme.worker(self.worker_id, self.n_workers)
        self.momentum = None
        if isinstance(scheme.aggregator, MoNNA):  # MoNNA server variant: Polyak momentum on the worker
            self.momentum = MoNNA.worker_state(self.config.monna_beta)
        self.session = int(session) if session else new_session()
        self.seq = -1
        self.epoch = 0
        self._task_state = hasattr(task, "worker_state")  # e.g. privacy stages (commlib/ps/private.py)
        if self._task_state:
            task.start_worker(self.worker_id)
        self.snapshots: Dict[int, Dict[str, Any]] = {-1: self._snapshot()}
        self.stats = WorkerStats()
        self._stash: List[tuple] = []  # frames received during a stall (see ``stall``)
        self.last_loss = float("nan")
        self.last_push: Optional[tuple] = None  # (incarnation, version) of the latest push
        self.coded = None  # gradient coding (commlib/ps/coded.py): this worker's coded half
        self.sgc = None  # sequential gradient coding (commlib/ps/sequential.py): assigned mini-tasks
        if self.config.coding is not None:
            from commlib.ps.coded import CodedWorker, build_code, check_coded_scheme
            from commlib.ps.sequential import SGCWorker

            check_coded_scheme(scheme, task)
            if coding_family(self.config.coding) == "sequential":
                self.sgc = SGCWorker(self.numels)
            else:
                code = build_code(self.config.coding, self.n_workers, self.config.straggler_tolerance,
                                  self.config.coding_seed)
                self.coded = CodedWorker(code, self.worker_id)

    # -- state snapshots ---------------------------------------------------------------------
    def _snapshot(self) -> Dict[str, Any]:
        return {"scheme": self.sw.state_dict(),
                "momentum": self.momentum.state_dict() if self.momentum is not None else None,
                "task": self.task.worker_state(self.worker_id) if self._task_state else None}

    def _restore(self, snap: Dict[str, Any]) -> None:
        self.sw.load_state_dict(snap["scheme"])
        if self.momentum is not None and snap["momentum"] is not None:
            self.momentum.load_state_dict(snap["momentum"])
        if self._task_state:
            self.task.load_worker_state(self.worker_id, snap["task"])

    def _clear_state(self, key: tuple = (0, 0)) -> None:
        """Start the scheme state over; ``key`` = (incarnation, epoch) of the new state epoch."""
        self.sw.state.clear()
        if self.momentum is not None:
            self.momentum.momenta.clear()
        if self._task_state:
            self.task.start_worker(self.worker_id, key)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Work until the server says SHUTDOWN (or stays silent for ``worker_give_up`` seconds).

        The loop is :meth:`start`, then :meth:`next_frame` / :meth:`accept` / :meth:`ready` /
        :meth:`compute` per frame; ``commlib.ps.worker_group`` drives the same steps for many
        logical workers in one thread."""
        cfg = self.config
        self.start()
        last_heard = time.monotonic()
        while True:
            frame = self.next_frame(cfg.worker_timeout)
            if frame is None:
                if time.monotonic() - last_heard > cfg.worker_give_up:
                    self.stats.status = "server lost"
                    break
                self.say_hello()
                continue
            last_heard = time.monotonic()
            step = self.accept(frame)
            if self.finished:
                break
            if step is not None and self.ready(step):
                self.compute(frame, step)
        return self.report()

    @property
    def finished(self) -> bool:
        """True once the worker stopped (SHUTDOWN answered, or the server was lost)."""
        return self.stats.status != "running"

    def start(self) -> None:
        """Say HELLO as a fresh process (the first thing a worker sends)."""
        self._hello(fresh=True)

    def say_hello(self) -> None:
        """Say HELLO again (the server was silent for ``worker_timeout``)."""
        self._hello(fresh=False)

    def accept(self, frame: Frame) -> Optional[int]:
        """Handle a frame from :meth:`next_frame`: SHUTDOWN is answered with BYE (the worker is
        then :attr:`finished`); PARAMS bring the scheme state in line and load the parameters.
        Returns the step to compute for, or None (nothing to compute)."""
        if frame.kind == FrameKind.SHUTDOWN:
            self._send(Frame(FrameKind.BYE, self.worker_id, session=self.session))
            self.stats.status = "shutdown"
            return None
        if not self._reconcile(frame) or not self._load_params(frame):
            return None
        return frame.step if self.config.mode == "sync" else self.seq + 1

    def ready(self, step: int) -> bool:
        """The fault hooks before computing (they may wait, skip the round, or raise
        ``WorkerCrashed``); False when nothing is to be computed and sent this step."""
        try:
            self.hooks.before_compute(self, step)
        except RoundSkipped:  # e.g. a stall cut short by the next round's parameters
            self.stats.skipped_rounds += 1
            return False
        return not self.hooks.silent(self, step)

    def compute(self, frame: Frame, step: int) -> None:
        """Compute the gradient at the loaded parameters and push the scheme's payloads."""
        self._push(frame, step)

    def wait(self, seconds: float, preemptible: bool = False) -> bool:
        """Let ``seconds`` pass for a fault hook (a hang, a straggler, network delay). With
        ``preemptible``, the wait ends early when the server sends a frame: returns True then
        (see :meth:`stall`). A worker driven by ``commlib.ps.worker_group`` overrides this so
        that waiting parks only this logical worker."""
        if seconds <= 0:
            return False
        if preemptible:
            return self.stall(seconds)
        time.sleep(seconds)
        return False

    def report(self) -> Dict[str, Any]:
        out = asdict(self.stats)
        out.update(worker=self.worker_id, session=self.session, seq=self.seq, epoch=self.epoch,
                   comm=self.sw.stats.as_dict(), transport=self.transport.stats.as_dict())
        if hasattr(self.task, "privacy_report"):
            out["privacy"] = self.task.privacy_report(self.worker_id)
        return out

    def _send(self, frame: Frame) -> bool:
        return self.transport.send(SERVER_RANK, frame.to_bytes())

    def _hello(self, fresh: bool) -> None:
        self.stats.hellos += 1
        self._send(Frame(FrameKind.HELLO, self.worker_id, seq=self.seq, session=self.session, epoch=self.epoch,
                         flags=FrameFlag.FRESH if fresh else FrameFlag.NONE))

    def stall(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (a simulated stall); True if a frame from the server arrived
        meanwhile (it is kept for the next :meth:`next_frame`)."""
        if self._stash:
            return True
        got = self.transport.recv(timeout=max(0.0, float(seconds)))
        if got is None:
            return False
        self._stash.append(got)
        return True

    def next_frame(self, timeout: float) -> Optional[Frame]:
        """Wait for a frame from the server, then drain the inbox: the newest PARAMS (or a SHUTDOWN)."""
        newest: Optional[Frame] = None
        wait: Optional[float] = timeout
        while True:
            got = self._stash.pop(0) if self._stash else self.transport.recv(timeout=wait)
            if got is None:
                return newest
            wait = 0.0
            src, data = got
            if src != SERVER_RANK:
                self.stats.ignored_frames += 1
                continue
            try:
                frame = Frame.from_bytes(data, max_body=self.transport.max_message_bytes)
            except PayloadError:
                self.stats.rejected_frames += 1
                continue
            if frame.kind == FrameKind.SHUTDOWN:
                return frame
            if frame.kind != FrameKind.PARAMS or frame.worker != self.worker_id or frame.session != self.session:
                self.stats.ignored_frames += 1  # e.g. PARAMS addressed to this worker's previous process
                continue
            newest = frame

    _next_frame = next_frame  # the name tests and older callers use

    def _reconcile(self, frame: Frame) -> bool:
        """Bring the scheme state in line with what the server applied (see module docstring).
        False: nothing to compute for this frame (it repeats parameters already answered)."""
        ack, durable = frame.seq, frame.aux
        if frame.epoch != self.epoch:  # the server restarted the scheme state: start over
            self._clear_state((frame.incarnation, frame.epoch))
            self.epoch = frame.epoch
            self.seq = ack
            self.snapshots = {ack: self._snapshot()}
            self.last_push = None
            self.stats.resyncs += 1
            return True
        if self.sgc is not None:
            # sequential coding keeps no scheme state, and a push of an earlier round that reaches
            # the server late is still used: never roll back, keep sequence numbers increasing
            return True
        if ack > self.seq:  # cannot happen within one session; align rather than stall
            self.seq = ack
            self.snapshots = {ack: self._snapshot()}
        elif ack < self.seq:
            if not self._decided(frame):
                return False  # the latest push may still be applied: wait for the verdict
            snap = self.snapshots.get(ack)
            if snap is None:  # nothing to roll back to: rejoin as a fresh process
                self._clear_state()
                self.session = new_session()
                self.seq = -1
                self.snapshots = {-1: self._snapshot()}
                self.last_push = None
                self._hello(fresh=True)
                return False
            self._restore(snap)
            self.seq = ack
            self.stats.rollbacks += 1
        keep_from = min(durable, ack)
        self.snapshots = {k: v for k, v in self.snapshots.items() if keep_from <= k <= ack}
        return True

    def _decided(self, frame: Frame) -> bool:
        """Whether the server has decided (applied or dropped) every push this worker sent."""
        if self.last_push is None:
            return True
        incarnation, version = self.last_push
        if frame.incarnation != incarnation:  # a restarted server never applies an older incarnation's push
            return True
        if self.config.mode == "sync":  # a round's pushes are applied in that round or never
            return frame.step > version
        return bool(frame.flags & FrameFlag.ANSWER)

    def _load_params(self, frame: Frame) -> bool:
        if self.sgc is not None:
            try:
                self.sgc.load(frame.message(None, sender=SERVER_SENDER, max_numel=self._assignment_cap), self.params,
                              frame.step)
            except PayloadError:
                self.stats.rejected_frames += 1
                return False
            self.stats.params_received += 1
            return True
        try:
            msg = frame.message(self.numels, sender=SERVER_SENDER)
            for p in msg.payloads:
                if p.kind != Kind.DENSE:
                    raise PayloadError(f"parameters must travel dense, slot {p.slot} is {p.kind.name}")
        except PayloadError:
            self.stats.rejected_frames += 1
            return False
        with torch.no_grad():
            for param, p in zip(self.params, msg.payloads):
                param.copy_(p.to_dense(param.dtype).view(param.shape))
        self.stats.params_received += 1
        return True

    def _push(self, frame: Frame, step: int) -> None:
        if self.sgc is not None:
            t0 = time.perf_counter()
            before = self.sgc.partition_grads
            payloads, loss_value = self.sgc.payloads(self.task, self.model, self.params,
                                                     flip_labels=self.hooks.flip_labels(self, step))
            P = self.sgc.assignment.P
            self.hooks.work(self, step, (self.sgc.partition_grads - before) / P)
            self._send_push(frame, step, payloads, loss_value, t0, flags=frame.flags & FrameFlag.REPAIR,
                            aux=self.sgc.assignment.tag)  # echo the repair tag
            return
        if self.coded is not None:
            t0 = time.perf_counter()
            payloads, loss_value = self.coded.payloads(self.task, self.model, self.params, step,
                                                       flip_labels=self.hooks.flip_labels(self, step))
            self.hooks.work(self, step, len(self.coded.partitions) / self.n_workers)
            self._send_push(frame, step, payloads, loss_value, t0)
            return
        t0 = time.perf_counter()
        loss_value = self.backward(step)
        self.push_gradients(frame, step, self.own_gradients(), loss_value, t0)

    def backward(self, step: int) -> float:
        """The task's loss at the loaded parameters, back-propagated; returns its value."""
        self.model.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model, self.worker_id, self.n_workers, step,
                              flip_labels=self.hooks.flip_labels(self, step))
        loss.backward()
        return float(loss.detach())

    def own_gradients(self) -> List[torch.Tensor]:
        """The flat gradients of this worker's parameters (zeros where there is none)."""
        return [p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                for p in self.params]

    def push_gradients(self, frame: Frame, step: int, grads: List[torch.Tensor], loss_value: float,
                       t0: float) -> None:
        """Encode ``grads`` with the scheme's worker half (after momentum and attack hooks), push."""
        if self.momentum is not None:  # MoNNA (Farhadkhani et al. 2023, Alg. 1): m_i <- beta m_i + (1-beta) g_i
            grads = [self.momentum.update(g, key) for g, key in zip(grads, self.keys)]
        self.sw.begin_step()
        evil = self.hooks.byzantine(self, step, grads)
        if evil is not None:  # an attacker sends its own vectors, dense, past the scheme
            payloads = [Payload.dense(v.reshape(-1).to(torch.float32), slot=j) for j, v in enumerate(evil)]
        else:
            payloads = self.sw.encode_group(self.keys, grads, shapes=self.shapes,
                                            params=[p.detach().reshape(-1) for p in self.params])
        self.sw.record(payloads, self.dense_bytes)
        self.sw.end_step()
        self.hooks.work(self, step, 1.0 / self.n_workers)
        self._send_push(frame, step, payloads, loss_value, t0)

    def _send_push(self, frame: Frame, step: int, payloads: List[Payload], loss_value: float, t0: float,
                   flags: FrameFlag = FrameFlag.NONE, aux: int = -1) -> None:
        self.seq += 1
        if self.sgc is None:  # sequential coding keeps no state to roll back (see _reconcile)
            self.snapshots[self.seq] = self._snapshot()
        self.last_push = (frame.incarnation, frame.step)
        self.last_loss = loss_value
        msg = Message(payloads, sender=self.worker_id, step=frame.step)
        out = Frame(FrameKind.PUSH, self.worker_id, step=frame.step, seq=self.seq, session=self.session,
                    incarnation=frame.incarnation, epoch=self.epoch, loss=self.last_loss, flags=flags, aux=aux,
                    body=msg.to_bytes())
        self.stats.compute_s += time.perf_counter() - t0
        data = self.hooks.before_send(self, step, out.to_bytes())
        self.transport.send(SERVER_RANK, data)
        self.stats.pushes += 1
