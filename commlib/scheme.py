"""A Scheme = worker half + server half, built from named pieces by one config.

    scheme = Scheme(compressor="dgc", ratio=0.001, feedback="ef21")
    worker = scheme.worker(rank, world_size)      # per worker process / rank
    server = scheme.server(world_size)            # central, or replicated on every DDP rank
    payloads = worker.encode_group(keys, grads)   # grad -> feedback(compressor) -> Payload
    dirs = server.decode_group(keys, numels, received_by_rank)  # decode -> aggregate -> server state

Both halves keep their state in explicit dicts keyed by tensor key (parameter name), saved
with ``state_dict()`` and restored with ``load_state_dict()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from commlib.aggregate import AGGREGATORS, Aggregator
from commlib.aggregate.base import mean_divisor
from commlib.compress import COMPRESSORS, Compressor
from commlib.compress.identity import Identity
from commlib.errors import CommlibError, ConfigError, NonFiniteError
from commlib.feedback import FEEDBACKS, Feedback, StepContext
from commlib.wire import Kind, Payload

#: DGC's sparsity warm-up (Lin et al. 2018, §3.4): 75%, 93.75%, 98.4375%, 99.6% over the first
#: four epochs, then the target sparsity. Stored as densities.
DGC_WARMUP = (0.25, 0.0625, 0.015625, 0.004)

_NONFINITE = ("skip", "raise")


def _mix_seed(*parts: int) -> int:
    """splitmix64 over the parts: a well-spread 63-bit seed per (base, rank, step, slot)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFF_FFFF_FFFF_FFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFF_FFFF_FFFF_FFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFF_FFFF_FFFF_FFFF
        z ^= z >> 31
    return z & 0x7FFF_FFFF_FFFF_FFFF


class Scheme:
    """What crosses the network and how it is combined.

    Args:
        compressor: name in ``COMPRESSORS`` (identity, fp16, bf16, topk, dgc, randk) or an object.
        ratio: fraction of entries kept by sparsifying compressors (e.g. 0.001 = 99.9% sparsity).
        feedback: name in ``FEEDBACKS`` (none, ef, ef21, ef21-sgdm, ef21-w, econtrol, dgc) or an object.
        aggregator: name in ``AGGREGATORS`` (mean, or a robust rule) or an object.
        compressor_options / feedback_options / aggregator_options: keyword options for each piece.
        warmup: sparsity warm-up: None, "dgc" (the paper's schedule) or a list of densities per epoch.
        steps_per_epoch: advance the warm-up epoch automatically (else call ``set_epoch``).
        compress_min_dim: tensors with fewer dimensions are sent dense (DGC: biases, norm weights).
        compress_min_numel: tensors with fewer entries are sent dense.
        nonfinite: a worker gradient with NaN/Inf is "skip"ped for that step (state untouched,
            counted) or "raise"s NonFiniteError.
        seed: base seed for randomised compressors (random-k): mixed with rank, step and slot.
        max_abs: optional bound on every received decoded value |value * scale|: receivers (the
            parameter server, the DDP hook) reject a payload with a larger one, counted per
            sender. Without it only the value rule applies (finite in float32 after scale and cast).
        checksum: DDP all-gather messages carry a CRC-32 per payload, checked by every rank (a
            corrupted message is rejected and counted in ``rejected_by_rank``). None: on for
            robust aggregators, off for the mean. A CRC catches accidents, it is no authentication.
        attack: simulate Byzantine ranks (tests, simulation, benchmarks): an
            ``commlib.attacks.AttackPlan`` or a dict ``{"attack": "alie", "ranks": [3], ...options}``.
            The server half replaces those ranks' decoded vectors by the attack's output computed
            from the honest ones (an omniscient attacker), deterministically on every replica.
    """

    def __init__(
        self,
        compressor: Union[str, Compressor] = "identity",
        ratio: Optional[float] = None,
        feedback: Union[str, Feedback] = "none",
        aggregator: Union[str, Aggregator] = "mean",
        *,
        compressor_options: Optional[Mapping[str, Any]] = None,
        feedback_options: Optional[Mapping[str, Any]] = None,
        aggregator_options: Optional[Mapping[str, Any]] = None,
        warmup: Union[None, str, Sequence[float]] = None,
        steps_per_epoch: Optional[int] = None,
        compress_min_dim: int = 2,
        compress_min_numel: int = 0,
        nonfinite: str = "skip",
        seed: int = 0,
        attack: Any = None,
        max_abs: Optional[float] = None,
        checksum: Optional[bool] = None,
    ) -> None:
        copt = dict(compressor_options or {})
        if ratio is not None:
            if not 0.0 < float(ratio) <= 1.0:
                raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
            if isinstance(compressor, str):
                copt.setdefault("ratio", float(ratio))
        self.compressor: Compressor = COMPRESSORS.build(compressor, **copt)
        self.ratio: Optional[float] = self.compressor.ratio
        self.feedback: Feedback = FEEDBACKS.build(feedback, **dict(feedback_options or {}))
        self.aggregator: Aggregator = AGGREGATORS.build(aggregator, **dict(aggregator_options or {}))
        if isinstance(warmup, str):
            if warmup.lower() != "dgc":
                raise ConfigError(f"unknown warm-up schedule {warmup!r}; use 'dgc' or a list of densities")
            warmup = DGC_WARMUP
        self.warmup = tuple(float(w) for w in warmup) if warmup else ()
        if any(not 0 < w <= 1 for w in self.warmup):
            raise ConfigError("warm-up densities must be in (0, 1]")
        if self.warmup and self.ratio is None:
            raise ConfigError("a sparsity warm-up needs a sparsifying compressor with a ratio")
        if steps_per_epoch is not None and int(steps_per_epoch) <= 0:
            raise ConfigError("steps_per_epoch must be > 0")
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        if nonfinite not in _NONFINITE:
            raise ConfigError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.compress_min_dim = int(compress_min_dim)
        self.compress_min_numel = int(compress_min_numel)
        self.seed = int(seed)
        self._dense = Identity()
        self.attack = self._build_attack(attack)
        if max_abs is not None and not (isinstance(max_abs, (int, float)) and 0 < float(max_abs) < float("inf")):
            raise ConfigError(f"max_abs must be a finite number > 0 (or None), got {max_abs!r}")
        self.max_abs: Optional[float] = None if max_abs is None else float(max_abs)
        self.checksum: bool = (not self.aggregator.is_mean) if checksum is None else bool(checksum)

    @staticmethod
    def _build_attack(attack: Any):
        if attack is None:
            return None
        from commlib.attacks.plan import AttackPlan

        if isinstance(attack, AttackPlan):
            return attack
        if isinstance(attack, Mapping):
            opts = dict(attack)
            try:
                name, ranks = opts.pop("attack"), opts.pop("ranks")
            except KeyError as exc:
                raise ConfigError(f"attack config needs 'attack' and 'ranks', missing {exc}") from None
            return AttackPlan(name, ranks, **opts)
        raise ConfigError(f"attack must be an AttackPlan or a dict, got {type(attack).__name__}")

    # -- configuration helpers ---------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Scheme":
        """Build from a plain dict (a YAML/JSON config or CLI flags)."""
        return cls(**dict(config))

    @property
    def worker_momentum(self) -> bool:
        """True when momentum lives in the worker (DGC): the optimizer must not add more."""
        return self.feedback.worker_momentum

    def ratio_at(self, epoch: int) -> Optional[float]:
        """Density in force during this epoch (warm-up densities never go below the target)."""
        if self.ratio is None:
            return None
        if 0 <= epoch < len(self.warmup):
            return max(self.warmup[epoch], self.ratio)
        return self.ratio

    def compresses(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape goes through the compressor (else it is sent dense).
        Dense compressors (identity, casts) apply to every tensor; sparsifiers skip small ones."""
        if self.compressor.kind == Kind.DENSE:
            return True
        numel = 1
        for s in shape:
            numel *= int(s)
        return len(shape) >= self.compress_min_dim and numel >= self.compress_min_numel

    def compressor_for(self, shape: Sequence[int]) -> Compressor:
        return self.compressor if self.compresses(shape) else self._dense

    def sends_dense(self, shape: Sequence[int]) -> bool:
        """True when this tensor travels uncompressed (DGC then applies its momentum on the server)."""
        return self.compressor_for(shape).is_identity

    def worker(self, rank: int = 0, world_size: int = 1) -> "SchemeWorker":
        return SchemeWorker(self, rank, world_size)

    def server(self, world_size: int = 1) -> "SchemeServer":
        return SchemeServer(self, world_size)

    def describe(self) -> str:
        parts = [f"compressor={self.compressor!r}", f"feedback={self.feedback!r}",
                 f"aggregator={type(self.aggregator).__name__}(f={self.aggregator.f})"]
        if self.warmup:
            parts.append(f"warmup={list(self.warmup)}")
        return "Scheme(" + ", ".join(parts) + ")"

    __repr__ = describe


@dataclass
class CommStats:
    """Traffic counters. ``last`` holds the most recent step's numbers, the rest are totals."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_dense: int = 0
    values_sent: int = 0
    values_total: int = 0
    skipped: int = 0  # tensors this worker skipped (non-finite gradient)
    rejected: int = 0  # payloads the server rejected (invalid / non-finite)
    last: Dict[str, float] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """Dense bytes / sent bytes over the run so far."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def density(self) -> float:
        return self.values_sent / self.values_total if self.values_total else 1.0

    def as_dict(self) -> Dict[str, float]:
        return {"steps": self.steps, "bytes_sent": self.bytes_sent, "bytes_dense": self.bytes_dense,
                "compression": self.compression, "density": self.density,
                "skipped": self.skipped, "rejected": self.rejected}


def _nested_state(state: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    return {k: {n: t.detach().clone() for n, t in v.items()} for k, v in state.items()}


def _load_nested(target: Dict[str, Dict[str, torch.Tensor]], src: Mapping[str, Mapping[str, torch.Tensor]],
                 device: Optional[torch.device] = None) -> None:
    target.clear()
    for k, v in src.items():
        target[k] = {n: (t.to(device) if device is not None else t).clone() for n, t in v.items()}


class SchemeWorker:
    """The worker half: gradient -> feedback(compressor) -> Payload, with per-key state."""

    def __init__(self, scheme: Scheme, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world of size {world_size}")
        self.scheme = scheme
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.state: Dict[str, Dict[str, torch.Tensor]] = {}
        self.step = 0
        self.epoch: Optional[int] = None
        self.stats = CommStats()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that selects the warm-up density (overrides steps_per_epoch)."""
        self.epoch = int(epoch)

    def current_epoch(self) -> int:
        if self.epoch is not None:
            return self.epoch
        spe = self.scheme.steps_per_epoch
        return self.step // spe if spe else len(self.scheme.warmup)

    def current_ratio(self) -> Optional[float]:
        return self.scheme.ratio_at(self.current_epoch())

    def encode_group(self, keys: Sequence[str], grads: Sequence[torch.Tensor],
                     shapes: Optional[Sequence[Sequence[int]]] = None,
                     params: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[Payload]:
        """Encode one group of tensors (a DDP bucket, or a whole model) for this step.

        ``grads`` are flat views; ``shapes`` the original shapes (decide which are compressed).
        Non-finite gradients follow the scheme's policy (one host sync for the whole group).
        """
        return self._encode(keys, grads, shapes, params, None, 0)[0]

    def encode_group_into(self, buf: torch.Tensor, offset: int, keys: Sequence[str], grads: Sequence[torch.Tensor],
                          shapes: Optional[Sequence[Sequence[int]]] = None,
                          params: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Tuple[List[Payload], int]:
        """``encode_group`` writing the payloads back to back into the flat uint8 ``buf`` from
        ``offset`` (8-byte aligned; room for ``max_bytes`` of each): compressors with a fused
        kernel select and pack in one pass (DGC: momentum correction too), others are copied in.
        Returns the payloads (views of the bytes written) and the end offset."""
        return self._encode(keys, grads, shapes, params, buf, offset)

    def _encode(self, keys, grads, shapes, params, buf: Optional[torch.Tensor],
                offset: int) -> Tuple[List[Payload], int]:
        if len(keys) != len(grads):
            raise ConfigError("keys and grads differ in length")
        shapes = shapes if shapes is not None else [tuple(g.shape) for g in grads]
        finite = self._finite_flags(grads)
        ratio = self.current_ratio()
        out: List[Payload] = []
        fb = self.scheme.feedback
        for slot, (key, g) in enumerate(zip(keys, grads)):
            flat = g.reshape(-1)
            if not finite[slot]:
                if self.scheme.nonfinite == "raise":
                    raise NonFiniteError(f"gradient of {key!r} holds NaN/Inf at step {self.step}")
                if fb.increments and key not in self.state:
                    raise NonFiniteError(
                        f"gradient of {key!r} is non-finite on the first step: {type(fb).__name__} "
                        "cannot initialise its state from it")
                self.stats.skipped += 1
                p = Payload.skip(flat.numel(), slot=slot, dtype=flat.dtype, device=flat.device)
            else:
                comp = self.scheme.compressor_for(shapes[slot])
                ctx = StepContext(rank=self.rank, world_size=self.world_size, step=self.step, ratio=ratio,
                                  seed=_mix_seed(self.scheme.seed, self.rank, self.step, slot), slot=slot,
                                  dense=comp.is_identity, param=None if params is None else params[slot],
                                  out=buf, offset=offset)
                p = fb.worker_step(self.state.setdefault(key, {}), flat, comp, ctx)
                p.slot = slot
            if buf is not None:
                # a payload the compressor packed in place is already there (unless the feedback changed
                # a header field since, as EF21-W's scale); anything else is (re)written
                offset = offset + p.nbytes if p.is_packed_at(offset) else p.encode_into(buf, offset)
            out.append(p)
        return out, offset

    def max_bytes(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Upper bound on this step's payload size for a tensor (fixed-capacity collectives).
        Same on every rank: it depends on the configuration and on whether the key is initialised."""
        numel = 1
        for s in shape:
            numel *= int(s)
        if self.scheme.feedback.increments and not self.state.get(key):
            return Payload.max_bytes(Kind.DENSE, numel, dtype)  # first EF21/EControl step is uncompressed
        return self.scheme.compressor_for(shape).max_bytes(numel, dtype, self.current_ratio())

    def record(self, payloads: Sequence[Payload], dense_bytes: int) -> None:
        """Count one group's traffic (runtimes call this once per group they send)."""
        sent = sum(p.nbytes for p in payloads)
        self.stats.bytes_sent += sent
        self.stats.bytes_dense += dense_bytes
        self.stats.values_sent += sum(p.nnz for p in payloads)
        self.stats.values_total += sum(p.numel for p in payloads)
        last = self.stats.last
        last["bytes_sent"] = last.get("bytes_sent", 0) + sent
        last["bytes_dense"] = last.get("bytes_dense", 0) + dense_bytes

    def end_step(self) -> None:
        """Close a communication round (runtimes call it once per optimizer step)."""
        self.step += 1
        self.stats.steps += 1

    def begin_step(self) -> None:
        self.stats.last = {}

    @staticmethod
    def _finite_flags(grads: Sequence[torch.Tensor]) -> List[bool]:
        """Per-tensor 'all entries finite', with one host sync. A finite sum implies finite
        entries (NaN and Inf propagate), and a sum reads memory at full speed where
        ``isfinite(g).all()`` materialises a bool tensor; only a non-finite sum (a real NaN/Inf,
        or an overflowing sum of finite values) is checked entry by entry."""
        if not grads:
            return []
        sums = torch.stack([g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
                            .to(torch.float64) for g in grads])
        ok = torch.isfinite(sums).tolist()
        return [bool(o) or bool(torch.isfinite(g).all()) for o, g in zip(ok, grads)]

    def state_dict(self) -> Dict[str, Any]:
        return {"state": _nested_state(self.state), "step": self.step, "epoch": self.epoch,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if int(sd.get("world_size", self.world_size)) != self.world_size:
            raise ConfigError(f"state was saved with world size {sd['world_size']}, this run has {self.world_size}")
        _load_nested(self.state, sd["state"])
        self.step = int(sd["step"])
        self.epoch = sd.get("epoch")


class SchemeServer:
    """The server half: validated payloads of all workers -> aggregate -> server feedback state."""

    def __init__(self, scheme: Scheme, world_size: int = 1) -> None:
        self.scheme = scheme
        self.world_size = int(world_size)
        self.state: Dict[str, Dict[str, torch.Tensor]] = {}
        self.step = 0
        self.rejected = 0

    def decode_group(self, keys: Sequence[str], numels: Sequence[int],
                     received: Sequence[Sequence[Optional[Payload]]], *,
                     dense: Optional[Sequence[bool]] = None, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> List[torch.Tensor]:
        """Combine one group. ``received[r][j]`` is worker r's payload for key j, or None when
        that worker's message was missing or rejected. Returns one flat direction per key."""
        n = len(received)
        if n == 0:
            raise CommlibError("no worker contributions to aggregate")
        dense = dense if dense is not None else [False] * len(keys)
        agg = self.scheme.aggregator
        if agg.is_mean and self.scheme.attack is None:
            aggs = [self._mean(received, j, numel, dtype, device) for j, numel in enumerate(numels)]
            # Each payload passed the value rule (finite in ``dtype``), but a sum of several
            # near the top of the range can still overflow: one host sync for the whole group,
            # and only then the exact mean again in float64 (it lies within the inputs' range).
            if aggs and dtype != torch.float64 and \
                    not bool(torch.isfinite(torch.stack([a.sum(dtype=torch.float64) for a in aggs])).all()):
                aggs = [a if bool(torch.isfinite(a).all()) else
                        self._mean(received, j, numels[j], torch.float64, device).to(dtype)
                        for j, a in enumerate(aggs)]
        else:
            aggs = self._robust(numels, received, dtype, device)
        return self.finish(keys, aggs, dense)

    def _mean(self, received: Sequence[Sequence[Optional[Payload]]], j: int, numel: int, dtype: torch.dtype,
              device) -> torch.Tensor:
        """Mean of the workers' payloads for key j (skipped/missing ones follow ``mean_divisor``)."""
        out = torch.zeros(numel, dtype=dtype, device=device)
        count = 0
        for msgs in received:
            p = msgs[j]
            if p is None or p.kind == Kind.SKIP:
                continue
            p.add_to(out)
            count += 1
        div = mean_divisor(len(received), count, self.scheme.feedback.increments)
        if div:
            out.div_(div)
        return out

    def finish(self, keys: Sequence[str], aggregates: Sequence[torch.Tensor],
               dense: Optional[Sequence[bool]] = None) -> List[torch.Tensor]:
        """Apply the feedback's server state to already aggregated vectors (one per key)."""
        dense = dense if dense is not None else [False] * len(keys)
        fb = self.scheme.feedback
        return [fb.server_step(self.state.setdefault(key, {}), aggregates[j],
                               StepContext(world_size=self.world_size, step=self.step, slot=j, dense=bool(dense[j])))
                for j, key in enumerate(keys)]

    def _robust(self, numels: Sequence[int], received, dtype, device) -> List[torch.Tensor]:
        """Decode each complete worker message to one row, (simulate attacks,) run the rule, split per key.

        Non-finite policy: a worker whose message was rejected (invalid or NaN/Inf) or that
        skipped a tensor is left out of the rule for this step, like a crashed worker.
        """
        ranks, rows = [], []
        for r, msgs in enumerate(received):
            if any(p is None or p.kind == Kind.SKIP for p in msgs):
                continue  # incomplete worker vectors are left out of a robust rule
            ranks.append(r)
            rows.append(torch.cat([p.to_dense(dtype, device) for p in msgs]) if msgs else
                        torch.zeros(0, dtype=dtype, device=device))
        if not rows:
            return [torch.zeros(m, dtype=dtype, device=device) for m in numels]
        stack = torch.stack(rows)
        plan = self.scheme.attack
        if plan is not None:
            stack = self._apply_attack(plan, ranks, stack)
        out = self.scheme.aggregator(stack) if stack.shape[0] else torch.zeros(stack.shape[1], dtype=dtype,
                                                                                device=device)
        return list(torch.split(out, list(numels)))

    def _apply_attack(self, plan, ranks: Sequence[int], stack: torch.Tensor) -> torch.Tensor:
        """Replace the Byzantine ranks' rows (among those present) by the attack's output."""
        from commlib.attacks.plan import AttackPlan

        local = [i for i, r in enumerate(ranks) if r in plan.ranks]
        if not local:
            return stack
        sub = AttackPlan(plan.attack, local)
        out, _present = sub.apply(stack, self.scheme.aggregator)
        return out

    def end_step(self) -> None:
        self.step += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"state": _nested_state(self.state), "step": self.step, "rejected": self.rejected,
                "aggregator": self.scheme.aggregator.state_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        _load_nested(self.state, sd["state"])
        self.step = int(sd["step"])
        self.rejected = int(sd.get("rejected", 0))
        if sd.get("aggregator") is not None:
            self.scheme.aggregator.load_state_dict(sd["aggregator"])
