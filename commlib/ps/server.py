"""The parameter server: owns the model, the optimizer and the scheme's server half.

Rank 0 of a transport is the server, ranks 1..n are workers 0..n-1.

Synchronous mode, one round per optimizer step ``t``:
  1. send PARAMS(t) to every worker (dropped workers every ``probe_every`` rounds);
  2. collect PUSH frames for step t until ``quorum`` of the live workers pushed or
     ``step_timeout`` passed; every frame is validated before use (a bad one is counted and
     treated as missing), pushes for an older step are late (dropped, counted);
  3. ``SchemeServer.decode_group`` (missing workers -> None: the same server half as the DDP
     runtime: decode, aggregate, feedback state), gradients into ``p.grad``, optimizer step;
  4. checkpoint (every ``checkpoint_every`` steps), history, evaluation.
A worker that misses ``max_misses`` rounds in a row is dropped from the quorum (counted);
any valid frame from it later brings it back (a rejoin, counted).

Asynchronous mode: every push is applied on arrival, alone (``decode_group`` with one
contribution), with staleness = (server version) - (version the worker computed on); pushes
staler than ``max_staleness`` are dropped (counted). Each push is answered with fresh
parameters. The default optimizer is Adaptive Braking SGD (``commlib.optim``).

Exactly once: the server records, per worker process (``session``), the sequence number of the
last push it applied; a push with a number not above it is a duplicate and ignored. PARAMS
frames carry that number (``ack``) and the one in the last checkpoint (``durable``), and
workers roll back their scheme state to the push the server actually kept (``worker.py``).
A restarted server (``resume=True``) loads the checkpoint, counts a new ``incarnation``
(pushes computed for an older one are dropped) and tells every worker what it kept, so no
update is lost or applied twice. A worker that comes back without its state (a new process)
while the scheme keeps per-worker increments (EF21, EControl) triggers a state epoch: server
and workers clear the feedback state and restart it with EF21's uncompressed first step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from commlib.comm.base import Transport
from commlib.ddp.register import check_optimizer
from commlib.errors import ConfigError, PayloadError
from commlib.ps import checkpoint as ckpt
from commlib.ps.config import PSConfig, build_optimizer
from commlib.ps.protocol import Frame, FrameFlag, FrameKind
from commlib.ps.task import Task, model_keys
from commlib.ps.worker import SERVER_RANK, SERVER_SENDER
from commlib.scheme import Scheme
from commlib.wire import DTYPES, Message, Payload, check_values


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


_BOOKKEEPING = ("session", "last_applied", "durable")


def _wire_dtype(t: torch.Tensor) -> torch.Tensor:
    """Parameters travel in their own dtype when the wire format has it (else float32), on CPU."""
    return (t if t.dtype in DTYPES else t.to(torch.float32)).cpu()


class ParameterServer:
    """Serve ``task`` (or a bare model) to the workers of ``transport`` with ``scheme``.

    Args:
        transport: rank 0 of a transport whose other ranks run :class:`commlib.ps.PSWorker`.
        scheme: the Scheme (the same object the DDP runtime takes).
        task: a :class:`commlib.ps.Task` (model + evaluation) or an ``nn.Module``.
        config: :class:`PSConfig` (mode, steps, quorum, timeouts, staleness, checkpoint, ...).
        optimizer: an optimizer over the model's parameters (default: from ``config.optimizer``).
        on_step: called with each history record (progress bars, logging).
    """

    def __init__(self, transport: Transport, scheme: Scheme, task: Union[Task, nn.Module],
                 config: Optional[PSConfig] = None, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        if transport.rank != SERVER_RANK:
            raise ConfigError(f"the server is rank {SERVER_RANK}, this transport is rank {transport.rank}")
        self.transport = transport
        self.n = transport.world_size - 1
        if self.n < 1:
            raise ConfigError("a parameter server needs at least one worker (world_size >= 2)")
        self.scheme = scheme
        self.config = cfg = config or PSConfig()
        self.task = task if isinstance(task, Task) else None
        self.model = task.build_model() if isinstance(task, Task) else task
        self.keys, self.params = model_keys(self.model)
        self.numels = [p.numel() for p in self.params]
        self.dense = [scheme.sends_dense(tuple(p.shape)) for p in self.params]
        self.optimizer = optimizer or build_optimizer(cfg.optimizer, self.params, cfg.mode, self.n)
        check_optimizer(scheme, self.optimizer)
        if cfg.quorum is not None and int(cfg.quorum) > self.n:
            raise ConfigError(f"quorum {cfg.quorum} exceeds the {self.n} workers")
        self.coded = None  # gradient coding (commlib/ps/coded.py): decode from the fastest n - s
        self.sgc = None  # sequential gradient coding (commlib/ps/sequential.py): SR-SGC, M-SGC
        if cfg.coding is not None:
            from commlib.ps.coded import CodedServer, build_code, check_coded_scheme
            from commlib.ps.sequential import SGC_CODINGS, SGCServer, build_scheduler

            check_coded_scheme(scheme, self.task)
            if cfg.coding in SGC_CODINGS:
                if getattr(self.task, "requires_full_quorum", False):
                    raise ConfigError("sequential gradient coding cannot run a task that keeps per-round state on "
                                      "both sides (DIFF2)")
                sched = build_scheduler(cfg.coding, self.n, cfg.straggler_burst, cfg.straggler_window,
                                        cfg.straggler_tolerance, cfg.steps, seed=cfg.coding_seed)
                self.sgc = SGCServer(sched, self.n, cfg.sgc_mu, cfg.straggler_burst, cfg.straggler_window,
                                     cfg.straggler_tolerance)
            else:
                self.coded = CodedServer(build_code(cfg.coding, self.n, cfg.straggler_tolerance, cfg.coding_seed))
        self.quorum = int(cfg.quorum or (self.coded.quorum if self.coded else self.n))
        if cfg.mode == "async" and not scheme.aggregator.is_mean:
            raise ConfigError("async mode applies one push at a time: it needs the mean aggregator "
                              f"(got {type(scheme.aggregator).__name__}); use sync mode for robust rules")
        if not scheme.aggregator.is_mean:
            scheme.aggregator.check_n(self.quorum)
        if getattr(self.task, "requires_full_quorum", False) and (cfg.mode != "sync" or self.quorum < self.n):
            raise ConfigError("this task's privacy stage keeps state on both sides per round (DIFF2): it needs "
                              f"sync mode with every worker in every round (quorum {self.quorum} of {self.n})")
        self.half = scheme.server(self.n)
        self.records = [WorkerRecord() for _ in range(self.n)]
        self.version = 0
        self.incarnation = 0
        self.epoch = 0
        self.resyncs = 0
        self.empty_rounds = 0
        self.unknown_frames = 0
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.on_step = on_step
        self.stopped = ""
        self._pending_resync = False
        self._starting = False
        self._t0 = time.monotonic()
        self._last_apply = self._t0
        if cfg.resume and cfg.checkpoint and os.path.exists(cfg.checkpoint):
            self.load_checkpoint(cfg.checkpoint)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        """Train until ``config.steps`` updates were applied (or every worker is gone)."""
        self._wait_for_workers()
        self._t0 = self._last_apply = time.monotonic()
        if self.config.mode == "sync":
            while self.version < self.config.steps and not self.stopped:
                if self.sgc is not None:
                    if self._pending_resync:
                        self._resync()
                    self.sgc.run_round(self)
                else:
                    self._sync_round()
        else:
            self._async_loop()
        # an exception above leaves without SHUTDOWN, like a crashed server: workers wait for a restart
        self._shutdown()
        if self.task is not None and not (self.evals and self.evals[-1]["step"] == self.version):
            self._evaluate()
        if not self.stopped:
            self.stopped = "done"
        return self.result()

    def _wait_for_workers(self) -> None:
        """Start once ``start_workers`` workers said HELLO (or ``startup_timeout`` passed)."""
        cfg = self.config
        want = self.n if cfg.start_workers is None else min(int(cfg.start_workers), self.n)
        deadline = time.monotonic() + cfg.startup_timeout
        self._starting = True  # HELLOs are registered, not answered: the first round sends PARAMS
        # records restored from a checkpoint are not present until their worker speaks again
        while sum(1 for r in self.records if r.session and r.present) < want and time.monotonic() < deadline:
            frame = self._receive(min(1.0, max(0.0, deadline - time.monotonic())))
            if frame is not None:  # a push computed for an older incarnation: counted as outdated
                self._check_push(frame)
        self._starting = False

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    # --------------------------------------------------------------------- frames in and out
    def _params_body(self) -> bytes:
        payloads = [Payload.dense(_wire_dtype(p.detach().reshape(-1)), slot=j) for j, p in enumerate(self.params)]
        return Message(payloads, sender=SERVER_SENDER, step=self.version).to_bytes()

    def _send_params(self, workers: List[int], body: Optional[bytes] = None, answer: bool = False) -> None:
        body = body if body is not None else self._params_body()
        for w in workers:
            rec = self.records[w]
            if rec.session == 0 or not rec.present or self.transport.is_dead(w + 1):
                continue
            frame = Frame(FrameKind.PARAMS, w, step=self.version, seq=rec.last_applied, aux=rec.durable,
                          session=rec.session, incarnation=self.incarnation, epoch=self.epoch,
                          flags=FrameFlag.ANSWER if answer else FrameFlag.NONE, body=body)
            self.transport.send(w + 1, frame.to_bytes())

    def _receive(self, timeout: float) -> Optional[Frame]:
        """The next valid frame from a worker (control frames handled here), or None at timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            got = self.transport.recv(timeout=max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            src, data = got
            w = src - 1
            if not 0 <= w < self.n:
                self.unknown_frames += 1
                continue
            rec = self.records[w]
            try:
                frame = Frame.from_bytes(data, max_body=self.transport.max_message_bytes)
                if frame.worker != w:
                    raise PayloadError(f"frame from rank {src} claims worker {frame.worker}")
                if frame.kind not in (FrameKind.HELLO, FrameKind.PUSH, FrameKind.BYE):
                    raise PayloadError(f"a worker may not send {frame.kind.name}")
            except PayloadError:
                # counted; no reply: the sender's process cannot be trusted from a bad frame, so
                # the worker learns its push was lost from the next round (sync) or, in async
                # mode, from the answer to the HELLO it sends after ``worker_timeout``
                rec.rejected += 1
                self._event("rejected", w)
                continue
            revived = self._heard(w)
            if frame.kind == FrameKind.HELLO:
                self._on_hello(frame, revived)
                continue
            if frame.kind == FrameKind.BYE:
                rec.live = False
                continue
            return frame

    def _event(self, kind: str, worker: int) -> None:
        """Record a fault-handling event (drops, rejoins, rejections, resyncs) for reports."""
        self.events.append({"time": round(self.elapsed(), 4), "step": self.version, "worker": worker, "kind": kind})

    def _heard(self, w: int) -> bool:
        """Note a valid frame from ``w``; True when this brings a dropped worker back (a rejoin)."""
        rec = self.records[w]
        rec.last_seen = time.monotonic()
        rec.misses = 0
        rec.present = True
        if not rec.live:
            rec.live = True
            rec.rejoins += 1
            self._event("rejoin", w)
            return True
        return False

    def _on_hello(self, frame: Frame, revived: bool = False) -> None:
        w, rec = frame.worker, self.records[frame.worker]
        if frame.session != rec.session:  # a new process for this worker (or the first one)
            self.transport.mark_alive(w + 1)  # we just heard from it (a restarted peer)
            had_history = rec.session != 0 and rec.last_applied >= 0
            if rec.session != 0 and not revived:
                rec.rejoins += 1  # a new process replaced one that was not dropped yet
                self._event("rejoin", w)
            claims_state = not (frame.flags & FrameFlag.FRESH) and frame.seq >= 0
            replaced = rec.session != 0
            if self.sgc is not None:
                self.sgc.forget(w)  # a new process holds no parameter versions
            rec.session = frame.session
            rec.last_applied = rec.durable = -1 if frame.flags & FrameFlag.FRESH else frame.seq
            # a task whose worker state must restart everywhere (privacy: noise streams, DIFF2 rounds)
            task_restart = replaced and getattr(self.task, "restarts_state_on_rejoin", False)
            if task_restart or (self.scheme.feedback.increments and (had_history or claims_state)):
                # the server's sum of increments holds this worker's old state: restart it everywhere
                if self.config.mode == "sync":
                    self._pending_resync = True
                    return  # it gets the parameters with the new epoch at the next round
                self._resync()
        if self._pending_resync:
            return  # sync: nothing goes out before the new epoch starts (next round)
        if not self._starting and self.sgc is None:  # SGC: the next round's assignment reaches it
            self._send_params([w], answer=self.config.mode == "async")

    def _resync(self) -> None:
        self.epoch += 1
        self.resyncs += 1
        self._event("resync", -1)
        self.half.state.clear()
        if hasattr(self.task, "restart_server"):
            self.task.restart_server()
        self._pending_resync = False
        if self.config.checkpoint:
            # durable before any frame of the new epoch leaves: a restarted server must not go
            # back to the old epoch while workers already cleared their state for the new one
            self.save_checkpoint(self.config.checkpoint)

    def _check_push(self, frame: Frame) -> str:
        """Common checks of a PUSH frame: "" when it may be used, else why not (counted)."""
        rec = self.records[frame.worker]
        if frame.session != rec.session:  # from an earlier process of this worker
            rec.outdated += 1
            return "session"
        if frame.incarnation != self.incarnation or frame.epoch != self.epoch:
            rec.outdated += 1
            return "outdated"
        if frame.seq <= rec.last_applied:
            rec.duplicates += 1
            return "duplicate"
        if frame.step > (self.sgc.round if self.sgc is not None else self.version):
            rec.rejected += 1  # computed on parameters that were never sent
            return "future"
        return ""

    def _decode(self, frame: Frame) -> Optional[List[Payload]]:
        """The push's payloads (validated by the frame: layout, CRC, the value rule for float32),
        checked against the scheme's ``max_abs``; None when rejected (counted)."""
        try:
            payloads = frame.message(self.numels, sender=frame.worker).payloads
            if self.scheme.max_abs is not None:
                for p in payloads:
                    check_values(p.values, p.scale, max_abs=self.scheme.max_abs, slot=p.slot)
            return payloads
        except PayloadError:
            self.records[frame.worker].rejected += 1
            self._event("rejected", frame.worker)
            return None

    # ----------------------------------------------------------------------------- sync mode
    def _sync_round(self) -> None:
        cfg = self.config
        if self._pending_resync:
            self._resync()
        t = self.version
        probe = t % cfg.probe_every == 0
        targets = [w for w in range(self.n) if self.records[w].live or probe]
        self._send_params(targets)
        self._note_dead()
        expected = [w for w in targets if self.records[w].live]
        got: Dict[int, tuple] = {}
        deadline = time.monotonic() + cfg.step_timeout
        fell_back = False
        while len(got) < self._need(expected) or (self.coded and not self.coded.decodable(list(got))):
            frame = self._receive(min(deadline - time.monotonic(), 0.5))
            if frame is None and time.monotonic() < deadline:
                continue  # look again at who is still alive
            if frame is None and self.coded and self._coded_fallback(expected, got, fell_back):
                fell_back = True  # outside the straggler model: wait one more step_timeout
                deadline = time.monotonic() + cfg.step_timeout
                continue
            if frame is None:
                break
            w = frame.worker
            if self._check_push(frame):
                continue
            if frame.step != t:
                self.records[w].late += 1
                continue
            if w in got:
                self.records[w].duplicates += 1
                continue
            payloads = self._decode(frame)
            if payloads is not None:
                got[w] = (payloads, frame)
        self._note_dead()
        for w in expected:
            if w not in got:
                rec = self.records[w]
                rec.timeouts += 1
                rec.misses += 1
                if rec.misses >= cfg.max_misses and rec.live:
                    rec.live = False
                    rec.drops += 1
                    self._event("drop", w)
        if len(got) < cfg.min_pushes or not self._apply_round(got):
            self.empty_rounds += 1
            if time.monotonic() - self._last_apply > cfg.idle_timeout:
                self.stopped = "no live workers"
            return
        self._after_update([w for w in got], staleness=0)

    def _coded_fallback(self, expected: List[int], got: Dict[int, tuple], fell_back: bool) -> bool:
        """Coded rounds: at the timeout without a decodable set, keep waiting (counted once per
        round) while a live worker may still push; False: give the round up."""
        if time.monotonic() - self._last_apply > self.config.idle_timeout:
            return False
        if not any(w not in got and not self.transport.is_dead(w + 1) for w in expected):
            return False
        if not fell_back:
            self.coded.fallbacks += 1
        return True

    def _note_dead(self) -> None:
        """Drop the live workers whose link the transport reports broken (a dead process)."""
        for w, rec in enumerate(self.records):
            if rec.live and rec.session and self.transport.is_dead(w + 1):
                rec.live = False
                rec.drops += 1
                self._event("drop", w)

    def _need(self, expected: List[int]) -> int:
        """Pushes to wait for: the quorum, or every expected worker still reachable if fewer."""
        alive = sum(1 for w in expected if not self.transport.is_dead(w + 1))
        return max(1, min(self.quorum, alive))

    def _apply_round(self, got: Dict[int, tuple]) -> bool:
        if self.coded is not None:
            from commlib.coding.gc import NotDecodable

            try:
                dirs = self.coded.decode({w: pl for w, (pl, _) in got.items()}, self.numels)
            except NotDecodable:
                return False
            return self._applied(got, dirs)
        received = [got[w][0] if w in got else [None] * len(self.keys) for w in range(self.n)]
        try:
            dirs = self.half.decode_group(self.keys, self.numels, received, dense=self.dense)
        except ConfigError:  # too few contributions for the robust rule this round
            return False
        return self._applied(got, dirs)

    def _applied(self, got: Dict[int, tuple], dirs: List[torch.Tensor]) -> bool:
        self._step(dirs)
        for w, (_, frame) in got.items():
            rec = self.records[w]
            rec.last_applied = frame.seq
            rec.applied += 1
            rec.loss = frame.loss
        return True

    def _sgc_apply(self, dirs: List[torch.Tensor], workers: List[int]) -> None:
        """Sequential coding: apply a decoded job (computed ``T`` rounds ago)."""
        self._step(dirs)
        self._after_update(workers, staleness=self.sgc.sched.T)

    def _sgc_idle_round(self) -> None:
        """Sequential coding: a round with no job due (the first T rounds)."""
        self._last_apply = time.monotonic()

    def _step(self, dirs: List[torch.Tensor]) -> None:
        if self.task is not None and hasattr(self.task, "server_directions"):
            dirs = self.task.server_directions(dirs)  # e.g. DIFF2's estimator (commlib/ps/private.py)
        for p, d in zip(self.params, dirs):
            p.grad = d.reshape(p.shape).to(p.dtype).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.half.end_step()
        self.version += 1
        self._last_apply = time.monotonic()

    def _after_update(self, workers: List[int], staleness: int) -> None:
        cfg = self.config
        if cfg.checkpoint and self.version % cfg.checkpoint_every == 0:
            self.save_checkpoint(cfg.checkpoint)
        elif not cfg.checkpoint:
            for rec in self.records:
                rec.durable = rec.last_applied
        losses = [self.records[w].loss for w in workers if not math.isnan(self.records[w].loss)]
        rec = {"step": self.version, "time": self.elapsed(), "workers": len(workers),
               "loss": sum(losses) / len(losses) if losses else float("nan"), "staleness": staleness}
        self.history.append(rec)
        if self.task is not None and cfg.eval_every and self.version % cfg.eval_every == 0:
            rec.update({f"test_{k}": v for k, v in self._evaluate().items()})
        if self.on_step is not None:
            self.on_step(rec)

    # ---------------------------------------------------------------------------- async mode
    def _async_loop(self) -> None:
        cfg = self.config
        self._send_params(list(range(self.n)))
        while self.version < cfg.steps:
            frame = self._receive(min(cfg.step_timeout, 1.0))
            self._note_dead()
            now = time.monotonic()
            for w, rec in enumerate(self.records):
                if rec.live and rec.session and now - max(rec.last_seen, self._t0) > cfg.step_timeout:
                    rec.live = False
                    rec.timeouts += 1
                    rec.drops += 1
                    self._event("drop", w)
            if frame is None:
                if now - self._last_apply > cfg.idle_timeout:
                    self.stopped = "no live workers"
                    return
                continue
            w, rec = frame.worker, self.records[frame.worker]
            why = self._check_push(frame)
            if why:
                if why in ("outdated", "future"):  # same process: tell it where things stand
                    self._send_params([w], answer=True)
                continue
            staleness = self.version - frame.step
            payloads = None
            if cfg.max_staleness is not None and staleness > cfg.max_staleness:
                rec.stale += 1
            else:
                payloads = self._decode(frame)
            if payloads is not None:
                received: List[List[Optional[Payload]]] = [[None] * len(self.keys) for _ in range(self.n)]
                received[w] = payloads
                self._step(self.half.decode_group(self.keys, self.numels, received, dense=self.dense))
                rec.last_applied = frame.seq
                rec.applied += 1
                rec.loss = frame.loss
                rec.staleness_sum += staleness
                rec.staleness_max = max(rec.staleness_max, staleness)
                self._after_update([w], staleness)
            self._send_params([w], answer=True)

    # ------------------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        """Tell every worker to stop; wait (bounded) for the live ones to say BYE. A worker that
        says HELLO meanwhile (a late restart) is told to stop too."""
        for w, rec in enumerate(self.records):
            if rec.session and not self.transport.is_dead(w + 1):
                self.transport.send(w + 1, Frame(FrameKind.SHUTDOWN, w, session=rec.session).to_bytes())
        waiting = {w for w, rec in enumerate(self.records)
                   if rec.live and rec.session and not self.transport.is_dead(w + 1)}
        deadline = time.monotonic() + self.config.shutdown_timeout
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

    # ------------------------------------------------------------------------------ evaluate
    def _evaluate(self) -> Dict[str, float]:
        if self.task is None:
            return {}
        metrics = self.task.evaluate(self.model)
        if metrics:
            self.evals.append({"step": self.version, "time": self.elapsed(), **metrics})
        return metrics

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Everything a restarted server needs (model, optimizer, every scheme state, step, workers)."""
        return {
            "format": ckpt.FORMAT,
            "scheme": self.scheme.describe(),
            "mode": self.config.mode,
            "version": self.version,
            "incarnation": self.incarnation,
            "epoch": self.epoch,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheme_server": self.half.state_dict(),
            "aggregator": self.scheme.aggregator.state_dict(),
            "workers": [{k: getattr(r, k) for k in _BOOKKEEPING} for r in self.records],
            "task": self.task.server_state() if hasattr(self.task, "server_state") else None,
            "sgc": self.sgc.state_dict() if self.sgc is not None else None,
            "pending_resync": self._pending_resync,
        }

    def save_checkpoint(self, path: str) -> None:
        for rec in self.records:  # what this checkpoint holds is now durable
            rec.durable = rec.last_applied
        ckpt.save_atomic(self.state_dict(), path)

    def load_checkpoint(self, path: str) -> None:
        """Resume from ``path``: a new incarnation that continues from the saved step."""
        ck = ckpt.load(path)
        if ck["scheme"] != self.scheme.describe():
            raise ConfigError(f"checkpoint was written for {ck['scheme']}, this server runs {self.scheme.describe()}")
        if len(ck["workers"]) != self.n:
            raise ConfigError(f"checkpoint has {len(ck['workers'])} workers, this run has {self.n}")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.half.load_state_dict(ck["scheme_server"])
        self.scheme.aggregator.load_state_dict(ck["aggregator"])
        if hasattr(self.task, "load_server_state"):
            self.task.load_server_state(ck.get("task"))
        if (self.sgc is None) != (ck.get("sgc") is None):
            raise ConfigError("checkpoint and this server disagree on sequential gradient coding")
        if self.sgc is not None:
            self.sgc.load_state_dict(ck["sgc"])
        self.version = int(ck["version"])
        self.incarnation = int(ck["incarnation"]) + 1
        self.epoch = int(ck["epoch"])
        self._pending_resync = bool(ck.get("pending_resync", False))  # a rejoin awaited a new epoch
        for rec, saved in zip(self.records, ck["workers"]):
            rec.session = int(saved["session"])
            rec.last_applied = rec.durable = int(saved["last_applied"])
            rec.present = False  # its worker must say HELLO to this incarnation before it counts
        # persist the new incarnation at once: a second crash before the next checkpoint must
        # not bring back an incarnation whose pushes workers still hold
        ckpt.save_atomic(self.state_dict(), path)

    # -------------------------------------------------------------------------------- result
    def result(self) -> Dict[str, Any]:
        """Summary of the run: counters per worker, history, evaluations, transport stats."""
        recs = [r.summary() for r in self.records]
        for r in recs:  # seconds since the start of training (None: never heard of)
            r["last_seen"] = round(r["last_seen"] - self._t0, 3) if r["last_seen"] else None
        totals = {k: sum(r[k] for r in recs) for k in ("applied", "late", "rejected", "duplicates", "stale",
                                                          "outdated", "timeouts", "drops", "rejoins")}
        return {
            "status": self.stopped or "running",
            "mode": self.config.mode,
            "steps": self.version,
            "incarnation": self.incarnation,
            "epoch": self.epoch,
            "resyncs": self.resyncs,
            "empty_rounds": self.empty_rounds,
            "unknown_frames": self.unknown_frames,
            "elapsed_s": self.elapsed(),
            "totals": totals,
            "workers": recs,
            "history": self.history,
            "evals": self.evals,
            "events": self.events,
            "scheme": self.scheme.describe(),
            "transport": self.transport.stats.as_dict(),
            "coding": (self.coded.summary() if self.coded is not None
                       else self.sgc.summary() if self.sgc is not None else None),
        }
