"""Gradient coding in the synchronous parameter server (Tandon, Lei, Dimakis, Karampatziakis,
ICML 2017, "Gradient Coding"; the code itself lives in :mod:`commlib.coding.gc`).

Each step's data is split into ``n`` partitions (``n`` = number of workers); partition ``p`` is
the batch that worker ``p`` would use in an uncoded run (``Task.partition_loss``), so the coded
run computes the same full gradient as the uncoded sync PS that waits for every worker.
Worker ``i`` computes the gradients of the ``s + 1`` partitions the code assigns to it and
pushes ``(B g)_i = sum_j B[i, j] g_j`` in float64. The server applies a round as soon as the
workers heard from determine ``g = sum_j g_j`` (any ``n - s`` of them), decodes in float64
(``a_F^T B_F = 1^T``) and steps with the mean ``g / n`` — what the mean aggregator of the
uncoded run computes. A round in which fewer than ``n - s`` (or a non-decodable set of)
workers pushed before ``step_timeout`` is a *fallback*: the server keeps waiting for more
pushes of that step (counted in ``result()["coding"]["fallbacks"]``).

The coded path is linear: it needs the identity compressor, no error feedback and the mean
aggregator (anything else is refused with ConfigError).

    PSConfig(coding="frc", straggler_tolerance=1, step_timeout=5.0)   # n % (s+1) == 0
    PSConfig(coding="cyclic", straggler_tolerance=2)                  # any n > s
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from commlib.coding.gc import GradientCode, NotDecodable, combine, make_gradient_code
from commlib.errors import ConfigError
from commlib.ps.config import coding_family
from commlib.ps.rounds import Pushes, ServerAPI, SyncRound
from commlib.scheme import Scheme
from commlib.wire import Payload


def check_coded_scheme(scheme: Scheme, task: Any = None) -> None:
    """Refuse schemes that are not linear in the gradient (decoding needs linear pushes), and
    tasks whose partition gradients may not be recomputed by several workers (privacy: each
    copy would draw its own noise and be a release of its own)."""
    problems = []
    if task is not None and not getattr(task, "supports_coding", True):
        problems.append(f"task {type(task).__name__} ({getattr(task, 'coding_refusal', 'not codable')})")
    if not getattr(scheme.compressor, "is_identity", False):
        problems.append(f"compressor {type(scheme.compressor).__name__} (need identity)")
    if type(scheme.feedback).__name__ != "NoFeedback":
        problems.append(f"feedback {type(scheme.feedback).__name__} (need none)")
    if not scheme.aggregator.is_mean:
        problems.append(f"aggregator {type(scheme.aggregator).__name__} (need mean)")
    if scheme.attack is not None:
        problems.append("a simulated attack")
    if problems:
        raise ConfigError("gradient coding decodes linear combinations of gradients; it cannot run with "
                          + ", ".join(problems))


def build_code(coding: str, n: int, s: int, seed: int = 0) -> GradientCode:
    """The (n, s) gradient code named by ``PSConfig.coding`` (``commlib.coding.GRADIENT_CODES``)."""
    if coding_family(coding) != "gradient":
        raise ConfigError(f"{coding!r} is a sequential gradient code, not a per-round one")
    if not 0 <= int(s) < int(n):
        raise ConfigError(f"straggler_tolerance must satisfy 0 <= s < n = {n}, got {s}")
    if coding == "frc" and n % (s + 1):
        raise ConfigError(f"fractional repetition needs (s+1) | n; got n={n}, s={s} (use 'cyclic' or 'auto')")
    return make_gradient_code(n, s, coding, seed)


class CodedWorker:
    """The worker half: coded partial gradients of the partitions the code gives this worker."""

    def __init__(self, code: GradientCode, worker: int) -> None:
        self.code = code
        self.worker = int(worker)
        self.partitions = code.partitions_of(worker)

    def payloads(self, task: Any, model: nn.Module, params: Sequence[nn.Parameter], step: int,
                 flip_labels: bool = False) -> Tuple[List[Payload], float]:
        """``[(B g)_i per parameter]`` as float64 dense payloads, and the mean partition loss."""
        per_part: List[Dict[int, torch.Tensor]] = [{} for _ in params]
        losses = []
        for p in self.partitions:
            model.zero_grad(set_to_none=True)
            loss = task.partition_loss(model, p, self.code.n, step, flip_labels=flip_labels)
            loss.backward()
            losses.append(float(loss.detach()))
            for j, prm in enumerate(params):
                g = prm.grad.detach().reshape(-1) if prm.grad is not None else torch.zeros(prm.numel())
                per_part[j][p] = g.clone()
        # Tandon et al. 2017: worker i sends sum_j B[i, j] g_j
        coded = [self.code.encode(self.worker, grads) for grads in per_part]
        return [Payload.dense(c, slot=j) for j, c in enumerate(coded)], sum(losses) / len(losses)


class CodedServer(SyncRound):
    """The server half, a synchronous round kind: when a round may be applied, and the decoded
    mean gradient."""

    def __init__(self, code: GradientCode) -> None:
        super().__init__(code.n)
        self.code = code
        self.fallbacks = 0  # rounds that waited past step_timeout for a decodable set
        self.decoded = 0  # rounds applied from a decoded gradient
        self.skipped = 0  # applied rounds that did not wait for every worker

    @property
    def quorum(self) -> int:
        """Pushes that always suffice: any ``n - s`` (Tandon et al. 2017)."""
        return self.code.n - self.code.s

    def decodable(self, workers: Sequence[int]) -> bool:
        return len(workers) > 0 and self.code.decodable(workers)

    # -- the round (commlib/ps/rounds.py) ---------------------------------------------------
    def enough(self, got: Pushes) -> bool:
        return self.decodable(list(got))

    def keep_waiting(self, ps: ServerAPI, expected: Sequence[int], got: Pushes, fell_back: bool) -> bool:
        """At the timeout without a decodable set, keep waiting (counted once per round) while a
        live worker may still push; False: give the round up."""
        if ps.idle_for() > ps.config.idle_timeout:
            return False
        if not any(w not in got and not ps.transport.is_dead(w + 1) for w in expected):
            return False
        if not fell_back:
            self.fallbacks += 1
        return True

    def combine(self, ps: ServerAPI, got: Pushes) -> Optional[List[torch.Tensor]]:
        try:
            return self.decode({w: pl for w, (pl, _) in got.items()}, ps.numels)
        except NotDecodable:
            return None

    def decode(self, got: Mapping[int, List[Payload]], numels: Sequence[int]) -> List[torch.Tensor]:
        """Mean gradient ``(1/n) sum_j g_j`` per parameter (float64), from ``{worker: payloads}``."""
        a = self.code.decode_vector(got.keys())  # raises NotDecodable outside the model
        out = []
        for j, numel in enumerate(numels):
            parts = {w: pl[j].to_dense(torch.float64).reshape(-1) for w, pl in got.items()}
            if any(t.numel() != numel for t in parts.values()):
                raise NotDecodable(f"a coded push for slot {j} has the wrong size", got.keys())
            out.append(combine(a, parts) / self.code.n)  # Tandon et al. 2017: g = sum_i a_i (B g)_i
        self.decoded += 1
        if len(got) < self.code.n:
            self.skipped += 1
        return out

    def summary(self) -> Dict[str, Any]:
        return {"code": repr(self.code), "load": self.code.load, "decoded": self.decoded,
                "fallbacks": self.fallbacks, "rounds_skipping_stragglers": self.skipped}
