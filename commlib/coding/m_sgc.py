"""Multiplexed sequential gradient coding, M-SGC (Krishnan, Ebrahimi, Khisti, ICLR 2023,
arXiv 2211.13802, M-SGC; docs/algorithms.md §4). The rules follow the paper as implemented in the
authors' simulator (mamaj/Sequential-Gradient-Coding-2, multiplexed_sgc.py).

Scheme: delay ``T = W-2+B``. Each job's data set is
split into D1 (fraction ``1 - d2``) and D2 (fraction ``d2 = B / (B + (lam+1)(W-1))``).
D1 is cut into ``n(W-1)`` uncoded chunks, ``W-1`` owned by each worker; D2 into ``B`` groups,
each coded with the same (n, lam) gradient code. In every round a worker runs ``W-1+B``
equal mini-tasks; mini-task (slot) ``m`` (0-based) of round ``r`` serves job ``r-m``:

* slots ``0 .. W-2`` process one of the worker's own D1 chunks of that job;
* slot ``W-1+b`` (``b = 0..B-1``) processes the worker's coded task of D2 group ``b`` if
  all its D1 chunks of that job have arrived, and otherwise one of its missing D1 chunks.

A D1 slot always takes the lowest-numbered own chunk whose result has not arrived, so a
chunk lost to a straggling round is redone in the next slot of that job (the paper counts
chunks; which chunk goes first does not matter). Job ``t`` is decodable (by the end of round
``t+T``, when its last slot has run) once all ``n(W-1)`` D1 chunks and, for every D2 group,
results from a decodable set (any ``n - lam`` workers) have arrived; the gradient is the sum of
the D1 chunks plus the GC-decoded sum of each D2 group.

Partitions: to express every task as a combination of equal partition gradients, each job is
split into ``P = n((W-1)(lam+1) + B)`` equal partitions. D1 chunk ``c`` of worker ``i`` is the
``lam+1`` partitions starting at ``(i(W-1)+c)(lam+1)``; D2 group ``b`` is the ``n`` partitions
starting at ``n(W-1)(lam+1) + b n``, coded by the (n, lam) code. Every mini-task then covers
``lam+1`` partitions, so its size is ``(1-d2)/(n(W-1)) = d2(lam+1)/(nB) = (lam+1)/P`` and the
load per worker and round is ``(W-1+B)(lam+1) / (n(B + (W-1)(lam+1)))``
(arXiv 2211.13802, M-SGC). ``lam`` must be below ``n`` (an (n, lam) code needs lam < n).

Example: driving M-SGC round by round (n=4, B=1, W=2, lam=1, so T=1 and load 1/3)::

    import torch
    from commlib.coding import MultiplexedSGC

    J, d = 3, 5
    sched = MultiplexedSGC(n=4, B=1, W=2, lam=1, num_jobs=J)
    grads = torch.randn(J, sched.num_partitions, d, dtype=torch.float64)  # g_p(job)
    slow = {0: {2}, 2: {1}}                       # who straggles in which round
    for r in range(sched.num_rounds):
        for w, tasks in sched.assignment(r).items():
            if w not in slow.get(r, set()):       # a straggler's results never arrive
                sched.receive(r, w, [t.compute(dict(enumerate(grads[t.job]))) for t in tasks])
        sched.end_round(r)
        job = sched.due(r)
        if job is not None:
            assert torch.allclose(sched.decode(job), grads[job].sum(0))
"""
from __future__ import annotations

from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Set

import numpy as np
import torch

from commlib.coding.gc import GradientCode, make_gradient_code
from commlib.coding.sgc import SGC_SCHEMES, MiniTask, SequentialScheduler, TaskKey
from commlib.errors import ConfigError


def msgc_d2_fraction(B: int, W: int, lam: int) -> Fraction:
    """d2 = B / (B + (lam+1)(W-1)) (arXiv 2211.13802, M-SGC)."""
    return Fraction(int(B), int(B) + (int(lam) + 1) * (int(W) - 1))


def msgc_load(n: int, B: int, W: int, lam: int) -> Fraction:
    """(lam+1)(W-1+B) / (n (B + (W-1)(lam+1))) (arXiv 2211.13802, M-SGC)."""
    n, B, W, lam = int(n), int(B), int(W), int(lam)
    return Fraction((lam + 1) * (W - 1 + B), n * (B + (W - 1) * (lam + 1)))


@SGC_SCHEMES.register("m-sgc", "multiplexed")
class MultiplexedSGC(SequentialScheduler):
    """M-SGC master. ``code`` picks the (n, lam) gradient code of the D2 groups (``auto``:
    FRC when (lam+1) | n, else cyclic with ``seed``), or pass a ready :class:`GradientCode`."""

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
        n, B, W, lam = int(n), int(B), int(W), int(lam)
        if B < 1 or W < 2 or lam < 0 or B > W - 1:
            raise ConfigError(
                f"M-SGC needs 1 <= B <= W-1, lam >= 0; got B={B}, W={W}, lam={lam}"
            )
        if lam >= n:
            raise ConfigError(f"M-SGC needs lam < n (an (n, lam) code); got lam={lam}, n={n}")
        super().__init__(n, W - 2 + B, num_jobs)  # arXiv 2211.13802, M-SGC: T = W-2+B
        self.B, self.W, self.lam = B, W, lam
        self.slots = W - 1 + B
        if isinstance(code, GradientCode):
            if code.n != n or code.s != lam or round(code.load * n) != lam + 1:
                raise ConfigError(f"M-SGC needs an (n={n}, s={lam}) code of load {lam + 1}/n, got {code}")
            self.code = code
        else:
            self.code = make_gradient_code(n, lam, code, seed)
        self._P = n * ((W - 1) * (lam + 1) + B)
        self._d2_base = n * (W - 1) * (lam + 1)

    # ------------------------------------------------------------------ scheme facts
    @property
    def load(self) -> float:
        return float(self.load_exact)

    @property
    def load_exact(self) -> Fraction:
        """(W-1+B) mini-tasks of (lam+1)/P each; equals :func:`msgc_load`."""
        return self.slots * self._task_size()

    @property
    def num_partitions(self) -> int:
        return self._P

    @property
    def d2_fraction(self) -> Fraction:
        return msgc_d2_fraction(self.B, self.W, self.lam)

    def _task_size(self) -> Fraction:
        return Fraction(self.lam + 1, self._P)  # every mini-task covers lam+1 partitions

    def d1_partitions(self, worker: int, chunk: int) -> List[int]:
        """Partitions of D1 chunk ``chunk`` (0..W-2) of worker ``worker``."""
        start = (self._check_worker(worker) * (self.W - 1) + int(chunk)) * (self.lam + 1)
        return list(range(start, start + self.lam + 1))

    def d2_partitions(self, group: int) -> List[int]:
        """The n partitions of D2 group ``group`` (0..B-1), in code order."""
        start = self._d2_base + int(group) * self.n
        return list(range(start, start + self.n))

    # ------------------------------------------------------------------ tasks
    def _task(self, job: int, key: TaskKey) -> MiniTask:
        kind, worker, index = key
        w = self._check_worker(worker)
        if kind == "d1" and 0 <= index < self.W - 1:
            coef = {p: 1.0 for p in self.d1_partitions(w, index)}
        elif kind == "d2" and 0 <= index < self.B:
            base = self.d2_partitions(index)
            coef = {base[j]: c for j, c in self.code.coefficients(w).items()}
        else:
            raise ConfigError(f"M-SGC has no task {key}")
        return MiniTask(w, job, kind, int(index), coef, float(self._task_size()))

    def _code_matrix(self) -> np.ndarray:
        return self.code.B

    def _missing_d1(self, job: int, worker: int) -> List[int]:
        have = self._keys.get(job, set())
        return [c for c in range(self.W - 1) if ("d1", worker, c) not in have]

    def _plan(self, round: int) -> Dict[int, List[MiniTask]]:
        r = int(round)
        plan: Dict[int, List[MiniTask]] = {w: [] for w in range(self.n)}
        for m in range(self.slots):
            job = r - m  # arXiv 2211.13802, M-SGC: mini-task m of round r serves job r-m
            if not self._is_job(job) or job in self._decoded:
                continue
            for w in range(self.n):
                lacking = self._missing_d1(job, w)
                if m < self.W - 1 or lacking:
                    if not lacking:  # D1 already complete (results submitted out of schedule)
                        continue
                    key: TaskKey = ("d1", w, lacking[0])
                else:
                    key = ("d2", w, m - (self.W - 1))  # D2 group m-W+1 (1-based in the paper)
                plan[w].append(self._placed(job, key, r, m))
        return plan

    # ------------------------------------------------------------------ decoding
    def _group_workers(self, have: Set[TaskKey], group: int) -> Set[int]:
        return {w for (kind, w, b) in have if kind == "d2" and b == group}

    def _missing(self, job: int, have: Set[TaskKey]) -> List[MiniTask]:
        out = [
            self._task(job, ("d1", w, c))
            for w in range(self.n)
            for c in range(self.W - 1)
            if ("d1", w, c) not in have
        ]
        for b in range(self.B):
            F = self._group_workers(have, b)
            for w in range(self.n):
                if self.code.decodable(F):
                    break
                if w not in F:
                    F.add(w)
                    out.append(self._task(job, ("d2", w, b)))
        return out

    def _decode(self, job: int, results: Mapping[TaskKey, torch.Tensor]) -> torch.Tensor:
        # arXiv 2211.13802, M-SGC: g = sum of all D1 chunks + GC-decoded sum of each D2 group
        total: Optional[torch.Tensor] = None
        for w in range(self.n):
            for c in range(self.W - 1):
                part = results[("d1", w, c)].to(torch.float64)
                total = part if total is None else total + part
        for b in range(self.B):
            part = self.code.decode(
                {w: res for (kind, w, g), res in results.items() if kind == "d2" and g == b}
            )
            total = part if total is None else total + part
        assert total is not None  # W >= 2 and n >= 1 give at least one D1 chunk
        return total
