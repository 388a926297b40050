"""PyTorch Lightning: put a commlib scheme on ``strategy="ddp"``, on any device, with checkpoints.

    from commlib.integrations.lightning import CommlibCallback
    trainer = L.Trainer(strategy="ddp", callbacks=[CommlibCallback(commlib.Scheme("topk", ratio=0.01, feedback="ef"))])

Why a callback: ``DDPStrategy(ddp_comm_hook=...)`` registers the hook on CUDA devices only (on
CPU Lightning silently trains without it), and Lightning's checkpoint would not hold the hook's
per-rank state. This callback registers the hook once the strategy has wrapped the model
(``on_fit_start``, every device type), checks every optimizer, stores every rank's hook state
in the checkpoint (:func:`commlib.ddp.gather_state`, written by rank 0) and gives each rank its
own back on ``trainer.fit(ckpt_path=...)``.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Mapping, Optional, Union

from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package of older installs
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("commlib.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'commlib[lightning]'") from exc

from commlib.ddp.checks import FSDP_REFUSAL, check_optimizer
from commlib.ddp.gather import gather_state, load_gathered_state
from commlib.ddp.hooks import hook
from commlib.ddp.register import _is_fsdp, register
from commlib.ddp.state import HookState
from commlib.errors import ConfigError
from commlib.scheme import Scheme


class CommlibCallback(pl.Callback):
    """Register ``scheme`` as the DDP communication hook of the Lightning strategy's model.

    Args:
        scheme: a :class:`commlib.Scheme` or a config dict (same on every rank).
        blocking: wait for each collective inside the hook (debugging).

    ``self.state`` is the :class:`commlib.ddp.HookState` once fitting has started.
    """

    def __init__(self, scheme: Union[Scheme, Mapping[str, Any]], *, blocking: bool = False) -> None:
        self.scheme = scheme if isinstance(scheme, Scheme) else Scheme.from_config(scheme)
        self.blocking = blocking
        self.state: Optional[HookState] = None
        self._hooked: Optional[weakref.ref] = None  # the DDP wrapper that has the hook
        self._pending: Optional[Mapping[str, Any]] = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            if _is_fsdp(model) or "FSDP" in type(trainer.strategy).__name__:
                raise ConfigError(f"CommlibCallback: {FSDP_REFUSAL}")
            raise ConfigError(f"CommlibCallback needs strategy='ddp' (a DistributedDataParallel model); "
                              f"{type(trainer.strategy).__name__} gave a {type(model).__name__}")
        optimizers = list(trainer.optimizers)
        for opt in optimizers[1:]:
            check_optimizer(self.scheme, opt)  # register() checks the first
        if self.state is None:
            self.state = register(model, self.scheme, optimizer=optimizers[0] if optimizers else None,
                                  blocking=self.blocking)
        elif self._hooked is None or self._hooked() is not model:  # a later fit() wrapped the module: keep state
            if optimizers:
                check_optimizer(self.scheme, optimizers[0])
            model.register_comm_hook(self.state, hook)
        self._hooked = weakref.ref(model)
        for opt in optimizers:
            self.state._checked_optimizers.add(opt)
        if self._pending is not None:
            load_gathered_state(self.state, self._pending)
            self._pending = None

    def state_dict(self) -> Dict[str, Any]:
        """Every rank's hook state (a collective: Lightning builds the checkpoint on every rank)."""
        if self.state is None:
            return {}
        return gather_state(self.state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep the gathered states; this rank's own is applied once the hook is registered
        (Lightning restores callbacks before the strategy wraps the model)."""
        if self.state is None:
            self._pending = state_dict
        else:
            load_gathered_state(self.state, state_dict)
