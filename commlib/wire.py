"""The one message format: a ``Payload`` per tensor, a ``Message`` per send.

Layers: ``commlib.wire_format`` holds the binary layout (constants, kinds, flags, header structs,
alignment, dtype codes, header parsing) and ``commlib.value_rule`` the value rule; the packing
ops of ``commlib.ops`` build on those two, and this module (Payload, Message) on all three. Their
names are re-exported here.

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

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from commlib import ops
from commlib.errors import NonFiniteError, PayloadError
# the layout and the value rule live below this module (commlib.ops builds on them too);
# re-exported here so ``from commlib.wire import ...`` keeps working
from commlib.value_rule import check_scale, check_values, product_in as _product_in, round_to as _round_to  # noqa: F401
from commlib.wire_format import (  # noqa: F401
    ALL_FLAGS as _ALL_FLAGS, DEFAULT_MAX_NUMEL, DTYPE_CODE as _DTYPE_CODE, DTYPES, MAX_NUMEL, MESSAGE_HEADER as _MHDR,
    MESSAGE_HEADER_BYTES, MESSAGE_MAGIC, PAYLOAD_HEADER as _PHDR, PAYLOAD_HEADER_BYTES, PAYLOAD_MAGIC, VERSION, Flag,
    Kind, align8 as _align8, body_bytes, check_crc, check_indices, pack_message_header, pack_payload_header,
    parse_message_header, payload_crc, payload_max_bytes, read_payload, with_crc,
)

FinitePolicy = str  # "reject" (raise NonFiniteError) or "allow"


def randk_indices(numel: int, k: int, seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The k distinct indices a RANDK payload with this seed stands for (sorted, int32).

    Sender and receiver call this with the same arguments, so indices never travel.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)
    return idx.to(device)


def seal_crc(buf: torch.Tensor, offset: int, end: int) -> None:
    """Set Flag.CHECKSUM and the CRC-32 of the payload written at buf[offset:end] (its padding
    already zeroed); a CUDA buffer is copied to the host once for it."""
    host = buf[offset:end].cpu().numpy().tobytes()
    hdr = with_crc(host[:PAYLOAD_HEADER_BYTES], 0)
    crc = payload_crc(hdr, host[PAYLOAD_HEADER_BYTES:])
    buf[offset:offset + PAYLOAD_HEADER_BYTES].copy_(
        torch.frombuffer(bytearray(with_crc(hdr, crc)), dtype=torch.uint8))


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
    #: What ``view`` recorded when the payload was packed into a send buffer (offset and header
    #: fields), else None: ``is_packed_at`` tells whether those bytes still stand for it.
    packed_as: Optional[tuple] = field(default=None, compare=False, repr=False)

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

    @classmethod
    def view(cls, buf: torch.Tensor, offset: int, kind: Kind, numel: int, nnz: int, dtype: torch.dtype, *,
             slot: int = 0, scale: float = 1.0, flags: Flag = Flag.NONE, seed: int = 0) -> "Payload":
        """The payload a packing op just wrote at buf[offset:], as views of its sections (no copy,
        no validation: the caller wrote these bytes itself); ``is_packed_at(offset)`` then holds."""
        pos = offset + PAYLOAD_HEADER_BYTES
        indices = None
        if kind == Kind.SPARSE:
            indices = buf[pos:pos + 4 * nnz].view(torch.int32)
            pos += _align8(4 * nnz)
        values = buf[pos:pos + nnz * torch.empty(0, dtype=dtype).element_size()].view(dtype)
        p = cls(kind, int(numel), values, indices, int(seed), float(scale), int(slot), Flag(int(flags)))
        p.packed_as = p._packed_key(offset)
        return p

    def _packed_key(self, offset: int) -> tuple:
        return (offset, self.kind, self.numel, self.nnz, self.values.dtype, self.values.data_ptr(), self.seed,
                self.scale, self.slot, int(self.flags))

    def is_packed_at(self, offset: int) -> bool:
        """True when this payload was packed at ``offset`` (``view``) and nothing in it changed since
        but its values in place (which change the packed bytes too)."""
        return self.packed_as is not None and self.packed_as == self._packed_key(offset)

    # ---- sizes ----------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def device(self) -> torch.device:
        return self.values.device

    def body_bytes(self) -> int:
        return body_bytes(self.kind, self.nnz, self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes this payload takes on the wire (header included)."""
        return PAYLOAD_HEADER_BYTES + self.body_bytes()

    @staticmethod
    def max_bytes(kind: Kind, max_nnz: int, dtype: torch.dtype) -> int:
        """Upper bound on ``nbytes`` for a payload of this kind carrying at most max_nnz values."""
        return payload_max_bytes(kind, max_nnz, dtype)

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
            check_indices(self.indices, n, self.numel)
        elif self.indices is not None:
            raise PayloadError(f"{self.kind.name} payload must not carry indices")
        check_values(self.values, float(self.scale), target=target, max_abs=max_abs,
                     finite=finite == "reject", slot=self.slot)
        return self

    # ---- encoding ---------------------------------------------------------------
    def _header(self, crc: int, flags: int) -> bytes:
        return pack_payload_header(self.kind, self.values.dtype, flags, self.slot, self.numel, self.nnz, self.seed,
                                   self.scale, self.body_bytes(), crc)

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
            buf[pos + nb:end] = 0  # padding is covered by the CRC: make it deterministic
            seal_crc(buf, offset, end)
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
        crc = payload_crc(self._header(0, flags), raw) if checksum else 0
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
        rp = read_payload(buf, offset, finite=finite, numel=numel, slot=slot, require_checksum=require_checksum,
                          target=target, max_abs=max_abs, max_numel=max_numel)
        h = rp.header
        values, indices = rp.values, rp.indices
        if copy:
            values = values.clone()
            indices = indices.clone() if indices is not None else None
        return cls(h.kind, int(h.numel), values, indices, int(h.seed), float(h.scale), int(h.slot),
                   Flag(h.flags & ~int(Flag.CHECKSUM))), rp.end

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
        hdr = pack_message_header(len(self.payloads), self.sender, self.step, used)
        buf[:MESSAGE_HEADER_BYTES].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
        off = MESSAGE_HEADER_BYTES
        for p in self.payloads:
            off = p.encode_into(buf, off, checksum=checksum)
        return off

    def to_bytes(self, checksum: bool = True) -> bytes:
        parts = [p.to_bytes(checksum=checksum) for p in self.payloads]
        used = MESSAGE_HEADER_BYTES + sum(len(x) for x in parts)
        hdr = pack_message_header(len(self.payloads), self.sender, self.step, used)
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
        count, sender, step, used = parse_message_header(
            buf[:MESSAGE_HEADER_BYTES].cpu().numpy().tobytes(), buf.numel(), max_count=max_count, exact=exact,
            count=None if numels is None else len(numels))
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
