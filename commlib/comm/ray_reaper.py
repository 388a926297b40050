"""Reap the processes of a local Ray when the process that started it ends, however it ends.

Ray 2.60's GCS and raylet exit when their driver is killed, but the dashboard agent and the
runtime-env agent they started keep running (and listening). :func:`start_reaper` starts this
module as a small watchdog process: it keeps a list of every descendant of the driver (the
Ray processes it started, their agents and workers), refreshed every ``--every`` seconds, and
reads a pipe whose only writer is the driver. A process is a Ray process when its command
line names the ray package or Ray renamed it ``ray::...`` (other children of the driver are
left alone). When the driver exits or is killed the pipe
closes; the watchdog then sends SIGKILL to every listed process that is still the same process
(same start time) and to their descendants. Linux only (it reads ``/proc``); elsewhere it
is not started.

    python -m commlib.comm.ray_reaper --driver PID --ray-dir RAY_PACKAGE_DIR [--every 0.5] < pipe
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
from typing import Dict, Iterable, Optional, Set, Tuple


def _stat(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the name (field 2) may hold spaces and ')'
    return int(fields[1]), int(fields[19])


def _all() -> Dict[int, Tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(roots: Iterable[int], table: Optional[Dict[int, Tuple[int, int]]] = None) -> Dict[int, int]:
    """pid -> start time of every live descendant of ``roots`` (not the roots themselves)."""
    table = _all() if table is None else table
    children: Dict[int, list] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: Dict[int, int] = {}
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out[c] = table[c][1]
                todo.append(c)
    return out


def _is_ray(pid: int, ray_dir: bytes) -> bool:
    """A Ray process: its command line names the ray package, or Ray renamed it ``ray::...``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return cmd.startswith(b"ray::") or (bool(ray_dir) and ray_dir in cmd)


def reap(known: Dict[int, int]) -> Set[int]:
    """SIGKILL every process of ``known`` (pid -> start time) that is still that process, and
    every descendant of them; returns the pids signalled."""
    table = _all()
    alive = {pid for pid, start in known.items() if pid in table and table[pid][1] == start}
    targets = alive | set(descendants(alive, table))
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return targets


def watch(driver: int, every: float, ray_dir: str, fd: int = 0) -> int:
    """Track the driver's Ray descendants until ``fd`` reaches end of file, then reap them."""
    known: Dict[int, int] = {}
    tag = ray_dir.encode()
    while True:
        for pid, start in descendants([driver]).items():
            if pid not in known and _is_ray(pid, tag):
                known[pid] = start
        ready, _, _ = select.select([fd], [], [], every)
        if ready and not os.read(fd, 4096):
            break
        if _stat(driver) is None:
            break
    me = os.getpid()
    reap({p: s for p, s in known.items() if p != me})
    return 0


def start_reaper(ray_dir: str, every: float = 0.5) -> Optional[subprocess.Popen]:
    """Start the watchdog for this process (call it after the local Ray is up). The pipe's write
    end stays open in this process only (not inherited, so Ray's processes do not hold it)."""
    if not sys.platform.startswith("linux"):
        return None
    r, w = os.pipe()
    os.set_inheritable(w, False)
    proc = subprocess.Popen([sys.executable, "-m", "commlib.comm.ray_reaper", "--driver", str(os.getpid()),
                             "--every", str(every), "--ray-dir", ray_dir], stdin=r, close_fds=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    os.close(r)
    proc._commlib_pipe = w  # closing it (or exiting) tells the watchdog to reap
    return proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m commlib.comm.ray_reaper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", type=int, required=True)
    p.add_argument("--every", type=float, default=0.5)
    p.add_argument("--ray-dir", default="", help="the ray package directory (marks Ray processes)")
    args = p.parse_args(argv)
    return watch(args.driver, args.every, args.ray_dir)


if __name__ == "__main__":
    sys.exit(main())
