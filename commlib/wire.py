"""The one message format: a ``Payload`` per tensor, a ``Message`` per send.

Binary layout (little-endian, every section 8-byte aligned so a received ``uint8`` buffer
can be viewed as int32/float tensors without a copy):

Payload (64-byte header, then body)::

    0  4s  magic  b"CLPL"
    4  u16 version (1)
    6  u8  kind   (Kind)
    7  u8  dtype  code of the values (DTYPES)
    8  u32 flags  (Flag)
    12 u32 slot   position of the tensor in the sender's group (parameter order)
    16 u64 numel  length of the dense tensor it stands for
    24 u64 nnz    number of values carried
    32 u64 seed   RANDK: indices are ``randk_indices(numel, nnz, seed)``
    40 f64 scale  decoded value = value * scale
    48 u32 body   body length in bytes (after the header)
    52 u32 crc    CRC-32 of header (crc field zeroed) + body, when Flag.CHECKSUM is set
    56 u64 reserved (0)
    body: indices int32[nnz] (SPARSE only), padded to 8; values dtype[nnz], padded to 8

Message (32-byte header, then payloads back to back)::

    0 4s magic b"CLMS"; 4 u16 version; 6 u16 reserved; 8 u32 count; 12 u32 sender;
    16 u64 step; 24 u64 used length in bytes (header + payloads; trailing padding ignored)

Everything received is validated before it touches a model: magic, version, kind, dtype,
sizes, index range and order, checksum, and the value rule below. No pickle anywhere.

Value rule (applied by every receiver; the native unpack in csrc/ implements the same): with
``T`` the dtype the receiver adds in (float32 unless it says otherwise) and ``round_T`` IEEE
round-to-nearest into ``T`` (overflow -> Inf), a payload is accepted only if

- ``scale`` is finite, > 0, and ``round_T(scale)`` is a finite *normal* number of ``T``
  (zero, negative, subnormal and overflowing scales are refused: no commlib sender makes them);
- every decoded value ``round_T(round_T(value) * round_T(scale))`` is finite (with the
  finiteness policy "reject"), and so is every addend ``round_T(value) * round_T(alpha * scale)``
  of a receiver that adds ``alpha`` times the payload;
- with ``max_abs``: every decoded value has magnitude <= max_abs;
- SPARSE indices are strictly ascending (no duplicates), so each decoded entry is one value.

Size claims: a payload decoded without an expected size may stand for at most ``max_numel``
entries (default ``DEFAULT_MAX_NUMEL``; for a Message, all its payloads together), so a short
message cannot make the receiver expand it into gigabytes.
"""
from __future__ import annotations

import enum
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from commlib.errors import NonFiniteError, PayloadError

VERSION = 1
PAYLOAD_MAGIC = b"CLPL"
MESSAGE_MAGIC = b"CLMS"
MAX_NUMEL = 1 << 40  # sanity bound: a header claiming more is corrupt
#: Entries a payload (or a whole Message) decoded *without* an expected size may stand for:
#: 2^26 = 64 Mi entries (256 MiB as float32). Receivers that know their tensors pass
#: ``numel``/``numels`` and are not capped; raise it (or pass ``max_numel``) for larger tensors.
DEFAULT_MAX_NUMEL = 1 << 26

_PHDR = struct.Struct("<4sHBBIIQQQdIIQ")
_MHDR = struct.Struct("<4sHHIIQQ")
PAYLOAD_HEADER_BYTES = _PHDR.size  # 64
MESSAGE_HEADER_BYTES = _MHDR.size  # 32
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


_ALL_FLAGS = int(Flag.RESET | Flag.CHECKSUM)


DTYPES: Tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}

FinitePolicy = str  # "reject" (raise NonFiniteError) or "allow"


def _align8(n: int) -> int:
    return (n + 7) & ~7


def randk_indices(numel: int, k: int, seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The k distinct indices a RANDK payload with this seed stands for (sorted, int32).

    Sender and receiver call this with the same arguments, so indices never travel.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)
    return idx.to(device)


_PACK_CODE = {torch.float32: "<f", torch.float16: "<e"}


def _round_to(x: float, dtype: torch.dtype) -> float:
    """IEEE round-to-nearest of a Python float into ``dtype`` (overflow gives +-Inf), as a float."""
    if dtype == torch.float64 or x != x:
        return float(x)
    code = _PACK_CODE.get(dtype)
    if code is None:  # bfloat16: no struct format
        return float(torch.tensor(x, dtype=torch.float64).to(dtype))
    try:
        return struct.unpack(code, struct.pack(code, x))[0]
    except OverflowError:  # struct refuses what rounds to Inf
        return math.copysign(math.inf, x)


def _product_in(a: float, b: float, dtype: torch.dtype) -> float:
    """round_dtype(a * b) for a, b representable in ``dtype``: the exact product rounded once
    (float32/16/bf16 products are exact in float64, so one rounding of the double product)."""
    return _round_to(a * b, dtype)


def check_scale(scale: float, *, target: torch.dtype = torch.float32, alpha: float = 1.0) -> None:
    """The scale half of the value rule (module docstring); raises NonFiniteError/PayloadError."""
    if not math.isfinite(scale):
        raise NonFiniteError(f"payload scale is {scale}")
    if not scale > 0:
        raise PayloadError(f"payload scale must be > 0, got {scale!r}")
    s_t = _round_to(scale, target)
    if not math.isfinite(s_t):
        raise NonFiniteError(f"payload scale {scale!r} overflows {target}")
    if s_t < torch.finfo(target).tiny:
        raise PayloadError(f"payload scale {scale!r} is not a normal {target} number")
    if alpha != 1.0 and not math.isfinite(_round_to(float(alpha) * scale, target)):
        raise NonFiniteError(f"alpha * scale = {float(alpha) * scale!r} overflows {target}")


def check_values(values: torch.Tensor, scale: float, *, target: torch.dtype = torch.float32,
                 alpha: float = 1.0, max_abs: Optional[float] = None, finite: bool = True,
                 slot: int = 0) -> None:
    """The value rule of the module docstring for one payload's values (any wire dtype).

    Rounding to ``target`` and multiplying by a positive number are monotone, so the rule holds
    for every value iff it holds for the largest magnitude: one ``aminmax`` pass, then scalars.
    Raises NonFiniteError (a non-finite value, or one that overflows ``target`` after scale and
    cast) or PayloadError (a bad scale, or a value over ``max_abs``).
    """
    if target not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise PayloadError(f"unsupported target dtype {target}")
    check_scale(scale, target=target, alpha=alpha)
    if values.numel() == 0 or (not finite and max_abs is None):
        return
    lo, hi = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if finite:
            raise NonFiniteError(f"payload for slot {slot} holds NaN or Inf values")
        peak = float("nan")
    else:
        peak = _round_to(max(-lo, hi), target)
    s_t = _round_to(scale, target)
    decoded = _product_in(peak, s_t, target) if peak == peak else peak
    if finite:
        addend = decoded if alpha == 1.0 else _product_in(peak, _round_to(float(alpha) * scale, target), target)
        if not (math.isfinite(decoded) and math.isfinite(addend)):
            raise NonFiniteError(f"payload for slot {slot}: a value (max |value| {max(-lo, hi):g}, scale "
                                 f"{scale:g}) is not finite in {target}")
    if max_abs is not None and not abs(decoded) <= max_abs:
        raise PayloadError(f"payload for slot {slot}: decoded |value| up to {abs(decoded):g} exceeds max_abs {max_abs:g}")


@dataclass
class Payload:
    """One tensor's worth of message: dense, sparse, seeded random-k, or skip."""

    kind: Kind
    numel: int
    values: torch.Tensor
    indices: Optional[torch.Tensor] = None
    seed: int = 0
    scale: float = 1.0
    slot: int = 0
    flags: Flag = Flag.NONE

    # ---- construction helpers -------------------------------------------------
    @classmethod
    def dense(cls, values: torch.Tensor, *, scale: float = 1.0, slot: int = 0, flags: Flag = Flag.NONE) -> "Payload":
        v = values.reshape(-1)
        return cls(Kind.DENSE, v.numel(), v, None, 0, scale, slot, flags)

    @classmethod
    def sparse(cls, indices: torch.Tensor, values: torch.Tensor, numel: int, *, scale: float = 1.0,
               slot: int = 0, flags: Flag = Flag.NONE) -> "Payload":
        return cls(Kind.SPARSE, int(numel), values.reshape(-1), indices.reshape(-1).to(torch.int32), 0, scale, slot, flags)

    @classmethod
    def randk(cls, values: torch.Tensor, numel: int, seed: int, *, scale: float = 1.0, slot: int = 0) -> "Payload":
        return cls(Kind.RANDK, int(numel), values.reshape(-1), None, int(seed), scale, slot)

    @classmethod
    def skip(cls, numel: int, *, slot: int = 0, dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu") -> "Payload":
        return cls(Kind.SKIP, int(numel), torch.empty(0, dtype=dtype, device=device), None, 0, 1.0, slot)

    # ---- sizes ----------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def device(self) -> torch.device:
        return self.values.device

    def body_bytes(self) -> int:
        idx = _align8(4 * self.nnz) if self.kind == Kind.SPARSE else 0
        return idx + _align8(self.nnz * self.values.element_size())

    @property
    def nbytes(self) -> int:
        """Bytes this payload takes on the wire (header included)."""
        return PAYLOAD_HEADER_BYTES + self.body_bytes()

    @staticmethod
    def max_bytes(kind: Kind, max_nnz: int, dtype: torch.dtype) -> int:
        """Upper bound on ``nbytes`` for a payload of this kind carrying at most max_nnz values."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        idx = _align8(4 * max_nnz) if kind == Kind.SPARSE else 0
        return PAYLOAD_HEADER_BYTES + idx + _align8(max_nnz * itemsize)

    # ---- decoding into dense --------------------------------------------------
    def dense_indices(self) -> Optional[torch.Tensor]:
        """Indices as int32 (None for DENSE and SKIP)."""
        if self.kind == Kind.SPARSE:
            return self.indices
        if self.kind == Kind.RANDK:
            return randk_indices(self.numel, self.nnz, self.seed, self.values.device)
        return None

    def add_to(self, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """out += alpha * decode(self), in place; out is a flat tensor of length numel."""
        from commlib import ops  # local: ops may load the native extension

        if out.numel() != self.numel:
            raise PayloadError(f"payload stands for {self.numel} entries, target has {out.numel()}")
        if self.kind == Kind.SKIP or self.nnz == 0:
            return out
        a = float(alpha) * float(self.scale)
        if out.is_floating_point() and not math.isfinite(_round_to(a, out.dtype)):
            raise NonFiniteError(f"alpha * scale = {a!r} overflows {out.dtype}")
        if self.kind == Kind.DENSE:
            out.add_(self.values.to(out.dtype), alpha=a)
            return out
        ops.scatter_add_(out, self.dense_indices(), self.values, a)
        return out

    def to_dense(self, dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=dtype, device=device if device is not None else self.values.device)
        return self.add_to(out)

    # ---- validation -----------------------------------------------------------
    def validate(self, finite: FinitePolicy = "reject", *, numel: Optional[int] = None,
                 slot: Optional[int] = None, target: torch.dtype = torch.float32,
                 max_abs: Optional[float] = None) -> "Payload":
        """Check internal consistency, index range and order, and the value rule (module
        docstring) for a receiver that adds in ``target``; raise PayloadError (NonFiniteError
        for values that are not finite in ``target`` after scale and cast)."""
        if not isinstance(self.kind, Kind):
            raise PayloadError(f"unknown payload kind {self.kind!r}")
        if self.values.dtype not in _DTYPE_CODE:
            raise PayloadError(f"values dtype {self.values.dtype} is not a wire dtype")
        if self.values.dim() != 1:
            raise PayloadError("payload values must be 1-D")
        if not 0 <= self.numel <= MAX_NUMEL:
            raise PayloadError(f"numel {self.numel} out of range")
        if numel is not None and self.numel != numel:
            raise PayloadError(f"payload for slot {self.slot} has numel {self.numel}, expected {numel}")
        if slot is not None and self.slot != slot:
            raise PayloadError(f"payload slot {self.slot}, expected {slot}")
        n = self.nnz
        if self.kind == Kind.DENSE and n != self.numel:
            raise PayloadError(f"dense payload carries {n} values for numel {self.numel}")
        if self.kind in (Kind.SPARSE, Kind.RANDK) and n > self.numel:
            raise PayloadError(f"payload carries {n} values but numel is {self.numel}")
        if self.kind == Kind.SKIP and n != 0:
            raise PayloadError("skip payload carries values")
        if self.values.dtype == torch.int8 and self.kind == Kind.SKIP:
            raise PayloadError("int8 skip payload")
        if finite not in ("reject", "allow"):
            raise PayloadError(f"unknown finiteness policy {finite!r}")
        if self.kind == Kind.SPARSE:
            idx = self.indices
            if idx is None or idx.dtype != torch.int32 or idx.dim() != 1 or idx.numel() != n:
                raise PayloadError("sparse payload needs int32 indices, one per value")
            if n:
                lo, hi = torch.aminmax(idx)
                if int(lo) < 0 or int(hi) >= self.numel:
                    raise PayloadError(
                        f"sparse index out of range [0, {self.numel}): min {int(lo)}, max {int(hi)}"
                    )
                if n > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    raise PayloadError("sparse indices must be strictly ascending (no duplicates)")
        elif self.indices is not None:
            raise PayloadError(f"{self.kind.name} payload must not carry indices")
        check_values(self.values, float(self.scale), target=target, max_abs=max_abs,
                     finite=finite == "reject", slot=self.slot)
        return self

    # ---- encoding ---------------------------------------------------------------
    def _header(self, crc: int, flags: int) -> bytes:
        return _PHDR.pack(
            PAYLOAD_MAGIC, VERSION, int(self.kind), _DTYPE_CODE[self.values.dtype], int(flags),
            int(self.slot), int(self.numel), self.nnz, int(self.seed) & 0xFFFF_FFFF_FFFF_FFFF,
            float(self.scale), self.body_bytes(), crc, 0,
        )

    def encode_into(self, buf: torch.Tensor, offset: int = 0, checksum: bool = False) -> int:
        """Write this payload into a flat uint8 tensor (any device) at offset; return the end.

        With ``checksum`` the header carries the CRC-32 of header and body (as ``to_bytes``);
        a CUDA buffer is then copied to the host once for it.
        """
        end = offset + self.nbytes
        if buf.dtype != torch.uint8 or buf.dim() != 1 or end > buf.numel():
            raise PayloadError(f"buffer too small: need {end} bytes, have {buf.numel()}")
        if offset % 8:
            raise PayloadError("payload offset must be 8-byte aligned")
        flags = int(self.flags) & ~int(Flag.CHECKSUM)
        hdr = torch.frombuffer(bytearray(self._header(0, flags)), dtype=torch.uint8)
        buf[offset:offset + PAYLOAD_HEADER_BYTES].copy_(hdr, non_blocking=False)
        pos = offset + PAYLOAD_HEADER_BYTES
        n = self.nnz
        if self.kind == Kind.SPARSE:
            buf[pos:pos + 4 * n].view(torch.int32).copy_(self.indices)
            pos += _align8(4 * n)
        nb = n * self.values.element_size()
        if nb:
            buf[pos:pos + nb].view(self.values.dtype).copy_(self.values)
        if checksum:
            pad = pos + nb
            buf[pad:end] = 0  # padding is covered by the CRC: make it deterministic
            hdr = self._header(0, flags | int(Flag.CHECKSUM))
            body = buf[offset + PAYLOAD_HEADER_BYTES:end].cpu().numpy()
            crc = zlib.crc32(body, zlib.crc32(hdr))
            buf[offset:offset + PAYLOAD_HEADER_BYTES].copy_(
                torch.frombuffer(bytearray(self._header(crc, flags | int(Flag.CHECKSUM))), dtype=torch.uint8))
        return end

    def to_bytes(self, checksum: bool = True) -> bytes:
        """Standalone bytes (CPU), with a CRC-32 of the body by default."""
        body = torch.zeros(self.body_bytes(), dtype=torch.uint8)
        tmp = torch.zeros(self.nbytes, dtype=torch.uint8)
        self.encode_into(tmp, 0)
        body.copy_(tmp[PAYLOAD_HEADER_BYTES:])
        raw = body.numpy().tobytes()
        flags = int(self.flags) | (int(Flag.CHECKSUM) if checksum else 0)
        if not checksum:
            flags &= ~int(Flag.CHECKSUM)
        crc = zlib.crc32(self._header(0, flags) + raw) if checksum else 0
        return self._header(crc, flags) + raw

    # ---- decoding -----------------------------------------------------------------
    @classmethod
    def decode_from(cls, buf: torch.Tensor, offset: int = 0, *, finite: FinitePolicy = "reject",
                    numel: Optional[int] = None, slot: Optional[int] = None,
                    copy: bool = False, require_checksum: bool = False,
                    target: torch.dtype = torch.float32, max_abs: Optional[float] = None,
                    max_numel: Optional[int] = None) -> Tuple["Payload", int]:
        """Parse and validate one payload from a flat uint8 tensor; return (payload, end offset).

        Values/indices are views into ``buf`` unless ``copy``. Receivers of bytes from an
        untrusted network pass ``require_checksum=True``. ``target``/``max_abs``: the value rule
        (module docstring). Without an expected ``numel`` the payload may stand for at most
        ``max_numel`` entries (default ``DEFAULT_MAX_NUMEL``).
        """
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise PayloadError("decode needs a flat uint8 buffer")
        total = buf.numel()
        if offset < 0 or offset + PAYLOAD_HEADER_BYTES > total:
            raise PayloadError(f"truncated payload: {total - offset} bytes left, header needs {PAYLOAD_HEADER_BYTES}")
        if offset % 8:
            raise PayloadError("payload offset must be 8-byte aligned")
        raw_hdr = buf[offset:offset + PAYLOAD_HEADER_BYTES].cpu().numpy().tobytes()
        (magic, version, kind, dcode, flags, pslot, pnumel, nnz, seed, scale, body, crc, _res) = _PHDR.unpack(raw_hdr)
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
        if _res:
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
        itemsize = torch.empty(0, dtype=dtype).element_size()
        idx_bytes = _align8(4 * nnz) if kind_e == Kind.SPARSE else 0
        expect_body = idx_bytes + _align8(nnz * itemsize)
        if body != expect_body:
            raise PayloadError(f"payload body is {body} bytes, its header implies {expect_body}")
        pos = offset + PAYLOAD_HEADER_BYTES
        end = pos + body
        if end > total:
            raise PayloadError(f"truncated payload: body needs {body} bytes, {total - pos} left")
        if flags & ~_ALL_FLAGS:
            raise PayloadError(f"unknown payload flags {flags:#x}")
        if not flags & Flag.CHECKSUM:
            if crc != 0:
                raise PayloadError("payload carries a checksum but its flag is cleared")
            if require_checksum:
                raise PayloadError("payload has no checksum and this receiver requires one")
        else:
            zeroed = raw_hdr[:52] + b"\0\0\0\0" + raw_hdr[56:]
            got = zlib.crc32(zeroed + buf[pos:end].cpu().numpy().tobytes())
            if got != crc:
                raise PayloadError(f"payload checksum mismatch (got {got:#010x}, header {crc:#010x})")
        indices = None
        if kind_e == Kind.SPARSE:
            indices = buf[pos:pos + 4 * nnz].view(torch.int32)
            pos += idx_bytes
        values = buf[pos:pos + nnz * itemsize].view(dtype)
        if copy:
            values = values.clone()
            indices = indices.clone() if indices is not None else None
        p = cls(kind_e, int(pnumel), values, indices, int(seed), float(scale), int(pslot),
                Flag(flags & ~int(Flag.CHECKSUM)))
        p.validate(finite, numel=numel, slot=slot, target=target, max_abs=max_abs)
        return p, end

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], *, finite: FinitePolicy = "reject",
                   numel: Optional[int] = None, slot: Optional[int] = None,
                   require_checksum: bool = False, target: torch.dtype = torch.float32,
                   max_abs: Optional[float] = None, max_numel: Optional[int] = None) -> "Payload":
        """Parse one standalone payload; trailing bytes are an error (options as decode_from)."""
        buf = _bytes_to_tensor(data)
        p, end = cls.decode_from(buf, 0, finite=finite, numel=numel, slot=slot, require_checksum=require_checksum,
                                 target=target, max_abs=max_abs, max_numel=max_numel)
        if end != buf.numel():
            raise PayloadError(f"{buf.numel() - end} trailing bytes after payload")
        return p


def _bytes_to_tensor(data: Union[bytes, bytearray, memoryview]) -> torch.Tensor:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise PayloadError("empty message")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class Message:
    """What one sender sends in one step: an ordered group of payloads."""

    payloads: List[Payload]
    sender: int = 0
    step: int = 0

    @property
    def nbytes(self) -> int:
        return MESSAGE_HEADER_BYTES + sum(p.nbytes for p in self.payloads)

    @staticmethod
    def capacity(payload_max_bytes: Iterable[int]) -> int:
        """Fixed buffer size that holds any message whose payloads stay within these bounds."""
        return MESSAGE_HEADER_BYTES + sum(payload_max_bytes)

    def encode_into(self, buf: torch.Tensor, checksum: bool = False) -> int:
        """Write into a flat uint8 tensor (padding after the used length is left as is);
        ``checksum``: every payload carries its CRC-32 (see Payload.encode_into)."""
        used = self.nbytes
        if buf.numel() < used:
            raise PayloadError(f"message needs {used} bytes, buffer holds {buf.numel()}")
        hdr = _MHDR.pack(MESSAGE_MAGIC, VERSION, 0, len(self.payloads), int(self.sender), int(self.step), used)
        buf[:MESSAGE_HEADER_BYTES].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
        off = MESSAGE_HEADER_BYTES
        for p in self.payloads:
            off = p.encode_into(buf, off, checksum=checksum)
        return off

    def to_bytes(self, checksum: bool = True) -> bytes:
        parts = [p.to_bytes(checksum=checksum) for p in self.payloads]
        used = MESSAGE_HEADER_BYTES + sum(len(x) for x in parts)
        hdr = _MHDR.pack(MESSAGE_MAGIC, VERSION, 0, len(self.payloads), int(self.sender), int(self.step), used)
        return hdr + b"".join(parts)

    @classmethod
    def decode_from(cls, buf: torch.Tensor, *, finite: FinitePolicy = "reject",
                    numels: Optional[Sequence[int]] = None, copy: bool = False,
                    max_count: int = 1 << 20, exact: bool = False,
                    require_checksum: bool = False, target: torch.dtype = torch.float32,
                    max_abs: Optional[float] = None, max_numel: Optional[int] = None) -> "Message":
        """Parse and validate a message; ``numels`` (if given) is what the receiver expects per slot.
        Without ``numels`` its payloads together may stand for at most ``max_numel`` entries
        (default ``DEFAULT_MAX_NUMEL``). ``target``/``max_abs``: the value rule (module docstring)."""
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise PayloadError("decode needs a flat uint8 buffer")
        if buf.numel() < MESSAGE_HEADER_BYTES:
            raise PayloadError(f"truncated message: {buf.numel()} bytes, header needs {MESSAGE_HEADER_BYTES}")
        magic, version, _r, count, sender, step, used = _MHDR.unpack(buf[:MESSAGE_HEADER_BYTES].cpu().numpy().tobytes())
        if magic != MESSAGE_MAGIC:
            raise PayloadError(f"bad message magic {magic!r}")
        if version != VERSION:
            raise PayloadError(f"unsupported message version {version} (this commlib speaks {VERSION})")
        if count > max_count:
            raise PayloadError(f"implausible payload count {count}")
        if used > buf.numel():
            raise PayloadError(f"truncated message: header says {used} bytes, got {buf.numel()}")
        if exact and used != buf.numel():
            raise PayloadError(f"message header says {used} bytes, got {buf.numel()}")
        if numels is not None and count != len(numels):
            raise PayloadError(f"message carries {count} payloads, expected {len(numels)}")
        view = buf[:used]
        off = MESSAGE_HEADER_BYTES
        payloads = []
        budget = DEFAULT_MAX_NUMEL if max_numel is None else int(max_numel)
        for i in range(count):
            p, off = Payload.decode_from(view, off, finite=finite, slot=i,
                                         numel=None if numels is None else numels[i], copy=copy,
                                         require_checksum=require_checksum, target=target, max_abs=max_abs,
                                         max_numel=budget)
            if numels is None:
                budget -= p.numel  # the whole message expands to at most max_numel entries
            payloads.append(p)
        if off != used:
            raise PayloadError(f"message length {used} disagrees with its payloads ({off})")
        return cls(payloads, int(sender), int(step))

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], **kw) -> "Message":
        """Parse standalone bytes; the length must match the header exactly."""
        return cls.decode_from(_bytes_to_tensor(data), exact=True, **kw)
