"""Run a parameter-server job on Ray: the server in this (driver) process, one actor per worker.

    from commlib.ps.ray_runner import run_ray
    result = run_ray({"name": "classification"}, {"compressor": "topk", "ratio": 0.05, "feedback": "ef21"},
                     PSConfig(steps=100, quorum=3), n_workers=4)                  # local Ray
    result = run_ray(..., address="auto", worker_options={"num_cpus": 1, "scheduling_strategy": "SPREAD"})

Every actor is started from JSON strings (task spec, scheme config, server config, fault
hooks spec, the job secret); the only things that later cross between processes are
``(int, bytes)`` frames, sealed with HMAC-SHA256 under the job secret (``COMMLIB_SECRET``,
generated here when unset; ``commlib/comm/auth.py``).
A worker whose fault hook raises ``WorkerCrashed`` ends its actor process with ``os._exit``
(a real process death); with ``restart_after`` set for that worker, the driver starts a new
actor for it after that many seconds, which rejoins as a fresh process.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from commlib.comm.auth import FrameAuth, auth_disabled, ensure_secret, load_secret
from commlib.comm.ray_transport import LocalInbox, RayTransport, mailbox_actor, ray_start
from commlib.errors import ConfigError
from commlib.ps.config import PSConfig
from commlib.ps.server import ParameterServer
from commlib.ps.task import build_task, import_object
from commlib.scheme import Scheme


def build_hooks(spec: Optional[Mapping[str, Any]], worker: int):
    """Worker hooks from ``{"factory": "module:callable", "options": {...}}`` (called with
    ``worker=`` and the options), or None."""
    if not spec:
        return None
    spec = dict(spec)
    factory = import_object(str(spec.pop("factory")))
    return factory(worker=worker, **dict(spec.pop("options", {}) or {}))


class _WorkerActor:
    """One PS worker inside a Ray actor: ``deliver`` feeds its inbox while ``run`` works."""

    def __init__(self, rank: int, world_size: int, server_inbox: Any, spec_json: str) -> None:
        import torch

        spec = json.loads(spec_json)
        torch.set_num_threads(int(spec.get("threads", 1)))
        self.spec = spec
        self.inbox = LocalInbox()
        self.transport = RayTransport(rank, world_size, peers={0: server_inbox}, inbox=self.inbox,
                                      auth=FrameAuth(spec["secret"]) if spec.get("secret") else None)

    def deliver(self, src: int, stream: int, seq: int, data: bytes) -> bool:
        return self.inbox.deliver(src, stream, seq, data)

    def run(self) -> str:
        from commlib.ps.worker import PSWorker, WorkerCrashed

        spec = self.spec
        w = self.transport.rank - 1
        worker = PSWorker(self.transport, Scheme.from_config(spec["scheme"]), build_task(spec["task"]),
                          PSConfig.from_dict(spec["config"]), hooks=build_hooks(spec.get("hooks"), w))
        try:
            report = worker.run()
        except WorkerCrashed:
            os._exit(1)  # a simulated crash is a real process death
        return json.dumps(report)

    def pid(self) -> int:
        return os.getpid()


class RayJob:
    """A parameter-server job on Ray (local by default, a cluster with ``address=``).

    Args:
        task, scheme, config, n_workers: as for :func:`commlib.ps.run_inproc` (task and scheme
            as JSON-able dicts: they are rebuilt in every actor).
        hooks: worker id -> hooks spec (``{"factory": ..., "options": ...}``; see ``commlib.sim``).
        restart_after: worker id -> seconds after its crash to start a new actor for it, with
            ``restart_hooks[w]`` (default: no hooks).
        worker_options: Ray actor options (default ``{"num_cpus": 0}``).
        num_cpus: CPUs of a local Ray started here.
    """

    def __init__(self, task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int, *,
                 address: Optional[str] = None, num_cpus: Optional[int] = None,
                 hooks: Optional[Dict[int, Mapping[str, Any]]] = None,
                 restart_after: Optional[Dict[int, float]] = None,
                 restart_hooks: Optional[Dict[int, Optional[Mapping[str, Any]]]] = None,
                 worker_options: Optional[Mapping[str, Any]] = None, threads: int = 1,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        if int(n_workers) < 1:
            raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
        if not isinstance(task, Mapping) or not isinstance(scheme, Mapping):
            raise ConfigError("run_ray takes the task and the scheme as JSON-able dicts (rebuilt in each actor)")
        self.task_spec = dict(task)
        self.scheme_cfg = dict(scheme)
        self.config = config
        self.n = int(n_workers)
        self.address, self.num_cpus = address, num_cpus
        self.hooks = {int(k): dict(v) for k, v in (hooks or {}).items()}
        self.restart_after = {int(k): float(v) for k, v in (restart_after or {}).items()}
        self.restart_hooks = {int(k): v for k, v in (restart_hooks or {}).items()}
        self.worker_options = dict(worker_options or {"num_cpus": 0})
        self.threads = int(threads)
        self.on_step = on_step
        self.actors: Dict[int, Any] = {}
        self.refs: Dict[Any, int] = {}
        self.reports: Dict[int, List[Dict[str, Any]]] = {w: [] for w in range(self.n)}
        self.crashes: Dict[int, int] = {w: 0 for w in range(self.n)}
        self._restarts: Dict[int, float] = {}
        self._done = threading.Event()
        self.transport: Optional[RayTransport] = None
        self._secret: Optional[str] = None

    def _spec(self, w: int) -> str:
        return json.dumps({"task": self.task_spec, "scheme": self.scheme_cfg, "config": self.config.to_dict(),
                           "hooks": self.hooks.get(w), "threads": self.threads, "secret": self._secret})

    def start_worker(self, w: int) -> None:
        import ray

        opts = {"max_concurrency": 4, "max_restarts": 0}
        opts.update(self.worker_options)
        actor = ray.remote(_WorkerActor).options(**opts).remote(w + 1, self.n + 1, self._mailbox, self._spec(w))
        self.actors[w] = actor
        self.transport.set_peer(w + 1, actor)
        self.refs[actor.run.remote()] = w

    def _monitor(self) -> None:
        """Collect finished workers; restart crashed ones that are due (driver thread)."""
        import ray

        while not self._done.is_set():
            if self.refs:
                ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=0.2)
                for ref in ready:
                    w = self.refs.pop(ref)
                    try:
                        self.reports[w].append(json.loads(ray.get(ref)))
                    except ray.exceptions.RayActorError:  # the worker's process died
                        self.crashes[w] += 1
                        self.reports[w].append({"worker": w, "status": "crashed"})
                        self.transport.mark_dead(w + 1)
                        if w in self.restart_after:
                            self._restarts[w] = time.monotonic() + self.restart_after.pop(w)
                    except ray.exceptions.RayError as exc:  # an error raised in the worker: a bug
                        self.reports[w].append({"worker": w, "status": "error", "error": str(exc)[-2000:]})
                        self.transport.mark_dead(w + 1)
            else:
                time.sleep(0.2)
            for w, at in list(self._restarts.items()):
                if time.monotonic() >= at:
                    del self._restarts[w]
                    self.hooks[w] = self.restart_hooks.get(w)
                    self.start_worker(w)

    def run(self, join_timeout: float = 30.0) -> Dict[str, Any]:
        import ray

        auth = None if auth_disabled() else FrameAuth(ensure_secret())
        self._secret = None if auth is None else load_secret().decode("utf-8")
        ray_start(self.address, self.num_cpus)
        self._mailbox = mailbox_actor()
        self.transport = RayTransport(0, self.n + 1, peers={}, inbox=self._mailbox, auth=auth)
        server = ParameterServer(self.transport, Scheme.from_config(self.scheme_cfg), build_task(self.task_spec),
                                 self.config, on_step=self.on_step)
        for w in range(self.n):
            self.start_worker(w)
        monitor = threading.Thread(target=self._monitor, daemon=True, name="commlib-ray-monitor")
        monitor.start()
        try:
            result = server.run()
            deadline = time.monotonic() + join_timeout
            while self.refs and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            self._done.set()
            monitor.join(timeout=5.0)
            for actor in list(self.actors.values()) + [self._mailbox]:
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
        result["worker_reports"] = self.reports
        result["crashes"] = self.crashes
        result["model_state"] = server.model.state_dict()
        return result


def run_ray(task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int,
            **kw: Any) -> Dict[str, Any]:
    """One parameter-server run on Ray; returns the server's result (+ ``worker_reports``,
    ``crashes`` and the final ``model_state``)."""
    return RayJob(task, scheme, config, n_workers, **kw).run()
