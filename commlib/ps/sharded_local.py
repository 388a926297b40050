"""A sharded parameter-server job inside this process: ``k`` server shards (one thread and one
in-process transport each) and one thread per worker that talks to every shard.

A worker (:class:`ShardedWorker`) holds one model and one :class:`PSWorker` per shard over that
shard's keys (each with its own scheme state, sequence numbers and rollback snapshots, so
exactly-once holds per shard). It waits for PARAMS of the same step from every shard, computes
the gradient once, and pushes each shard its keys' payloads.

    from commlib.ps.sharded_local import run_inproc_sharded
    res = run_inproc_sharded({"name": "classification", "dataset": "digits"}, {"aggregator": "krum", "f": 1},
                             PSConfig(steps=20), 8, shards=3)
    res["model_state"]   # the whole model, assembled from the shards
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn

from commlib.comm.base import Transport
from commlib.comm.inproc import InprocHub
from commlib.errors import ConfigError, WorkerFailure
from commlib.ps.config import PSConfig
from commlib.ps.protocol import FrameKind
from commlib.ps.server import ParameterServer
from commlib.ps.shards import InprocShardExchange, ShardSpec, shard_config, shard_ranges
from commlib.ps.task import Task, build_task, model_keys
from commlib.ps.worker import PSWorker, WorkerHooks, new_session
from commlib.scheme import Scheme

_POLL = 0.05  # seconds a worker waits on one shard before looking at the others again


class ShardedWorker:
    """One worker of a sharded run: a :class:`PSWorker` per shard, sharing one model."""

    def __init__(self, endpoints: List[Transport], schemes: List[Scheme], task: Task, config: PSConfig,
                 ranges: List[range], hooks: Optional[Mapping[int, WorkerHooks]] = None) -> None:
        self.config = config
        self.model = task.build_model()
        session = new_session()  # one process: the same session on every shard
        hooks = hooks or {}
        self.parts = [PSWorker(ep, sc, task, config, session=session, model=self.model, keys=r, hooks=hooks.get(i))
                      for i, (ep, sc, r) in enumerate(zip(endpoints, schemes, ranges))]
        self.steps = 0

    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.parts)

    def start(self) -> None:
        """Say HELLO to every shard (the first thing a worker sends)."""
        for p in self.parts:
            p.start()
        self._pending: List[Optional[tuple]] = [None] * len(self.parts)  # (frame, step) per shard
        self._heard = [time.monotonic()] * len(self.parts)

    def poll(self, timeout: float) -> bool:
        """Look once at every shard's frames (waiting up to ``timeout`` on the first shard still
        owing parameters); compute and push when every live shard sent PARAMS of one step.
        True when a frame arrived."""
        cfg, pending, heard = self.config, self._pending, self._heard
        waiting = [i for i, p in enumerate(self.parts) if not p.finished and pending[i] is None]
        progressed = False
        for i, p in enumerate(self.parts):
            if p.finished:
                continue
            frame = p.next_frame(timeout if waiting and i == waiting[0] else 0.0)
            now = time.monotonic()
            if frame is None:
                if now - heard[i] > cfg.worker_give_up:
                    p.stats.status = "server lost"
                elif now - heard[i] > cfg.worker_timeout:
                    p.say_hello()
                    heard[i] = now - cfg.worker_timeout / 2  # ask again after half the timeout
                continue
            progressed = True
            heard[i] = now
            step = p.accept(frame)
            if frame.kind == FrameKind.SHUTDOWN:
                pending[i] = None
            elif step is not None:
                pending[i] = (frame, step)  # its keys' parameters are loaded
        live = [i for i, p in enumerate(self.parts) if not p.finished]
        if live and all(pending[i] is not None for i in live) and len({pending[i][1] for i in live}) == 1:
            self._compute([(i, pending[i]) for i in live])
            self._pending = [None] * len(self.parts)
        return progressed

    def stop(self, status: str) -> None:
        """End every part that is still running with ``status`` (e.g. a shard is gone)."""
        for p in self.parts:
            if not p.finished:
                p.stats.status = status

    def report(self) -> List[Dict[str, Any]]:
        return [p.report() for p in self.parts]

    def run(self) -> List[Dict[str, Any]]:
        """Work until every shard said SHUTDOWN (or stayed silent for ``worker_give_up``)."""
        self.start()
        while not self.finished:
            self.poll(_POLL)
        return self.report()

    def _compute(self, work: List[tuple]) -> None:
        """One gradient at the parameters every shard sent, pushed to each shard in parts."""
        t0 = time.perf_counter()
        step = work[0][1][1]
        loss = self.parts[work[0][0]].backward(step)
        for i, (frame, _) in work:
            p = self.parts[i]
            p.push_gradients(frame, step, p.own_gradients(), loss, t0)
        self.steps += 1


class ShardedInprocJob:
    """``shards`` parameter-server shards and ``n_workers`` :class:`ShardedWorker` threads.

    The keys are split by :func:`commlib.ps.shards.shard_ranges`; with ``config.checkpoint``
    shard ``i`` checkpoints to ``<checkpoint>.shard<i>`` (and resumes from it). ``hooks[w][i]``:
    the :class:`WorkerHooks` of worker ``w``'s part for shard ``i`` (its ``before_send`` sees the
    frames to that shard; computation hooks are not called by sharded workers)."""

    def __init__(self, task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                 config: PSConfig, n_workers: int, shards: int,
                 hooks: Optional[Mapping[int, Mapping[int, WorkerHooks]]] = None) -> None:
        if int(n_workers) < 1:
            raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
        self.task = build_task(task)
        self._scheme = scheme
        self.config = config
        self.n, self.k = int(n_workers), int(shards)
        self.numels = [p.numel() for p in model_keys(self.task.build_model())[1]]
        self.ranges = shard_ranges(self.numels, self.k)
        self.exchange = InprocShardExchange(self.k, timeout=4 * config.step_timeout + 30.0)
        self.hubs = [InprocHub(self.n + 1) for _ in range(self.k)]
        self.servers = [ParameterServer(self.hubs[i].endpoint(0), self.new_scheme(), self.task,
                                        shard_config(self.config, i), shard=ShardSpec(i, self.k, r, self.exchange))
                        for i, r in enumerate(self.ranges)]
        self.workers = [ShardedWorker([h.endpoint(w + 1) for h in self.hubs], [self.new_scheme() for _ in self.hubs],
                                      self.task, config, self.ranges, (hooks or {}).get(w)) for w in range(self.n)]
        self.errors: Dict[str, BaseException] = {}

    def new_scheme(self) -> Scheme:
        return self._scheme if isinstance(self._scheme, Scheme) else Scheme.from_config(self._scheme)

    def _guard(self, name: str, fn, out: Dict[str, Any]) -> None:
        try:
            out[name] = fn()
        except BaseException as exc:  # a bug: run() raises it
            self.errors[name] = exc

    def run(self, join_timeout: float = 60.0) -> Dict[str, Any]:
        """Run every shard and worker to the end; the shards' results and the assembled model."""
        out: Dict[str, Any] = {}
        threads = [threading.Thread(target=self._guard, args=(f"shard{i}", s.run, out), daemon=True)
                   for i, s in enumerate(self.servers)]
        threads += [threading.Thread(target=self._guard, args=(f"worker{w}", wk.run, out), daemon=True)
                    for w, wk in enumerate(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(join_timeout + self.config.steps * self.config.step_timeout)
        if self.errors:
            name, exc = next(iter(self.errors.items()))
            raise WorkerFailure(f"{name} failed: {type(exc).__name__}: {exc}") from exc
        shards = [out[f"shard{i}"] for i in range(self.k)]
        model = self.model()
        evals = self.task.evaluate(model)
        return {"status": "done" if all(r["status"] == "done" for r in shards) else "stopped",
                "steps": min(r["steps"] for r in shards), "shards": shards,
                "ranges": [[r.start, r.stop] for r in self.ranges], "exchanges": self.exchange.exchanges,
                "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "evals": evals or {}, "worker_reports": {w: out.get(f"worker{w}") for w in range(self.n)}}

    def model(self) -> nn.Module:
        """The whole model: each shard's keys from that shard."""
        model = self.task.build_model()
        _, params = model_keys(model)
        for server, r in zip(self.servers, self.ranges):
            for p, q in zip(params[r.start:r.stop], server.params):
                p.data.copy_(q.detach())
        return model


def run_inproc_sharded(task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                       config: PSConfig, n_workers: int, shards: int) -> Dict[str, Any]:
    """One in-process sharded run (see :class:`ShardedInprocJob`)."""
    return ShardedInprocJob(task, scheme, config, n_workers, shards).run()
