"""The checks every route into the DDP hook goes through.

``commlib.ddp.register`` calls :func:`check_optimizer` directly. A ``HookState`` built by hand
(``model.register_comm_hook(state, commlib.ddp.hook)``, Lightning, Accelerate) never sees the
optimizer, so every HookState is also watched by two global optimizer step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``_post_hook``):

- before the first step of an optimizer that updates a hooked model's parameters, the same
  :func:`check_optimizer` runs (double momentum is refused however the hook was installed);
- after the first optimizer step, a HookState whose hook has never run gives a
  :class:`HookNotRunWarning` (the hook was built but never installed: Lightning, for one,
  registers ``ddp_comm_hook`` on CUDA devices only).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from commlib.errors import ConfigError
from commlib.scheme import Scheme

if TYPE_CHECKING:
    from commlib.ddp.state import HookState

#: Below this density, EF21-style feedback plus optimizer heavy-ball momentum is known to diverge.
EF21_MOMENTUM_MAX_RATIO = 0.01

FSDP_REFUSAL = (
    "FSDP is not supported: commlib's schemes keep error-feedback state per parameter and need each "
    "rank's full, unsharded gradient of every parameter before communicating, while FSDP's comm hooks "
    "receive flattened (and, when sharded, to-be-reduce-scattered) gradients with no parameter "
    "boundaries. Wrap the model in DistributedDataParallel instead.")


def check_hook_call(state: object, bucket: object, extra: tuple) -> None:
    """Refuse, with the reason, a call that does not come from DDP (FSDP's hooks pass a flat
    gradient tensor, and an output shard when sharded)."""
    import torch.distributed as dist
    from commlib.ddp.state import HookState

    if extra or not isinstance(bucket, dist.GradBucket):
        raise ConfigError(f"commlib.ddp.hook was called with a {type(bucket).__name__}, not a DDP GradBucket. "
                          + FSDP_REFUSAL)
    if not isinstance(state, HookState):
        raise ConfigError(f"commlib.ddp.hook needs a commlib.ddp.HookState as its state, got {type(state).__name__}")


class CommlibWarning(UserWarning):
    """A configuration commlib accepts but that is known to train badly."""


class HookNotRunWarning(CommlibWarning):
    """A HookState exists but its hook did not run before an optimizer step."""


def optimizer_momentum(optimizer: torch.optim.Optimizer) -> float:
    """The largest momentum-like setting of any param group (SGD momentum, Adam beta1, ...)."""
    worst = 0.0
    for g in optimizer.param_groups:
        worst = max(worst, float(g.get("momentum", 0.0) or 0.0))
        betas = g.get("betas")
        if betas:
            worst = max(worst, float(betas[0]))
    return worst


def check_optimizer(scheme: Scheme, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Refuse double momentum; warn about EF21-style feedback under heavy-ball momentum at high sparsity.

    - DGC's momentum correction already applies momentum on the worker: an optimizer with
      momentum of its own is refused (:class:`ConfigError`).
    - EF21 / EF21-SGDM / EF21-W / EControl hand the optimizer a *persistent* estimate g = mean g_i
      whose entries change only where a worker sent a correction (k of d per step). An optimizer
      with heavy-ball momentum re-applies the stale entries every step with gain 1/(1 - beta); EF21's
      step-size bound already shrinks like k/d (Richtarik et al. 2021, arXiv 2106.05203, Thm. 1),
      so at high sparsity the run diverges (measured on digits, 2 ranks, DGC 0.1% + EF21 + SGD
      momentum 0.9: 0.08-0.52 accuracy against 0.98 dense; with Adam 0.84 against 0.97).
      This warns, naming the fixes.
    """
    fb = scheme.feedback
    if scheme.worker_momentum:
        if optimizer is None:
            raise ConfigError(
                f"{type(fb).__name__} applies momentum on the worker (momentum correction); "
                "pass optimizer= so commlib can check that the optimizer itself has none "
                "(e.g. torch.optim.SGD(params, lr, momentum=0))")
        m = optimizer_momentum(optimizer)
        if m > 0:
            raise ConfigError(
                f"double momentum: the scheme's {type(fb).__name__} already applies momentum "
                f"{getattr(fb, 'momentum', getattr(fb, 'beta', '?'))} on the worker, and the optimizer adds "
                f"momentum {m}. Use torch.optim.SGD(..., momentum=0) with this scheme.")
        return
    if optimizer is None or not fb.increments:
        return
    ratio = scheme.ratio
    m = optimizer_momentum(optimizer)
    if m > 0 and ratio is not None and ratio < EF21_MOMENTUM_MAX_RATIO:
        warnings.warn(
            f"feedback={type(fb).__name__} with a sparsifier at ratio {ratio} and an optimizer with "
            f"momentum {m} is known to train badly or diverge (the optimizer's momentum re-applies "
            "EF21's stale gradient estimate every step). Use feedback='ef' (classic error feedback, keeps the "
            "optimizer's momentum), or feedback='dgc' / 'ef21-sgdm' with momentum=0 in the optimizer, "
            f"or a ratio >= {EF21_MOMENTUM_MAX_RATIO}.", CommlibWarning, stacklevel=3)


# -- route-independent checks: global optimizer step hooks ------------------------------------
_states: "weakref.WeakSet[HookState]" = weakref.WeakSet()
_lock = threading.Lock()
_handles: list = []


def watch(state: "HookState") -> None:
    """Check ``state`` at the first step of any optimizer that updates its parameters."""
    with _lock:
        _states.add(state)
        if not _handles:
            _handles.append(register_optimizer_step_pre_hook(_before_step))
            _handles.append(register_optimizer_step_post_hook(_after_step))


def _param_ids(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for state in list(_states):
        if optimizer in state._checked_optimizers or state.hook_runs == 0:
            continue  # checked already, or the hook has not seen its parameters yet
        if state.param_ids & _param_ids(optimizer):
            check_optimizer(state.scheme, optimizer)  # raises again at every step if refused
        state._checked_optimizers.add(optimizer)  # once per (state, optimizer): related or not


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for state in list(_states):
        if state.hook_runs == 0 and not state._warned_not_run:
            state._warned_not_run = True
            warnings.warn(
                "a commlib HookState exists but its hook has not run by the first optimizer step: "
                "the hook is not installed, and gradients were averaged without the scheme. Use "
                "commlib.ddp.register(ddp_model, scheme, optimizer=opt); in PyTorch Lightning use "
                "commlib.integrations.lightning.CommlibCallback (Lightning registers ddp_comm_hook "
                "on CUDA only).", HookNotRunWarning, stacklevel=2)
