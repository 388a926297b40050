"""The binary layout of commlib's wire format: constants, kinds, flags, header structs,
alignment, dtype codes, and the structural checks of a received header.

This module is the bottom of the wire stack: ``commlib.ops`` (the packing kernels and their
pure-torch reference) and ``commlib.wire`` (``Payload``/``Message``) both build on it, and it
imports neither. The layout itself is documented in ``commlib.wire``; csrc/payload_format.h
mirrors these constants for the native kernels.
"""
from __future__ import annotations

import enum
import struct
import zlib
from typing import NamedTuple, Optional, Tuple

import torch

from commlib.errors import PayloadError

VERSION = 1
PAYLOAD_MAGIC = b"CLPL"
MESSAGE_MAGIC = b"CLMS"
MAX_NUMEL = 1 << 40  # sanity bound: a header claiming more is corrupt
#: Entries a payload (or a whole Message) decoded *without* an expected size may stand for:
#: 2^26 = 64 Mi entries (256 MiB as float32). Receivers that know their tensors pass
#: ``numel``/``numels`` and are not capped; raise it (or pass ``max_numel``) for larger tensors.
DEFAULT_MAX_NUMEL = 1 << 26

PAYLOAD_HEADER = struct.Struct("<4sHBBIIQQQdIIQ")
MESSAGE_HEADER = struct.Struct("<4sHHIIQQ")
PAYLOAD_HEADER_BYTES = PAYLOAD_HEADER.size  # 64
MESSAGE_HEADER_BYTES = MESSAGE_HEADER.size  # 32
CRC_OFFSET = 52  # byte offset of the crc field in a payload header
KIND_OFFSET = 6  # byte offset of the kind field in a payload header
assert PAYLOAD_HEADER_BYTES == 64 and MESSAGE_HEADER_BYTES == 32


class Kind(enum.IntEnum):
    DENSE = 0  # values hold every entry (nnz == numel)
    SPARSE = 1  # indices + values
    RANDK = 2  # values only; indices regenerated from a shared seed
    SKIP = 3  # nothing this step (e.g. the sender's gradient was non-finite)


class Flag(enum.IntFlag):
    NONE = 0
    RESET = 1  # values are a full state value (first EF21/EControl step), not an increment
    CHECKSUM = 2  # crc field is valid


ALL_FLAGS = int(Flag.RESET | Flag.CHECKSUM)

DTYPES: Tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
_ITEMSIZE = {dt: torch.empty(0, dtype=dt).element_size() for dt in DTYPES}


def align8(n: int) -> int:
    """n rounded up to a multiple of 8 (every section of the format is 8-byte aligned)."""
    return (n + 7) & ~7


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per value of a wire dtype."""
    size = _ITEMSIZE.get(dtype)
    return torch.empty(0, dtype=dtype).element_size() if size is None else size


def index_bytes(kind: Kind, nnz: int) -> int:
    """Bytes of the (padded) index section: int32 per value for SPARSE, none otherwise."""
    return align8(4 * nnz) if kind == Kind.SPARSE else 0


def body_bytes(kind: Kind, nnz: int, dtype: torch.dtype) -> int:
    """Body length after the 64-byte header: padded indices, then padded values."""
    return index_bytes(kind, nnz) + align8(nnz * itemsize(dtype))


def payload_max_bytes(kind: Kind, max_nnz: int, dtype: torch.dtype) -> int:
    """Wire size of a payload of this kind carrying (at most) max_nnz values of ``dtype``."""
    return PAYLOAD_HEADER_BYTES + body_bytes(kind, max_nnz, dtype)


def pack_payload_header(kind: int, dtype: torch.dtype, flags: int, slot: int, numel: int, nnz: int, seed: int,
                        scale: float, body: int, crc: int = 0) -> bytes:
    """The 64 header bytes of one payload."""
    return PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, VERSION, int(kind), DTYPE_CODE[dtype], int(flags), int(slot),
                               int(numel), int(nnz), int(seed) & 0xFFFF_FFFF_FFFF_FFFF, float(scale), int(body),
                               int(crc), 0)


def pack_message_header(count: int, sender: int, step: int, used: int) -> bytes:
    """The 32 header bytes of one message."""
    return MESSAGE_HEADER.pack(MESSAGE_MAGIC, VERSION, 0, int(count), int(sender), int(step), int(used))


def payload_crc(header: bytes, body) -> int:
    """CRC-32 of a payload: its header with the crc field zeroed, then its body bytes."""
    zeroed = header[:CRC_OFFSET] + b"\0\0\0\0" + header[CRC_OFFSET + 4:PAYLOAD_HEADER_BYTES]
    return zlib.crc32(body, zlib.crc32(zeroed))


def with_crc(header: bytes, crc: int) -> bytes:
    """``header`` with Flag.CHECKSUM set and its crc field set to ``crc``."""
    flags = struct.unpack_from("<I", header, 8)[0] | int(Flag.CHECKSUM)
    return header[:8] + struct.pack("<I", flags) + header[12:CRC_OFFSET] + struct.pack("<I", crc) + \
        header[CRC_OFFSET + 4:PAYLOAD_HEADER_BYTES]


class PayloadHeader(NamedTuple):
    """A parsed payload header that passed the structural checks."""

    kind: Kind
    dtype: torch.dtype
    flags: int
    slot: int
    numel: int
    nnz: int
    seed: int
    scale: float
    body: int
    crc: int


def parse_payload_header(raw: bytes, available: int, *, numel: Optional[int] = None,
                         max_numel: Optional[int] = None) -> PayloadHeader:
    """Parse and check 64 header bytes; ``available``: bytes from the header's start to the end
    of the buffer. Raises PayloadError for a bad magic, version, kind, dtype, reserved field,
    size (or a size other than the expected ``numel``; without it more than ``max_numel``,
    default DEFAULT_MAX_NUMEL), body length, truncation or unknown flag.
    """
    (magic, version, kind, dcode, flags, pslot, pnumel, nnz, seed, scale, body, crc, res) = \
        PAYLOAD_HEADER.unpack(raw)
    if magic != PAYLOAD_MAGIC:
        raise PayloadError(f"bad payload magic {magic!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this commlib speaks {VERSION})")
    try:
        kind_e = Kind(kind)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind}") from None
    if dcode >= len(DTYPES):
        raise PayloadError(f"unknown dtype code {dcode}")
    if res:
        raise PayloadError("reserved payload header field is not zero")
    if pnumel > MAX_NUMEL or nnz > MAX_NUMEL:
        raise PayloadError(f"implausible sizes numel={pnumel} nnz={nnz}")
    if numel is None:
        cap = DEFAULT_MAX_NUMEL if max_numel is None else int(max_numel)
        if pnumel > cap:
            raise PayloadError(f"payload claims {pnumel} entries; a receiver without an expected size "
                               f"accepts at most {cap} (max_numel)")
    elif pnumel != numel:
        raise PayloadError(f"payload for slot {pslot} has numel {pnumel}, expected {numel}")
    dtype = DTYPES[dcode]
    expect_body = body_bytes(kind_e, nnz, dtype)
    if body != expect_body:
        raise PayloadError(f"payload body is {body} bytes, its header implies {expect_body}")
    if PAYLOAD_HEADER_BYTES + body > available:
        raise PayloadError(f"truncated payload: body needs {body} bytes, {available - PAYLOAD_HEADER_BYTES} left")
    if flags & ~ALL_FLAGS:
        raise PayloadError(f"unknown payload flags {flags:#x}")
    return PayloadHeader(kind_e, dtype, flags, pslot, pnumel, nnz, seed, scale, body, crc)


def check_crc(header: PayloadHeader, raw: bytes, body, require_checksum: bool) -> None:
    """The checksum part of validation: a flagged CRC must match header + body (a bytes-like),
    an unflagged one must be zero, and ``require_checksum`` refuses payloads without one."""
    if not header.flags & Flag.CHECKSUM:
        if header.crc != 0:
            raise PayloadError("payload carries a checksum but its flag is cleared")
        if require_checksum:
            raise PayloadError("payload has no checksum and this receiver requires one")
        return
    got = payload_crc(raw, body)
    if got != header.crc:
        raise PayloadError(f"payload checksum mismatch (got {got:#010x}, header {header.crc:#010x})")


class MessageHeader(NamedTuple):
    count: int
    sender: int
    step: int
    used: int


def parse_message_header(raw: bytes, available: int, *, max_count: int = 1 << 20, exact: bool = False,
                         count: Optional[int] = None) -> MessageHeader:
    """Parse and check 32 message header bytes against a buffer of ``available`` bytes
    (``exact``: the used length must equal it; ``count``: the payload count expected)."""
    magic, version, _r, pcount, sender, step, used = MESSAGE_HEADER.unpack(raw)
    if magic != MESSAGE_MAGIC:
        raise PayloadError(f"bad message magic {magic!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported message version {version} (this commlib speaks {VERSION})")
    if pcount > max_count:
        raise PayloadError(f"implausible payload count {pcount}")
    if used > available:
        raise PayloadError(f"truncated message: header says {used} bytes, got {available}")
    if exact and used != available:
        raise PayloadError(f"message header says {used} bytes, got {available}")
    if count is not None and pcount != count:
        raise PayloadError(f"message carries {pcount} payloads, expected {count}")
    return MessageHeader(pcount, sender, step, used)


def check_indices(idx: Optional[torch.Tensor], nnz: int, numel: int) -> None:
    """SPARSE indices: int32, one per value, in [0, numel), strictly ascending."""
    if idx is None or idx.dtype != torch.int32 or idx.dim() != 1 or idx.numel() != nnz:
        raise PayloadError("sparse payload needs int32 indices, one per value")
    if nnz:
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= numel:
            raise PayloadError(f"sparse index out of range [0, {numel}): min {int(lo)}, max {int(hi)}")
        if nnz > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PayloadError("sparse indices must be strictly ascending (no duplicates)")


class RawPayload(NamedTuple):
    """A validated payload read from a buffer: its header and views of its sections."""

    header: PayloadHeader
    indices: Optional[torch.Tensor]  # int32 view (SPARSE), else None
    values: torch.Tensor  # view of the values, header.dtype
    end: int  # offset just past the payload


def read_payload(buf: torch.Tensor, offset: int = 0, *, finite: str = "reject", numel: Optional[int] = None,
                 slot: Optional[int] = None, require_checksum: bool = False, target: torch.dtype = torch.float32,
                 max_abs: Optional[float] = None, max_numel: Optional[int] = None) -> RawPayload:
    """Read and validate one payload from a flat uint8 tensor (any device): header, checksum,
    slot, index range and order, and the value rule (``commlib.wire``) for a receiver adding
    in ``target``. Sections are views into ``buf``."""
    from commlib.value_rule import check_values

    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise PayloadError("decode needs a flat uint8 buffer")
    total = buf.numel()
    if offset < 0 or offset + PAYLOAD_HEADER_BYTES > total:
        raise PayloadError(f"truncated payload: {total - offset} bytes left, header needs {PAYLOAD_HEADER_BYTES}")
    if offset % 8:
        raise PayloadError("payload offset must be 8-byte aligned")
    raw = buf[offset:offset + PAYLOAD_HEADER_BYTES].cpu().numpy().tobytes()
    h = parse_payload_header(raw, total - offset, numel=numel, max_numel=max_numel)
    pos = offset + PAYLOAD_HEADER_BYTES
    end = pos + h.body
    if h.flags & Flag.CHECKSUM or h.crc or require_checksum:
        check_crc(h, raw, buf[pos:end].cpu().numpy().tobytes() if h.flags & Flag.CHECKSUM else b"",
                  require_checksum)
    if slot is not None and h.slot != slot:
        raise PayloadError(f"payload slot {h.slot}, expected {slot}")
    if finite not in ("reject", "allow"):
        raise PayloadError(f"unknown finiteness policy {finite!r}")
    if h.kind == Kind.DENSE and h.nnz != h.numel:
        raise PayloadError(f"dense payload carries {h.nnz} values for numel {h.numel}")
    if h.kind in (Kind.SPARSE, Kind.RANDK) and h.nnz > h.numel:
        raise PayloadError(f"payload carries {h.nnz} values but numel is {h.numel}")
    if h.kind == Kind.SKIP and h.nnz != 0:
        raise PayloadError("skip payload carries values")
    if h.dtype == torch.int8 and h.kind == Kind.SKIP:
        raise PayloadError("int8 skip payload")
    indices = None
    if h.kind == Kind.SPARSE:
        indices = buf[pos:pos + 4 * h.nnz].view(torch.int32)
        check_indices(indices, h.nnz, h.numel)
        pos += index_bytes(h.kind, h.nnz)
    values = buf[pos:pos + h.nnz * itemsize(h.dtype)].view(h.dtype)
    check_values(values, float(h.scale), target=target, max_abs=max_abs, finite=finite == "reject", slot=h.slot)
    return RawPayload(h, indices, values, end)
