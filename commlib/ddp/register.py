"""One call to put a Scheme on a DistributedDataParallel model."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from commlib.ddp.checks import FSDP_REFUSAL, check_optimizer
from commlib.ddp.hooks import hook
from commlib.ddp.state import HookState
from commlib.errors import ConfigError
from commlib.scheme import Scheme


def _is_fsdp(model: object) -> bool:
    """FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard) modules."""
    names = {c.__name__ for c in type(model).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"})


def register(ddp_model: DistributedDataParallel, scheme: Union[Scheme, Mapping[str, Any], None] = None, *,
             optimizer: Optional[torch.optim.Optimizer] = None,
             process_group: Optional[dist.ProcessGroup] = None, blocking: bool = False,
             **scheme_kwargs: Any) -> HookState:
    """Register ``scheme`` as the communication hook of ``ddp_model`` and return its state.

        state = commlib.ddp.register(ddp_model, commlib.Scheme("dgc", ratio=0.001, feedback="ef21"))
        state = commlib.ddp.register(ddp_model, compressor="topk", ratio=0.01, feedback="ef")

    ``optimizer`` is required for schemes that apply momentum on the worker (DGC) and checked
    for double momentum. The returned state has ``stats`` (bytes, density per step) and
    ``state_dict()`` / ``load_state_dict()`` for checkpoints (save one per rank, or use
    :func:`commlib.ddp.gather_state` / :func:`commlib.ddp.load_gathered_state`). A HookState
    registered by hand gets the same optimizer checks at the optimizer's first step.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise ConfigError(f"register() needs a DistributedDataParallel model, got {type(ddp_model).__name__}"
                          + (f". {FSDP_REFUSAL}" if _is_fsdp(ddp_model) else ""))
    if scheme is None:
        scheme = Scheme(**scheme_kwargs)
    elif scheme_kwargs:
        raise ConfigError(f"give either a scheme or scheme options, not both (got {sorted(scheme_kwargs)})")
    elif isinstance(scheme, Mapping):
        scheme = Scheme.from_config(scheme)
    elif not isinstance(scheme, Scheme):
        raise ConfigError(f"scheme must be a commlib.Scheme or a config dict, got {type(scheme).__name__}")
    check_optimizer(scheme, optimizer)
    state = HookState(scheme, process_group=process_group, model=ddp_model.module, blocking=blocking)
    if optimizer is not None:
        state._checked_optimizers.add(optimizer)  # checked above: the step hook need not repeat it
    state.worker  # resolves rank/world now: configuration errors surface here, not mid-backward
    ddp_model.register_comm_hook(state, hook)
    return state
