"""Virtual workers in-process: the server and a few threads, each stepping a group of logical
workers (``commlib.ps.worker_group``), on one in-process hub. The threaded backend
(``commlib.ps.local``, a thread per worker) is the group-size-1 reference it is tested against.

    from commlib.ps.group_local import run_inproc_groups
    res = run_inproc_groups(task, scheme, PSConfig(steps=20), n_workers=256, groups=2)
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Union

from commlib.comm.base import Transport
from commlib.comm.inproc import InprocHub
from commlib.errors import ConfigError, WorkerFailure
from commlib.ps.config import PSConfig
from commlib.ps.local import LocalJob
from commlib.ps.server import ParameterServer
from commlib.ps.task import Task
from commlib.ps.worker import WorkerHooks
from commlib.ps.worker_group import GroupLink, VirtualPSWorker, WorkerGroup
from commlib.scheme import Scheme


class _Waker:
    """The workers of one group that received frames, and a condition to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.dirty: Set[int] = set()

    def note(self, w: int) -> None:
        with self.cond:
            self.dirty.add(w)
            self.cond.notify()


class NotifyingHub(InprocHub):
    """An :class:`InprocHub` that wakes the group hosting a rank when a message arrives for it."""

    def __init__(self, world_size: int, **kw: Any) -> None:
        super().__init__(world_size, **kw)
        self.wakers: Dict[int, _Waker] = {}

    def deliver(self, src: int, dst: int, data: bytes) -> bool:
        ok = super().deliver(src, dst, data)
        waker = self.wakers.get(dst)
        if ok and waker is not None:
            waker.note(dst - 1)
        return ok


class InprocLink(GroupLink):
    """A group's link on a :class:`NotifyingHub` (worker ``w`` is rank ``w + 1``)."""

    def __init__(self, hub: NotifyingHub, workers: List[int]) -> None:
        self.hub = hub
        self.waker = _Waker()
        for w in workers:
            hub.wakers[w + 1] = self.waker

    def endpoint(self, w: int) -> Transport:
        return self.hub.endpoint(w + 1)

    def disconnect(self, w: int) -> None:
        self.hub.disconnect(w + 1)

    def reconnect(self, w: int) -> None:
        self.hub.reconnect(w + 1)

    def pending(self, w: int) -> bool:
        return self.hub.pending(w + 1) > 0

    def wait(self, timeout: float) -> Set[int]:
        with self.waker.cond:
            if not self.waker.dirty and timeout > 0:
                self.waker.cond.wait(timeout)
            dirty, self.waker.dirty = self.waker.dirty, set()
        return dirty


def split_workers(n_workers: int, groups: int) -> List[List[int]]:
    """Worker ids 0..n-1 in ``groups`` contiguous blocks of (almost) equal size."""
    if int(groups) < 1:
        raise ConfigError(f"groups must be >= 1, got {groups}")
    groups = min(int(groups), int(n_workers))
    size, extra = divmod(int(n_workers), groups)
    out, at = [], 0
    for g in range(groups):
        k = size + (1 if g < extra else 0)
        out.append(list(range(at, at + k)))
        at += k
    return out


class GroupInprocJob(LocalJob):
    """A server and ``groups`` threads hosting ``n_workers`` logical workers on one hub.

    Args: as :class:`commlib.ps.InprocJob` (``hooks`` / ``restart_hooks``: worker id ->
    WorkerHooks), plus ``groups``: threads (each steps a contiguous block of workers).
    """

    def __init__(self, task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                 config: PSConfig, n_workers: int, *, groups: int = 2,
                 hooks: Optional[Dict[int, WorkerHooks]] = None,
                 restart_after: Optional[Dict[int, float]] = None,
                 restart_hooks: Optional[Dict[int, Optional[WorkerHooks]]] = None,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        super().__init__(task, scheme, config, n_workers, hooks=hooks, restart_hooks=restart_hooks, on_step=on_step)
        self.hub = NotifyingHub(self.n + 1)
        self.groups = [WorkerGroup(InprocLink(self.hub, ws), self._make_worker, ws, config,
                                   restart_after=restart_after) for ws in split_workers(self.n, groups)]

    def _make_worker(self, w: int, transport: Transport, restarted: bool) -> VirtualPSWorker:
        hooks = self.restart_hooks.get(w) if restarted else self.hooks.get(w)
        return VirtualPSWorker(transport, self.new_scheme(), self.task, self.config, hooks=hooks)

    def _run_group(self, g: int) -> None:
        try:
            self.groups[g].run()
        except BaseException as exc:  # a bug, not a simulated fault: run() raises it
            self.errors[g] = exc
            for w in self.groups[g].slots:
                self.hub.disconnect(w + 1)

    def run(self, join_timeout: float = 60.0) -> Dict[str, Any]:
        """Start every group, run the server to the end, join the groups; return the result."""
        self.server = ParameterServer(self.hub.endpoint(0), self.new_scheme(), self.task, self.config,
                                      on_step=self.on_step)
        threads = [threading.Thread(target=self._run_group, args=(g,), daemon=True, name=f"ps-group{g}")
                   for g in range(len(self.groups))]
        for t in threads:
            t.start()
        try:
            result = self.server.run()
        finally:
            for group in self.groups:
                group.stop(join_timeout)
        for t in threads:
            t.join(join_timeout + 5.0)
        if self.errors:
            g, exc = next(iter(self.errors.items()))
            raise WorkerFailure(f"worker group {g} failed: {type(exc).__name__}: {exc}") from exc
        reports: Dict[int, List[Dict[str, Any]]] = {}
        crashes: Dict[int, int] = {}
        for group in self.groups:
            reports.update(group.reports)
            crashes.update(group.crashes)
        result["worker_reports"] = dict(sorted(reports.items()))
        result["crashes"] = dict(sorted(crashes.items()))
        result["groups"] = len(self.groups)
        return result


def run_inproc_groups(task: Union[Task, Mapping[str, Any]], scheme: Union[Scheme, Mapping[str, Any]],
                      config: PSConfig, n_workers: int, **kw: Any) -> Dict[str, Any]:
    """One in-process run with virtual workers; returns the server's result (+ ``worker_reports``)."""
    return GroupInprocJob(task, scheme, config, n_workers, **kw).run()
