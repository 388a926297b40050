"""Pure-torch reference of the packing ops: selection written as a wire Payload straight into
a send buffer, and many ranks' payloads unpacked with one scatter-add.

The layout is ``commlib.wire_format`` (documented in ``commlib.wire``: 64-byte header, int32 indices padded to 8, values
padded to 8); padding bytes are written as zeros so that equal selections give equal bytes.
The native extension implements the same functions (commlib/ops/native.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from commlib.errors import ConfigError, NonFiniteError, PayloadError
from commlib.ops import torch_ops
from commlib.value_rule import check_values
from commlib.wire_format import (PAYLOAD_HEADER_BYTES, Flag, Kind, RawPayload, align8, body_bytes, pack_payload_header,
                                 payload_max_bytes, read_payload)

PACK_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Offsets = Union[Sequence[int], torch.Tensor]


@dataclass
class UnpackResult:
    """What ``unpack_scatter_add_`` found in each rank's buffer.

    ends[r]: offset just past rank r's payload (where its next payload starts), -1 when the
    payload was rejected or the rank was skipped (offset < 0); pass ``ends`` as the next call's
    offsets.  nnz[r], flags[r]: from the header.  errors: rank -> reason for every rejected
    payload (only non-empty with on_error="skip"; "raise" raises on the first).
    """

    ends: List[int]
    nnz: List[int]
    flags: List[int]
    errors: Dict[int, str] = field(default_factory=dict)

    @property
    def accepted(self) -> List[int]:
        """Ranks whose payload was added."""
        return [r for r, e in enumerate(self.ends) if e >= 0]


# ---- argument checks shared by both paths ------------------------------------------------------
def check_buffer(buf: torch.Tensor, offset: int) -> None:
    """A send buffer: flat uint8, 8-byte aligned start; offset 8-byte aligned."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ConfigError("a payload buffer must be a flat contiguous uint8 tensor")
    if buf.data_ptr() % 8:
        raise ConfigError("a payload buffer must start 8-byte aligned (slice it at multiples of 8)")
    if offset < 0 or offset % 8:
        raise PayloadError(f"payload offset must be 8-byte aligned and >= 0, got {offset}")


def value_dtype_of(value_dtype: Optional[torch.dtype], default: torch.dtype) -> torch.dtype:
    """The wire dtype of packed values: float32 (default for float32 data), float16 or bfloat16."""
    vd = default if value_dtype is None else value_dtype
    if vd not in PACK_VALUE_DTYPES:
        raise ConfigError(f"packed values must be float32, float16 or bfloat16, got {vd}")
    return vd


def too_small(offset: int, needed: int, have: int, nnz: int) -> PayloadError:
    return PayloadError(f"payload of {nnz} values needs {needed} bytes at offset {offset}; the buffer holds {have}")


def check_unpack(out: torch.Tensor, bufs: torch.Tensor, offsets: Offsets, finite: str, on_error: str,
                 max_abs: Optional[float] = None) -> List[int]:
    """Arguments of unpack_scatter_add_; returns the offsets as a list."""
    if not out.is_contiguous() or not out.is_floating_point():
        raise ConfigError("unpack target must be a contiguous floating-point tensor")
    if bufs.dtype != torch.uint8 or bufs.dim() != 2 or not bufs.is_contiguous():
        raise ConfigError("bufs must be a contiguous (ranks, capacity) uint8 tensor")
    if bufs.size(1) % 8 or bufs.data_ptr() % 8:
        raise ConfigError("each rank's row must be 8-byte aligned (capacity a multiple of 8)")
    offs = [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    if len(offs) != bufs.size(0):
        raise ConfigError(f"{len(offs)} offsets for {bufs.size(0)} ranks")
    if finite not in ("reject", "allow"):
        raise ConfigError(f"finite must be 'reject' or 'allow', got {finite!r}")
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_abs is not None and not float(max_abs) > 0:
        raise ConfigError(f"max_abs must be > 0 (or None), got {max_abs!r}")
    return offs


def raise_first(result: UnpackResult, codes: Sequence[int]) -> None:
    """on_error='raise': the lowest rank's error, as NonFiniteError or PayloadError."""
    if result.errors:
        r = min(result.errors)
        cls = NonFiniteError if codes[r] == 2 else PayloadError
        raise cls(f"rank {r}: {result.errors[r]}")


# ---- packing ---------------------------------------------------------------------------------
def write_sparse(buf: torch.Tensor, offset: int, idx: torch.Tensor, vals: torch.Tensor, numel: int, *,
                 slot: int, scale: float, flags: int, value_dtype: torch.dtype) -> Tuple[int, int]:
    """Encode (idx, vals) as a SPARSE payload at buf[offset:], zero padding; (end, nnz)."""
    nnz = int(idx.numel())
    nbytes = payload_max_bytes(Kind.SPARSE, nnz, value_dtype)
    if offset + nbytes > buf.numel():
        raise too_small(offset, nbytes, buf.numel(), nnz)
    end = offset + nbytes
    hdr = pack_payload_header(Kind.SPARSE, value_dtype, flags, slot, numel, nnz, 0, scale,
                              body_bytes(Kind.SPARSE, nnz, value_dtype))
    buf[offset:offset + PAYLOAD_HEADER_BYTES].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
    ib = offset + PAYLOAD_HEADER_BYTES
    vb = ib + align8(4 * nnz)
    buf[ib:ib + 4 * nnz].view(torch.int32).copy_(idx.reshape(-1))
    buf[ib + 4 * nnz:vb] = 0
    nb = nnz * vals.new_empty(0, dtype=value_dtype).element_size()
    buf[vb:vb + nb].view(value_dtype).copy_(vals.reshape(-1))
    buf[vb + nb:end] = 0
    return end, nnz


def pack_threshold_(buf: torch.Tensor, offset: int, x: torch.Tensor, threshold: float, *,
                    max_nnz: Optional[int] = None, slot: int = 0, scale: float = 1.0, flags: int = 0,
                    value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """Select |x| >= threshold (at most max_nnz of the largest) and write a complete SPARSE
    Payload at buf[offset:]; return (end offset, nnz).  Payload.decode_from reads it back.

    A payload that does not fit raises PayloadError and writes nothing.
    """
    check_buffer(buf, offset)
    vd = value_dtype_of(value_dtype, x.dtype if x.dtype in PACK_VALUE_DTYPES else torch.float32)
    x = x.reshape(-1)
    idx, vals = torch_ops.keep_largest(*torch_ops.threshold_select(x, threshold), max_nnz)
    return write_sparse(buf, offset, idx, vals, x.numel(), slot=slot, scale=scale, flags=flags, value_dtype=vd)


def dgc_update_pack_(buf: torch.Tensor, offset: int, u: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     momentum: float, threshold: float, *, nesterov: bool = False, max_nnz: Optional[int] = None,
                     slot: int = 0, scale: float = 1.0, flags: int = 0,
                     value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """``dgc_update_select_`` writing its selection as a SPARSE Payload at buf[offset:].

    If the payload does not fit, PayloadError is raised after the momentum update but before
    masking: u and v then hold the updated state with nothing sent and nothing lost.
    """
    check_buffer(buf, offset)
    torch_ops.check_state(u, v, g)
    vd = value_dtype_of(value_dtype, v.dtype if v.dtype in PACK_VALUE_DTYPES else torch.float32)
    uf, vf = u.view(-1), v.view(-1)
    torch_ops.dgc_momentum_(uf, vf, g.reshape(-1).to(v.dtype), momentum, nesterov)
    idx, vals = torch_ops.keep_largest(*torch_ops.threshold_select(vf, threshold), max_nnz)
    res = write_sparse(buf, offset, idx, vals, vf.numel(), slot=slot, scale=scale, flags=flags, value_dtype=vd)
    torch_ops.mask_(uf, vf, idx)
    return res


# ---- unpacking -------------------------------------------------------------------------------
def _decode(row: torch.Tensor, off: int, out: torch.Tensor, slot: Optional[int], finite: str,
            require_checksum: bool, alpha: float, max_abs: Optional[float]) -> RawPayload:
    p = read_payload(row, off, finite=finite, numel=out.numel(), slot=slot, require_checksum=require_checksum,
                     target=out.dtype, max_abs=max_abs)
    h = p.header
    if h.kind == Kind.RANDK:
        raise PayloadError("RANDK payloads are not unpacked here (decode them with Payload.decode_from)")
    if alpha != 1.0:  # the addends alpha * value * scale must be finite too (the value rule)
        check_values(p.values, h.scale, target=out.dtype, alpha=alpha, finite=finite == "reject", slot=h.slot)
    return p


def unpack_scatter_add_(out: torch.Tensor, bufs: torch.Tensor, offsets: Offsets, *, alpha: float = 1.0,
                        slot: Optional[int] = None, finite: str = "reject", on_error: str = "raise",
                        require_checksum: bool = False, max_abs: Optional[float] = None) -> UnpackResult:
    """out += alpha * sum over ranks r of decode(payload at bufs[r, offsets[r]:]).

    bufs: (ranks, capacity) uint8, row r = what rank r sent (e.g. an all-gather's output viewed
    as (world, capacity)); offsets: where this tensor's payload starts in each row (negative:
    skip the rank).  Each payload must stand for out.numel() entries (and carry ``slot`` if
    given); SPARSE, DENSE and SKIP payloads are accepted.  Every payload is validated before
    anything is written (header, checksum -- required if ``require_checksum`` --, index range
    and order, the value rule of commlib.wire for out's dtype with ``finite``/``max_abs``), with
    the checks of ``Payload.decode_from``; a bad one
    raises (on_error="raise") or is left out and reported (on_error="skip").  Ranks are added
    in rank order, each as ``scatter_add_(out, idx, values, alpha * scale)``.
    """
    offs = check_unpack(out, bufs, offsets, finite, on_error, max_abs)
    ranks = bufs.size(0)
    res = UnpackResult([-1] * ranks, [0] * ranks, [0] * ranks)
    codes = [0] * ranks
    payloads: List[Tuple[int, RawPayload]] = []
    for r, off in enumerate(offs):
        if off < 0:
            continue
        try:
            p = _decode(bufs[r], off, out, slot, finite, require_checksum, float(alpha), max_abs)
        except PayloadError as exc:
            res.errors[r] = str(exc)
            codes[r] = 2 if isinstance(exc, NonFiniteError) else 1
            continue
        res.ends[r] = p.end
        res.nnz[r] = p.header.nnz
        res.flags[r] = int(p.header.flags) & ~int(Flag.CHECKSUM)  # as Payload.flags: the CRC is checked
        payloads.append((r, p))
    if on_error == "raise":
        raise_first(res, codes)
    flat = out.view(-1)
    for r, p in payloads:
        a = float(alpha) * float(p.header.scale)
        if p.header.kind == Kind.SPARSE and p.header.nnz:
            torch_ops.scatter_add_(flat, p.indices, p.values, a)
        elif p.header.kind == Kind.DENSE and p.header.nnz:
            flat.add_(p.values.to(flat.dtype) * a)  # a multiply, then an add: as scatter_add_
    return res
