"""The round interface of the synchronous parameter server, and the plain (uncoded) round.

A *round kind* runs one synchronous round against the server's public API
(:class:`ServerAPI`): send parameters, receive frames, check each push, then apply an update.
Three kinds exist: :class:`SyncRound` (this module: decode and aggregate with the scheme's
server half), ``CodedServer`` (``commlib/ps/coded.py``: decode a gradient code from the fastest
``n - s`` workers) and ``SGCServer`` (``commlib/ps/sequential.py``: sequential gradient
coding). ``commlib.ps.server.ParameterServer`` picks one with :func:`build_round`.

One plain round at step ``t``:
  1. PARAMS(t) to every live worker (dropped ones too every ``probe_every`` rounds);
  2. PUSH frames for step t until ``quorum`` of the live workers pushed or ``step_timeout``
     passed; every frame is validated before use (a bad one is counted and treated as missing);
     pushes for an older step are late (dropped, counted);
  3. ``SchemeServer.decode_group`` (missing workers -> None), then the optimizer step.
A worker that misses ``max_misses`` rounds in a row is dropped from the quorum (counted).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from commlib.errors import ConfigError
from commlib.ps.membership import Membership
from commlib.ps.protocol import Frame
from commlib.wire import Payload

#: worker -> (its payloads, its PUSH frame)
Pushes = Dict[int, Tuple[List[Payload], Frame]]


class ServerAPI(Protocol):
    """What a round kind may use of the server (``commlib.ps.server.ParameterServer``)."""

    config: Any
    n: int
    quorum: int
    version: int
    incarnation: int
    epoch: int
    params: List[torch.nn.Parameter]
    keys: List[str]
    numels: List[int]
    dense: List[bool]
    members: Membership
    transport: Any
    stopped: str
    started: float  # time.monotonic() when training started

    def receive(self, timeout: float) -> Optional[Frame]: ...

    def check_push(self, frame: Frame) -> str: ...

    def decode(self, frame: Frame) -> Optional[List[Payload]]: ...

    def send_params(self, workers: Sequence[int], body: Optional[bytes] = None, answer: bool = False) -> None: ...

    def apply(self, dirs: List[torch.Tensor], workers: Sequence[int], staleness: int = 0,
              frames: Sequence[Frame] = ()) -> None: ...

    def empty_round(self) -> None: ...

    def decode_group(self, received: List[List[Optional[Payload]]]) -> List[torch.Tensor]: ...

    def agree(self, got: Pushes) -> Pushes: ...

    def idle_for(self) -> float: ...

    def note_progress(self) -> None: ...


class RoundKind(ABC):
    """Defaults shared by every round kind; each kind implements :meth:`run_round`."""

    #: True: a HELLO from a known worker is answered with parameters at once
    answers_hello = True
    #: True: ``state_dict`` holds state a checkpoint must keep
    stateful = False

    def __init__(self, n: int) -> None:
        self.n = int(n)

    @property
    def quorum(self) -> int:
        """Pushes a round waits for by default."""
        return self.n

    def newest_step(self, ps: ServerAPI) -> int:
        """The newest step a push may have been computed for."""
        return ps.version

    def forget(self, w: int) -> None:
        """Worker ``w`` is a new process."""

    @abstractmethod
    def run_round(self, ps: ServerAPI) -> None:
        """Collect one round's pushes from ``ps`` and apply them (or end the round empty)."""

    def summary(self) -> Optional[Dict[str, Any]]:
        return None

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore by default."""


class SyncRound(RoundKind):
    """The plain synchronous round (and the base of the coded one)."""

    def enough(self, got: Pushes) -> bool:
        """Whether the pushes received so far may end the round (once the quorum is in)."""
        return True

    def keep_waiting(self, ps: ServerAPI, expected: Sequence[int], got: Pushes, fell_back: bool) -> bool:
        """At ``step_timeout`` before :meth:`enough`: True waits one more ``step_timeout``."""
        return False

    def combine(self, ps: ServerAPI, got: Pushes) -> Optional[List[torch.Tensor]]:
        """The update directions from this round's pushes; None: nothing can be applied."""
        received = [got[w][0] if w in got else [None] * len(ps.keys) for w in range(ps.n)]
        try:
            return ps.decode_group(received)
        except ConfigError:  # too few contributions for the robust rule this round
            return None

    def run_round(self, ps: ServerAPI) -> None:
        cfg = ps.config
        members = ps.members
        t = ps.version
        probe = t % cfg.probe_every == 0
        targets = [w for w in range(ps.n) if members[w].live or probe]
        ps.send_params(targets)
        members.note_dead()
        expected = [w for w in targets if members[w].live]
        listed = set(expected)
        got: Pushes = {}
        deadline = time.monotonic() + cfg.step_timeout
        fell_back = False
        # pushes to wait for: the quorum, or every expected worker still reachable if fewer
        while len(got) < max(1, min(ps.quorum, members.alive_among(listed))) or not self.enough(got):
            frame = ps.receive(min(deadline - time.monotonic(), 0.5))
            if frame is None and time.monotonic() < deadline:
                continue  # look again at who is still alive
            if frame is None and self.keep_waiting(ps, expected, got, fell_back):
                fell_back = True  # outside the straggler model: wait one more step_timeout
                deadline = time.monotonic() + cfg.step_timeout
                continue
            if frame is None:
                break
            w = frame.worker
            if ps.check_push(frame):
                continue
            if frame.step != t:
                members[w].late += 1
                continue
            if w in got:
                members[w].duplicates += 1
                continue
            payloads = ps.decode(frame)
            if payloads is not None:
                got[w] = (payloads, frame)
        got = ps.agree(got)
        members.note_dead()
        for w in expected:
            if w not in got:
                members.missed(w, cfg.max_misses)
        dirs = self.combine(ps, got) if len(got) >= cfg.min_pushes else None
        if dirs is None:
            ps.empty_round()
            return
        ps.apply(dirs, list(got), frames=[f for _, f in got.values()])
