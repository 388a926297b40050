"""Run a whole parameter-server job inside this process: the server and one thread per worker
on the in-process transport (fast tests, debugging, the ``inproc`` simulation backend)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from commlib.comm.inproc import InprocHub
from commlib.errors import ConfigError, WorkerFailure
from commlib.ps.config import PSConfig
from commlib.ps.server import ParameterServer
from commlib.ps.task import Task, build_task
from commlib.ps.worker import PSWorker, WorkerCrashed, WorkerHooks
from commlib.scheme import Scheme


def _scheme(scheme: Union[Scheme, Mapping[str, Any]]) -> Scheme:
    return scheme if isinstance(scheme, Scheme) else Scheme.from_config(scheme)


class LocalJob:
    """What every in-process job holds: the task, the scheme config, the server config, the
    worker count, the fault hooks (worker id -> WorkerHooks, and those of restarted workers)."""

    def __init__(self, task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                 config: PSConfig, n_workers: int, *, hooks: Optional[Dict[int, WorkerHooks]] = None,
                 restart_hooks: Optional[Dict[int, Optional[WorkerHooks]]] = None,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        if int(n_workers) < 1:
            raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
        self.task = build_task(task)
        self._scheme = scheme
        self.config = config
        self.n = int(n_workers)
        self.hooks = dict(hooks or {})
        self.restart_hooks = dict(restart_hooks or {})
        self.on_step = on_step
        self.errors: Dict[int, BaseException] = {}
        self.server: Optional[ParameterServer] = None

    def new_scheme(self) -> Scheme:
        """The scheme for one more endpoint (a config dict is built anew for each)."""
        return _scheme(self._scheme)


class InprocJob(LocalJob):
    """A server and ``n_workers`` worker threads on one :class:`InprocHub`.

    Args:
        task: a Task or a task spec.
        scheme: a Scheme (configuration only: state lives in its halves, so threads may share
            it) or a config dict (each thread builds its own).
        hooks: worker id -> :class:`WorkerHooks` (fault injection). A worker whose hook raises
            :class:`WorkerCrashed` stops and its queue is cut off, as for a dead process.
        restart_after: worker id -> seconds after its crash to start a fresh worker (new
            session, no scheme state) with ``restart_hooks[w]`` (default: no hooks).
    """

    def __init__(self, task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                 config: PSConfig, n_workers: int, *, hooks: Optional[Dict[int, WorkerHooks]] = None,
                 restart_after: Optional[Dict[int, float]] = None,
                 restart_hooks: Optional[Dict[int, Optional[WorkerHooks]]] = None,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        super().__init__(task, scheme, config, n_workers, hooks=hooks, restart_hooks=restart_hooks, on_step=on_step)
        self.restart_after = {int(k): float(v) for k, v in (restart_after or {}).items()}
        self.hub = InprocHub(self.n + 1)
        self.threads: Dict[int, threading.Thread] = {}
        self.workers: Dict[int, PSWorker] = {}
        self.reports: Dict[int, List[Dict[str, Any]]] = {w: [] for w in range(self.n)}
        self.crashes: Dict[int, int] = {w: 0 for w in range(self.n)}
        self._finished = threading.Event()
        self._lock = threading.Lock()

    def start_worker(self, w: int) -> PSWorker:
        """Start worker ``w`` (again, after a crash: a fresh process with an empty queue)."""
        with self._lock:
            old = self.threads.get(w)
            if old is not None:
                if old.is_alive() and old is not threading.current_thread():
                    raise ConfigError(f"worker {w} is still running")
                self.hub.reconnect(w + 1)
            worker = PSWorker(self.hub.endpoint(w + 1), self.new_scheme(), self.task, self.config,
                              hooks=self.hooks.get(w))
            t = threading.Thread(target=self._work, args=(w, worker), daemon=True, name=f"ps-worker{w}")
            self.threads[w] = t
            self.workers[w] = worker
            t.start()
            return worker

    def _work(self, w: int, worker: PSWorker) -> None:
        try:
            self.reports[w].append(worker.run())
        except WorkerCrashed:
            self.hub.disconnect(w + 1)
            rep = worker.report()
            rep["status"] = "crashed"
            self.reports[w].append(rep)
            self.crashes[w] += 1
            if w in self.restart_after and not self._finished.is_set():
                timer = threading.Timer(self.restart_after.pop(w), self._restart, args=(w,))
                timer.daemon = True
                timer.start()
        except BaseException as exc:  # a bug, not a simulated fault: run() raises it
            self.errors[w] = exc
            self.hub.disconnect(w + 1)

    def _restart(self, w: int) -> None:
        if self._finished.is_set():
            return
        self.threads[w].join()
        self.hooks[w] = self.restart_hooks.get(w)
        self.start_worker(w)

    def make_server(self) -> ParameterServer:
        self.server = ParameterServer(self.hub.endpoint(0), self.new_scheme(), self.task, self.config,
                                      on_step=self.on_step)
        return self.server

    def run(self, join_timeout: float = 60.0) -> Dict[str, Any]:
        """Start every worker, run the server to the end, join the workers; return the result."""
        server = self.server or self.make_server()
        for w in range(self.n):
            if w not in self.threads:
                self.start_worker(w)
        try:
            result = server.run()
        finally:
            self._finished.set()
        self.join(join_timeout)
        result["worker_reports"] = dict(self.reports)
        result["crashes"] = dict(self.crashes)
        return result

    def join(self, timeout: float = 60.0) -> None:
        for t in list(self.threads.values()):
            t.join(timeout)
        if self.errors:
            w, exc = next(iter(self.errors.items()))
            raise WorkerFailure(f"worker {w} failed: {type(exc).__name__}: {exc}") from exc


def run_inproc(task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]], config: PSConfig,
               n_workers: int, **kw: Any) -> Dict[str, Any]:
    """One in-process parameter-server run; returns the server's result (+ ``worker_reports``)."""
    return InprocJob(task, scheme, config, n_workers, **kw).run()
