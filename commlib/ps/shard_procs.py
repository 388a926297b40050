"""The two roles of a process in a sharded parameter-server job across processes
(``commlib.ps.shard_net``): a shard server, or a host of logical workers. Runtimes (torchrun /
local processes over gloo: ``commlib.ps.shard_launch``; Ray actors: ``commlib.ps.shard_ray``)
give each process its authenticated transport endpoint and call :func:`run_shard_process`.

Results cross back as plain data only: a shard returns its result (JSON-able) and its keys'
tensors (``{name: tensor}``, saved with ``torch.save`` and read with ``weights_only=True``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import torch

from commlib.comm.base import Transport
from commlib.errors import CommlibError, ConfigError
from commlib.ps import checkpoint as ckpt
from commlib.ps.config import PSConfig
from commlib.ps.server import ParameterServer
from commlib.ps.shard_net import NetShardExchange, ShardLayout, ShardRouter
from commlib.ps.sharded_local import ShardedWorker
from commlib.ps.shards import ShardSpec, shard_config, shard_ranges
from commlib.ps.task import build_task, model_keys
from commlib.scheme import Scheme

_IDLE = 0.05  # seconds a worker process waits for frames when none of its workers had any


def check_sharding(config: PSConfig, task_spec: Mapping[str, Any], scheme_cfg: Mapping[str, Any]) -> None:
    """Refuse, before any process starts, what a sharded server cannot run (ConfigError)."""
    ShardSpec(0, 1, range(0, 1), None).select(["x"], [torch.zeros(1)], config, Scheme.from_config(dict(scheme_cfg)),
                                               build_task(dict(task_spec)))


def _checkpoint_step(path: str) -> int:
    return int(ckpt.load(path)["version"]) if os.path.exists(path) else -1


def align_resume(exchange: NetShardExchange, path: str) -> int:
    """Before a shard resumes: every shard resumes from a checkpoint of one step. A shard that
    died in the middle of a round leaves its checkpoint one step behind the others' (a round is
    applied by all or none, so never more); the shards ahead go back to their previous
    checkpoint (``PATH.prev``, kept by sharded servers; none before a shard's first checkpoint:
    then the shards start afresh). Every shard first says whether it can reach the common step;
    unless all can, every shard refuses (ConfigError) and no checkpoint changes. Returns the
    common step (-1: none)."""
    mine = _checkpoint_step(path)
    steps = [int(v) for v in _one_value_each(exchange, mine)]
    target = min(steps)
    prev = f"{path}.prev"
    back = mine > target  # this shard goes back to its previous checkpoint (or to none)
    try:
        have = _checkpoint_step(prev) if back else mine
    except ConfigError:  # an unreadable PATH.prev: this shard cannot go back (said to the others first)
        have = -2
    ready = [bool(v) for v in _one_value_each(exchange, float(have == target))]
    if not all(ready):
        raise ConfigError(f"shard {exchange.index}: the shards' checkpoints are at steps {steps} and shard(s) "
                          f"{[j for j, ok in enumerate(ready) if not ok]} cannot go back to step {target} "
                          f"(PATH.prev, e.g. {prev}): the shards cannot resume to one model; no checkpoint changed")
    if back and target >= 0:
        os.replace(prev, path)
    elif back:
        os.remove(path)  # its first checkpoint was one round ahead of the others: all start afresh
    return target


def _one_value_each(exchange: NetShardExchange, value: float) -> List[float]:
    """Every shard's ``value`` (a one-hot sum over the exchange), in shard order."""
    onehot = torch.zeros(exchange.k, dtype=torch.float64)
    onehot[exchange.index] = float(value)
    return exchange.allreduce(exchange.index, onehot).tolist()


def serve_shard(router: ShardRouter, task_spec: Mapping[str, Any], scheme_cfg: Mapping[str, Any],
                config: PSConfig) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Serve shard ``router.rank``: its result and its keys' final tensors."""
    lay, i = router.layout, router.rank
    task = build_task(dict(task_spec))
    ranges = shard_ranges([p.numel() for p in model_keys(task.build_model())[1]], lay.k)
    exchange = NetShardExchange(router, timeout=4 * config.step_timeout + 30.0)
    config = shard_config(config, i)
    if config.resume and config.checkpoint:
        align_resume(exchange, config.checkpoint)
    server = ParameterServer(router.server_view(), Scheme.from_config(dict(scheme_cfg)), task,
                             config, shard=ShardSpec(i, lay.k, ranges[i], exchange))
    result = server.run()
    result["exchange"] = {"exchanges": exchange.exchanges, "rejected": exchange.rejected,
                          "last_rejection": exchange.last_rejection, "router_rejected": router.rejected,
                          "router_last_rejection": router.last_rejection}
    result["physical"] = router.physical.stats.as_dict()
    return result, {name: p.detach().clone() for name, p in zip(server.keys, server.params)}


def host_workers(router: ShardRouter, task_spec: Mapping[str, Any], scheme_cfg: Mapping[str, Any],
                 config: PSConfig) -> Dict[int, List[Dict[str, Any]]]:
    """Step this process's logical workers (one :class:`ShardedWorker` each, one thread) until
    every shard said SHUTDOWN; a shard process that is gone stops them all ("shard lost")."""
    lay = router.layout
    task = build_task(dict(task_spec))
    ranges = shard_ranges([p.numel() for p in model_keys(task.build_model())[1]], lay.k)
    workers = {w: ShardedWorker([router.worker_view(i, w) for i in range(lay.k)],
                                [Scheme.from_config(dict(scheme_cfg)) for _ in range(lay.k)], task, config, ranges)
               for w in sorted(router.mine)}
    for wk in workers.values():
        wk.start()
    while not all(wk.finished for wk in workers.values()):
        gone = router.shards_gone()
        if gone:
            for wk in workers.values():
                wk.stop(f"shard lost ({gone})")
            break
        progressed = False
        for wk in workers.values():
            if not wk.finished:
                progressed = wk.poll(0.0) or progressed
        if not progressed:
            router.wait_activity(_IDLE)
    return {w: wk.report() for w, wk in workers.items()}


def run_shard_process(physical: Transport, layout: ShardLayout, task_spec: Mapping[str, Any],
                      scheme_cfg: Mapping[str, Any], config: PSConfig) -> Dict[str, Any]:
    """Run this process's role in a sharded job: ``{"role": "shard", "result", "state"}`` or
    ``{"role": "workers", "reports"}``. The caller closes ``physical``."""
    router = ShardRouter(physical, layout)
    try:
        if layout.is_shard(physical.rank):
            result, state = serve_shard(router, task_spec, scheme_cfg, config)
            return {"role": "shard", "result": result, "state": state}
        reports = host_workers(router, task_spec, scheme_cfg, config)
        return {"role": "workers", "reports": reports}
    finally:
        router.close()


def assemble_model(task_spec: Mapping[str, Any], states: List[Mapping[str, torch.Tensor]]) -> torch.nn.Module:
    """The whole model from the shards' ``{name: tensor}`` parts (every key exactly once)."""
    model = build_task(dict(task_spec)).build_model()
    names, params = model_keys(model)
    have: Dict[str, torch.Tensor] = {}
    for st in states:
        for k, v in st.items():
            if k in have:
                raise CommlibError(f"key {k} came from two shards")
            have[k] = v
    missing = [k for k in names if k not in have]
    if missing or len(have) != len(names):
        raise CommlibError(f"the shards' parts do not make the model (missing {missing[:5]})")
    for k, p in zip(names, params):
        if have[k].shape != p.shape:
            raise CommlibError(f"key {k}: shard sent shape {tuple(have[k].shape)}, the model has {tuple(p.shape)}")
        p.data.copy_(have[k])
    return model


def sharded_result(task_spec: Mapping[str, Any], shards: List[Dict[str, Any]],
                   states: List[Mapping[str, torch.Tensor]], reports: Mapping[int, Any]) -> Dict[str, Any]:
    """The job's result: the shards' results, the worker reports and the whole model."""
    model = assemble_model(task_spec, states)
    return {"status": "done" if all(s["status"] == "done" for s in shards) else "stopped",
            "steps": min(s["steps"] for s in shards), "shards": shards,
            "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "worker_reports": dict(reports)}


def wait_seconds(config: PSConfig) -> float:
    """A generous bound on a whole sharded run (for the launchers' joins)."""
    return config.startup_timeout + config.steps * config.step_timeout + 4 * config.shutdown_timeout + 60.0

