"""A sharded parameter server across processes: who is where, how one transport endpoint per
process carries the shards' and the workers' traffic, and the shards' exchange over it.

Ranks of the job's transport (torch.distributed/gloo, Ray, MPI; authenticated with the job
secret, ``commlib/comm/auth.py``)::

    0 .. k-1          shard servers (shard i serves key range i, ``commlib.ps.shards``)
    k .. k+P-1        worker processes; process p hosts logical workers ``split_workers(n, P)[p]``

A :class:`ShardRouter` owns a process's endpoint. Every message it sends starts with a route
header (channel, shard, logical worker); a receiving router checks the header against the
authenticated sender rank before it hands anything on:

* a PS frame to shard i from logical worker w must come from the process that hosts w;
* a PS frame to logical worker w from shard i must come from rank i, to the process hosting w;
* an exchange message must come from another shard's rank and name that shard.

Anything else is refused and counted (``ShardRouter.rejected``). On top of the router each
shard's :class:`~commlib.ps.server.ParameterServer` and each logical worker's part get an
ordinary :class:`~commlib.comm.base.Transport` (a view): the server is rank 0 of a world of
``n + 1`` and worker w is rank ``w + 1``, as in an unsharded job, so frames, checks and
exactly-once bookkeeping are unchanged. :class:`NetShardExchange` is the shards' meeting point
(``commlib.ps.shards.ShardExchange``) over the router: every shard sends every other its part
of each call (``commlib.ps.shard_wire``) and adds the parts in shard order, so every shard
gets the same bits as the in-process exchange.
"""
from __future__ import annotations

import queue
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from commlib.comm.base import Received, Transport
from commlib.errors import CommlibError, ConfigError, PayloadError
from commlib.ps.group_local import split_workers
from commlib.ps.shard_wire import OP_AGREE, OP_SUM, pack_agree, pack_sum, read_agree, read_head, read_sum
from commlib.ps.shards import ShardExchange, sum_in_shard_order

ROUTE_MAGIC = b"CLSR"
_ROUTE = struct.Struct("<4sBxHI")  # magic, channel, shard, logical worker
CH_FRAME = 0
CH_EXCHANGE = 1
#: exchange messages of the next call a shard keeps per sender until it gets there
MAX_AHEAD = 4
_SLICE = 0.2  # seconds a shard's server waits before it looks whether the other shards are alive


class ShardLayout:
    """Ranks of a sharded job: ``shards`` servers, then ``procs`` processes of logical workers."""

    def __init__(self, shards: int, n_workers: int, procs: int) -> None:
        if int(shards) < 1 or int(n_workers) < 1 or int(procs) < 1:
            raise ConfigError(f"a sharded job needs shards, workers and worker processes >= 1, got "
                              f"{shards}, {n_workers}, {procs}")
        self.k, self.n = int(shards), int(n_workers)
        self.groups = split_workers(self.n, int(procs))
        self.world = self.k + len(self.groups)
        self._owner = {w: self.k + p for p, g in enumerate(self.groups) for w in g}

    def is_shard(self, rank: int) -> bool:
        return 0 <= rank < self.k

    def owner(self, worker: int) -> int:
        """The rank of the process hosting logical worker ``worker``."""
        return self._owner[worker]

    def workers_of(self, rank: int) -> List[int]:
        return list(self.groups[rank - self.k]) if self.k <= rank < self.world else []


class _View(Transport):
    """One logical endpoint over a router. ``route(dst)`` gives the physical rank and the route
    header of a message to logical rank ``dst``; received messages come from ``inbox``."""

    def __init__(self, router: "ShardRouter", rank: int, world: int,
                 route: Callable[[int], Tuple[int, bytes]], inbox: "queue.Queue[Received]") -> None:
        super().__init__(rank, world, router.physical.max_message_bytes - _ROUTE.size)
        self.router, self._route, self._inbox = router, route, inbox

    def _send(self, dst: int, data: bytes) -> bool:
        phys, head = self._route(dst)
        return self.router.physical.send(phys, head + data)

    def _recv(self, timeout: Optional[float]) -> Optional[Received]:
        """The next message; on a shard, CommlibError as soon as another shard is gone (the shards
        can no longer apply the same rounds: the run stops rather than wait out its timeouts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.rank == 0 and self.router.layout.is_shard(self.router.rank):
                gone = self.router.shards_gone()
                if gone:
                    raise CommlibError(f"shard {self.router.rank}: shard(s) {gone} are gone (process died or "
                                       "link broke); the sharded run stops")
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    return self._inbox.get_nowait()
                return self._inbox.get(timeout=_SLICE if left is None else min(_SLICE, left))
            except queue.Empty:
                if left is not None and left <= _SLICE:
                    return None

    def is_dead(self, peer: int) -> bool:
        if int(peer) == self.rank:
            return False
        phys, _ = self._route(int(peer))
        return self.router.physical.is_dead(phys) or super().is_dead(peer)

    def _close(self) -> None:
        pass


class ShardRouter:
    """The traffic of one process of a sharded job over its ``physical`` endpoint (one pump
    thread reads it and sorts what it reads by the route header)."""

    def __init__(self, physical: Transport, layout: ShardLayout) -> None:
        if physical.world_size != layout.world:
            raise ConfigError(f"a sharded job of {layout.k} shards and {len(layout.groups)} worker processes "
                              f"needs {layout.world} ranks, the transport has {physical.world_size}")
        self.physical, self.layout = physical, layout
        self.rank = physical.rank
        self.mine = set(layout.workers_of(self.rank))
        self._frames: Dict[Tuple[int, int], "queue.Queue[Received]"] = {}
        self._exchange: "queue.Queue[Received]" = queue.Queue()
        self.activity = threading.Condition()
        self.rejected = 0
        self.last_rejection: Optional[str] = None
        if layout.is_shard(self.rank):
            self._frames[(self.rank, -1)] = queue.Queue()
        for w in self.mine:
            for i in range(layout.k):
                self._frames[(i, w)] = queue.Queue()
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._run, daemon=True, name="commlib-shard-router")
        self._pump.start()

    @staticmethod
    def _head(channel: int, shard: int, worker: int) -> bytes:
        return _ROUTE.pack(ROUTE_MAGIC, channel, shard, worker)

    def server_view(self) -> Transport:
        """This shard's server endpoint: rank 0 of ``n + 1``; logical worker w is rank ``w + 1``."""
        i, lay = self.rank, self.layout
        return _View(self, 0, lay.n + 1, lambda dst: (lay.owner(dst - 1), self._head(CH_FRAME, i, dst - 1)),
                     self._frames[(i, -1)])

    def worker_view(self, shard: int, worker: int) -> Transport:
        """Logical worker ``worker``'s endpoint to shard ``shard`` (rank ``worker + 1``; the shard is 0)."""
        head = self._head(CH_FRAME, shard, worker)
        return _View(self, worker + 1, self.layout.n + 1, lambda dst: (shard, head), self._frames[(shard, worker)])

    def send_exchange(self, shard: int, data: bytes) -> bool:
        return self.physical.send(shard, self._head(CH_EXCHANGE, self.rank, 0) + data)

    def take_exchange(self, timeout: float) -> Optional[Received]:
        try:
            return self._exchange.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_activity(self, timeout: float) -> None:
        """Wait until a frame arrives for one of this process's logical workers (or ``timeout``)."""
        with self.activity:
            self.activity.wait(timeout)

    def shards_gone(self) -> List[int]:
        return [i for i in range(self.layout.k) if i != self.rank and self.physical.is_dead(i)]

    def _reject(self, src: int, why: str) -> None:
        self.rejected += 1
        self.last_rejection = f"from rank {src}: {why}"

    def _dispatch(self, src: int, data: bytes) -> None:
        lay = self.layout
        if len(data) < _ROUTE.size:
            return self._reject(src, f"{len(data)} bytes, shorter than a route header")
        magic, channel, shard, worker = _ROUTE.unpack_from(data)
        body = data[_ROUTE.size:]
        if magic != ROUTE_MAGIC:
            return self._reject(src, f"bad route magic {bytes(magic)!r}")
        if channel == CH_EXCHANGE:
            if not lay.is_shard(self.rank) or not lay.is_shard(src) or shard != src:
                return self._reject(src, f"an exchange message from rank {src} naming shard {shard}")
            self._exchange.put((src, body))
            return None
        if channel != CH_FRAME:
            return self._reject(src, f"unknown channel {channel}")
        if lay.is_shard(self.rank):  # a worker's frame to this shard
            if shard != self.rank or worker >= lay.n or lay.owner(worker) != src:
                return self._reject(src, f"a frame for shard {shard} from logical worker {worker}")
            self._frames[(self.rank, -1)].put((worker + 1, body))
            return None
        if not lay.is_shard(src) or shard != src or worker not in self.mine:  # a shard's frame to a worker here
            return self._reject(src, f"a frame of shard {shard} for logical worker {worker}")
        self._frames[(shard, worker)].put((0, body))
        with self.activity:
            self.activity.notify_all()
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.physical.recv(timeout=0.1)
            except CommlibError:  # the endpoint was closed under us
                return
            if got is not None:
                self._dispatch(*got)

    def close(self) -> None:
        """Stop the pump (the caller closes the physical endpoint)."""
        self._stop.set()
        self._pump.join(timeout=2.0)


class NetShardExchange(ShardExchange):
    """The shards' meeting point over their routers: every call, shard ``index`` sends the other
    shards its part and waits for theirs (checked by ``commlib.ps.shard_wire``; refused parts are
    counted in :attr:`rejected` and the call goes on waiting). A shard whose process is gone, or
    that sends no valid part within ``timeout`` seconds, ends the run (CommlibError)."""

    def __init__(self, router: ShardRouter, timeout: float = 60.0) -> None:
        self.router, self.index = router, router.rank
        self.k, self.n = router.layout.k, router.layout.n
        self.timeout = float(timeout)
        self.exchanges = 0
        self.rejected = 0
        self.last_rejection: Optional[str] = None
        self._call = 0
        self._ahead: Dict[int, List[bytes]] = {}

    def allreduce(self, shard: int, t: torch.Tensor) -> torch.Tensor:
        local = t.detach().to("cpu").contiguous()
        parts = self._meet(OP_SUM, lambda c: pack_sum(self.index, c, local), lambda d: read_sum(d, local), local)
        total = sum_in_shard_order(parts)
        if not bool(torch.isfinite(total).all()):  # finite parts (each checked) can still overflow
            raise CommlibError(f"shard {self.index}: the shards' parts of exchange {self._call - 1} sum to NaN or Inf; "
                               "the sharded run stops rather than hand it to a rule")
        return total.to(t.device)

    def agree(self, shard: int, workers: Set[int]) -> Set[int]:
        mine = frozenset(int(w) for w in workers)
        parts = self._meet(OP_AGREE, lambda c: pack_agree(self.index, c, mine), lambda d: read_agree(d, self.n), mine)
        return set(frozenset.intersection(*parts))

    def _refuse(self, src: int, exc: Exception) -> None:
        self.rejected += 1
        self.last_rejection = f"shard {src}: {exc}"

    def _meet(self, op: int, pack: Callable[[int], bytes], parse: Callable[[bytes], object], local: object) -> list:
        call = self._call
        self._call += 1
        msg = pack(call)
        for j in range(self.k):
            if j != self.index:
                self.router.send_exchange(j, msg)
        got = {self.index: local}
        early = [(src, d) for src, ds in self._ahead.items() for d in ds]
        self._ahead = {}
        deadline = time.monotonic() + self.timeout
        while len(got) < self.k:
            if early:
                src, data = early.pop(0)
            else:
                missing = [j for j in range(self.k) if j not in got]
                gone = [j for j in missing if self.router.physical.is_dead(j)]
                if gone:
                    raise CommlibError(f"shard {self.index}: shard(s) {gone} are gone (process died or link broke) "
                                       f"during exchange {call}; the sharded run stops")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommlibError(f"shard {self.index}: shard(s) {missing} sent no valid part of exchange {call} "
                                       f"within {self.timeout:.0f} s ({self.rejected} refused)")
                item = self.router.take_exchange(min(0.2, left))
                if item is None:
                    continue
                src, data = item
            try:
                head = read_head(data)
                if head.shard != src:
                    raise PayloadError(f"claims to be shard {head.shard}")
                if head.call == call + 1 and len(self._ahead.get(src, [])) < MAX_AHEAD:
                    self._ahead.setdefault(src, []).append(data)  # that shard is one call ahead
                    continue
                if head.call != call or head.op != op:
                    raise PayloadError(f"exchange {head.call} op {head.op} while at exchange {call} op {op}")
                if src in got:
                    raise PayloadError(f"a second part of exchange {call}")
                got[src] = parse(data)
            except PayloadError as exc:
                self._refuse(src, exc)
        self.exchanges += 1
        return [got[i] for i in range(self.k)]
