"""Bundles: many transport messages in one byte string, so one call carries a round's traffic
between two processes (a process hosting many virtual workers and the server).

Layout (little-endian)::

    4s magic b"CLB1", u32 count, then per message:
    u32 src, u32 dst, u32 stream, u64 seq, u64 length, then ``length`` bytes

A bundle is parsed as hostile input: every length is checked against the bytes that are
there and against ``max_message_bytes``; anything left over or missing rejects the whole
bundle (``PayloadError``). The messages inside are opaque: their receiver validates them as
it would any other message (``commlib.ps.protocol``).
"""
from __future__ import annotations

import struct
from typing import Iterable, List, NamedTuple

from commlib.errors import PayloadError

BUNDLE_MAGIC = b"CLB1"
_HEAD = struct.Struct("<4sI")
_ITEM = struct.Struct("<IIIQQ")
#: most messages one bundle may declare (a larger count is corrupt)
MAX_BUNDLE_ITEMS = 1 << 20


class Bundled(NamedTuple):
    """One message of a bundle: from rank ``src`` to rank ``dst``, number ``seq`` of ``stream``."""

    src: int
    dst: int
    stream: int
    seq: int
    data: bytes


def pack_bundle(items: Iterable[Bundled]) -> bytes:
    """The bundle holding ``items`` in order."""
    parts: List[bytes] = []
    count = 0
    for src, dst, stream, seq, data in items:
        parts.append(_ITEM.pack(int(src), int(dst), int(stream), int(seq), len(data)))
        parts.append(bytes(data))
        count += 1
    if count > MAX_BUNDLE_ITEMS:
        raise PayloadError(f"a bundle holds at most {MAX_BUNDLE_ITEMS} messages, got {count}")
    return _HEAD.pack(BUNDLE_MAGIC, count) + b"".join(parts)


def unpack_bundle(blob: bytes, max_message_bytes: int) -> List[Bundled]:
    """The messages of a bundle; ``PayloadError`` if any byte of it is out of place."""
    if not isinstance(blob, (bytes, bytearray)):
        raise PayloadError(f"a bundle is bytes, got {type(blob).__name__}")
    view = memoryview(blob)
    if len(view) < _HEAD.size:
        raise PayloadError(f"truncated bundle: {len(view)} bytes")
    magic, count = _HEAD.unpack_from(view)
    if magic != BUNDLE_MAGIC:
        raise PayloadError(f"bad bundle magic {bytes(magic)!r}")
    if count > MAX_BUNDLE_ITEMS or count * _ITEM.size > len(view) - _HEAD.size:
        raise PayloadError(f"bundle declares {count} messages in {len(view)} bytes")
    out: List[Bundled] = []
    pos = _HEAD.size
    for _ in range(count):
        if pos + _ITEM.size > len(view):
            raise PayloadError("truncated bundle item header")
        src, dst, stream, seq, length = _ITEM.unpack_from(view, pos)
        pos += _ITEM.size
        if length > max_message_bytes:
            raise PayloadError(f"bundled message of {length} bytes exceeds {max_message_bytes}")
        if pos + length > len(view):
            raise PayloadError(f"bundled message says {length} bytes, {len(view) - pos} are left")
        out.append(Bundled(src, dst, stream, seq, bytes(view[pos:pos + length])))
        pos += length
    if pos != len(view):
        raise PayloadError(f"{len(view) - pos} stray bytes after the bundle's {count} messages")
    return out


_U32 = struct.Struct("<I")


def pack_ranks(ranks: Iterable[int]) -> bytes:
    """A list of ranks as bytes (u32 each): what a delivery refused."""
    return b"".join(_U32.pack(int(r)) for r in ranks)


def unpack_ranks(blob: bytes, world_size: int) -> List[int]:
    """Ranks from :func:`pack_ranks`; ``PayloadError`` on a bad length or a rank outside the world."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) % _U32.size:
        raise PayloadError("a rank list is bytes of u32")
    ranks = [r for (r,) in _U32.iter_unpack(blob)]
    if any(r >= world_size for r in ranks):
        raise PayloadError(f"rank outside a world of {world_size}")
    return ranks
