"""The DDP hook's all-gather messages without a Python loop over payloads.

Send: the worker half packs every payload straight into the send buffer
(``SchemeWorker.encode_group_into``); :func:`seal` writes the message header in front and,
with ``checksum``, each payload's CRC-32.

Receive, mean aggregator: :func:`gathered_mean` adds every rank's payload for a tensor into its
section of the bucket with one ``ops.unpack_scatter_add_`` per tensor (all ranks at once: the
native kernel validates and scatters; no dense temporary per payload), then divides by the
number of contributors. Rejections follow the slow path exactly: a rank whose message header or
any payload is bad is left out of the whole group, counted once per step, and the group is
re-added without it from zero. A tensor whose sum of valid payloads overflows float32 is
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
             max_abs: Optional[float]) -> tuple:
    """Zero the sections and add every rank with used[r] >= 0 into them, tensor by tensor.
    Returns (start offsets per tensor, ranks rejected) -- the latter empty on success."""
    n = rows.size(0)
    offs = [MESSAGE_HEADER_BYTES if used[r] >= 0 else -1 for r in range(n)]
    starts = []
    for j, sec in enumerate(sections):
        sec.zero_()
        starts.append(offs)
        res = ops.unpack_scatter_add_(sec, rows, offs, slot=j, finite="reject", on_error="skip",
                                      require_checksum=checksum, max_abs=max_abs)
        if res.errors:
            return starts, set(res.errors)
        offs = res.ends
    # the payloads must fill each message exactly (as Message.decode_from checks)
    return starts, {r for r in range(n) if offs[r] >= 0 and offs[r] != used[r]}


def gathered_mean(rows: torch.Tensor, sections: Sequence[torch.Tensor], *, step: int, increments: bool,
                  checksum: bool, max_abs: Optional[float], reject: Callable[[int], None]) -> None:
    """The mean aggregator over all-gathered messages, written into ``sections`` (float32 views of
    the bucket, one per tensor). rows: (ranks, capacity) uint8, row r = rank r's message.
    ``reject(r)`` is called once for each rank left out."""
    n, cap = rows.shape
    used = _headers_ok(rows, len(sections), step)
    out: Set[int] = {r for r in range(n) if used[r] < 0}
    for r in sorted(out):
        reject(r)
    while True:
        starts, bad = _add_all(rows, sections, used, checksum, max_abs)
        if not bad:
            break
        for r in sorted(bad):  # leave the rank out of the whole group and add again from zero
            used[r] = -1
            reject(r)
    ranks = [r for r in range(n) if used[r] >= 0]
    heads = _payload_headers(rows, starts, ranks)
    divs = []
    for j, sec in enumerate(sections):
        div = mean_divisor(n, sum(1 for r in ranks if heads[j, r]["kind"] != Kind.SKIP), increments)
        divs.append(div)
        if div:
            sec.div_(div)
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
    """max |value * scale| over the accepted payloads (their values only: one cat, one sync)."""
    views, scales, counts = [], [], []
    for (_j, r), h in heads.items():
        if h["nnz"] == 0 or h["kind"] not in (Kind.SPARSE, Kind.DENSE):
            continue
        pos = h["start"] + PAYLOAD_HEADER_BYTES + index_bytes(Kind(h["kind"]), h["nnz"])
        views.append(rows[r, pos:pos + h["nnz"] * itemsize(h["dtype"])].view(h["dtype"]).to(torch.float64))
        scales.append(h["scale"])
        counts.append(h["nnz"])
    if not views:
        return 0.0
    scale = torch.repeat_interleave(torch.tensor(scales, dtype=torch.float64), torch.tensor(counts))
    return float((torch.cat(views).abs() * scale.to(rows.device)).max())
