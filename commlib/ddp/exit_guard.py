"""Chain a Python callback on a collective's future without aborting the process at exit.

On gloo, ``torch.futures.Future.then(fn)`` runs ``fn`` on gloo's work thread when the collective
completes; that thread then releases ``fn`` and, when it drops the finished work, the Python
wrappers of the work's tensors (torch 2.13 releases a tensor's Python object when its C++ count
falls to the wrapper's own reference). Each release takes the GIL. The training thread wakes as
soon as ``fn`` returned; if it then reaches interpreter shutdown without releasing the GIL (the
last step of a short script, a rank with nothing to save), the work thread asks for the GIL
after finalisation began, CPython ends it with ``pthread_exit``, and unwinding through a
``noexcept`` C++ frame calls ``std::terminate``: SIGABRT after every result was written
(``terminate called without an active exception``; seen under torchrun on a loaded 2-core
machine, reproduced by ``tests/exit_job.py``).

``then_released`` registers each callback in a weak set; an ``atexit`` handler, which runs
before finalisation, waits with the GIL released until the work threads have dropped every
callback (at most ``EXIT_WAIT_S``, so a collective that never completes cannot hang the exit),
then ``EXIT_GRACE_S`` more for the same threads to drop the finished works and their tensors
(microseconds of work once they are scheduled; nothing observable from Python marks its end).
On NCCL the future completes when the collective is queued and ``fn`` runs on the calling thread,
so the guard only costs the grace there.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable

import torch

EXIT_WAIT_S = 2.0  # longest wait at exit for callbacks of collectives still in flight
EXIT_GRACE_S = 0.2  # then this long with the GIL released, for the threads' own clean-up

_pending: "weakref.WeakSet[Callable]" = weakref.WeakSet()
_lock = threading.Lock()
_installed = False


def then_released(fut: torch.futures.Future, fn: Callable) -> torch.futures.Future:
    """``fut.then(fn)``, with ``fn`` waited for at interpreter exit until the thread that
    completes ``fut`` has released it (see the module docstring)."""
    global _installed
    with _lock:
        _pending.add(fn)
        if not _installed:
            atexit.register(wait_released)
            _installed = True
    return fut.then(fn)


def pending() -> int:
    """How many chained callbacks are still held by a future (run or not)."""
    with _lock:
        return len(_pending)


def wait_released(timeout: float = EXIT_WAIT_S) -> bool:
    """Sleep (GIL released) until no chained callback is held any more, at most ``timeout``
    seconds. Returns True when none is left."""
    deadline = time.monotonic() + timeout
    while pending():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    # the thread that ran the last callback still drops the finished work and its tensors'
    # Python wrappers (which takes the GIL too): give it the GIL for a moment
    time.sleep(EXIT_GRACE_S)
    return True
