"""Sequential gradient coding: the round-by-round bookkeeping shared by SR-SGC and M-SGC
(Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv 2211.13802).

Jobs ``0, 1, 2, ...`` are gradient computations (each over the whole data set, split into
``num_partitions`` equal partitions, so job ``t``'s gradient is ``sum_p g_p(t)``). Job ``t``
starts in round ``t`` and must be decoded by the end of round ``t + T``. In every round each
worker receives a list of :class:`MiniTask`; a task asks for ``sum_p c_p * g_p(job)`` over its
coefficient map. A straggler's results for a round never arrive. The master learns the
straggler pattern online: the tasks of round ``r`` depend on what arrived in rounds ``< r``.

Server loop (``sched`` is an :class:`~commlib.coding.m_sgc.MultiplexedSGC` or a
:class:`~commlib.coding.sr_sgc.SelectiveRepeatSGC`)::

    for r in range(sched.num_rounds):
        plan = sched.assignment(r)                 # {worker: [MiniTask, ...]}, send these out
        for w, outs in gather_until_cutoff(plan):  # outs[k] answers plan[w][k]
            sched.receive(r, w, outs)
        sched.end_round(r)                         # who did not answer straggled in round r
        job = sched.due(r)                         # the job whose deadline is round r
        if job is not None:
            if not sched.decodable(job):           # pattern outside the straggler model
                for task in sched.missing(job):    # fall back: get exactly these results
                    sched.submit(task, compute(task))
            grad = sched.decode(job)               # float64 sum_p g_p(job)

``receive`` also accepts late results of an earlier round (used for decoding; the recorded
pattern keeps the worker as a straggler of that round, since later assignments relied on it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from commlib.coding.gc import NotDecodable
from commlib.errors import ConfigError
from commlib.registry import Registry

#: (kind, worker, index) names one mini-task of one job
TaskKey = Tuple[str, int, int]


@dataclass(frozen=True)
class MiniTask:
    """One unit of work: worker ``worker`` returns ``sum_p coefficients[p] * g_p(job)``.

    ``kind`` is ``"gc"`` (SR-SGC coded task), ``"d1"`` (M-SGC uncoded D1 chunk number
    ``index`` of this worker) or ``"d2"`` (M-SGC coded task of D2 group ``index``). ``size`` is
    the fraction of one job's data set the task processes. ``round``/``slot`` say where the
    schedule placed it (``None`` for a fallback task from ``missing``).
    """

    worker: int
    job: int
    kind: str
    index: int
    coefficients: Mapping[int, float] = field(compare=False)
    size: float
    round: Optional[int] = None
    slot: Optional[int] = None

    @property
    def key(self) -> TaskKey:
        return (self.kind, self.worker, self.index)

    @property
    def partitions(self) -> List[int]:
        return sorted(self.coefficients)

    def compute(self, partition_grads: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The task's result from the job's partition gradients (float64 accumulation)."""
        out: Optional[torch.Tensor] = None
        for p in self.partitions:
            if p not in partition_grads:
                raise ConfigError(f"task {self.key} of job {self.job} needs partition {p}")
            term = partition_grads[p].to(torch.float64) * self.coefficients[p]
            out = term if out is None else out + term
        if out is None:
            raise ConfigError(f"task {self.key} of job {self.job} has no partition")
        return out


SGC_SCHEMES: "Registry[SequentialScheduler]" = Registry("sequential gradient code")


class SequentialScheduler(ABC):
    """Round-by-round master of a sequential gradient code.

    ``num_jobs`` (optional) bounds the job ids; without it jobs never stop and
    ``num_rounds`` is None. Subclasses define the schedule (:meth:`_plan`), the decoding rule
    and the canonical task of a key (:meth:`_task`).
    """

    def __init__(self, n: int, T: int, num_jobs: Optional[int] = None) -> None:
        if int(n) < 1:
            raise ConfigError(f"need n >= 1 workers, got {n}")
        if num_jobs is not None and int(num_jobs) < 0:
            raise ConfigError(f"num_jobs must be >= 0, got {num_jobs}")
        self.n = int(n)
        self.T = int(T)
        self.num_jobs: Optional[int] = None if num_jobs is None else int(num_jobs)
        self._round = 0
        self._plans: Dict[int, Dict[int, List[MiniTask]]] = {}
        self._reported: Set[int] = set()
        self._rows: List[np.ndarray] = []
        self._keys: Dict[int, Set[TaskKey]] = {}
        self._tensors: Dict[int, Dict[TaskKey, torch.Tensor]] = {}
        self._decoded: Set[int] = set()

    # ------------------------------------------------------------------ scheme facts
    @property
    @abstractmethod
    def load(self) -> float:
        """Fraction of one job's data set each worker processes per round."""

    @property
    @abstractmethod
    def num_partitions(self) -> int:
        """Equal partitions each job's data set is split into."""

    @property
    def num_rounds(self) -> Optional[int]:
        """Rounds needed to finish all jobs (num_jobs + T), or None without num_jobs."""
        return None if self.num_jobs is None else self.num_jobs + self.T

    @property
    def current_round(self) -> int:
        return self._round

    @property
    def pattern(self) -> np.ndarray:
        """Recorded straggler pattern of the closed rounds, shape (rounds, n)."""
        if not self._rows:
            return np.zeros((0, self.n), dtype=bool)
        return np.stack(self._rows)

    def recent_pattern(self, rounds: int) -> np.ndarray:
        """The last ``rounds`` rows of :attr:`pattern` (all ``admits`` needs for a window W)."""
        rows = self._rows[-int(rounds):] if int(rounds) > 0 else []
        return np.stack(rows) if rows else np.zeros((0, self.n), dtype=bool)

    def deadline(self, job: int) -> int:
        """Round by whose end job ``job`` must be decoded."""
        return int(job) + self.T

    def due(self, round: int) -> Optional[int]:
        """The job whose deadline is round ``round`` (None if there is none)."""
        job = int(round) - self.T
        return job if self._is_job(job) else None

    def _is_job(self, job: int) -> bool:
        return job >= 0 and (self.num_jobs is None or job < self.num_jobs)

    # ------------------------------------------------------------------ rounds
    def assignment(self, round: int) -> Dict[int, List[MiniTask]]:
        """``{worker: tasks}`` of round ``round`` (the current one, or a recent past one)."""
        r = int(round)
        if r > self._round:
            raise ConfigError(
                f"round {r} cannot be planned before round {self._round} has ended"
            )
        if r not in self._plans:
            if r < self._round:
                raise ConfigError(f"round {r} is too old; its plan was dropped")
            self._plans[r] = self._plan(r)
        return self._plans[r]

    def tasks(self, round: int, worker: int) -> List[MiniTask]:
        """Mini-tasks worker ``worker`` computes in round ``round``."""
        return list(self.assignment(round)[self._check_worker(worker)])

    def receive(self, round: int, worker: int, results: Sequence[torch.Tensor]) -> None:
        """All results of worker ``worker`` for round ``round``, in the order of its tasks."""
        w = self._check_worker(worker)
        plan = self.assignment(round)[w]
        if len(results) != len(plan):
            raise ConfigError(
                f"worker {w} round {round}: {len(results)} results for {len(plan)} tasks"
            )
        for task, res in zip(plan, results):
            self._store(task, res)
        if int(round) == self._round:
            self._reported.add(w)

    def submit(self, task: MiniTask, result: torch.Tensor) -> None:
        """One result of one task (e.g. a fallback task of :meth:`missing`)."""
        if not self._is_job(task.job):
            raise ConfigError(f"job {task.job} does not exist")
        canon = self._task(task.job, task.key)
        if dict(canon.coefficients) != dict(task.coefficients):
            raise ConfigError(f"task {task.key} of job {task.job} is not one of this scheme")
        self._store(canon, result)

    def end_round(self, round: int) -> np.ndarray:
        """Close round ``round``: workers with tasks that did not report straggled.

        Returns the row of stragglers recorded for the round."""
        r = int(round)
        if r != self._round:
            raise ConfigError(f"round {r} cannot end: the current round is {self._round}")
        plan = self.assignment(r)
        row = np.array(
            [bool(plan[w]) and w not in self._reported for w in range(self.n)], dtype=bool
        )
        self._rows.append(row)
        self._reported = set()
        self._round = r + 1
        for old in [k for k in self._plans if k < r - self.T]:
            del self._plans[old]
        return row

    def _store(self, task: MiniTask, result: torch.Tensor) -> None:
        if not isinstance(result, torch.Tensor):
            raise ConfigError(f"result of task {task.key} of job {task.job} is not a tensor")
        if task.job in self._decoded:
            return
        self._keys.setdefault(task.job, set()).add(task.key)
        self._tensors.setdefault(task.job, {}).setdefault(task.key, result)

    def received(self, job: int) -> Set[TaskKey]:
        """Keys of the tasks of job ``job`` whose results have arrived."""
        return set(self._keys.get(int(job), set()))

    # ------------------------------------------------------------------ decoding
    def decodable(self, job: int) -> bool:
        """True when the results at hand determine job ``job``'s full gradient."""
        job = int(job)
        return job in self._decoded or not self.missing(job)

    def missing(self, job: int) -> List[MiniTask]:
        """Tasks whose results would make job ``job`` decodable (empty when it is)."""
        job = int(job)
        if not self._is_job(job):
            raise ConfigError(f"job {job} does not exist")
        if job in self._decoded:
            return []
        return self._missing(job, self._keys.get(job, set()))

    def decode(self, job: int) -> torch.Tensor:
        """Full gradient ``sum_p g_p(job)`` in float64; frees the job's stored results.

        Raises :class:`NotDecodable` (with :meth:`missing` telling what is lacking)."""
        job = int(job)
        if job in self._decoded:
            raise ConfigError(f"job {job} was already decoded")
        lack = self.missing(job)
        if lack:
            raise NotDecodable(
                f"job {job} is not decodable: {len(lack)} more task results needed, e.g. "
                f"{[t.key for t in lack[:5]]}"
            )
        out = self._decode(job, self._tensors.get(job, {}))
        self.discard(job)
        self._decoded.add(job)
        return out

    def discard(self, job: int) -> None:
        """Drop the stored results of job ``job`` (after decoding, or when giving it up)."""
        self._keys.pop(int(job), None)
        self._tensors.pop(int(job), None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything a restarted master needs to go on (results included, as tensors)."""
        return {
            "n": self.n,
            "T": self.T,
            "num_jobs": self.num_jobs,
            "code_B": self._code_matrix(),
            "round": self._round,
            "rows": self.pattern,
            "reported": sorted(self._reported),
            "plans": {
                r: {w: [(t.job, t.key, t.slot) for t in ts] for w, ts in plan.items()}
                for r, plan in self._plans.items()
            },
            "results": {job: dict(res) for job, res in self._tensors.items()},
            "decoded": sorted(self._decoded),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a master built with the same arguments."""
        mine = self._code_matrix()
        if (state["n"], state["T"], state["num_jobs"]) != (self.n, self.T, self.num_jobs) or (
            mine.shape != np.shape(state["code_B"]) or not np.array_equal(mine, state["code_B"])
        ):
            raise ConfigError("state was saved by a scheduler with other parameters or code")
        self._round = int(state["round"])
        self._rows = [np.asarray(row, dtype=bool) for row in state["rows"]]
        self._reported = {int(w) for w in state["reported"]}
        self._plans = {
            int(r): {
                int(w): [self._placed(job, tuple(key), int(r), slot) for job, key, slot in ts]
                for w, ts in plan.items()
            }
            for r, plan in state["plans"].items()
        }
        self._tensors = {int(j): dict(res) for j, res in state["results"].items()}
        self._keys = {j: set(res) for j, res in self._tensors.items()}
        self._decoded = {int(j) for j in state["decoded"]}

    def _placed(self, job: int, key: TaskKey, round: int, slot: Optional[int]) -> MiniTask:
        """The canonical task ``key`` of ``job`` placed in ``round`` / ``slot``."""
        t = self._task(job, key)
        return MiniTask(t.worker, job, t.kind, t.index, t.coefficients, t.size, round, slot)

    @abstractmethod
    def _code_matrix(self) -> np.ndarray:
        """Encoding matrix of the gradient code in use (identifies the scheme's code)."""

    # ------------------------------------------------------------------ scheme hooks
    @abstractmethod
    def _plan(self, round: int) -> Dict[int, List[MiniTask]]:
        """Tasks of every worker in round ``round`` from the results received so far."""

    @abstractmethod
    def _task(self, job: int, key: TaskKey) -> MiniTask:
        """The canonical task named ``key`` of job ``job`` (round/slot unset)."""

    @abstractmethod
    def _missing(self, job: int, have: Set[TaskKey]) -> List[MiniTask]:
        """Tasks to add to ``have`` to decode ``job``."""

    @abstractmethod
    def _decode(self, job: int, results: Mapping[TaskKey, torch.Tensor]) -> torch.Tensor:
        """Decode a job known to be decodable."""

    def _check_worker(self, worker: int) -> int:
        w = int(worker)
        if not 0 <= w < self.n:
            raise ConfigError(f"worker {worker} out of range 0..{self.n - 1}")
        return w
