"""Spawn N worker processes on this machine with a gloo process group on loopback.

The rendezvous store and gloo's sockets listen on 127.0.0.1 only
(``commlib.comm.torch_dist.init_process_group_bound``)."""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commlib.comm.torch_dist import init_process_group_bound
from commlib.errors import WorkerFailure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: Sequence[Any], errdir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        init_process_group_bound("gloo", rank, world, "127.0.0.1", port, "127.0.0.1",
                                 datetime.timedelta(minutes=30))
        fn(rank, world, *args)
    except BaseException:
        os.makedirs(errdir, exist_ok=True)
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start(fn: Callable, world: int, *args: Any, errdir: str, threads: int = 1,
          start_method: str = "fork") -> "mp.ProcessContext":
    """Start fn(rank, world, *args) on ``world`` local processes joined by gloo on loopback and
    return at once (the context's ``processes`` and ``pids()``; the caller joins them)."""
    if world < 1:
        raise ValueError("world must be >= 1")
    return mp.start_processes(_entry, args=(world, free_port(), fn, args, errdir, threads), nprocs=world,
                              join=False, start_method=start_method)


def launch(fn: Callable, world: int, *args: Any, errdir: str, threads: int = 1) -> None:
    """Run fn(rank, world, *args) on ``world`` local processes; raise WorkerFailure with the
    failing ranks' tracebacks if any of them dies."""
    if world < 1:
        raise ValueError("world must be >= 1")
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, errdir, threads), nprocs=world,
                           join=True, start_method="fork")
    except Exception as exc:
        errs = sorted(f for f in os.listdir(errdir) if f.endswith(".err")) if os.path.isdir(errdir) else []
        detail = "\n".join(open(os.path.join(errdir, f)).read() for f in errs)
        raise WorkerFailure(f"a worker process failed: {exc}\n{detail}") from None
