"""HookState: everything the commlib DDP hook keeps between calls.

It holds this rank's worker half and its replica of the server half, keyed by parameter name
(never by DDP bucket index: DDP rebuilds its buckets after the first iteration).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Mapping, Optional, Set

import torch
import torch.distributed as dist

from commlib.ddp import checks, packed
from commlib.errors import ConfigError
from commlib.scheme import CommStats, Scheme


class HookState:
    """State for :func:`commlib.ddp.hook`; pass it to ``ddp_model.register_comm_hook(state, hook)``
    (Lightning: :class:`commlib.integrations.lightning.CommlibCallback`; Accelerate:
    :func:`commlib.integrations.accelerate.register`).

    Whatever the route, the first step of an optimizer that updates the hooked parameters runs
    :func:`commlib.ddp.check_optimizer` (double momentum is refused), and a state whose hook
    has not run by the first optimizer step gives a ``HookNotRunWarning``.

    Args:
        scheme: the Scheme to run (every rank must use the same one).
        process_group: defaults to the default group.
        model: optional module whose ``named_parameters()`` give the state keys; without it
            keys are ``param<i>`` in order of first appearance (stable for a given model and
            DDP config). Call :meth:`bind` later to name them.
        blocking: wait for each collective inside the hook (debugging; no overlap).
    """

    def __init__(self, scheme: Scheme, process_group: Optional[dist.ProcessGroup] = None,
                 model: Optional[torch.nn.Module] = None, blocking: bool = False) -> None:
        if not isinstance(scheme, Scheme):
            raise ConfigError(f"HookState needs a commlib.Scheme, got {type(scheme).__name__}")
        self.scheme = scheme
        self.process_group = process_group
        self.blocking = bool(blocking)
        self._names: Dict[int, str] = {}
        self._next = 0
        self._worker = None
        self._server = None
        self._in_step = False
        self._lock = threading.Lock()
        self._buffers: Dict[Any, torch.Tensor] = {}
        self._outputs: Dict[Any, packed.OutputBuffer] = {}
        self.rejected_by_rank: Dict[int, int] = {}
        self.hook_runs = 0  # communication rounds this state has run (0: the hook never ran)
        self._checked_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._warned_not_run = False
        if model is not None:
            self.bind(model)
        checks.watch(self)

    # -- lazy world info (the group may not exist when the state is built, e.g. in Lightning) --
    def _init_world(self) -> None:
        if self._worker is None:
            if not dist.is_available() or not dist.is_initialized():
                raise ConfigError("commlib's DDP hook needs torch.distributed to be initialised")
            rank = dist.get_rank(self.process_group)
            world = dist.get_world_size(self.process_group)
            self.scheme.aggregator.check_n(world)  # e.g. Krum needs n >= 2f + 3: say so before training
            self._worker = self.scheme.worker(rank, world)
            self._server = self.scheme.server(world)
            if hasattr(self, "_pending_state"):
                self._apply_state(self._pending_state)
                del self._pending_state

    @property
    def worker(self):
        self._init_world()
        return self._worker

    @property
    def server(self):
        self._init_world()
        return self._server

    @property
    def rank(self) -> int:
        return self.worker.rank

    @property
    def world_size(self) -> int:
        return self.worker.world_size

    @property
    def stats(self) -> CommStats:
        """Traffic counters of this rank (``stats.last`` is the latest step)."""
        return self.worker.stats

    # -- parameter keys ---------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> "HookState":
        """Key state by ``model.named_parameters()`` names (pass the DDP module or its .module)."""
        module = getattr(model, "module", model)
        self._names = {id(p): n for n, p in module.named_parameters()}
        return self

    @property
    def param_ids(self) -> Set[int]:
        """ids of the parameters this state knows (bound, or seen by the hook)."""
        return set(self._names)

    def key_of(self, param: torch.Tensor) -> str:
        key = self._names.get(id(param))
        if key is None:
            key = self._names[id(param)] = f"param{self._next}"
            self._next += 1
        return key

    # -- buffers reused across steps ------------------------------------------------
    def buffer(self, tag: Any, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tag, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def output_buffer(self, tag: Any) -> packed.OutputBuffer:
        """The reusable result buffer of one group (see :class:`commlib.ddp.packed.OutputBuffer`)."""
        out = self._outputs.get(tag)
        if out is None:
            out = self._outputs[tag] = packed.OutputBuffer()
        return out

    # -- step bookkeeping (main thread only) -----------------------------------------------
    def begin_bucket(self) -> None:
        if not self._in_step:
            self._in_step = True
            self.hook_runs += 1
            self.worker.begin_step()

    def end_bucket(self, is_last: bool) -> None:
        if is_last:
            self._in_step = False
            self.worker.end_step()
            self.server.end_step()

    def count_rejected(self, rank: int) -> None:
        with self._lock:
            self.rejected_by_rank[rank] = self.rejected_by_rank.get(rank, 0) + 1
            self.worker.stats.rejected += 1
            self.server.rejected += 1

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """This rank's worker state + its server replica (one per rank: worker state differs
        per rank; :func:`commlib.ddp.gather_state` collects every rank's into one object)."""
        return {"worker": self.worker.state_dict(), "server": self.server.state_dict(),
                "names": dict(sorted((n, i) for i, n in enumerate(self._names.values()))),
                "scheme": self.scheme.describe(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore this rank's state. Refuses a state saved for another scheme, rank or world size."""
        if not isinstance(sd, Mapping) or "worker" not in sd or "server" not in sd:
            raise ConfigError("not a commlib HookState state_dict (expected keys 'worker', 'server', 'scheme'); "
                              "for the output of commlib.ddp.gather_state use commlib.ddp.load_gathered_state")
        if sd.get("scheme") != self.scheme.describe():
            raise ConfigError(f"state was saved for {sd.get('scheme')}, this hook runs {self.scheme.describe()}")
        if self._worker is None:
            self._pending_state = sd  # applied once the process group is known
        else:
            self._apply_state(sd)

    def _apply_state(self, sd: Mapping[str, Any]) -> None:
        worker = sd["worker"]
        rank = sd.get("rank", worker.get("rank") if isinstance(worker, Mapping) else None)
        world = sd.get("world_size", worker.get("world_size") if isinstance(worker, Mapping) else None)
        if world is None or int(world) != self.world_size:
            raise ConfigError(f"hook state was saved with world size {world}, this run has {self.world_size}: "
                              "error-feedback state is per rank and cannot be resharded")
        if rank is None or int(rank) != self.rank:
            raise ConfigError(f"hook state was saved by rank {rank}, this is rank {self.rank}: each rank must load "
                              "its own (commlib.ddp.load_gathered_state picks it from a gathered checkpoint)")
        self._worker.load_state_dict(worker)
        self._server.load_state_dict(sd["server"])
