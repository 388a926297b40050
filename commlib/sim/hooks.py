"""The worker side of a fault plan: ``FaultHooks`` plugs a worker's faults into ``PSWorker``.

Built in the worker's own process from JSON options (``FaultHooks(worker=w, **options)``), so
the same plan drives in-process threads and Ray actors.
"""
from __future__ import annotations

import json
import threading
import zlib
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from commlib.errors import ConfigError
from commlib.ps.worker import PSWorker, RoundSkipped, WorkerCrashed, WorkerHooks


STRAGGLE_MODES = ("sleep", "skip")


def _params_digest(params: Sequence[torch.Tensor]) -> int:
    """CRC-32 of the parameters' bytes: which parameters an attack row was computed at."""
    crc = 0
    for p in params:
        crc = zlib.crc32(p.detach().contiguous().view(-1).numpy().view(np.uint8), crc)
    return crc


class _AttackRows:
    """The rows of a coordinated vector attack, by (attack, step, attackers, parameters).

    Every attacker computes the same omniscient attack from the honest workers' gradients at
    the same parameters; with many logical workers per process (``commlib.ps.worker_group``)
    the first attacker of a step computes it and the others take their row from here (the
    result is the same tensor they would have computed). Keeps the last few steps."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = int(keep)
        self._rows: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        with self._lock:
            return self._rows.get(key)

    def put(self, key: tuple, rows: torch.Tensor) -> None:
        with self._lock:
            self._rows[key] = rows
            while len(self._rows) > self.keep:
                self._rows.popitem(last=False)


_ATTACK_ROWS = _AttackRows()


class FaultHooks(WorkerHooks):
    """One worker's faults (see ``commlib.sim.plan.WorkerFaults`` for the meaning of each option).

    Args:
        worker: this worker's id.
        compute_delays: seconds to sleep before computing, per step (straggling).
        work_s: seconds one full-data gradient takes (a step's data over all workers): after each
            computation the worker sleeps ``work_s x load`` (its share of the data), so schemes
            with different loads per worker (gradient coding) pay for their compute.
        preempt: a straggling stall (``compute_delays``) ends early when the server sends the
            next round, and the stalled round is given up (its result never arrives), as for
            independent per-round invocations (the serverless workers of the SGC paper):
            a straggler's delay then belongs to its round and does not carry into the next.
        straggle: "sleep" (a straggler's delay passes in real time: ``worker.wait``, which parks
            only this logical worker under ``commlib.ps.worker_group``) or "skip" (simulated
            time: no time passes, the straggling round is given up at once, as if its push had
            reached the server after the round closed).
        byzantine_ids: every worker running a vector attack (they send one output row each).
        seed: seed of this worker's random choices (garbling, jitter).
    """

    def __init__(self, worker: int, *, crash_at: Optional[int] = None, hang_at: Optional[int] = None,
                 hang_s: float = 0.0, attack: Optional[str] = None, attack_options: Optional[Dict[str, Any]] = None,
                 byzantine_ids: Sequence[int] = (), compute_delays: Sequence[float] = (),
                 garbage_at: Sequence[int] = (), garbage_p: float = 0.0, delay_s: float = 0.0,
                 jitter_s: float = 0.0, work_s: float = 0.0, preempt: bool = False, straggle: str = "sleep",
                 seed: int = 0) -> None:
        from commlib.attacks import ATTACKS

        self.worker = int(worker)
        self.crash_at = None if crash_at is None else int(crash_at)
        self.hang_at = None if hang_at is None else int(hang_at)
        self.hang_s = float(hang_s)
        self.attack = ATTACKS.build(attack, **dict(attack_options or {})) if attack else None
        # attackers of one process that run the same attack share its output (see _AttackRows)
        self.attack_key = json.dumps([attack, dict(attack_options or {})], sort_keys=True, default=str)
        self.byzantine_ids: List[int] = [int(b) for b in byzantine_ids]
        if self.attack is not None and self._vector_attack() and self.worker not in self.byzantine_ids:
            raise ConfigError(f"worker {self.worker} runs {attack!r} but is not among byzantine_ids")
        self.compute_delays = [float(d) for d in compute_delays]
        self.garbage_at = {int(s) for s in garbage_at}
        self.garbage_p = float(garbage_p)
        self.delay_s, self.jitter_s = float(delay_s), float(jitter_s)
        self.work_s = float(work_s)
        self.preempt = bool(preempt)
        if straggle not in STRAGGLE_MODES:
            raise ConfigError(f"straggle must be one of {STRAGGLE_MODES}, got {straggle!r}")
        self.straggle = straggle
        if not self.work_s >= 0:
            raise ConfigError(f"work_s must be >= 0, got {work_s}")
        self.rng = np.random.default_rng([int(seed), self.worker])
        self.hung = False
        self.garbled = 0

    def _vector_attack(self) -> bool:
        return self.attack is not None and not self.attack.data_level and not self.attack.sends_nothing

    def before_compute(self, worker: PSWorker, step: int) -> None:
        if self.crash_at is not None and step >= self.crash_at:
            raise WorkerCrashed(f"worker {self.worker} crashes at step {step} (fault plan)")
        if self.hang_at is not None and step >= self.hang_at and not self.hung:
            self.hung = True
            worker.wait(self.hang_s)
        if 0 <= step < len(self.compute_delays) and self.compute_delays[step] > 0:
            if self.straggle == "skip":
                raise RoundSkipped(f"worker {self.worker}: round {step} straggles (simulated time)")
            if worker.wait(self.compute_delays[step], preemptible=self.preempt):
                raise RoundSkipped(f"worker {self.worker}: round {step} given up for the next one")

    def work(self, worker: PSWorker, step: int, load: float) -> None:
        if self.work_s > 0 and load > 0:
            worker.wait(self.work_s * load)

    def silent(self, worker: PSWorker, step: int) -> bool:
        return self.attack is not None and self.attack.sends_nothing

    def flip_labels(self, worker: PSWorker, step: int) -> bool:
        return self.attack is not None and self.attack.data_level

    def byzantine(self, worker: PSWorker, step: int, grads: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """The attack's row for this worker, crafted from the honest workers' gradients at the
        current parameters (an omniscient attacker, the usual threat model, docs/algorithms.md §6)."""
        if not self._vector_attack():
            return None
        from commlib.attacks.plan import AttackPlan

        # a stateful attack (e.g. gaussian's draw count) computes its own rows: its state advances
        shared = not getattr(self.attack, "state_dict", dict)()
        key = (self.attack_key, step, tuple(self.byzantine_ids), _params_digest(worker.params))
        out = _ATTACK_ROWS.get(key) if shared else None
        if out is None:
            # What every worker would send if honest (Byzantine rows are replaced by the plan).
            stack = torch.zeros(worker.n_workers, sum(worker.numels))
            for h in range(worker.n_workers):
                if h in self.byzantine_ids:
                    continue
                loss = worker.task.loss(worker.model, h, worker.n_workers, step)
                gs = torch.autograd.grad(loss, worker.params, allow_unused=True)
                stack[h] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for g, p in zip(gs, worker.params)])
            out, _present = AttackPlan(self.attack, self.byzantine_ids).apply(stack, worker.scheme.aggregator)
            if shared:
                _ATTACK_ROWS.put(key, out)
        return list(torch.split(out[self.worker], worker.numels))

    def before_send(self, worker: PSWorker, step: int, data: bytes) -> bytes:
        wait = self.delay_s + (self.rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)
        if wait > 0:
            worker.wait(wait)
        if step in self.garbage_at or (self.garbage_p and self.rng.random() < self.garbage_p):
            self.garbage_at.discard(step)
            buf = bytearray(data)
            for pos in self.rng.integers(0, len(buf), size=4):
                buf[int(pos)] ^= 0xA5  # a few flipped bytes anywhere in the frame
            self.garbled += 1
            return bytes(buf)
        return data
