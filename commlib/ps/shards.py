"""A sharded parameter server: the model's parameters partitioned over ``k`` server shards.

Keys (parameters, in model order) are split into ``k`` contiguous ranges of about equal size
(:func:`shard_ranges`), as key ranges are split over servers in ps-lite / BytePS. Every shard is
a :class:`commlib.ps.server.ParameterServer` over its keys, on a transport of its own; a worker
pushes each shard its part of the scheme's payloads (``commlib/ps/sharded_local.py``). Every
shard applies the same scheme's server half to its keys, so:

* coordinate-wise rules (mean, median, trimmed mean, ...) run per shard unchanged;
* distance-based rules (Krum, Multi-Krum, NNM, MoNNA, geometric median, Flag) see
  the whole vectors' geometry: row norms and the n x n Gram matrix are sums over coordinates,
  so each shard's partial sums are added over the shards (``commlib.aggregate.points.Part``)
  and every shard selects the same workers;
* the shards agree, every round, on the workers whose pushes they apply (the intersection of
  what each received and validated), so they apply the same rounds and stay at one version.
  A push that reached some shards but not all is not applied anywhere (its worker rolls back
  that shard's scheme state, as for any push the server did not keep).

Exactly-once bookkeeping and checkpoints are per shard (each shard has its own records and
checkpoint file). :class:`ShardExchange` is where the shards meet: :class:`InprocShardExchange`
for shards that are threads of one process, ``commlib.ps.shard_net.NetShardExchange`` for shards
that are processes (the exchange travels over the job's authenticated transport).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from commlib.aggregate.points import Part, vectors_in_parts
from commlib.errors import CommlibError, ConfigError
from commlib.wire import Kind, Payload


def shard_ranges(numels: Sequence[int], k: int) -> List[range]:
    """Split keys ``0..len(numels)-1`` into ``k`` non-empty contiguous ranges whose total sizes
    are as even as possible: the largest shard is as small as it can be (binary search on that
    bound, then greedy filling from the front)."""
    sizes = [int(x) for x in numels]
    k = int(k)
    if k < 1 or k > len(sizes):
        raise ConfigError(f"cannot split {len(sizes)} parameters over {k} shards (need 1 <= shards <= parameters)")

    def cuts(bound: int) -> Optional[List[int]]:
        out, acc = [], 0
        for i, s in enumerate(sizes):
            left_keys, left_shards = len(sizes) - i, k - len(out) - 1
            if acc and (acc + s > bound or left_keys == left_shards):
                out.append(i)
                acc = 0
            acc += s
            if acc > bound:
                return None
        return out if len(out) == k - 1 else None

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    edges = [0] + (cuts(lo) or []) + [len(sizes)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


class ShardExchange(ABC):
    """Where the ``k`` shards meet. Every shard makes the same calls in the same order; every
    shard gets the same result (bit for bit) or the call raises (CommlibError) and the run ends
    rather than let the shards apply different rounds."""

    k: int
    exchanges: int

    @abstractmethod
    def allreduce(self, shard: int, t: torch.Tensor) -> torch.Tensor:
        """The sum over the shards of ``t`` (added in shard order 0..k-1)."""

    @abstractmethod
    def agree(self, shard: int, workers: Set[int]) -> Set[int]:
        """The workers every shard has (the intersection)."""


def sum_in_shard_order(parts: List[torch.Tensor]) -> torch.Tensor:
    """``parts[0] + parts[1] + ...``, added in that order (the same bits on every shard)."""
    out = parts[0].clone()
    for p in parts[1:]:
        out.add_(p.to(device=out.device, dtype=out.dtype))
    return out


class InprocShardExchange(ShardExchange):
    """Where ``k`` in-process shards (threads) meet; a shard that does not come within
    ``timeout`` seconds ends the run (CommlibError)."""

    def __init__(self, k: int, timeout: float = 60.0) -> None:
        self.k = int(k)
        self.timeout = float(timeout)
        self._cond = threading.Condition()
        self._round: Dict[int, Dict[int, object]] = {}  # call number -> shard -> contribution
        self._calls = [0] * self.k
        self._done: Dict[int, object] = {}
        self._left: Dict[int, int] = {}
        self.exchanges = 0

    def _meet(self, shard: int, value: object, combine) -> object:
        with self._cond:
            call = self._calls[shard]
            self._calls[shard] += 1
            self._round.setdefault(call, {})[shard] = value
            if len(self._round[call]) == self.k:
                got = self._round.pop(call)
                self._done[call] = combine([got[i] for i in range(self.k)])
                self._left[call] = self.k
                self.exchanges += 1
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: call in self._done, timeout=self.timeout):
                raise CommlibError(f"shard {shard}: the other shards did not meet within {self.timeout} s")
            out = self._done[call]
            self._left[call] -= 1
            if not self._left[call]:
                del self._done[call], self._left[call]
            return out

    def allreduce(self, shard: int, t: torch.Tensor) -> torch.Tensor:
        return self._meet(shard, t.detach(), sum_in_shard_order).clone()  # type: ignore[union-attr]

    def agree(self, shard: int, workers: Set[int]) -> Set[int]:
        return set(self._meet(shard, frozenset(workers), lambda sets: frozenset.intersection(*sets)))


def shard_config(config: Any, index: int) -> Any:
    """Shard ``index``'s server config: the same, with its own checkpoint ``<checkpoint>.shard<i>``."""
    if not config.checkpoint:
        return config
    import dataclasses

    return dataclasses.replace(config, checkpoint=f"{config.checkpoint}.shard{index}")


def checkpoint_layout(shard: Optional["ShardSpec"]) -> Optional[List[int]]:
    """What a server's checkpoint records of its shard: ``[index, count, first key, end key]``
    (None: an unsharded server)."""
    return None if shard is None else [shard.index, shard.count, shard.keys.start, shard.keys.stop]


def check_checkpoint_layout(ck: Dict[str, Any], shard: Optional["ShardSpec"]) -> Dict[str, Any]:
    """``ck`` if it was written for this shard layout, else ConfigError (a checkpoint of other
    keys, e.g. after ``shards`` changed, would mix trained and untrained keys)."""
    saved, mine = ck.get("shard"), checkpoint_layout(shard)
    if saved != mine:
        raise ConfigError(f"checkpoint was written for shard [index, count, keys] {saved}, this server is {mine}: "
                          "resume with the shard layout that wrote it")
    return ck


class ShardSpec:
    """Shard ``index`` of ``count``: the keys ``keys`` of the model, and where it meets the others."""

    def __init__(self, index: int, count: int, keys: range, exchange: ShardExchange) -> None:
        self.index, self.count, self.keys, self.exchange = int(index), int(count), keys, exchange
        self.part: Optional[Part] = None
        self.dropped = 0  # pushes this shard had but another did not (not applied)

    def select(self, names: List[str], params: List[Any], config: Any, scheme: Any,
               task: Any) -> Tuple[List[str], List[Any]]:
        """This shard's keys and parameters out of the whole model's; refuses what cannot be
        split by keys (ConfigError)."""
        problems = []
        if config.mode != "sync":
            problems.append("async mode (shards agree on each round's pushes)")
        if config.coding is not None:
            problems.append("gradient coding")
        if scheme.attack is not None:
            problems.append("a server-side simulated attack (it would see one shard's coordinates)")
        if task is not None and hasattr(task, "server_directions"):
            problems.append(f"task {type(task).__name__} (server state over the whole model)")
        if self.keys.stop > len(names) or not len(self.keys):
            problems.append(f"keys {self.keys} of a model with {len(names)} parameters")
        if problems:
            raise ConfigError("a sharded parameter server cannot run " + ", ".join(problems))
        numels = [p.numel() for p in params]
        self.part = Part(lambda t: self.exchange.allreduce(self.index, t), sum(numels[: self.keys.start]),
                         sum(numels))
        return names[self.keys.start:self.keys.stop], params[self.keys.start:self.keys.stop]

    def agree_pushes(self, got: Dict[int, Any], members: Any) -> Dict[int, Any]:
        """The pushes of this round that every shard received and validated."""
        keep = self.exchange.agree(self.index, set(got))
        for w in got:
            if w not in keep:
                self.dropped += 1
                members[w].late += 1  # arrived here, but the round goes on without it
        return {w: v for w, v in got.items() if w in keep}

    def decode_group(self, half: Any, keys: Sequence[str], numels: Sequence[int],
                     received: List[List[Optional[Payload]]], dense: Sequence[bool]) -> List[torch.Tensor]:
        """The server half on this shard's keys. A robust rule leaves out a worker whose message
        is incomplete on any shard (as the unsharded server does), and sees the whole vectors'
        norms and Gram matrix (``vectors_in_parts``)."""
        if not half.scheme.aggregator.is_mean:
            complete = {w for w, msgs in enumerate(received)
                        if all(p is not None and p.kind != Kind.SKIP for p in msgs)}
            complete = self.exchange.agree(self.index, complete)
            received = [msgs if w in complete else [None] * len(msgs) for w, msgs in enumerate(received)]
        with vectors_in_parts(self.part):
            return half.decode_group(keys, numels, received, dense=dense)

    def summary(self) -> Dict[str, Any]:
        return {"index": self.index, "count": self.count, "keys": [self.keys.start, self.keys.stop],
                "dropped": self.dropped}
