"""A sharded parameter server on Ray: one actor per shard and per worker process (each worker
actor hosts a group of logical workers), every actor a rank of one Ray transport
(``commlib.comm.ray_transport``; frames sealed with the job secret). The layout and the roles are
those of ``commlib.ps.shard_net`` / ``commlib.ps.shard_procs``.

    from commlib.ps.shard_ray import run_ray_sharded
    res = run_ray_sharded(task_spec, scheme_cfg, PSConfig(steps=20, shards=3), n_workers=64, procs=2)
    res = run_ray_sharded(..., address="auto")       # a Ray cluster: actors spread over its nodes

As in ``commlib.ps.ray_runner``, actors start from JSON strings and return JSON and bytes only: a
shard's tensors travel as ``torch.save`` bytes and are read back with ``weights_only=True``.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import torch

from commlib.comm.auth import FrameAuth, auth_disabled, ensure_secret, load_secret
from commlib.comm.ray_transport import LocalInbox, RayTransport, ray_start
from commlib.errors import ConfigError, WorkerFailure
from commlib.ps.config import PSConfig
from commlib.ps.shard_net import ShardLayout
from commlib.ps.shard_procs import check_sharding, run_shard_process, sharded_result, wait_seconds


class _ShardRankActor:
    """One rank of a sharded job inside a Ray actor: ``deliver`` feeds its inbox while ``run`` works."""

    def __init__(self, rank: int, layout_args: List[int], spec_json: str) -> None:
        spec = json.loads(spec_json)
        torch.set_num_threads(int(spec.get("threads", 1)))
        self.rank, self.spec = int(rank), spec
        self.layout = ShardLayout(*layout_args)
        self.inbox = LocalInbox()

    def deliver(self, src: int, stream: int, seq: int, data: bytes) -> bool:
        return self.inbox.deliver(src, stream, seq, data)

    def pid(self) -> int:
        return os.getpid()

    def run(self, peers: Dict[int, Any]) -> tuple:
        spec = self.spec
        physical = RayTransport(self.rank, self.layout.world, peers={int(r): h for r, h in peers.items()},
                                inbox=self.inbox, auth=FrameAuth(spec["secret"]) if spec.get("secret") else None)
        try:
            got = run_shard_process(physical, self.layout, spec["task"], spec["scheme"],
                                    PSConfig.from_dict(spec["config"]))
            physical.flush(timeout=10.0)
        finally:
            physical.close()
        if got["role"] == "shard":
            buf = io.BytesIO()
            torch.save(got["state"], buf)
            return "shard", json.dumps(got["result"], default=float), buf.getvalue()
        return "workers", json.dumps({str(w): r for w, r in got["reports"].items()}, default=float), b""


def _collect(ray: Any, refs: List[Any], lay: ShardLayout, timeout: float) -> List[Any]:
    """Every rank's return value, in rank order; WorkerFailure as soon as a shard actor fails
    (the other shards could not go on: the run stops) or when all are back and any failed."""
    index = {ref: r for r, ref in enumerate(refs)}
    out: Dict[int, Any] = {}
    failures: List[str] = []
    pending = list(refs)
    deadline = time.monotonic() + timeout
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            failures.append(f"ranks {sorted(index[p] for p in pending)} did not finish within {timeout:.0f} s")
            break
        r = index[ready[0]]
        who = f"shard {r}" if lay.is_shard(r) else f"worker actor {r}"
        try:
            out[r] = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            failures.append(f"{who} died ({str(exc).strip().splitlines()[0][:200]})")
        except ray.exceptions.RayError as exc:
            failures.append(f"{who}: {str(exc).strip().splitlines()[-1][:300]}")
        if failures and lay.is_shard(r):
            break
    if failures:
        raise WorkerFailure("sharded run on Ray failed: " + "; ".join(failures))
    return [out[r] for r in range(len(refs))]


class RayShardedJob:
    """``config.shards`` shard actors and ``procs`` worker actors (``n_workers`` logical workers
    between them) on a local Ray or a cluster (``address``). :meth:`run` returns the shards'
    results and the whole model; a failed actor raises WorkerFailure naming its rank and role."""

    def __init__(self, task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int, *,
                 procs: int = 1, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 actor_options: Optional[Mapping[str, Any]] = None, threads: int = 1) -> None:
        if not isinstance(task, Mapping) or not isinstance(scheme, Mapping):
            raise ConfigError("a sharded job on Ray takes the task and the scheme as JSON-able dicts")
        check_sharding(config, task, scheme)
        self.task, self.scheme, self.config = dict(task), dict(scheme), config
        self.layout = ShardLayout(config.shards, n_workers, procs)
        self.address, self.num_cpus, self.threads = address, num_cpus, int(threads)
        self.options = {"max_concurrency": 4, "max_restarts": 0, "num_cpus": 0}
        self.options.update(actor_options or {})
        self.actors: List[Any] = []
        self.refs: List[Any] = []

    def start(self) -> None:
        import ray

        secret = None
        if not auth_disabled():
            ensure_secret()
            secret = load_secret().decode("utf-8")
        ray_start(self.address, self.num_cpus)
        lay = self.layout
        spec = json.dumps({"task": self.task, "scheme": self.scheme, "config": self.config.to_dict(),
                           "secret": secret, "threads": self.threads})
        self.actors = [ray.remote(_ShardRankActor).options(**self.options).remote(r, [lay.k, lay.n, len(lay.groups)],
                                                                                   spec)
                       for r in range(lay.world)]
        peers = dict(enumerate(self.actors))
        self.refs = [a.run.remote({r: h for r, h in peers.items() if r != i}) for i, a in enumerate(self.actors)]

    def wait(self) -> Dict[str, Any]:
        import ray

        try:
            out = _collect(ray, self.refs, self.layout, wait_seconds(self.config))
        finally:
            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # already gone
                    pass
        shards = [json.loads(o[1]) for o in out if o[0] == "shard"]
        states = [torch.load(io.BytesIO(o[2]), map_location="cpu", weights_only=True) for o in out if o[0] == "shard"]
        reports: Dict[int, Any] = {}
        for o in out:
            if o[0] == "workers":
                reports.update({int(w): v for w, v in json.loads(o[1]).items()})
        return sharded_result(self.task, shards, states, reports)

    def run(self) -> Dict[str, Any]:
        self.start()
        return self.wait()


def run_ray_sharded(task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int,
                    **kw: Any) -> Dict[str, Any]:
    """One sharded run on Ray (see :class:`RayShardedJob`)."""
    return RayShardedJob(task, scheme, config, n_workers, **kw).run()
