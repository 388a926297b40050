"""The asynchronous mode of the parameter server: every push is applied on arrival, alone
(``decode_group`` with one contribution), with staleness = (server version) - (version the
worker computed on); pushes staler than ``max_staleness`` are dropped (counted). Each push is
answered with fresh parameters. The default optimizer is Adaptive Braking SGD
(``commlib.optim``). A worker silent for ``step_timeout`` is dropped until it is heard from.
"""
from __future__ import annotations

from typing import List, Optional

from commlib.ps.rounds import ServerAPI
from commlib.wire import Payload


def run_async(ps: ServerAPI) -> None:
    """Apply pushes as they come until ``config.steps`` updates (or the workers went silent)."""
    cfg = ps.config
    members = ps.members
    ps.send_params(list(range(ps.n)))
    while ps.version < cfg.steps:
        frame = ps.receive(min(cfg.step_timeout, 1.0))
        members.note_dead()
        members.drop_silent(ps.started, cfg.step_timeout)
        if frame is None:
            if ps.idle_for() > cfg.idle_timeout:
                ps.stopped = "no live workers"
                return
            continue
        w = frame.worker
        why = ps.check_push(frame)
        if why:
            if why in ("outdated", "future"):  # same process: tell it where things stand
                ps.send_params([w], answer=True)
            continue
        staleness = ps.version - frame.step
        payloads = None
        if cfg.max_staleness is not None and staleness > cfg.max_staleness:
            members[w].stale += 1
        else:
            payloads = ps.decode(frame)
        if payloads is not None:
            received: List[List[Optional[Payload]]] = [[None] * len(ps.keys) for _ in range(ps.n)]
            received[w] = payloads
            dirs = ps.decode_group(received)
            ps.apply(dirs, [w], staleness=staleness, frames=[frame])
        ps.send_params([w], answer=True)

