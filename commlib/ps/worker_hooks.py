"""A parameter-server worker's fault-injection points (``commlib.sim`` implements them), its
counters, and the exceptions a fault hook raises."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:  # annotations only
    from commlib.ps.worker import PSWorker


class WorkerCrashed(Exception):
    """Raised by a fault hook to make a worker stop as if its process had died."""


class RoundSkipped(Exception):
    """Raised by a fault hook to give up the current round (its result never arrives)."""


class WorkerHooks:
    """Fault-injection points (``commlib.sim`` implements them); the defaults do nothing."""

    def before_compute(self, worker: "PSWorker", step: int) -> None:
        """Called before each gradient (may sleep: a straggler; raise WorkerCrashed: a crash)."""

    def silent(self, worker: "PSWorker", step: int) -> bool:
        """True: compute nothing and send nothing this step (a crashed-attack worker)."""
        return False

    def flip_labels(self, worker: "PSWorker", step: int) -> bool:
        """True: compute the gradient on flipped labels (label-flipping attack)."""
        return False

    def work(self, worker: "PSWorker", step: int, load: float) -> None:
        """Called after each computation with its load: the fraction of one full-data gradient
        (a step's data over all workers) it processed (may sleep: simulated compute time)."""

    def byzantine(self, worker: "PSWorker", step: int, grads: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """Replacement vectors (one flat tensor per key) sent instead of the scheme's payloads."""
        return None

    def before_send(self, worker: "PSWorker", step: int, data: bytes) -> bytes:
        """The bytes that actually leave (may sleep: network delay; may garble them)."""
        return data


@dataclass
class WorkerStats:
    pushes: int = 0
    params_received: int = 0
    rollbacks: int = 0
    skipped_rounds: int = 0
    resyncs: int = 0
    hellos: int = 0
    rejected_frames: int = 0
    ignored_frames: int = 0
    compute_s: float = 0.0
    status: str = "running"


def new_session() -> int:
    """A random non-zero 32-bit id for this worker process."""
    while True:
        s = int.from_bytes(os.urandom(4), "little")
        if s:
            return s
