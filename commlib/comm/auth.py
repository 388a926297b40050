"""Message authentication for network transports: a shared job secret and HMAC-SHA256.

Every message a network transport (torch.distributed, Ray, MPI) moves is sealed by the sender
and opened by the receiver *before* anything else looks at it::

    0  4s  magic b"CLAU"        16 u64 stream  sender endpoint id: creation time (ms) << 20 | random
    4  u8  version (1)          24 u64 seq     per (stream, destination), increasing
    5  3x  reserved (0)         32 ...  body   the message (a PS frame, or any bytes)
    8  u32 src                  -32     tag    HMAC-SHA256(key, bytes 0 .. end of body)
    12 u32 dst

The key is derived from the job secret (HMAC-SHA256 with a fixed label), so the secret itself
never keys anything directly. The tag binds the sender rank, the destination rank (and so the
direction), the sender's stream and a sequence number: a captured message cannot be passed
off as another rank's, delivered to another rank, or replayed. The receiver (:class:`Opener`)
checks, in this order: size and magic, the tag (``hmac.compare_digest``: constant time), that
``src`` is the rank the transport says sent it and ``dst`` is this rank, and that ``seq`` is
above the last one accepted from that stream; a stream older than the one it already follows
from that rank (a replay of an earlier process of that peer) is refused. A restarted peer
opens a newer stream, which replaces the old one. Refused messages are counted
(``TransportStats.auth_failures`` / ``replays``) and dropped; they never reach a decoder.

The secret comes from ``COMMLIB_SECRET`` (any string of at least 16 characters) or from the
file named by ``COMMLIB_SECRET_FILE`` (first line). The launchers in ``launch/``, ``commlib
simulate`` and the local runners generate one (:func:`ensure_secret`) when none is given.
``COMMLIB_AUTH=none`` turns authentication off (CRC-only frames): for trusted single-machine
tests only. Stream order uses the sender's clock: a restarted peer must start on a clock that
is not behind the one of its previous process (true on one machine; on a cluster keep clocks
synchronised, e.g. NTP).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import time
from typing import Dict, MutableMapping, Optional, Tuple

from commlib.errors import ConfigError, PayloadError

SECRET_ENV = "COMMLIB_SECRET"
SECRET_FILE_ENV = "COMMLIB_SECRET_FILE"
AUTH_MODE_ENV = "COMMLIB_AUTH"
MIN_SECRET_CHARS = 16

AUTH_MAGIC = b"CLAU"
AUTH_VERSION = 1
_HDR = struct.Struct("<4sB3xIIQQ")
AUTH_HEADER_BYTES = _HDR.size
TAG_BYTES = hashlib.sha256().digest_size
#: bytes a sealed message adds to its body (transports allow this much above max_message_bytes)
AUTH_OVERHEAD = AUTH_HEADER_BYTES + TAG_BYTES
_KEY_LABEL = b"commlib transport HMAC-SHA256 key v1"
assert AUTH_HEADER_BYTES == 32


class AuthError(PayloadError):
    """A received message failed authentication (bad tag, wrong ranks, or a replay)."""


class ReplayError(AuthError):
    """An authentic message that was already delivered, or comes from a superseded stream."""


def new_secret() -> str:
    """A fresh job secret (256 random bits, hex)."""
    return secrets.token_hex(32)


def load_secret(env: Optional[MutableMapping[str, str]] = None) -> Optional[bytes]:
    """The job secret from ``COMMLIB_SECRET`` or ``COMMLIB_SECRET_FILE`` (None if neither is set)."""
    env = os.environ if env is None else env
    text = env.get(SECRET_ENV)
    if not text and env.get(SECRET_FILE_ENV):
        path = env[SECRET_FILE_ENV]
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.readline().strip()
        except OSError as exc:
            raise ConfigError(f"{SECRET_FILE_ENV}={path}: cannot read the job secret ({exc})") from None
    if not text:
        return None
    if len(text) < MIN_SECRET_CHARS:
        raise ConfigError(f"the job secret must have at least {MIN_SECRET_CHARS} characters "
                          f"(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')")
    return text.encode("utf-8")


def ensure_secret(env: Optional[MutableMapping[str, str]] = None) -> str:
    """Make sure ``env`` (default ``os.environ``) names a job secret; generate one when it does
    not (child processes inherit it). Returns the secret."""
    env = os.environ if env is None else env
    got = load_secret(env)
    if got is not None:
        return got.decode("utf-8")
    env[SECRET_ENV] = new_secret()
    return env[SECRET_ENV]


def auth_disabled(env: Optional[MutableMapping[str, str]] = None) -> bool:
    """True when ``COMMLIB_AUTH=none`` explicitly turns authentication off (trusted local tests)."""
    env = os.environ if env is None else env
    mode = env.get(AUTH_MODE_ENV, "hmac").strip().lower()
    if mode not in ("hmac", "none"):
        raise ConfigError(f"{AUTH_MODE_ENV} must be 'hmac' or 'none', got {mode!r}")
    return mode == "none"


def _new_stream() -> int:
    return ((time.time_ns() // 1_000_000) << 20) | secrets.randbits(20)


class FrameAuth:
    """HMAC-SHA256 sealing for one endpoint (rank ``rank``) of a job with ``secret``."""

    def __init__(self, secret: bytes) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"the job secret must be at least {MIN_SECRET_CHARS} bytes")
        self._key = hmac.new(bytes(secret), _KEY_LABEL, hashlib.sha256).digest()

    @classmethod
    def from_env(cls, env: Optional[MutableMapping[str, str]] = None) -> Optional["FrameAuth"]:
        """From the environment: None when ``COMMLIB_AUTH=none``; a ConfigError when no secret is set."""
        if auth_disabled(env):
            return None
        secret = load_secret(env)
        if secret is None:
            raise ConfigError(f"this transport authenticates every message: set {SECRET_ENV} (or "
                              f"{SECRET_FILE_ENV}) to the same secret on every process of the job "
                              f"(the launchers in launch/ generate one); {AUTH_MODE_ENV}=none turns "
                              "authentication off for trusted single-machine tests")
        return cls(secret)

    def tag(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def sealer(self, src: int) -> "Sealer":
        return Sealer(self, src)

    def opener(self, dst: int) -> "Opener":
        return Opener(self, dst)


class Sealer:
    """The sending half of one endpoint: a stream id and one sequence counter per destination."""

    def __init__(self, auth: FrameAuth, src: int) -> None:
        self.auth = auth
        self.src = int(src)
        self.stream = _new_stream()
        self._seq: Dict[int, int] = {}

    def seal(self, dst: int, body: bytes) -> bytes:
        seq = self._seq.get(int(dst), 0)
        self._seq[int(dst)] = seq + 1
        msg = _HDR.pack(AUTH_MAGIC, AUTH_VERSION, self.src, int(dst), self.stream, seq) + bytes(body)
        return msg + self.auth.tag(msg)


class Opener:
    """The receiving half of one endpoint: checks tags, ranks and freshness per sender."""

    def __init__(self, auth: FrameAuth, dst: int) -> None:
        self.auth = auth
        self.dst = int(dst)
        self._last: Dict[int, Tuple[int, int]] = {}  # src -> (stream, last seq accepted)

    def open(self, src: int, data: bytes) -> bytes:
        """The body of an authentic, fresh message from ``src``; AuthError / ReplayError otherwise."""
        if len(data) < AUTH_OVERHEAD:
            raise AuthError(f"message of {len(data)} bytes from rank {src} is not sealed")
        msg, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(self.auth.tag(msg), tag):
            raise AuthError(f"message from rank {src}: authentication tag mismatch")
        magic, version, m_src, m_dst, stream, seq = _HDR.unpack_from(msg)
        if magic != AUTH_MAGIC or version != AUTH_VERSION:
            raise AuthError(f"message from rank {src}: bad envelope {magic!r} v{version}")
        if m_src != int(src) or m_dst != self.dst:
            raise AuthError(f"message from rank {src} to {self.dst} was sealed for {m_src} -> {m_dst}")
        last = self._last.get(m_src)
        if last is not None:
            if stream < last[0] or (stream == last[0] and seq <= last[1]):
                raise ReplayError(f"message from rank {src} (stream {stream:#x}, seq {seq}) is a replay")
        self._last[m_src] = (stream, seq)
        return bytes(msg[AUTH_HEADER_BYTES:])
