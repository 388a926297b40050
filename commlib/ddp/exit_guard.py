"""Chain a Python callback on a collective's future without aborting the process at exit.

``torch.futures.Future.then(fn)`` keeps ``fn`` alive in the future's callback list. When the
collective completes, the communication thread (gloo's work loop, NCCL's watchdog) runs ``fn``
and then releases it, which takes the GIL a second time. The training thread wakes as soon as
``fn`` returned, and if it then reaches interpreter shutdown without releasing the GIL (the
last step of a short script; a rank that has nothing to save), the communication thread asks
for the GIL after finalisation began: CPython ends that thread with ``pthread_exit``, whose
unwinding through a ``noexcept`` C++ frame calls ``std::terminate`` -- SIGABRT, after every
result was written (observed with gloo under torchrun on a loaded 2-core machine).

``then_released`` registers each callback in a weak set; an ``atexit`` handler, which runs
before finalisation, waits with the GIL released until the communication threads have dropped
every callback (bounded, so a collective that will never complete cannot hang the exit).
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable

import torch

EXIT_WAIT_S = 2.0  # longest wait at exit for callbacks of collectives still in flight
EXIT_GRACE_S = 0.05  # then this long with the GIL released, for the threads' own clean-up

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
    # the thread that ran the last callback still drops its references to the work (and to
    # tensors made in Python, which also takes the GIL): give it the GIL for a moment
    time.sleep(EXIT_GRACE_S)
    return True
