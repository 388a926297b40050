"""A sharded parameter server over torch.distributed (gloo): every shard and every worker
process is a rank of one process group (``commlib.ps.shard_net`` gives the layout).

Under torchrun (``python -m commlib.ps --transport torch --shards K``, ``commlib/ps/launch.py``)
and under mpirun (``--transport mpi``) every rank calls :func:`rank_main`. :class:`ShardedProcessJob` starts the ranks itself on
this machine (gloo on loopback, ``commlib.local.cluster``)::

    from commlib.ps.shard_launch import ShardedProcessJob
    res = ShardedProcessJob({"name": "classification", "dataset": "digits"}, {"aggregator": "krum", "f": 1},
                            PSConfig(steps=20, shards=3), n_workers=64, procs=2).run()
    res["model_state"]          # the whole model, assembled from the shards

Every rank writes to ``out``: ``shard<i>.json`` and ``shard<i>.pt`` (a shard's result and its
keys' tensors), ``workers<rank>.json`` (a worker process's reports), ``error<rank>.txt`` (the
traceback of a rank that failed).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Mapping, Optional

import torch

from commlib.comm.auth import ensure_secret
from commlib.errors import ConfigError, WorkerFailure
from commlib.ps.config import PSConfig
from commlib.ps.shard_net import ShardLayout
from commlib.ps.shard_procs import check_sharding, run_shard_process, sharded_result, wait_seconds


def write_output(out: str, rank: int, got: Mapping[str, Any]) -> None:
    """A rank's result files (plain JSON; tensors with ``torch.save``)."""
    os.makedirs(out, exist_ok=True)
    if got["role"] == "shard":
        with open(os.path.join(out, f"shard{rank}.json"), "w") as f:
            json.dump(got["result"], f, default=float)
        torch.save(got["state"], os.path.join(out, f"shard{rank}.pt"))
    else:
        with open(os.path.join(out, f"workers{rank}.json"), "w") as f:
            json.dump({str(w): r for w, r in got["reports"].items()}, f, default=float)


def collect_out(out: str, task_spec: Mapping[str, Any], layout: ShardLayout) -> Dict[str, Any]:
    """A finished job's result from the ranks' files in ``out`` (tensors read with ``weights_only=True``)."""
    shards = []
    for i in range(layout.k):
        with open(os.path.join(out, f"shard{i}.json")) as f:
            shards.append(json.load(f))
    states = [torch.load(os.path.join(out, f"shard{i}.pt"), map_location="cpu", weights_only=True)
              for i in range(layout.k)]
    reports: Dict[int, Any] = {}
    for r in range(layout.k, layout.world):
        path = os.path.join(out, f"workers{r}.json")
        if os.path.exists(path):  # (on another node under torchrun: not in this directory)
            with open(path) as f:
                reports.update({int(w): v for w, v in json.load(f).items()})
    return dict(sharded_result(task_spec, shards, states, reports), out=out)


def write_job_output(out: str, result: Dict[str, Any]) -> None:
    """``OUT/result.json`` (the shards' results) and ``OUT/model.pt`` (the whole model)."""
    state = result.pop("model_state")
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    torch.save(state, os.path.join(out, "model.pt"))
    totals = [s["totals"]["applied"] for s in result["shards"]]
    print(f"commlib.ps: {result['status']}: {result['steps']} steps on {len(totals)} shards, pushes applied {totals}")


def _gather_on_rank0(out: str, task_spec: Mapping[str, Any], layout: ShardLayout, timeout: float = 60.0) -> None:
    """Rank 0 under torchrun: once every shard wrote its files to ``out`` (one machine, or a
    shared directory), write the job's result.json and model.pt."""
    deadline = time.monotonic() + timeout
    names = [os.path.join(out, f"shard{i}.{ext}") for i in range(layout.k) for ext in ("json", "pt")]
    while not all(os.path.exists(n) for n in names):
        if time.monotonic() > deadline:
            print(f"commlib.ps: not every shard's files are in {out}; collect them with "
                  "commlib.ps.shard_launch.collect_out", file=sys.stderr)
            return
        time.sleep(0.2)
    write_job_output(out, collect_out(out, task_spec, layout))


def launched_world_size(transport: str) -> int:
    """The number of ranks torchrun (``WORLD_SIZE``) or mpirun (``MPI.COMM_WORLD``) started."""
    if transport == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - mpi4py is in the 'mpi' extra
            raise ConfigError("the MPI transport needs mpi4py (pip install 'commlib[mpi]')") from exc
        return MPI.COMM_WORLD.Get_size()
    return int(os.environ.get("WORLD_SIZE", "0"))


def _physical(transport: str, layout: ShardLayout, backend: Optional[str]):
    """This rank's endpoint of the job's transport (authenticated with the job secret)."""
    if transport == "mpi":
        from mpi4py import MPI

        from commlib.comm.mpi import MPITransport

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:  # the router's pump receives while the server sends
            raise ConfigError("a sharded run under mpirun needs MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level = "
                              f"'multiple', the default); this MPI gives level {MPI.Query_thread()}")
        return MPITransport()
    from commlib.comm.torch_dist import TorchDistTransport, init_from_env

    owns = init_from_env(backend)
    import torch.distributed as dist

    # a worker process hears only from the shards; every queue holds a round of its workers' frames
    peers = None if layout.is_shard(dist.get_rank()) else range(layout.k)
    return TorchDistTransport(peers=peers, owns_group=owns, max_outbox=4 * layout.n + 64, close_timeout=5.0)


def rank_main(layout: ShardLayout, task_spec: Mapping[str, Any], scheme_cfg: Mapping[str, Any],
              config: PSConfig, out: str, *, transport: str = "torch", backend: Optional[str] = None,
              gather: bool = False) -> int:
    """One rank of a sharded job on torch.distributed (under torchrun, or started by
    :class:`ShardedProcessJob`; the group is set up from the environment if it is not yet) or on
    MPI (under mpirun). Writes its files to ``out``; ``gather``: rank 0 then writes the job's
    ``result.json`` and ``model.pt``. On torch it leaves the process with ``os._exit`` (a gloo
    receiver thread may still be blocked; see ``commlib/ps/launch.py``); on MPI it returns the
    exit code (MPI must finalise)."""
    rc = 1
    physical = None
    try:
        physical = _physical(transport, layout, backend)
        write_output(out, physical.rank, run_shard_process(physical, layout, task_spec, scheme_cfg, config))
        if gather and physical.rank == 0:
            _gather_on_rank0(out, task_spec, layout)
        rc = 0
    except BaseException:
        os.makedirs(out, exist_ok=True)
        rank = physical.rank if physical is not None else os.environ.get("RANK", os.environ.get("PMI_RANK", "x"))
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
    finally:
        if physical is not None:
            physical.close()
        sys.stdout.flush()
        sys.stderr.flush()
        if transport != "mpi":
            os._exit(rc)
    return rc


def _rank_entry(rank: int, world: int, layout_args: List[int], spec_json: str, out: str) -> None:
    spec = json.loads(spec_json)
    rank_main(ShardLayout(*layout_args), spec["task"], spec["scheme"], PSConfig.from_dict(spec["config"]), out)


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running (stopped by the launcher)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ShardedProcessJob:
    """``config.shards`` shard processes and ``procs`` worker processes (hosting ``n_workers``
    logical workers between them) on this machine, joined by gloo on loopback."""

    def __init__(self, task: Mapping[str, Any], scheme: Mapping[str, Any], config: PSConfig, n_workers: int,
                 procs: int = 1, out: Optional[str] = None, start_method: str = "fork") -> None:
        if not isinstance(task, Mapping) or not isinstance(scheme, Mapping):
            raise ConfigError("a sharded job across processes takes the task and scheme as JSON-able dicts")
        check_sharding(config, task, scheme)
        self.task_spec, self.scheme_cfg, self.config = dict(task), dict(scheme), config
        self.layout = ShardLayout(config.shards, n_workers, procs)
        self.out = out or tempfile.mkdtemp(prefix="commlib-shards-", dir=os.environ.get("COMMLIB_TMP"))
        self.start_method = start_method
        self.context: Any = None

    def start(self) -> None:
        from commlib.local.cluster import start

        ensure_secret()  # every rank inherits the job secret
        if self.start_method == "fork":
            # forked ranks inherit what is imported here: the first optimizer imports
            # torch._dynamo (seconds of CPU), which each rank would otherwise do on its own
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        spec = json.dumps({"task": self.task_spec, "scheme": self.scheme_cfg, "config": self.config.to_dict()})
        lay = self.layout
        self.context = start(_rank_entry, lay.world, [lay.k, lay.n, len(lay.groups)], spec, self.out,
                             errdir=self.out, start_method=self.start_method)

    @property
    def pids(self) -> List[int]:
        """Process ids by rank (shards first)."""
        return list(self.context.pids())

    def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Join every rank; the assembled result, or WorkerFailure naming each failed rank."""
        deadline = time.monotonic() + (wait_seconds(self.config) if timeout is None else timeout)
        procs = self.context.processes
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        codes = [None if p.is_alive() else p.exitcode for p in procs]
        failed = [r for r, c in enumerate(codes) if c != 0]
        if failed:
            raise WorkerFailure("sharded run failed: " + "; ".join(self._describe(r, codes[r]) for r in failed))
        return self.collect()

    def _describe(self, rank: int, code: Optional[int]) -> str:
        who = f"shard {rank}" if self.layout.is_shard(rank) else f"worker process {rank}"
        err = os.path.join(self.out, f"error{rank}.txt")
        last = ""
        if os.path.exists(err):
            lines = [ln for ln in open(err).read().strip().splitlines() if ln.strip()]
            last = f": {lines[-1]}" if lines else ""
        return f"{who} ({_exit_text(code)}){last}"

    def collect(self) -> Dict[str, Any]:
        """The shards' results and the whole model, read from ``out``."""
        return collect_out(self.out, self.task_spec, self.layout)

    def run(self) -> Dict[str, Any]:
        self.start()
        return self.wait()
