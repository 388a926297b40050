"""Parameter-server frames: a small checked header around a ``commlib.wire.Message``.

Layout (little-endian, 80 bytes, then the body)::

    0  4s  magic b"CLPF"           36 i64 seq    PUSH: the worker's push number; PARAMS: ack
    4  u16 version (1)             44 i64 aux    PARAMS: durable ack (last checkpointed push)
    6  u8  kind (FrameKind)        52 f64 loss   PUSH: the worker's minibatch loss (NaN if none)
    7  u8  flags (FrameFlag)       60 u64 body   body length in bytes
    8  u32 worker                  68 u32 crc    CRC-32 of header (crc zeroed) + body
    12 u32 session  (worker process nonce)       72 u64 reserved (0)
    16 u32 incarnation (server start count)
    20 u32 epoch    (state resync count)
    24 u32 reserved (0)
    28 u64 step     (parameter version)

Kinds: HELLO (worker joins; FRESH flag: it holds no scheme state), PARAMS (server -> worker:
dense parameters at version ``step``; ``seq`` acknowledges the last push of this worker the
server applied, ``aux`` the last one that is in a checkpoint; ANSWER flag in async mode: a
reply, so every push the worker sent before it has been decided), PUSH (worker -> server: the
scheme's payloads computed at version ``step``), SHUTDOWN, BYE. With sequential gradient
coding (``commlib/ps/sequential.py``) ``step`` is the round, a PARAMS body is an assignment
(mini-tasks + the model versions they need) and a PUSH body holds one result per task; the
REPAIR flag marks a fallback assignment and its answer.

Every received frame is checked before anything in it is used: magic, version, kind, flags,
sizes, CRC, the worker id against the transport's sender, then the body with
``Message.from_bytes(require_checksum=True, numels=...)`` (which validates every payload).
"""
from __future__ import annotations

import enum
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from commlib.errors import PayloadError
from commlib.wire import Message

FRAME_MAGIC = b"CLPF"
FRAME_VERSION = 1
_HDR = struct.Struct("<4sHBBIIIIIQqqdQIQ")
HEADER_BYTES = _HDR.size
assert HEADER_BYTES == 80
_CRC_AT = 68

#: transport rank of the server (workers 0..n-1 are ranks 1..n)
SERVER_RANK = 0
#: Message.sender of the server's PARAMS messages (workers are 0..n-1)
SERVER_SENDER = 0xFFFF_FFFF


class FrameKind(enum.IntEnum):
    HELLO = 1
    PARAMS = 2
    PUSH = 3
    SHUTDOWN = 4
    BYE = 5


class FrameFlag(enum.IntFlag):
    NONE = 0
    FRESH = 1  # HELLO: this worker process holds no scheme state (new or restarted)
    ANSWER = 2  # PARAMS (async): a reply; every frame the worker sent before was processed
    REPAIR = 4  # PARAMS / PUSH (sequential gradient coding): fallback tasks of a round


_ALL_FLAGS = int(FrameFlag.FRESH | FrameFlag.ANSWER | FrameFlag.REPAIR)
_U32 = 0xFFFF_FFFF


@dataclass
class Frame:
    """One protocol message; ``body`` holds the bytes of a wire Message (or nothing)."""

    kind: FrameKind
    worker: int
    step: int = 0
    seq: int = -1
    aux: int = -1
    session: int = 0
    incarnation: int = 0
    epoch: int = 0
    loss: float = float("nan")
    flags: FrameFlag = FrameFlag.NONE
    body: bytes = b""

    def to_bytes(self) -> bytes:
        hdr = self._header(0)
        crc = zlib.crc32(hdr + self.body)
        return self._header(crc) + self.body

    def _header(self, crc: int) -> bytes:
        return _HDR.pack(FRAME_MAGIC, FRAME_VERSION, int(self.kind), int(self.flags), int(self.worker) & _U32,
                         int(self.session) & _U32, int(self.incarnation) & _U32, int(self.epoch) & _U32, 0,
                         int(self.step), int(self.seq), int(self.aux), float(self.loss), len(self.body), crc, 0)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_body: int = 1 << 40) -> "Frame":
        """Parse and check a frame's header and CRC (the body is checked by :meth:`message`)."""
        if not isinstance(data, (bytes, bytearray)):
            raise PayloadError(f"a frame is bytes, got {type(data).__name__}")
        if len(data) < HEADER_BYTES:
            raise PayloadError(f"truncated frame: {len(data)} bytes, header needs {HEADER_BYTES}")
        (magic, version, kind, flags, worker, session, incarnation, epoch, res0, step, seq, aux, loss,
         body, crc, res1) = _HDR.unpack_from(data)
        if magic != FRAME_MAGIC:
            raise PayloadError(f"bad frame magic {magic!r}")
        if version != FRAME_VERSION:
            raise PayloadError(f"unsupported frame version {version} (this commlib speaks {FRAME_VERSION})")
        try:
            kind_e = FrameKind(kind)
        except ValueError:
            raise PayloadError(f"unknown frame kind {kind}") from None
        if flags & ~_ALL_FLAGS:
            raise PayloadError(f"unknown frame flags {flags:#x}")
        if res0 or res1:
            raise PayloadError("reserved frame fields are not zero")
        if body > max_body or HEADER_BYTES + body != len(data):
            raise PayloadError(f"frame says {body} body bytes, got {len(data) - HEADER_BYTES}")
        if seq < -1 or aux < -1:
            raise PayloadError(f"bad frame sequence numbers seq={seq} aux={aux}")
        raw = bytes(data)
        got = zlib.crc32(raw[:_CRC_AT] + b"\0\0\0\0" + raw[_CRC_AT + 4:])
        if got != crc:
            raise PayloadError(f"frame checksum mismatch (got {got:#010x}, header {crc:#010x})")
        if not math.isfinite(loss):
            loss = float("nan")  # metadata only: a non-finite loss is recorded as missing
        return cls(kind_e, worker, step, seq, aux, session, incarnation, epoch, loss, FrameFlag(flags),
                   raw[HEADER_BYTES:])

    def message(self, numels: Optional[Sequence[int]], *, sender: Optional[int] = None,
                max_numel: Optional[int] = None) -> Message:
        """The validated wire Message in the body (checksums required, every payload checked).
        ``numels=None``: the layout is checked by the caller (sequential coding's assignments),
        and the payloads may stand for at most ``max_numel`` entries in all (default: the wire's
        ``DEFAULT_MAX_NUMEL``)."""
        if not self.body:
            raise PayloadError(f"{self.kind.name} frame carries no message")
        kw = {} if max_numel is None else {"max_numel": int(max_numel)}
        msg = Message.from_bytes(self.body, numels=None if numels is None else list(numels),
                                 require_checksum=True, finite="reject", **kw)
        if msg.step != self.step or (sender is not None and msg.sender != sender):
            raise PayloadError(f"message (sender {msg.sender}, step {msg.step}) disagrees with its frame "
                               f"(sender {sender}, step {self.step})")
        return msg
