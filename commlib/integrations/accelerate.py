"""Hugging Face Accelerate: one line after ``accelerator.prepare``, with checkpoints.

    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = commlib.integrations.accelerate.register(accelerator, model, scheme, optimizer=opt)

``DistributedDataParallelKwargs(comm_hook=...)`` takes only Accelerate's own hooks, so the hook
goes on the prepared DDP model directly (:func:`commlib.ddp.register`, which is also fine on its
own). This adds Accelerate ``save_state`` / ``load_state`` pre-hooks: ``save_state`` gathers every
rank's hook state (:func:`commlib.ddp.gather_state`) into ``commlib_hook_state.pt`` next to
Accelerate's files, and ``load_state`` gives each rank its own. The file is read with
``torch.load(weights_only=True)`` (Accelerate's ``register_for_checkpointing`` files are unpickled
with ``weights_only=False``, which is why they are not used here).
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Union

import torch

try:
    import accelerate
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("commlib.integrations.accelerate needs Accelerate: pip install 'commlib[accelerate]'") from exc

from commlib.ddp.gather import gather_state, load_gathered_state
from commlib.ddp.register import register as ddp_register
from commlib.ddp.state import HookState
from commlib.errors import ConfigError
from commlib.scheme import Scheme

FILENAME = "commlib_hook_state.pt"


def register(accelerator: "accelerate.Accelerator", model: torch.nn.Module,
             scheme: Union[Scheme, Mapping[str, Any], None] = None, *,
             optimizer: Optional[torch.optim.Optimizer] = None, **kwargs: Any) -> HookState:
    """Register ``scheme`` on the prepared (DDP) ``model`` and hook its state into
    ``accelerator.save_state`` / ``load_state``. Options as :func:`commlib.ddp.register`."""
    state = ddp_register(model, scheme, optimizer=optimizer, **kwargs)
    optimizer_for_check = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer wraps the torch one
    if optimizer_for_check is not None:
        state._checked_optimizers.add(optimizer_for_check)

    def save_hook(models: List[torch.nn.Module], weights: List[Any], output_dir: str) -> None:
        blob = gather_state(state)  # a collective: Accelerate runs this hook on every rank
        cfg = accelerator.project_configuration
        writer = accelerator.is_local_main_process if cfg.save_on_each_node else accelerator.is_main_process
        if writer:
            path = os.path.join(output_dir, FILENAME)
            torch.save(blob, path + ".tmp")
            os.replace(path + ".tmp", path)

    def load_hook(models: List[torch.nn.Module], input_dir: str) -> None:
        path = os.path.join(input_dir, FILENAME)
        if not os.path.exists(path):
            raise ConfigError(f"{input_dir} has no {FILENAME}: it was saved without commlib's hook state "
                              "(resuming would restart error feedback from zero on every rank)")
        load_gathered_state(state, torch.load(path, map_location="cpu", weights_only=True))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return state
