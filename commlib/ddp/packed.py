"""The DDP hook's all-gather messages without a Python loop over payloads.

Send: the worker half packs every payload straight into the send buffer
(``SchemeWorker.encode_group_into``); :func:`seal` writes the message header in front and,
with ``checksum``, each payload's CRC-32.

Receive, mean aggregator: :func:`gathered_mean` adds every rank's payload for a tensor into its
section of the bucket with one ``ops.unpack_scatter_add_`` per tensor (all ranks at once: the
native kernel validates and scatters; no dense temporary per payload), then divides by the
number of contributors -- for a tensor whose payloads are all sparse only at the entries they
carry. The sections are the bucket's (zeroed first) or an :class:`OutputBuffer`'s, which is reset
only where the previous step wrote. Rejections follow the slow path exactly: a rank whose
message header or any payload is bad is left out of the whole group, counted once per step, and
the group is re-added without it from zero. A tensor whose sum of valid payloads overflows float32 is
re-added in float64 (as ``SchemeServer.decode_group``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Set

import torch

from commlib import ops
from commlib.aggregate.base import mean_divisor
from commlib.errors import PayloadError
from commlib.wire import Message, seal_crc
from commlib.wire_format import (DTYPES, KIND_OFFSET, MESSAGE_HEADER_BYTES, PAYLOAD_HEADER_BYTES, Kind,
                                 index_bytes, itemsize, pack_message_header, parse_message_header)


def seal(msg: Message, buf: torch.Tensor, checksum: bool = False) -> int:
    """Write ``msg``'s header in front of its payloads, already packed back to back at
    buf[MESSAGE_HEADER_BYTES:]; with ``checksum`` give each payload its CRC-32. Returns the used length."""
    used = msg.nbytes
    hdr = pack_message_header(len(msg.payloads), msg.sender, msg.step, used)
    buf[:MESSAGE_HEADER_BYTES].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
    if checksum:
        off = MESSAGE_HEADER_BYTES
        for p in msg.payloads:
            seal_crc(buf, off, off + p.nbytes)
            off += p.nbytes
    return used


def _headers_ok(rows: torch.Tensor, count: int, step: int) -> List[int]:
    """Per rank: the message's used length, or -1 when its header is bad (one copy to the host)."""
    n, cap = rows.shape
    heads = rows[:, :MESSAGE_HEADER_BYTES].cpu().numpy()
    used = []
    for r in range(n):
        try:
            h = parse_message_header(heads[r].tobytes(), cap, count=count)
            if h.sender != r or h.step != step:
                raise PayloadError(f"message from rank {r} claims sender {h.sender}, step {h.step}")
            used.append(h.used)
        except PayloadError:
            used.append(-1)
    return used


def _add_all(rows: torch.Tensor, sections: Sequence[torch.Tensor], used: Sequence[int], checksum: bool,
             max_abs: Optional[float], clear: Callable[[int], None]) -> tuple:
    """Clear the sections (``clear(j)``) and add every rank with used[r] >= 0 into them, tensor by
    tensor. Returns (start offsets per tensor, ranks rejected) -- the latter empty on success."""
    n = rows.size(0)
    offs = [MESSAGE_HEADER_BYTES if used[r] >= 0 else -1 for r in range(n)]
    starts = []
    for j, sec in enumerate(sections):
        clear(j)
        starts.append(offs)
        res = ops.unpack_scatter_add_(sec, rows, offs, slot=j, finite="reject", on_error="skip",
                                      require_checksum=checksum, max_abs=max_abs)
        if res.errors:
            return starts, set(res.errors)
        offs = res.ends
    # the payloads must fill each message exactly (as Message.decode_from checks)
    return starts, {r for r in range(n) if offs[r] >= 0 and offs[r] != used[r]}


def gathered_mean(rows: torch.Tensor, sections: Sequence[torch.Tensor], *, step: int, increments: bool,
                  checksum: bool, max_abs: Optional[float], reject: Callable[[int], None],
                  clear: Optional[Callable[[int], None]] = None) -> List[Optional[torch.Tensor]]:
    """The mean aggregator over all-gathered messages, written into ``sections`` (float32 views of
    the bucket, one per tensor). rows: (ranks, capacity) uint8, row r = rank r's message.
    ``reject(r)`` is called once for each rank left out. ``clear(j)`` zeroes section j before the
    first sum (default ``sections[j].zero_()``; an :class:`OutputBuffer` resets only what it
    wrote last). Returns, per section, the int64 indices of the only entries that may be nonzero
    (every accepted payload sparse), or None where the whole section may be."""
    n, cap = rows.shape
    used = _headers_ok(rows, len(sections), step)
    out: Set[int] = {r for r in range(n) if used[r] < 0}
    for r in sorted(out):
        reject(r)
    first = clear if clear is not None else (lambda j: sections[j].zero_())
    while True:
        starts, bad = _add_all(rows, sections, used, checksum, max_abs, first)
        if not bad:
            break
        first = lambda j: sections[j].zero_()  # noqa: E731  (a partial sum may be anywhere)
        for r in sorted(bad):  # leave the rank out of the whole group and add again from zero
            used[r] = -1
            reject(r)
    ranks = [r for r in range(n) if used[r] >= 0]
    heads = _payload_headers(rows, starts, ranks)
    touched = [_touched(rows, heads, j, ranks) for j in range(len(sections))]
    divs = []
    for j, sec in enumerate(sections):
        div = mean_divisor(n, sum(1 for r in ranks if heads[j, r]["kind"] != Kind.SKIP), increments)
        divs.append(div)
        if div:
            _divide(sec, div, touched[j])
    # Valid payloads are finite in float32, but a sum of several can overflow. Only possible when
    # some |value * scale| exceeds FLT_MAX / (2n): the bound reads the payloads' values (nnz
    # entries, one sync), not the bucket; past it the exact check and a float64 redo follow.
    if sections and 2 * n * _peak(rows, heads) >= torch.finfo(torch.float32).max and \
            not bool(torch.isfinite(torch.stack([s.sum(dtype=torch.float64) for s in sections])).all()):
        for j, sec in enumerate(sections):
            if bool(torch.isfinite(sec).all()):
                continue
            exact = torch.zeros(sec.numel(), dtype=torch.float64, device=sec.device)
            ops.unpack_scatter_add_(exact, rows, starts[j], slot=j, require_checksum=checksum, max_abs=max_abs)
            sec.copy_(exact.div_(divs[j]) if divs[j] else exact)
            touched[j] = None
    return touched


def already_clear(j: int) -> None:
    """``clear`` for :func:`gathered_mean` when the caller zeroed the sections beforehand."""


def _touched(rows: torch.Tensor, heads: dict, j: int, ranks: Sequence[int]) -> Optional[torch.Tensor]:
    """The indices (int64) of the accepted payloads for tensor j, all ranks concatenated (repeats
    possible), when every one of them is SPARSE or SKIP; else None. The indices were validated
    by the unpack (in range)."""
    parts = []
    for r in ranks:
        h = heads[j, r]
        if h["kind"] == Kind.SKIP:
            continue
        if h["kind"] != Kind.SPARSE:
            return None
        pos = h["start"] + PAYLOAD_HEADER_BYTES
        parts.append(rows[r, pos:pos + 4 * h["nnz"]].view(torch.int32))
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=rows.device)
    return torch.cat(parts).to(torch.int64)


def _divide(sec: torch.Tensor, div: int, touched: Optional[torch.Tensor]) -> None:
    """sec /= div, bit for bit; with ``touched`` (the only entries that may be nonzero; 0 / div
    stays +0) only there: the same float32 division on nnz entries instead of the whole section.
    Repeated indices write the same quotient (every value is read before any is written)."""
    if touched is None:
        sec.div_(div)
    elif touched.numel():
        sec.index_copy_(0, touched, sec.index_select(0, touched).div_(div))


class OutputBuffer:
    """The hook's result for one bucket when the gradients are not views of the bucket (DDP's
    default ``gradient_as_bucket_view=False``: DDP copies the result into ``.grad`` either way).
    Between steps it stays zero except where the last result was written, so a sparse mean
    resets those entries (``clear``) instead of zeroing the whole bucket. Anything else that
    writes into it (its version counter moves) makes the next ``clear`` zero it whole."""

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None
        self.numels: tuple = ()
        self.sections: List[torch.Tensor] = []
        self.written: List[Optional[torch.Tensor]] = []  # per section: indices, or None (anywhere)
        self.version = -1

    def take(self, numels: Sequence[int], device: torch.device) -> torch.Tensor:
        """The flat float32 output for this layout (its sections in ``self.sections``)."""
        numels = tuple(int(m) for m in numels)
        if self.buf is None or self.buf.device != device or self.buf.numel() != sum(numels):
            self.buf = torch.zeros(sum(numels), dtype=torch.float32, device=device)
            self.written = [torch.zeros(0, dtype=torch.int64, device=device) for _ in numels]
        elif numels != self.numels or self.buf._version != self.version:
            self.written = [None] * len(numels)  # another layout, or written by someone else
        self.numels = numels
        self.sections = list(torch.split(self.buf, list(numels)))
        self.version = -1  # the record holds again only after done(): a step that raises never gets there
        return self.buf

    def clear(self, j: int) -> None:
        """Zero section j: only the entries written last time when they are known."""
        idx = self.written[j]
        if idx is None:
            self.sections[j].zero_()
        elif idx.numel():
            self.sections[j].index_fill_(0, idx, 0.0)

    def done(self, written: Sequence[Optional[torch.Tensor]]) -> None:
        """Record where this step's result may be nonzero (call after the last write)."""
        self.written = list(written)
        self.version = self.buf._version


def _payload_headers(rows: torch.Tensor, starts: Sequence[Sequence[int]], ranks: Sequence[int]) -> dict:
    """(tensor j, rank r) -> kind, dtype, nnz, scale and start of every accepted payload: its
    64 header bytes for all of them in one gather (one host copy)."""
    cap = rows.size(1)
    pairs = [(j, r) for j in range(len(starts)) for r in ranks]
    if not pairs:
        return {}
    base = torch.tensor([r * cap + starts[j][r] for j, r in pairs], dtype=torch.int64, device=rows.device)
    raw = rows.view(-1)[base[:, None] + torch.arange(PAYLOAD_HEADER_BYTES, device=rows.device)].cpu().numpy()
    nnz = raw[:, 24:32].copy().view("<u8").reshape(-1)
    scale = raw[:, 40:48].copy().view("<f8").reshape(-1)
    return {(j, r): {"kind": int(raw[p, KIND_OFFSET]), "dtype": DTYPES[int(raw[p, KIND_OFFSET + 1])],
                     "nnz": int(nnz[p]), "scale": float(scale[p]), "start": starts[j][r]}
            for p, (j, r) in enumerate(pairs)}


def _peak(rows: torch.Tensor, heads: dict) -> float:
    """max |value * scale| over the accepted payloads: max |value| per payload on the device (no
    temporary copy of the values), one sync, then times |scale| on the host (monotone, so the
    same maximum as entry by entry in float64)."""
    peaks, scales = [], []
    for (_j, r), h in heads.items():
        if h["nnz"] == 0 or h["kind"] not in (Kind.SPARSE, Kind.DENSE):
            continue
        pos = h["start"] + PAYLOAD_HEADER_BYTES + index_bytes(Kind(h["kind"]), h["nnz"])
        vals = rows[r, pos:pos + h["nnz"] * itemsize(h["dtype"])].view(h["dtype"])
        peaks.append(torch.linalg.vector_norm(vals, float("inf")).to(torch.float64) if vals.is_floating_point()
                     else vals.to(torch.float64).abs().amax())
        scales.append(abs(h["scale"]))
    if not peaks:
        return 0.0
    return max(p * s for p, s in zip(torch.stack(peaks).tolist(), scales))
