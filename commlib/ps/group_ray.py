"""Virtual workers on Ray: a few actors (one per CPU by default), each hosting a group of
logical workers (``commlib.ps.worker_group``); the server in the driver talks to them with
bundled deliveries (``commlib.comm.ray_bundle``).

    from commlib.ps.group_ray import run_ray_groups
    res = run_ray_groups(task_spec, scheme_cfg, PSConfig(steps=20, quorum=990), 1000)  # local Ray
    res = run_ray_groups(..., address="auto")          # a Ray cluster: one actor per cluster CPU

As in ``commlib.ps.ray_runner``, every actor is started from JSON strings and only bytes
cross between processes. Logical worker ``w`` is rank ``w + 1`` with its own message stream:
the server sees the same frames and sender ids as from one process per worker. A crash of a
logical worker throws away its state only (its actor and its process-mates go on); the group
refuses deliveries to it, so the server's transport marks it dead, and restarts it (a new
session with no state) after ``restart_after`` seconds, inside the same actor.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from commlib.comm.auth import AUTH_OVERHEAD, FrameAuth, auth_disabled, ensure_secret, load_secret
from commlib.comm.base import Received, Transport
from commlib.comm.bundle import Bundled, pack_bundle, pack_ranks, unpack_bundle
from commlib.comm.ray_bundle import BundleRayTransport, bundle_mailbox_actor
from commlib.comm.ray_transport import LocalInbox, ray_start
from commlib.errors import ConfigError, PayloadError
from commlib.ps.config import PSConfig
from commlib.ps.group_local import split_workers
from commlib.ps.ray_runner import build_hooks
from commlib.ps.server import ParameterServer
from commlib.ps.task import build_task
from commlib.ps.worker_group import GroupLink, VirtualPSWorker, WorkerGroup
from commlib.scheme import Scheme


class _RayGroupLink(GroupLink):
    """Inside a group actor: one ``LocalInbox`` per logical worker (kept across its crashes,
    so the server's message numbering stays in step), sends queued and shipped as bundles."""

    def __init__(self, world_size: int, workers: List[int], mailbox: Any, max_message_bytes: int,
                 secret: Optional[str] = None) -> None:
        import ray

        self._ray = ray
        self.world_size = int(world_size)
        self.max_message_bytes = int(max_message_bytes)
        self.secret = secret  # the job secret: every logical worker seals its frames (commlib/comm/auth.py)
        wire_max = self.max_message_bytes + AUTH_OVERHEAD
        self.inboxes = {w: LocalInbox(wire_max) for w in workers}
        self.mailbox = mailbox
        self.down: Set[int] = set()
        self.dirty: Set[int] = set()
        self.cond = threading.Condition()
        self.outbox: List[Bundled] = []
        self._out_lock = threading.Lock()
        self._calls: List[Any] = []
        self.refused_bundles = 0
        self.bundles_sent = 0

    def endpoint(self, w: int) -> Transport:
        return _GroupEndpoint(self, w, auth=FrameAuth(self.secret) if self.secret else None)

    def _drain(self, w: int) -> None:
        while self.inboxes[w].take(0) is not None:
            pass

    def disconnect(self, w: int) -> None:
        with self.cond:
            self.down.add(w)
            self._drain(w)

    def reconnect(self, w: int) -> None:
        with self.cond:
            self.down.discard(w)
            self._drain(w)

    def pending(self, w: int) -> bool:
        return self.inboxes[w].pending() > 0

    def deliver_bundle(self, blob: bytes) -> bytes:
        """Frames from the server (actor threads call this); returns the ranks refused."""
        try:
            items = unpack_bundle(blob, self.max_message_bytes + AUTH_OVERHEAD)
        except PayloadError:
            self.refused_bundles += 1
            return b""
        refused = set()
        with self.cond:
            for it in items:
                w = it.dst - 1
                inbox = self.inboxes.get(w)
                if inbox is None:
                    refused.add(it.dst)
                    continue
                inbox.deliver(it.src, it.stream, it.seq, it.data)  # in order, even while down
                if w in self.down:
                    self._drain(w)
                    refused.add(it.dst)
                else:
                    self.dirty.add(w)
            self.cond.notify()
        return pack_ranks(sorted(refused))

    def wait(self, timeout: float) -> Set[int]:
        with self.cond:
            if not self.dirty and timeout > 0:
                self.cond.wait(timeout)
            dirty, self.dirty = self.dirty, set()
        return dirty

    def queue(self, item: Bundled) -> None:
        with self._out_lock:
            self.outbox.append(item)

    def flush(self) -> None:
        with self._out_lock:
            items, self.outbox = self.outbox, []
        if items:
            self._calls.append(self.mailbox.deliver_bundle.remote(pack_bundle(items)))
            self.bundles_sent += 1
        if len(self._calls) > 16:
            _, self._calls = self._ray.wait(self._calls, num_returns=len(self._calls), timeout=0)


class _GroupEndpoint(Transport):
    """Logical worker ``w``'s endpoint (rank ``w + 1``): a message stream of its own."""

    def __init__(self, link: _RayGroupLink, w: int, **transport_kw: Any) -> None:
        super().__init__(w + 1, link.world_size, link.max_message_bytes, **transport_kw)
        self.link = link
        self.w = w
        self._stream = int.from_bytes(os.urandom(4), "little")
        self._seq: Dict[int, int] = {}

    def _send(self, dst: int, data: bytes) -> bool:
        seq = self._seq.get(dst, 0)
        self._seq[dst] = seq + 1
        self.link.queue(Bundled(self.rank, dst, self._stream, seq, data))
        return True

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        return self.link.inboxes[self.w].take(timeout)

    def _close(self) -> None:
        pass


class _GroupActor:
    """A Ray actor hosting the logical workers ``spec["workers"]``."""

    def __init__(self, world_size: int, mailbox: Any, spec_json: str) -> None:
        import torch

        spec = json.loads(spec_json)
        torch.set_num_threads(int(spec.get("threads", 1)))
        self.workers = [int(w) for w in spec["workers"]]
        self.scheme_cfg = spec["scheme"]
        self.task = build_task(spec["task"])
        self.config = PSConfig.from_dict(spec["config"])
        self.hooks = {int(k): v for k, v in (spec.get("hooks") or {}).items()}
        self.restart_hooks = {int(k): v for k, v in (spec.get("restart_hooks") or {}).items()}
        self.link = _RayGroupLink(world_size, self.workers, mailbox, int(spec["max_message_bytes"]),
                                  secret=spec.get("secret"))
        self.group = WorkerGroup(self.link, self._make_worker, self.workers, self.config,
                                 restart_after={int(k): v for k, v in (spec.get("restart_after") or {}).items()})

    def _make_worker(self, w: int, transport: Transport, restarted: bool) -> VirtualPSWorker:
        spec = self.restart_hooks.get(w) if restarted else self.hooks.get(w)
        return VirtualPSWorker(transport, Scheme.from_config(self.scheme_cfg), self.task, self.config,
                               hooks=build_hooks(spec, w))

    def deliver_bundle(self, blob: bytes) -> bytes:
        return self.link.deliver_bundle(blob)

    def run(self) -> str:
        t0 = time.monotonic()
        reports = self.group.run()
        return json.dumps({"reports": {str(w): r for w, r in reports.items()},
                           "crashes": {str(w): c for w, c in self.group.crashes.items()},
                           "passes": self.group.passes, "bundles_sent": self.link.bundles_sent,
                           "pid": os.getpid(), "run_s": time.monotonic() - t0, "peak_rss_mb": peak_rss_mb()})

    def stop(self, grace_s: float) -> bool:
        self.group.stop(grace_s)
        return True


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class GroupRayJob:
    """A parameter-server job on Ray with ``processes`` actors hosting ``n_workers`` logical workers.

    Args: as :class:`commlib.ps.ray_runner.RayJob` (hooks as JSON specs), plus
        processes: actors (default: the cluster's CPUs, at most one per worker).
        worker_options: Ray options of the group actors (default ``{"num_cpus": 0}`` on a
            local Ray; ``{"num_cpus": 1, "scheduling_strategy": "SPREAD"}`` with ``address``).
    """

    def __init__(self, task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int, *,
                 processes: Optional[int] = None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 hooks: Optional[Dict[int, Mapping[str, Any]]] = None,
                 restart_after: Optional[Dict[int, float]] = None,
                 restart_hooks: Optional[Dict[int, Optional[Mapping[str, Any]]]] = None,
                 worker_options: Optional[Mapping[str, Any]] = None, threads: int = 1,
                 max_message_bytes: int = 1 << 30,
                 on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        if int(n_workers) < 1:
            raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
        if processes is not None and int(processes) < 1:
            raise ConfigError(f"processes must be >= 1, got {processes}")
        if not isinstance(task, Mapping) or not isinstance(scheme, Mapping):
            raise ConfigError("run_ray_groups takes the task and the scheme as JSON-able dicts")
        self.task_spec, self.scheme_cfg, self.config, self.n = dict(task), dict(scheme), config, int(n_workers)
        self.processes = processes
        self.address, self.num_cpus = address, num_cpus
        self.hooks = {int(k): dict(v) for k, v in (hooks or {}).items() if v}
        self.restart_after = {int(k): float(v) for k, v in (restart_after or {}).items()}
        self.restart_hooks = {int(k): v for k, v in (restart_hooks or {}).items() if v}
        default = {"num_cpus": 1, "scheduling_strategy": "SPREAD"} if address else {"num_cpus": 0}
        self.worker_options = dict(worker_options or default)
        self.threads = int(threads)
        self.max_message_bytes = int(max_message_bytes)
        self.on_step = on_step
        self.timings: Dict[str, float] = {}

    def _spec(self, block: List[int], secret: Optional[str]) -> str:
        pick = lambda d: {str(w): d[w] for w in block if w in d}  # noqa: E731
        return json.dumps({"workers": block, "task": self.task_spec, "scheme": self.scheme_cfg,
                           "config": self.config.to_dict(), "threads": self.threads,
                           "hooks": pick(self.hooks), "restart_hooks": pick(self.restart_hooks),
                           "restart_after": pick(self.restart_after), "max_message_bytes": self.max_message_bytes,
                           "secret": secret})

    def run(self, join_timeout: float = 30.0) -> Dict[str, Any]:
        import ray

        t0 = time.monotonic()
        auth = None if auth_disabled() else FrameAuth(ensure_secret())
        secret = None if auth is None else load_secret().decode("utf-8")
        ray_start(self.address, self.num_cpus)
        self.timings["ray_start_s"] = time.monotonic() - t0
        procs = min(self.n, int(self.processes or cluster_cpus()))
        blocks = split_workers(self.n, procs)
        mailbox = bundle_mailbox_actor()
        opts = {"max_concurrency": 4, "max_restarts": 0}
        opts.update(self.worker_options)
        actors = [ray.remote(_GroupActor).options(**opts).remote(self.n + 1, mailbox, self._spec(b, secret))
                  for b in blocks]
        peers = {w + 1: actors[g] for g, b in enumerate(blocks) for w in b}
        transport = BundleRayTransport(0, self.n + 1, peers, mailbox, max_message_bytes=self.max_message_bytes,
                                       auth=auth)
        first_step: List[float] = []

        def on_step(rec: Dict[str, Any]) -> None:
            if not first_step:
                first_step.append(time.monotonic())
            if self.on_step is not None:
                self.on_step(rec)

        server = ParameterServer(transport, Scheme.from_config(self.scheme_cfg), build_task(self.task_spec),
                                 self.config, on_step=on_step)
        refs = {actor.run.remote(): g for g, actor in enumerate(actors)}
        reports: Dict[int, List[Dict[str, Any]]] = {w: [] for w in range(self.n)}
        crashes: Dict[int, int] = {w: 0 for w in range(self.n)}
        groups: List[Dict[str, Any]] = []
        try:
            t1 = time.monotonic()
            result = server.run()
            self.timings["server_run_s"] = time.monotonic() - t1
        finally:
            t2 = time.monotonic()
            for actor in actors:
                actor.stop.remote(join_timeout)
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=join_timeout + 10.0)
            for ref in ready:
                g = refs[ref]
                try:
                    out = json.loads(ray.get(ref))
                except ray.exceptions.RayError as exc:  # the group's process died or a bug
                    for w in blocks[g]:
                        reports[w].append({"worker": w, "status": "error", "error": str(exc)[-2000:]})
                    continue
                for w, r in out.pop("reports").items():
                    reports[int(w)] = r
                for w, c in out.pop("crashes").items():
                    crashes[int(w)] = c
                groups.append({"group": g, "workers": len(blocks[g]), **out})
            self.timings["join_s"] = time.monotonic() - t2
            transport.close()
            for actor in actors + [mailbox]:
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
        result["worker_reports"] = reports
        result["crashes"] = crashes
        result["groups"] = sorted(groups, key=lambda g: g["group"])
        result["model_state"] = server.model.state_dict()
        self.timings["total_s"] = time.monotonic() - t0
        if first_step:  # from the call to the first applied step: Ray, actors, workers, HELLOs, round 0
            self.timings["to_first_step_s"] = first_step[0] - t0
        self.timings["driver_peak_rss_mb"] = peak_rss_mb()
        result["timings"] = dict(self.timings)
        result["bundles"] = {"sent": transport.bundles_sent, "received": transport.bundles_received}
        return result


def run_ray_groups(task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int,
                   **kw: Any) -> Dict[str, Any]:
    """One parameter-server run on Ray with virtual workers; returns the server's result (+
    ``worker_reports``, ``crashes``, ``groups``, ``timings`` and the final ``model_state``)."""
    return GroupRayJob(task, scheme, config, n_workers, **kw).run()
