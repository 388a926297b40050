"""Configuration of a parameter-server run (JSON-able, so every process can rebuild it)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from commlib.errors import ConfigError
from commlib.optim.schedule import LRSchedule

MODES = ("sync", "async")


def coding_family(name: Any) -> str:
    """Which round a ``PSConfig.coding`` name runs, looked up in the code registries:
    "gradient" (Tandon et al. 2017: ``commlib.coding.GRADIENT_CODES`` or "auto") or
    "sequential" (Krishnan et al. 2023: ``commlib.coding.SGC_SCHEMES``); ConfigError otherwise."""
    from commlib.coding import GRADIENT_CODES, SGC_SCHEMES

    if isinstance(name, str):
        if name in SGC_SCHEMES:
            return "sequential"
        if name in GRADIENT_CODES or name.strip().lower() == "auto":
            return "gradient"
    known = ["auto"] + GRADIENT_CODES.names() + SGC_SCHEMES.names()
    raise ConfigError(f"coding must be one of {known} or None, got {name!r}")


@dataclass
class PSConfig:
    """How the server runs.

    Args:
        mode: "sync" (one step per round; wait for a quorum) or "async" (apply each push on arrival).
        steps: optimizer steps to take (sync: rounds that were applied; async: applied pushes).
        quorum: sync: apply a round once this many workers pushed (default: all live workers).
        step_timeout: sync: longest wait for the quorum of one round; async: a worker silent this
            long is counted as timed out and dropped until it is heard from again.
        min_pushes: sync: a round that timed out is applied with at least this many pushes
            (fewer: nothing is applied, the round is repeated).
        max_misses: sync: consecutive rounds a worker may miss before it is dropped from the quorum.
        max_staleness: async: pushes computed on parameters more than this many versions old
            are dropped (counted); None accepts any staleness.
        optimizer: {"name": "sgd" | "ab-sgd", "lr", "momentum", "rho", "weight_decay", ...,
            "lr_scaling": "workers" | "none", "async_momentum", "schedule": "constant" | "cosine",
            "warmup"}; default SGD for sync and Adaptive Braking SGD for async. In async mode with
            n > 1 workers ``lr`` and ``momentum`` are the synchronous ones (one step per round of n
            gradients) and the server converts them per push: momentum min(momentum,
            async_momentum=0.75), lr scaled to the same distance per gradient
            (``build_optimizer``); "lr_scaling": "none" uses both as given. "schedule": the lr over
            the ``steps`` (``build_schedule``): "cosine" (the async default) warms up linearly over
            the "warmup" fraction (0.05) of the steps, then decays to 0; "constant" (the sync
            default) keeps it. docs/algorithms.md §5.4.
        checkpoint: file the server writes atomically (model, optimizer, scheme state, step,
            per-worker bookkeeping); ``resume`` continues from it.
        checkpoint_every: steps between checkpoints (1 keeps workers' rollback memory to one state).
        eval_every: evaluate the task's held-out metrics every this many steps (0: at the end only).
        idle_timeout: stop when no update was applied for this long (every worker gone).
        probe_every: sync: dropped workers still get the parameters every this many rounds.
        shutdown_timeout: how long the server waits for workers to say goodbye.
        monna_beta: worker momentum when the scheme's aggregator is MoNNA (server variant).
        worker_timeout: a worker that hears nothing from the server for this long says HELLO
            again; after ``worker_give_up`` seconds without the server it stops.
        start_workers: training starts once this many workers said HELLO (default: all of
            them), or after ``startup_timeout`` seconds with whoever is there.
        coding: sync only: gradient coding against stragglers. "frc", "cyclic" or "auto"
            (Tandon et al. 2017, ``commlib/ps/coded.py``); "sr-sgc" or "m-sgc" (sequential
            gradient coding, Krishnan et al. 2023, ``commlib/ps/sequential.py``); None: uncoded.
        straggler_tolerance: Tandon codes: stragglers ``s`` tolerated per round (a round is
            applied from any n - s workers; load (s+1)/n). SR-SGC / M-SGC: lambda of the
            (B, W, lambda) bursty model, at most lambda distinct stragglers per window of W rounds.
        straggler_burst: SR-SGC / M-SGC: B, the longest burst of straggling rounds of one worker.
        straggler_window: SR-SGC / M-SGC: W, the window of the bursty model.
        sgc_mu: SR-SGC / M-SGC: a round lasts at least (1 + sgc_mu) x its first push's time.
        coding_seed: seed of the random cyclic-repetition matrix.
        shards: server processes the parameters are split over (size-balanced key ranges,
            ``commlib/ps/shards.py``); 1: one server. Sync mode only, no gradient coding.
    """

    mode: str = "sync"
    steps: int = 100
    quorum: Optional[int] = None
    step_timeout: float = 30.0
    min_pushes: int = 1
    max_misses: int = 3
    max_staleness: Optional[int] = None
    optimizer: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    checkpoint_every: int = 1
    resume: bool = False
    eval_every: int = 0
    idle_timeout: float = 120.0
    probe_every: int = 5
    shutdown_timeout: float = 5.0
    monna_beta: float = 0.99
    worker_timeout: float = 10.0
    worker_give_up: float = 300.0
    start_workers: Optional[int] = None
    startup_timeout: float = 120.0
    coding: Optional[str] = None
    straggler_tolerance: int = 0
    straggler_burst: int = 1
    straggler_window: int = 2
    sgc_mu: float = 0.2
    coding_seed: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "checkpoint_every", "probe_every", "min_pushes", "max_misses"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quorum is not None and int(self.quorum) < 1:
            raise ConfigError(f"quorum must be >= 1, got {self.quorum}")
        if self.max_staleness is not None and int(self.max_staleness) < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.start_workers is not None and int(self.start_workers) < 0:
            raise ConfigError(f"start_workers must be >= 0, got {self.start_workers}")
        for name in ("step_timeout", "idle_timeout", "shutdown_timeout", "worker_timeout", "worker_give_up",
                     "startup_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.coding is not None:
            if self.mode != "sync":
                raise ConfigError("gradient coding needs mode='sync'")
            coding_family(self.coding)
        if int(self.shards) < 1:
            raise ConfigError(f"shards must be >= 1, got {self.shards}")
        if int(self.shards) > 1 and (self.mode != "sync" or self.coding is not None):
            raise ConfigError("a sharded server (shards > 1) runs sync mode without gradient coding: the shards "
                              "agree on each round's pushes (got mode=%r, coding=%r)" % (self.mode, self.coding))
        if int(self.straggler_tolerance) < 0:
            raise ConfigError(f"straggler_tolerance must be >= 0, got {self.straggler_tolerance}")
        if int(self.straggler_burst) < 1 or int(self.straggler_window) <= int(self.straggler_burst):
            raise ConfigError("the bursty straggler model needs 1 <= straggler_burst < straggler_window, got "
                              f"B={self.straggler_burst}, W={self.straggler_window}")
        if not (math.isfinite(float(self.sgc_mu)) and float(self.sgc_mu) >= 0):
            raise ConfigError(f"sgc_mu must be >= 0, got {self.sgc_mu}")
        self.optimizer = dict(self.optimizer or {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PSConfig":
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown parameter-server options {sorted(extra)}")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


#: Async learning-rate scalings: "workers" converts the given synchronous lr and momentum per push.
LR_SCALINGS = ("workers", "none")
#: Async default cap on the per-push momentum (docs/algorithms.md §5.4).
ASYNC_MOMENTUM = 0.75
#: Async default lr schedule: warm-up then cosine decay over ``steps`` (docs/algorithms.md §5.4).
ASYNC_SCHEDULE = "cosine"


def async_step_size(lr: float, momentum: float, n_workers: int,
                    async_momentum: float = ASYNC_MOMENTUM) -> tuple:
    """Per-push (lr, momentum) for ``n_workers`` asynchronous workers from the synchronous ones.

    Every push applies one gradient about n - 1 versions old instead of a mean of n, and the
    staleness itself acts as extra momentum (Mitliagkas, Zhang, Hadjis, Ré, "Asynchrony begets
    momentum", arXiv 1605.09774). So the momentum is lowered to at most ``async_momentum`` and the
    lr is set to keep the steady-state distance per gradient, lr / (1 - momentum) / n, of the
    synchronous run:

        m_push  = min(momentum, async_momentum)            (momentum kept when n = 1)
        lr_push = lr * (1 - m_push) / (1 - momentum) / n
    """
    n = int(n_workers)
    if n < 1:
        raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"async lr scaling needs a momentum in [0, 1), got {momentum}")
    if not 0.0 <= async_momentum < 1.0:
        raise ConfigError(f"async_momentum must be in [0, 1), got {async_momentum}")
    m_push = momentum if n == 1 else min(momentum, async_momentum)
    return lr * (1.0 - m_push) / (1.0 - momentum) / n, m_push


def build_optimizer(spec: Mapping[str, Any], params: Iterable[torch.nn.Parameter], mode: str,
                    n_workers: int = 1) -> torch.optim.Optimizer:
    """The server's optimizer from a spec; default SGD (sync) or Adaptive Braking SGD (async).

    Async mode applies every push on arrival, each computed about n - 1 versions ago. With
    ``lr_scaling="workers"`` (the async default) the spec's lr and momentum are the synchronous
    ones and :func:`async_step_size` converts them per push (lr / n at an unchanged momentum;
    momentum lowered to ``async_momentum``, default 0.75, with the lr raised to keep the
    distance per gradient). ``lr_scaling="none"`` applies them as given (docs/algorithms.md §5.4).
    """
    from commlib.optim import AdaptiveBrakingSGD

    spec = dict(spec or {})
    for key in SCHEDULE_KEYS:  # the lr schedule is built by build_schedule
        spec.pop(key, None)
    name = str(spec.pop("name", "sgd" if mode == "sync" else "ab-sgd")).lower().replace("_", "-")
    scaling = str(spec.pop("lr_scaling", "workers" if mode == "async" else "none")).lower()
    async_momentum = spec.pop("async_momentum", None)
    if scaling not in LR_SCALINGS:
        raise ConfigError(f"lr_scaling must be one of {LR_SCALINGS}, got {scaling!r}")
    if int(n_workers) < 1:
        raise ConfigError(f"n_workers must be >= 1, got {n_workers}")
    spec.setdefault("lr", 0.05)
    if name in ("ab-sgd", "adaptive-braking"):
        spec.setdefault("momentum", 0.9)
    if scaling == "workers" and mode == "async":
        lr, momentum = async_step_size(
            float(spec["lr"]), float(spec.get("momentum", 0.0)), int(n_workers),
            ASYNC_MOMENTUM if async_momentum is None else float(async_momentum))
        spec["lr"] = lr
        if "momentum" in spec:
            spec["momentum"] = momentum
    elif async_momentum is not None and mode == "async":
        raise ConfigError("async_momentum needs lr_scaling='workers' (with 'none' the momentum is used as given)")
    try:
        if name == "sgd":
            return torch.optim.SGD(params, **spec)
        if name in ("ab-sgd", "adaptive-braking"):
            return AdaptiveBrakingSGD(params, **spec)
    except TypeError as exc:
        raise ConfigError(f"optimizer {name!r}: {exc}") from None
    raise ConfigError(f"unknown optimizer {name!r}; use 'sgd' or 'ab-sgd'")


#: Optimizer-spec keys of the lr schedule (not optimizer arguments).
SCHEDULE_KEYS = ("schedule", "warmup")
#: Default lr schedule per mode (docs/algorithms.md §5.4).
DEFAULT_SCHEDULE = {"sync": "constant", "async": ASYNC_SCHEDULE}


def build_schedule(spec: Mapping[str, Any], optimizer: torch.optim.Optimizer, mode: str,
                   total_steps: int, given: bool = False) -> LRSchedule:
    """The server's lr schedule over ``total_steps`` optimizer steps, from the optimizer spec's
    ``"schedule"`` ("constant" or "cosine": linear warm-up over the ``"warmup"`` fraction of the
    steps, default 0.05, then cosine decay to 0; ``commlib.optim.schedule``). Default: constant
    in sync mode, ``ASYNC_SCHEDULE`` in async mode, and constant for an optimizer the user
    ``given`` (it keeps its lr unless the spec names a schedule). The lrs it scales are the
    optimizer's (after the async conversion of :func:`build_optimizer`)."""
    spec = dict(spec or {})
    if mode not in DEFAULT_SCHEDULE:
        raise ConfigError(f"mode must be one of {tuple(DEFAULT_SCHEDULE)}, got {mode!r}")
    kind = spec.get("schedule", "constant" if given else DEFAULT_SCHEDULE[mode])
    return LRSchedule(optimizer, total_steps, str(kind), float(spec.get("warmup", 0.05)))
