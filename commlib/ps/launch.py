"""Entry point of a parameter-server job on any transport.

    torchrun --standalone --nproc_per_node 3 -m commlib.ps --transport torch --steps 50 --out runs/ps
    mpirun -n 3 python -m commlib.ps --transport mpi --mode async --steps 200 --out runs/ps
    mpirun -n 5 python -m commlib.ps --transport mpi --shards 3 --workers 64 --out runs/ps   (sharded)
    python -m commlib.ps --transport ray --workers 4 [--address auto] --out runs/ps
    python -m commlib.ps --transport inproc --workers 4 --out runs/ps

A sharded server (``--shards K``, parameters split over K server processes; ``commlib/ps/shards.py``):

    torchrun --standalone --nproc_per_node 5 -m commlib.ps --transport torch --shards 3 --workers 64 --out runs/ps
    python -m commlib.ps --transport local --shards 3 --workers 64 --procs 2 --out runs/ps
    python -m commlib.ps --transport ray --shards 3 --workers 64 --procs 2 [--address auto] --out runs/ps

Under torchrun and mpirun rank 0 serves and every other rank works; with ray and inproc this
process serves and starts the workers (Ray actors, or threads). Sharded, ranks 0..K-1 are the
shards and the other ranks (``--procs`` local processes or Ray actors) host the ``--workers``
logical workers between them; ``local`` starts those ranks here, joined by gloo on loopback.

Task, scheme and server options are JSON (``--task``, ``--scheme``, ``--ps``) with shortcuts for
the common ones; every rank parses the same command line. The server writes
``OUT/result.json`` (counters, history, evaluations) and ``OUT/model.pt`` (final weights);
each worker writes ``OUT/worker<w>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, Dict, List, Optional

import torch

from commlib.errors import CommlibError, ConfigError
from commlib.ps.config import PSConfig

TRANSPORT_CHOICES = ("torch", "mpi", "ray", "inproc", "local")


def _json_arg(text: str, what: str) -> Dict[str, Any]:
    if os.path.exists(text):
        with open(text) as f:
            text = f.read()
    try:
        val = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--{what}: not JSON ({exc})") from None
    if not isinstance(val, dict):
        raise ConfigError(f"--{what}: expected a JSON object")
    return val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m commlib.ps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=TRANSPORT_CHOICES, required=True)
    p.add_argument("--backend", default=None, help="torch transport: gloo (default on CPU) or nccl")
    p.add_argument("--workers", type=int, default=None,
                   help="ray / inproc / local: number of workers (default 2); sharded torchrun: logical workers "
                        "(default: one per non-shard rank)")
    p.add_argument("--shards", type=int, default=None, help="server shards (PSConfig.shards; default 1)")
    p.add_argument("--procs", type=int, default=1, help="sharded local / ray: worker processes (actors)")
    p.add_argument("--address", default=None, help="ray: join this cluster (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="ray: CPUs of the local Ray")
    p.add_argument("--spread", action="store_true", help="ray: one CPU per worker actor, spread over the nodes")
    p.add_argument("--task", default='{"name": "classification", "dataset": "digits"}',
                   help="task spec as JSON (or a JSON file)")
    p.add_argument("--scheme", default='{"compressor": "identity"}', help="Scheme config as JSON (or a file)")
    p.add_argument("--ps", default="{}", help="PSConfig options as JSON (or a file); the flags below override")
    p.add_argument("--mode", choices=("sync", "async"))
    p.add_argument("--steps", type=int)
    p.add_argument("--quorum", type=int)
    p.add_argument("--step-timeout", type=float)
    p.add_argument("--max-staleness", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--checkpoint")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default="runs/ps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    return p


def _config(args) -> PSConfig:
    d = _json_arg(args.ps, "ps")
    for flag, key in (("mode", "mode"), ("steps", "steps"), ("quorum", "quorum"), ("step_timeout", "step_timeout"),
                      ("max_staleness", "max_staleness"), ("checkpoint", "checkpoint")):
        v = getattr(args, flag)
        if v is not None:
            d[key] = v
    if args.resume:
        d["resume"] = True
    if args.shards is not None:
        d["shards"] = args.shards
    if args.lr is not None:
        d.setdefault("optimizer", {})["lr"] = args.lr
    return PSConfig.from_dict(d)


def _transport(args):
    if args.transport == "torch":
        from commlib.comm.torch_dist import TorchDistTransport, init_from_env

        owns = init_from_env(args.backend)
        import torch.distributed as dist

        peers = None if dist.get_rank() == 0 else [0]
        return TorchDistTransport(peers=peers, owns_group=owns)
    from commlib.comm.mpi import MPITransport

    return MPITransport()


def _write(out: str, result: Dict[str, Any], model_state: Dict[str, torch.Tensor]) -> None:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    torch.save(model_state, os.path.join(out, "model.pt"))
    print(f"commlib.ps: {result['status']}: {result['steps']} steps in {result['elapsed_s']:.1f}s, "
          f"{result['totals']}")


def _run_driver(args, task_spec: Dict[str, Any], scheme_cfg: Dict[str, Any], config: PSConfig) -> int:
    """ray / inproc: this process is the server and starts the workers."""
    if args.transport == "ray":
        from commlib.ps.ray_runner import run_ray

        result = run_ray(task_spec, scheme_cfg, config, args.workers, address=args.address, num_cpus=args.num_cpus,
                         threads=args.threads,
                         worker_options={"num_cpus": 1, "scheduling_strategy": "SPREAD"} if args.spread else None)
        state = result.pop("model_state")
    else:
        from commlib.ps.local import InprocJob

        job = InprocJob(task_spec, scheme_cfg, config, args.workers)
        result = job.run()
        state = job.server.model.state_dict()
    reports = result.pop("worker_reports", {})
    for w, reps in reports.items():
        with open(os.path.join(args.out, f"worker{w}.json"), "w") as f:
            json.dump(reps[-1] if reps else {}, f, indent=1, default=float)
    _write(args.out, result, state)
    return 0 if result["status"] == "done" else 1


def _run_sharded(args, task_spec: Dict[str, Any], scheme_cfg: Dict[str, Any], config: PSConfig) -> int:
    """``--shards K`` (K > 1): the shards and the worker processes (``commlib/ps/shard_launch.py``)."""
    from commlib.ps import shard_launch

    if args.transport in ("torch", "mpi"):
        from commlib.ps.shard_net import ShardLayout

        world = shard_launch.launched_world_size(args.transport)
        if world <= config.shards:
            raise ConfigError(f"--shards {config.shards} needs more than {config.shards} ranks (the shards, then "
                              f"the worker processes); this job has {world}")
        layout = ShardLayout(config.shards, args.workers or world - config.shards, world - config.shards)
        return shard_launch.rank_main(layout, task_spec, scheme_cfg, config, args.out, transport=args.transport,
                                      backend=args.backend, gather=True)
    if args.transport == "ray":
        from commlib.ps.shard_ray import run_ray_sharded

        result = run_ray_sharded(task_spec, scheme_cfg, config, args.workers or 2, procs=args.procs,
                                 address=args.address, num_cpus=args.num_cpus, threads=args.threads)
    elif args.transport == "local":
        result = shard_launch.ShardedProcessJob(task_spec, scheme_cfg, config, args.workers or 2, procs=args.procs,
                                                out=args.out).run()
    elif args.transport == "inproc":
        from commlib.ps.sharded_local import run_inproc_sharded

        result = run_inproc_sharded(task_spec, scheme_cfg, config, args.workers or 2, config.shards)
    else:
        raise ConfigError(f"--transport {args.transport} cannot run a sharded server")
    shard_launch.write_job_output(args.out, result)
    return 0 if result["status"] == "done" else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from commlib.ps.server import ParameterServer
    from commlib.ps.task import build_task
    from commlib.ps.worker import PSWorker
    from commlib.scheme import Scheme

    try:
        config = _config(args)
        task_spec, scheme_cfg = _json_arg(args.task, "task"), _json_arg(args.scheme, "scheme")
        task = build_task(task_spec)
        scheme = Scheme.from_config(scheme_cfg)
        os.makedirs(args.out, exist_ok=True)
        if config.shards > 1:
            from commlib.ps.shard_procs import check_sharding

            check_sharding(config, task_spec, scheme_cfg)
            return _run_sharded(args, task_spec, scheme_cfg, config)
        if args.transport == "local":
            raise ConfigError("--transport local starts the ranks of a sharded server (--shards K > 1); "
                              "an unsharded job runs under torchrun, mpirun, ray or inproc")
        if args.workers is None:
            args.workers = 2
        if args.transport in ("ray", "inproc"):
            return _run_driver(args, task_spec, scheme_cfg, config)
        transport = _transport(args)
    except CommlibError as exc:
        print(f"commlib.ps: error: {exc}", file=sys.stderr)
        return 2
    rc = 1
    try:
        if transport.rank == 0:
            server = ParameterServer(transport, scheme, task, config)
            _write(args.out, server.run(), server.model.state_dict())
        else:
            report = PSWorker(transport, scheme, task, config).run()
            with open(os.path.join(args.out, f"worker{transport.rank - 1}.json"), "w") as f:
                json.dump(report, f, indent=1)
        rc = 0
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        transport.close()
        if args.transport == "torch":
            # A gloo receiver thread may still be blocked in a receive; letting the interpreter run
            # gloo's C++ destructors under it can abort the finished process ("terminate called
            # without an active exception"). Results are written: flush and leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
