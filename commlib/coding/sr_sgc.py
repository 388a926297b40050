"""Selective-repeat sequential gradient coding, SR-SGC (Krishnan, Ebrahimi, Khisti, ICLR 2023,
arXiv 2211.13802, SR-SGC; docs/algorithms.md §4). The rules follow the paper as implemented in the
authors' simulator (mamaj/Sequential-Gradient-Coding-2, selective_repeat_sgc.py).

Scheme: every job uses the same
(n, s)-gradient code with ``s = ceil(B*lam / (W-1+B))``; delay ``T = B``; needs ``B | (W-1)``.
In round ``t`` every worker computes its coded task for job ``t``; if ``v > s`` workers have
not delivered their task of job ``t-B`` (stragglers of round ``t-B``, and workers who were
busy repeating an older task then), ``v - s`` of them repeat their job-``(t-B)`` task instead
of job ``t``. Job ``t-B`` is decoded at the end of round ``t`` from any ``n - s`` distinct
workers' results. Load per worker and round: ``(s+1)/n``.

Choice of the ``v - s`` repeaters (the authors' simulator takes the lowest ids; the paper fixes
no order): workers that straggled in round ``t-B`` come first, because the model forbids them to straggle
again in round ``t`` (``B < W``, and a burst longer than B is not allowed); ties go to
the lower worker id. The repeat condition is ``v > s``: job ``t-B`` is left alone when at most
``s`` of its results are missing, since an (n, s) code decodes from any n - s of them.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch

from commlib.coding.gc import GradientCode, make_gradient_code
from commlib.coding.sgc import SGC_SCHEMES, MiniTask, SequentialScheduler, TaskKey
from commlib.errors import ConfigError


def srsgc_parameters(n: int, B: int, W: int, lam: int) -> Tuple[int, int, Fraction]:
    """``(s, T, load)`` of SR-SGC for n workers under the (B, W, lam) model."""
    n, B, W, lam = int(n), int(B), int(W), int(lam)
    if B < 1 or W < 2 or lam < 0 or B > W - 1:
        raise ConfigError(f"SR-SGC needs B >= 1, W >= 2, 1 <= B <= W-1, lam >= 0; got {B}, {W}, {lam}")
    if (W - 1) % B != 0:
        raise ConfigError(f"SR-SGC needs B | (W-1); got B={B}, W={W}")
    s = math.ceil(Fraction(B * lam, W - 1 + B))  # arXiv 2211.13802, SR-SGC: s = ceil(B·λ/(W-1+B))
    if s >= n:
        raise ConfigError(f"SR-SGC needs s = {s} < n = {n}")
    return s, B, Fraction(s + 1, n)  # T = B; load = (s+1)/n


@SGC_SCHEMES.register("sr-sgc", "selective-repeat")
class SelectiveRepeatSGC(SequentialScheduler):
    """SR-SGC master. ``code`` picks the (n, s) gradient code (``auto``: FRC when (s+1) | n,
    else cyclic with ``seed``), or pass a ready :class:`GradientCode`."""

    def __init__(
        self,
        n: int,
        B: int,
        W: int,
        lam: int,
        num_jobs: Optional[int] = None,
        code: "str | GradientCode" = "auto",
        seed: int = 0,
    ) -> None:
        s, T, _ = srsgc_parameters(n, B, W, lam)
        super().__init__(n, T, num_jobs)
        self.B, self.W, self.lam, self.s = int(B), int(W), int(lam), s
        if isinstance(code, GradientCode):
            if code.n != self.n or code.s < s:
                raise ConfigError(f"SR-SGC needs an (n={n}, s>={s}) code, got {code}")
            self.code = code
        else:
            self.code = make_gradient_code(self.n, s, code, seed)
        width = max(len(self.code.partitions_of(w)) for w in range(self.n))
        self._load = Fraction(width, self.n)  # (s+1)/n for FRC and cyclic codes

    @property
    def load(self) -> float:
        return float(self._load)

    @property
    def load_exact(self) -> Fraction:
        """(s+1)/n as a fraction (largest row support of the code over n)."""
        return self._load

    @property
    def num_partitions(self) -> int:
        return self.n

    def _task(self, job: int, key: TaskKey) -> MiniTask:
        kind, worker, index = key
        if kind != "gc" or index != 0:
            raise ConfigError(f"SR-SGC has only ('gc', worker, 0) tasks, got {key}")
        w = self._check_worker(worker)
        size = len(self.code.partitions_of(w)) / self.n
        return MiniTask(w, job, "gc", 0, self.code.coefficients(w), size)

    def _plan(self, round: int) -> Dict[int, List[MiniTask]]:
        r = int(round)
        old = r - self.B
        repeaters: Set[int] = set()
        if self._is_job(old) and old not in self._decoded:
            have = {w for (_, w, _) in self._keys.get(old, set())}
            absent = [w for w in range(self.n) if w not in have]
            v = len(absent)
            if v > self.s:  # arXiv 2211.13802, SR-SGC: v > s missing -> v - s of them repeat
                straggled = self._rows[old] if old < len(self._rows) else None
                absent.sort(key=lambda w: (not (straggled is not None and straggled[w]), w))
                repeaters = set(absent[: v - self.s])
        plan: Dict[int, List[MiniTask]] = {}
        for w in range(self.n):
            job = old if w in repeaters else r
            if self._is_job(job):
                plan[w] = [self._placed(job, ("gc", w, 0), r, 0)]
            else:
                plan[w] = []
        return plan

    def _code_matrix(self) -> np.ndarray:
        return self.code.B

    def _finished(self, have: Set[TaskKey]) -> Set[int]:
        return {w for (_, w, _) in have}

    def _missing(self, job: int, have: Set[TaskKey]) -> List[MiniTask]:
        F = self._finished(have)
        extra: List[int] = []
        for w in range(self.n):
            if self.code.decodable(F | set(extra)):
                break
            if w not in F:
                extra.append(w)
        if not self.code.decodable(F | set(extra)):
            raise ConfigError(f"the (n={self.n}, s={self.s}) code cannot decode even with all workers")
        return [self._task(job, ("gc", w, 0)) for w in extra]

    def _decode(self, job: int, results: Mapping[TaskKey, torch.Tensor]) -> torch.Tensor:
        # arXiv 2211.13802, SR-SGC: plain GC decoding of job t-B from >= n-s distinct workers
        return self.code.decode({w: res for (_, w, _), res in results.items()})
