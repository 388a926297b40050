"""The parameter server: owns the model, the optimizer and the scheme's server half.

Rank 0 of a transport is the server, ranks 1..n are workers 0..n-1. The public API that the
round kinds and the async loop use: :meth:`ParameterServer.receive` (the next valid frame,
control frames handled), :meth:`~ParameterServer.check_push` (exactly-once and freshness
checks), :meth:`~ParameterServer.decode` (the validated payloads), :meth:`~ParameterServer.apply`
(an optimizer step, bookkeeping, checkpoint, history) and :meth:`~ParameterServer.send_params`.

Synchronous mode runs one round kind per step (``rounds.py``: plain, ``coded.py``, ``sequential.py``:
SR-SGC / M-SGC); async mode applies each push on arrival (``async_loop.py``). Membership and
exactly-once bookkeeping live in ``membership.py``.

A restarted server (``resume=True``) loads the checkpoint, counts a new ``incarnation`` (older
pushes are dropped) and tells every worker what it kept: no update is lost or applied twice. A
worker back without its state while the scheme keeps per-worker increments (EF21, EControl)
starts a state epoch: both sides restart the feedback with EF21's uncompressed first step.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from commlib.comm.base import Transport
from commlib.ddp.register import check_optimizer
from commlib.errors import ConfigError, PayloadError
from commlib.ps import checkpoint as ckpt
from commlib.ps.async_loop import run_async
from commlib.ps.config import PSConfig, build_optimizer, build_schedule
from commlib.ps.membership import BOOKKEEPING, Membership, WorkerRecord  # noqa: F401  (re-exported)
from commlib.ps.protocol import SERVER_RANK, SERVER_SENDER, Frame, FrameFlag, FrameKind
from commlib.ps.round_kinds import build_round
from commlib.ps.shards import ShardSpec, check_checkpoint_layout, checkpoint_layout
from commlib.ps.task import Task, model_keys
from commlib.scheme import Scheme
from commlib.wire import DTYPES, Message, Payload, check_values


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
        optimizer: an optimizer over the model's parameters (default: from ``config.optimizer``);
            its lr stays constant unless ``config.optimizer`` names a "schedule".
        on_step: called with each history record (progress bars, logging).
        shard: serve one shard of the keys (:class:`commlib.ps.shards.ShardSpec`).
    """

    def __init__(self, transport: Transport, scheme: Scheme, task: Union[Task, nn.Module],
                 config: Optional[PSConfig] = None, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
                 shard: Optional[ShardSpec] = None) -> None:
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
        self.shard = shard  # a sharded server (commlib/ps/shards.py): this shard's keys only
        if shard is None and int(cfg.shards) > 1:
            raise ConfigError(f"shards={cfg.shards}: run the sharded runners (--shards K, ShardedProcessJob, "
                              "RayShardedJob, ShardedInprocJob), not one ParameterServer")
        if shard is not None:
            self.keys, self.params = shard.select(self.keys, self.params, cfg, scheme, self.task)
        self.numels = [p.numel() for p in self.params]
        self.dense = [scheme.sends_dense(tuple(p.shape)) for p in self.params]
        self.optimizer = optimizer or build_optimizer(cfg.optimizer, self.params, cfg.mode, self.n)
        check_optimizer(scheme, self.optimizer)
        # the lr as a function of the version (docs/algorithms.md §5.4)
        self.schedule = build_schedule(cfg.optimizer, self.optimizer, cfg.mode, cfg.steps,
                                       given=optimizer is not None)
        if cfg.quorum is not None and int(cfg.quorum) > self.n:
            raise ConfigError(f"quorum {cfg.quorum} exceeds the {self.n} workers")
        self.rounds = build_round(cfg, self.n, scheme, self.task)  # the synchronous round kind
        self.quorum = int(cfg.quorum or self.rounds.quorum)
        if cfg.mode == "async" and not scheme.aggregator.is_mean:
            raise ConfigError("async mode applies one push at a time: it needs the mean aggregator "
                              f"(got {type(scheme.aggregator).__name__}); use sync mode for robust rules")
        if not scheme.aggregator.is_mean:
            scheme.aggregator.check_n(self.quorum)
        if getattr(self.task, "requires_full_quorum", False) and (cfg.mode != "sync" or self.quorum < self.n):
            raise ConfigError("this task's privacy stage keeps state on both sides per round (DIFF2): it needs "
                              f"sync mode with every worker in every round (quorum {self.quorum} of {self.n})")
        self.half = scheme.server(self.n)
        self.members = Membership(self.n, transport, lambda: (self.elapsed(), self.version))
        self.records = self.members.records
        self.version = self.incarnation = self.epoch = 0
        self.resyncs = self.empty_rounds = self.unknown_frames = 0
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.on_step = on_step
        self.stopped = ""
        self.pending_resync = False  # a rejoin awaits a new state epoch (sync: at the next round)
        self._starting = False
        self.started = time.monotonic()  # start of training
        self._last_apply = self.started
        if cfg.resume and cfg.checkpoint and os.path.exists(cfg.checkpoint):
            self.load_checkpoint(cfg.checkpoint)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        """Train until ``config.steps`` updates were applied (or every worker is gone)."""
        self._wait_for_workers()
        self.started = self._last_apply = time.monotonic()
        if self.config.mode == "sync":
            while self.version < self.config.steps and not self.stopped:
                if self.pending_resync:
                    self._resync()
                self.rounds.run_round(self)
        else:
            run_async(self)
        # an exception above leaves without SHUTDOWN, like a crashed server: workers wait for a restart
        self.members.shutdown(self.config.shutdown_timeout)
        if self.task is not None and not (self.evals and self.evals[-1]["step"] == self.version):
            self.evaluate()
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
        while self.members.present_count() < want and time.monotonic() < deadline:
            frame = self.receive(min(1.0, max(0.0, deadline - time.monotonic())))
            if frame is not None:  # a push computed for an older incarnation: counted as outdated
                self.check_push(frame)
        self._starting = False

    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.monotonic() - self.started

    def idle_for(self) -> float:
        """Seconds since the last update (or the start, or the last round with nothing due)."""
        return time.monotonic() - self._last_apply

    def note_progress(self) -> None:
        """A round ran with nothing due (sequential coding's first ``T`` rounds): not idle."""
        self._last_apply = time.monotonic()

    def empty_round(self) -> None:
        """A round applied nothing (too few pushes): counted; stop when idle too long."""
        self.empty_rounds += 1
        if self.idle_for() > self.config.idle_timeout:
            self.stopped = "no live workers"

    # --------------------------------------------------------------------- frames in and out
    def _params_body(self) -> bytes:
        payloads = [Payload.dense(_wire_dtype(p.detach().reshape(-1)), slot=j) for j, p in enumerate(self.params)]
        return Message(payloads, sender=SERVER_SENDER, step=self.version).to_bytes()

    def send_params(self, workers: Sequence[int], body: Optional[bytes] = None, answer: bool = False) -> None:
        """PARAMS at the current version to ``workers`` that have a process heard from."""
        body = body if body is not None else self._params_body()
        for w in workers:
            rec = self.records[w]
            if rec.session == 0 or not rec.present or self.transport.is_dead(w + 1):
                continue
            frame = Frame(FrameKind.PARAMS, w, step=self.version, seq=rec.last_applied, aux=rec.durable,
                          session=rec.session, incarnation=self.incarnation, epoch=self.epoch,
                          flags=FrameFlag.ANSWER if answer else FrameFlag.NONE, body=body)
            self.transport.send(w + 1, frame.to_bytes())

    def receive(self, timeout: float) -> Optional[Frame]:
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
                self.members.reject(w)
                continue
            revived = self.members.heard(w)
            if frame.kind == FrameKind.HELLO:
                self._on_hello(frame, revived)
                continue
            if frame.kind == FrameKind.BYE:
                self.members.bye(w)
                continue
            return frame

    def _on_hello(self, frame: Frame, revived: bool = False) -> None:
        w = frame.worker
        new = self.members.new_process(frame, revived)
        if new is not None:  # a new process for this worker (or the first one)
            self.rounds.forget(w)  # e.g. it holds no parameter versions (sequential coding)
            # a task whose worker state must restart everywhere (privacy: noise streams, DIFF2 rounds)
            task_restart = new.replaced and getattr(self.task, "restarts_state_on_rejoin", False)
            if task_restart or (self.scheme.feedback.increments and (new.had_history or new.claims_state)):
                # the server's sum of increments holds this worker's old state: restart it everywhere
                if self.config.mode == "sync":
                    self.pending_resync = True
                    return  # it gets the parameters with the new epoch at the next round
                self._resync()
        if self.pending_resync:
            return  # sync: nothing goes out before the new epoch starts (next round)
        if not self._starting and self.rounds.answers_hello:
            self.send_params([w], answer=self.config.mode == "async")

    def _resync(self) -> None:
        self.epoch += 1
        self.resyncs += 1
        self.members.event("resync", -1)
        self.half.state.clear()
        if hasattr(self.task, "restart_server"):
            self.task.restart_server()
        self.pending_resync = False
        if self.config.checkpoint:
            # durable before any frame of the new epoch leaves: a restarted server must not go
            # back to the old epoch while workers already cleared their state for the new one
            self.save_checkpoint(self.config.checkpoint)

    def check_push(self, frame: Frame) -> str:
        """Common checks of a PUSH frame: "" when it may be used, else why not (counted):
        "session", "outdated" (another incarnation or state epoch), "duplicate", "future"."""
        return self.members.check_push(frame, self.incarnation, self.epoch, self.rounds.newest_step(self))

    def decode(self, frame: Frame) -> Optional[List[Payload]]:
        """The push's payloads (validated by the frame: layout, CRC, the value rule for float32),
        checked against the scheme's ``max_abs``; None when rejected (counted)."""
        try:
            payloads = frame.message(self.numels, sender=frame.worker).payloads
            if self.scheme.max_abs is not None:
                for p in payloads:
                    check_values(p.values, p.scale, max_abs=self.scheme.max_abs, slot=p.slot)
            return payloads
        except PayloadError:
            self.members.reject(frame.worker)
            return None

    # ---------------------------------------------------------------------------- updates
    def decode_group(self, received: List[List[Optional[Payload]]]) -> List[torch.Tensor]:
        """The scheme's server half on ``received[w][j]`` (None: missing): one direction per key."""
        if self.shard is not None:
            return self.shard.decode_group(self.half, self.keys, self.numels, received, self.dense)
        return self.half.decode_group(self.keys, self.numels, received, dense=self.dense)

    def agree(self, got: Dict[int, Any]) -> Dict[int, Any]:
        """The pushes of a round that are applied: all of them, or on a shard those every shard has."""
        return got if self.shard is None else self.shard.agree_pushes(got, self.members)

    def apply(self, dirs: List[torch.Tensor], workers: Sequence[int], staleness: int = 0,
              frames: Sequence[Frame] = ()) -> None:
        """One optimizer step with ``dirs`` (one flat direction per parameter) from ``workers``;
        the pushes in ``frames`` are recorded as applied (exactly once), then checkpoint,
        history and evaluation."""
        self._step(dirs)
        for frame in frames:
            self.members.applied(frame, staleness)
        self._after_update(list(workers), staleness)

    def _step(self, dirs: List[torch.Tensor]) -> None:
        if self.task is not None and hasattr(self.task, "server_directions"):
            dirs = self.task.server_directions(dirs)  # e.g. DIFF2's estimator (commlib/ps/private.py)
        for p, d in zip(self.params, dirs):
            p.grad = d.reshape(p.shape).to(p.dtype).clone()
        self.schedule.set(self.version)
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
            self.members.make_durable()
        rec = {"step": self.version, "time": self.elapsed(), "workers": len(workers),
               "loss": self.members.mean_loss(workers), "staleness": staleness}
        self.history.append(rec)
        if self.task is not None and cfg.eval_every and self.version % cfg.eval_every == 0:
            rec.update({f"test_{k}": v for k, v in self.evaluate().items()})
        if self.on_step is not None:
            self.on_step(rec)

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self) -> Dict[str, float]:
        """The task's metrics at the current parameters (recorded in ``evals``)."""
        if self.task is None or self.shard is not None:  # a shard holds only its keys
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
            "workers": self.members.state_dict(),
            "task": self.task.server_state() if hasattr(self.task, "server_state") else None,
            "sgc": self.rounds.state_dict(),
            "pending_resync": self.pending_resync,
            "shard": checkpoint_layout(self.shard),
        }

    def save_checkpoint(self, path: str) -> None:
        self.members.make_durable()  # what this checkpoint holds is now durable
        ckpt.save_atomic(self.state_dict(), path, keep_previous=self.shard is not None)

    def load_checkpoint(self, path: str) -> None:
        """Resume from ``path``: a new incarnation that continues from the saved step."""
        ck = check_checkpoint_layout(ckpt.load(path), self.shard)
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
        if self.rounds.stateful != (ck.get("sgc") is not None):
            raise ConfigError("checkpoint and this server disagree on sequential gradient coding")
        if self.rounds.stateful:
            self.rounds.load_state_dict(ck["sgc"])
        self.version = int(ck["version"])
        self.incarnation = int(ck["incarnation"]) + 1
        self.epoch = int(ck["epoch"])
        self.pending_resync = bool(ck.get("pending_resync", False))  # a rejoin awaited a new epoch
        self.members.load_state_dict(ck["workers"])  # each worker must say HELLO before it counts
        # persist the new incarnation at once: a second crash before the next checkpoint must
        # not bring back an incarnation whose pushes workers still hold
        ckpt.save_atomic(self.state_dict(), path)

    # -------------------------------------------------------------------------------- result
    def result(self) -> Dict[str, Any]:
        """Summary of the run: counters per worker, history, evaluations, transport stats."""
        recs, totals = self.members.summaries(self.started)
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
            "events": self.members.events,
            "scheme": self.scheme.describe(),
            "transport": self.transport.stats.as_dict(),
            "coding": self.rounds.summary(),
            "shard": self.shard.summary() if self.shard is not None else None,
        }
