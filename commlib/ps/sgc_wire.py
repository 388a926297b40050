"""Wire format of sequential gradient coding's assignments and results (the protocol is
described in ``commlib/ps/sequential.py``; Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv
2211.13802).

Descriptor (float64, every value an exact integer except the coefficients)::

    [MAGIC, P, keep_from, tag, k versions, m tasks, v_1 .. v_k,
     then per task: job, q, p_1 .. p_q, c_1 .. c_q]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from commlib.coding.sgc import MiniTask
from commlib.errors import PayloadError
from commlib.wire import DTYPES, Kind, Message, Payload

MAGIC = 21319.0  # "SG": marks an assignment descriptor
_MAX_INT = 2 ** 52  # integers above this are not exact in float64

@dataclass
class Assignment:
    """A decoded assignment: ``tasks`` are ``(job, {partition: coefficient})``."""

    P: int
    keep_from: int
    tag: int
    tasks: List[Tuple[int, Dict[int, float]]]
    versions: Dict[int, List[torch.Tensor]]


def encode_assignment(P: int, tasks: Sequence[MiniTask], versions: Mapping[int, Sequence[torch.Tensor]],
                      *, sender: int, step: int, keep_from: int = 0, tag: int = 0) -> Message:
    """An assignment Message: descriptor + the listed parameter versions (flat tensors each)."""
    desc: List[float] = [MAGIC, float(P), float(max(0, keep_from)), float(tag), float(len(versions)),
                         float(len(tasks))]
    desc += [float(v) for v in versions]
    for t in tasks:
        parts = t.partitions
        desc += [float(t.job), float(len(parts))]
        desc += [float(p) for p in parts]
        desc += [float(t.coefficients[p]) for p in parts]
    payloads = [Payload.dense(torch.tensor(desc, dtype=torch.float64), slot=0)]
    for params in versions.values():
        for p in params:
            t = p.detach().reshape(-1)
            payloads.append(Payload.dense((t if t.dtype in DTYPES else t.to(torch.float32)).cpu(),
                                          slot=len(payloads)))
    return Message(payloads, sender=sender, step=step)


def _int(x: float, what: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if not math.isfinite(x) or x != int(x) or not lo <= int(x) <= hi:
        raise PayloadError(f"assignment: {what} must be an integer in [{lo}, {hi}], got {x}")
    return int(x)


def decode_assignment(msg: Message, numels: Sequence[int]) -> Assignment:
    """The :class:`Assignment` in ``msg``, every field checked (PayloadError on anything malformed)."""
    if not msg.payloads or msg.payloads[0].kind != Kind.DENSE or msg.payloads[0].values.dtype != torch.float64:
        raise PayloadError("assignment: slot 0 must be a dense float64 descriptor")
    d = msg.payloads[0].values.tolist()
    if len(d) < 6 or d[0] != MAGIC:
        raise PayloadError("assignment: bad descriptor header")
    P = _int(d[1], "partition count", 1)
    keep_from = _int(d[2], "keep_from")
    tag = _int(d[3], "repair tag")
    k = _int(d[4], "version count", 1, len(d))
    m = _int(d[5], "task count", 0, len(d))
    pos = 6
    if len(d) < pos + k:
        raise PayloadError("assignment: truncated version list")
    vers = [_int(v, "version") for v in d[pos:pos + k]]
    if len(set(vers)) != k:
        raise PayloadError("assignment: a version is listed twice")
    pos += k
    tasks: List[Tuple[int, Dict[int, float]]] = []
    for _ in range(m):
        if len(d) < pos + 2:
            raise PayloadError("assignment: truncated task")
        job, q = _int(d[pos], "job"), _int(d[pos + 1], "partitions per task", 1, P)
        pos += 2
        if len(d) < pos + 2 * q:
            raise PayloadError("assignment: truncated task")
        parts = [_int(p, "partition", 0, P - 1) for p in d[pos:pos + q]]
        coefs = d[pos + q:pos + 2 * q]
        pos += 2 * q
        if len(set(parts)) != q or not all(math.isfinite(c) for c in coefs):
            raise PayloadError("assignment: repeated partition or non-finite coefficient")
        tasks.append((job, dict(zip(parts, coefs))))
    if pos != len(d):
        raise PayloadError(f"assignment: {len(d) - pos} trailing descriptor values")
    if len(msg.payloads) != 1 + k * len(numels):
        raise PayloadError(f"assignment: {len(msg.payloads) - 1} parameter payloads for {k} versions")
    versions: Dict[int, List[torch.Tensor]] = {}
    for i, v in enumerate(vers):
        block = msg.payloads[1 + i * len(numels):1 + (i + 1) * len(numels)]
        for pl, numel in zip(block, numels):
            if pl.kind != Kind.DENSE or pl.numel != numel:
                raise PayloadError(f"assignment: version {v} has a malformed parameter payload")
        versions[v] = [pl.values for pl in block]
    return Assignment(P, keep_from, tag, tasks, versions)


def decode_results(msg: Message, count: int, numel: int) -> List[torch.Tensor]:
    """The ``count`` float64 task results of a PUSH (PayloadError unless exactly that)."""
    if len(msg.payloads) != count:
        raise PayloadError(f"push carries {len(msg.payloads)} results for {count} tasks")
    out = []
    for pl in msg.payloads:
        if pl.kind != Kind.DENSE or pl.numel != numel or pl.values.dtype != torch.float64:
            raise PayloadError("a task result must be dense float64 of the model's size")
        out.append(pl.values)
    return out
