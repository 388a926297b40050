"""Atomic server checkpoints: write a temporary file next to the target, fsync, rename.

A reader sees either the previous checkpoint or the new one, never a torn file, whatever
moment the process dies at. Loading uses ``torch.load(weights_only=True)``: a checkpoint
holds tensors, numbers, strings, lists and dicts only; anything else (a pickled object, a
tampered file) is refused with a ConfigError and runs no code. A save killed half-way leaves
``PATH.tmp.PID``; :func:`remove_stale_temps` (called by every save and load) deletes those whose
process is gone.
"""
from __future__ import annotations

import glob
import os
import pickle
import shutil
from typing import Any, Dict, List

import torch

from commlib.errors import ConfigError

FORMAT = "commlib-ps-checkpoint/1"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temps(path: str) -> List[str]:
    """Delete ``PATH.tmp.PID`` files left by saves whose process ``PID`` is gone; returns them.
    (On a shared file system a PID is only meaningful on the host that wrote it: the files of
    live processes elsewhere may look stale, so keep one writer per checkpoint path.)"""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        suffix = tmp[len(path) + len(".tmp."):]
        if not suffix.isdigit() or int(suffix) == os.getpid() or _pid_alive(int(suffix)):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:  # removed by someone else meanwhile
            pass
    return removed


def save_atomic(obj: Dict[str, Any], path: str, keep_previous: bool = False) -> None:
    """Write ``obj`` to ``path`` so that the file is always complete. ``keep_previous``: the
    checkpoint it replaces stays as ``PATH.prev`` (a sharded server's shards may have to go back
    one step to resume together: ``commlib.ps.shard_procs``)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    remove_stale_temps(path)
    if keep_previous:
        remove_stale_temps(f"{path}.prev")
    if keep_previous and os.path.exists(path):
        prev_tmp = f"{path}.prev.tmp.{os.getpid()}"
        try:
            os.link(path, prev_tmp)  # PATH itself stays in place throughout
        except OSError:  # no hard links on this file system
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, f"{path}.prev")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass


def load_plain(path: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain types only; anything else is a
    ConfigError (the file is not trusted to run code)."""
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}")
    remove_stale_temps(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a checkpoint of tensors and plain types ({str(exc)[:300]})") from None


def load(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` and check its format tag."""
    ck = load_plain(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a commlib parameter-server checkpoint")
    return ck
