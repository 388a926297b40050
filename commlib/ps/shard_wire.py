"""The messages the shards of a sharded parameter server exchange, and the checks every one of
them passes before it is used.

A shard sends every other shard its part of each exchange (``commlib.ps.shard_net``): a sum
(row norms, the n x n Gram matrix, Flag's products; ``OP_SUM``) or a set of worker ids (the
pushes it accepted; ``OP_AGREE``). Layout (little-endian), inside the transport's
authenticated envelope (``commlib/comm/auth.py``)::

    4s magic b"CLSX"   u8 version (1)   u8 op   u16 shard   u64 call
    OP_SUM:   u8 dtype code, u8 ndim, u32 x ndim dims, then the tensor's bytes
    OP_AGREE: u32 count, then ``count`` u32 worker ids, strictly increasing

Every received byte is hostile: a message is refused (``PayloadError``) unless the op is the
one this call makes, the dtype and shape are those of this shard's own part (the parts of one
call always match), the byte count is exact, every value is finite, and worker ids are
increasing and below the number of workers. A refused message is counted and dropped by the
caller; it never reaches a rule.
"""
from __future__ import annotations

import struct
from typing import FrozenSet, Iterable, NamedTuple

import torch

from commlib.errors import PayloadError

EXCHANGE_MAGIC = b"CLSX"
EXCHANGE_VERSION = 1
OP_SUM = 1
OP_AGREE = 2
_HEAD = struct.Struct("<4sBBHQ")
_U32 = struct.Struct("<I")
#: dtypes a sum may carry (code on the wire -> dtype)
SUM_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.float16, 4: torch.bfloat16}
_CODES = {d: c for c, d in SUM_DTYPES.items()}
MAX_DIMS = 4


class ExchangeHead(NamedTuple):
    op: int
    shard: int
    call: int


def pack_sum(shard: int, call: int, t: torch.Tensor) -> bytes:
    """Shard ``shard``'s part of sum number ``call``."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _CODES or t.dim() > MAX_DIMS:
        raise PayloadError(f"cannot exchange a {t.dtype} tensor of {t.dim()} dims")
    dims = b"".join(_U32.pack(int(s)) for s in t.shape)
    body = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _HEAD.pack(EXCHANGE_MAGIC, EXCHANGE_VERSION, OP_SUM, int(shard), int(call)) + \
        struct.pack("<BB", _CODES[t.dtype], t.dim()) + dims + body


def pack_agree(shard: int, call: int, workers: Iterable[int]) -> bytes:
    """Shard ``shard``'s worker set of agreement number ``call``."""
    ids = sorted({int(w) for w in workers})
    return _HEAD.pack(EXCHANGE_MAGIC, EXCHANGE_VERSION, OP_AGREE, int(shard), int(call)) + \
        _U32.pack(len(ids)) + b"".join(_U32.pack(w) for w in ids)


def read_head(data: bytes) -> ExchangeHead:
    """The op, sender shard and call number of an exchange message (PayloadError if malformed)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _HEAD.size:
        raise PayloadError(f"exchange message of {len(data) if isinstance(data, (bytes, bytearray)) else '?'} "
                           "bytes is shorter than its header")
    magic, version, op, shard, call = _HEAD.unpack_from(data)
    if magic != EXCHANGE_MAGIC or version != EXCHANGE_VERSION:
        raise PayloadError(f"bad exchange header {bytes(magic)!r} v{version}")
    if op not in (OP_SUM, OP_AGREE):
        raise PayloadError(f"unknown exchange op {op}")
    return ExchangeHead(op, shard, call)


def read_sum(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """The tensor of an ``OP_SUM`` message, which must have ``like``'s dtype and shape."""
    pos = _HEAD.size
    if len(data) < pos + 2:
        raise PayloadError("truncated sum header")
    code, ndim = struct.unpack_from("<BB", data, pos)
    pos += 2
    if SUM_DTYPES.get(code) != like.dtype:
        raise PayloadError(f"sum part has dtype code {code}, this shard's part is {like.dtype}")
    if ndim != like.dim() or len(data) < pos + 4 * ndim:
        raise PayloadError(f"sum part has {ndim} dims, this shard's part has {like.dim()}")
    shape = tuple(_U32.unpack_from(data, pos + 4 * i)[0] for i in range(ndim))
    pos += 4 * ndim
    if shape != tuple(like.shape):
        raise PayloadError(f"sum part of shape {shape}, this shard's part is {tuple(like.shape)}")
    want = like.numel() * like.element_size()
    if len(data) - pos != want:
        raise PayloadError(f"sum part carries {len(data) - pos} bytes, its shape needs {want}")
    if not want:
        return torch.empty(shape, dtype=like.dtype)
    out = torch.frombuffer(bytearray(data[pos:]), dtype=torch.uint8).view(like.dtype).reshape(shape)
    if not bool(torch.isfinite(out).all()):
        raise PayloadError("sum part holds NaN or Inf")
    return out


def read_agree(data: bytes, n_workers: int) -> FrozenSet[int]:
    """The worker ids of an ``OP_AGREE`` message: at most ``n_workers``, increasing, each below it."""
    pos = _HEAD.size
    if len(data) < pos + 4:
        raise PayloadError("truncated agreement")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > n_workers or len(data) - pos != 4 * count:
        raise PayloadError(f"agreement declares {count} workers in {len(data) - pos} bytes (at most {n_workers})")
    ids = [w for (w,) in _U32.iter_unpack(bytes(data[pos:]))]
    if any(b <= a for a, b in zip(ids, ids[1:])) or (ids and ids[-1] >= n_workers):
        raise PayloadError(f"agreement worker ids are not increasing ids below {n_workers}")
    return frozenset(ids)
