"""Mutation fuzzing of every decode entry point: Payload.from_bytes, Message.from_bytes, the
parameter server's frames (commlib.ps.protocol: Frame.from_bytes + Frame.message) and the
unpack op (native and pure torch, compared bit for bit).

Inputs are valid messages of every kind and dtype, mutated (bit flips, interesting header
values, hostile values in the body, index swaps, truncation, splicing), mostly with their CRCs
recomputed so that the mutations reach the checks behind the checksum. Every input must either
decode to something that obeys the wire rules (finite in float32 after scale and cast, indices
strictly ascending and in range, size within the cap) or raise PayloadError; anything else
fails with the seed to reproduce it (COMMLIB_FUZZ_SEED=<seed>). At least FUZZ_INPUTS inputs
(default 100,000) within COMMLIB_FUZZ_SECONDS (default 60).
"""
import math
import os
import random
import struct
import time
import warnings
import zlib

import torch

from commlib.errors import PayloadError
from commlib.ops import native, torch_pack
from commlib.ps.protocol import Frame, FrameKind
from commlib.wire import DEFAULT_MAX_NUMEL, DTYPES, Kind, Message, Payload

TARGET = int(os.environ.get("FUZZ_INPUTS", "100000"))
BUDGET_S = float(os.environ.get("COMMLIB_FUZZ_SECONDS", "60"))
CAP = 1 << 12  # max_numel of size-less decodes here (small: accepted payloads are expanded)
UNPACK_N = 40  # numel of the unpack corpus
UNPACK_ROWS = 32

F64_HOSTILE = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-310, 1e-40, 1.1754943508222875e-38,
               3.4028234663852886e38, 3.4028235677973366e38, 3.4028236e38, 1e300, 1.1e215, -1.0, 2.0 ** 120,
               65504.0, 65520.0]
U64_HOSTILE = [0, 1, 7, 8, 39, 40, 41, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 26, (1 << 26) + 1, 1 << 40,
               (1 << 40) + 1, 1 << 63, (1 << 64) - 1]
# (offset, struct code) of the payload header fields
FIELDS = [(4, "<H"), (6, "<B"), (7, "<B"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q"), (32, "<Q"),
          (40, "<d"), (48, "<I"), (56, "<Q")]


def _values(rng: random.Random, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-3, 3)).to(dtype)


def seed_payload(rng: random.Random, numel: int = 0, kinds=(Kind.DENSE, Kind.SPARSE, Kind.RANDK, Kind.SKIP),
                 slot: int = 0) -> Payload:
    numel = numel or rng.choice([1, 2, 7, 16, 40, 100])
    kind = rng.choice(kinds)
    dtype = rng.choice(DTYPES)
    scale = rng.choice([1.0, 1.0, 0.5, 2.0 ** rng.randint(-20, 20), 0.75])
    if kind == Kind.SKIP:
        return Payload.skip(numel, slot=slot, dtype=torch.float32 if dtype == torch.int8 else dtype)
    if kind == Kind.DENSE:
        return Payload.dense(_values(rng, numel, dtype), scale=scale, slot=slot)
    k = rng.randint(0, numel)
    if kind == Kind.RANDK:
        return Payload.randk(_values(rng, k, dtype), numel, rng.randrange(1 << 62), scale=scale, slot=slot)
    idx = torch.tensor(sorted(rng.sample(range(numel), k)), dtype=torch.int32)
    return Payload.sparse(idx, _values(rng, k, dtype), numel, scale=scale, slot=slot)


def recrc(raw: bytearray) -> None:
    """Recompute a payload's CRC in place when its flag says it has one."""
    if len(raw) >= 64 and raw[8] & 2:
        raw[52:56] = b"\0\0\0\0"
        raw[52:56] = struct.pack("<I", zlib.crc32(bytes(raw)))


def mutate(rng: random.Random, raw: bytes, other: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(8)
        if op == 0 and b:  # bit flips
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # an interesting byte
            b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0x40])
        elif op in (2, 3) and len(b) >= 64:  # a header field set to a hostile value
            off, code = rng.choice(FIELDS)
            if code == "<d":
                val = rng.choice(F64_HOSTILE) * rng.choice([1, 1, -1])
            else:
                bits = struct.calcsize(code) * 8
                val = rng.choice(U64_HOSTILE + [rng.randrange(1 << bits)]) & ((1 << bits) - 1)
            struct.pack_into(code, b, off, val)
        elif op == 4 and len(b) > 64:  # a hostile value in the body
            dcode = b[7] if b[7] < len(DTYPES) else 0
            size = {0: 4, 1: 2, 2: 2, 3: 8, 4: 1}[dcode]
            at = 64 + rng.randrange(max(1, (len(b) - 64) // size)) * size
            code = {4: "<f", 2: "<e", 8: "<d", 1: "<b"}[size]
            if size == 1:
                val = rng.choice([127, -128, -127])
            else:
                val = rng.choice(F64_HOSTILE)
                try:
                    struct.pack(code, val)
                except OverflowError:
                    val = math.inf
            if at + size <= len(b):
                struct.pack_into(code, b, at, val)
        elif op == 5 and len(b) > 72:  # swap / duplicate two int32 words of the body (indices)
            n = (len(b) - 64) // 4
            i, j = 64 + 4 * rng.randrange(n), 64 + 4 * rng.randrange(n)
            if rng.random() < 0.5:
                b[i:i + 4], b[j:j + 4] = b[j:j + 4], b[i:i + 4]
            else:
                b[j:j + 4] = b[i:i + 4]
        elif op == 6:  # truncate or extend
            if b and rng.random() < 0.5:
                del b[rng.randrange(len(b)):]
            else:
                b += bytes(rng.choice([1, 4, 8, 64]))
        else:  # splice with another input
            cut = rng.randrange(len(b) + 1)
            b = b[:cut] + bytearray(other[cut:])
    if rng.random() < 0.75:
        recrc(b)
    return bytes(b)


def check_payload(p: Payload, numel=None, cap: int = CAP) -> None:
    """What an accepted payload promises (the wire rules)."""
    assert p.numel <= (cap if numel is None else numel)
    if p.kind == Kind.SPARSE and p.nnz:
        idx = p.indices.to(torch.int64)
        assert int(idx.min()) >= 0 and int(idx.max()) < p.numel
        assert bool((idx[1:] > idx[:-1]).all())
    assert math.isfinite(p.scale) and p.scale > 0
    if p.numel <= CAP:  # expand: cheap here
        dense = p.to_dense(torch.float32)
    else:  # what add_to computes for each carried value
        dense = p.values.to(torch.float32) * torch.tensor(p.scale, dtype=torch.float32)
    assert bool(torch.isfinite(dense).all()), "an accepted payload decodes to a non-finite value"


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.count = 0
        self.accepted = 0
        self.last = b""

    def run_one(self, fn, data: bytes) -> None:
        self.last = data
        self.count += 1
        try:
            fn(data)
            self.accepted += 1
        except PayloadError:
            pass

    # ---- entry points ------------------------------------------------------------------
    def payload(self) -> None:
        a, b = (seed_payload(self.rng).to_bytes(checksum=self.rng.random() < 0.9) for _ in range(2))
        data = mutate(self.rng, a, b) if self.rng.random() < 0.97 else bytes(self.rng.randrange(256)
                                                                            for _ in range(self.rng.randrange(80)))
        expect = self.rng.choice([None, None, Payload.from_bytes(a, finite="allow").numel])

        def decode(d):
            kw = {"max_numel": CAP} if expect is None else {"numel": expect}
            check_payload(Payload.from_bytes(d, require_checksum=self.rng.random() < 0.5, **kw), expect)

        self.run_one(decode, data)

    def _message_parts(self):
        n = self.rng.randint(0, 4)
        return [seed_payload(self.rng, slot=j) for j in range(n)]

    def _mutated_message(self):
        parts = self._message_parts()
        raw = [p.to_bytes() for p in parts]
        if raw and self.rng.random() < 0.8:
            j = self.rng.randrange(len(raw))
            raw[j] = mutate(self.rng, raw[j], raw[(j + 1) % len(raw)])
        used = 32 + sum(len(r) for r in raw)
        body = bytearray(struct.pack("<4sHHIIQQ", b"CLMS", 1, 0, len(raw), 7, 3, used) + b"".join(raw))
        if self.rng.random() < 0.3:  # the message header itself
            off, code = self.rng.choice([(4, "<H"), (6, "<H"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q")])
            bits = struct.calcsize(code) * 8
            struct.pack_into(code, body, off, self.rng.choice(U64_HOSTILE) & ((1 << bits) - 1))
        return parts, bytes(body)

    def message(self) -> None:
        parts, body = self._mutated_message()
        numels = [p.numel for p in parts] if self.rng.random() < 0.5 else None

        def decode(d):
            m = Message.from_bytes(d, numels=numels, max_numel=CAP)
            total = 0
            for j, p in enumerate(m.payloads):
                check_payload(p, None if numels is None else numels[j])
                total += p.numel
            assert numels is not None or total <= CAP

        self.run_one(decode, body)

    def frame(self) -> None:
        parts, body = self._mutated_message()
        numels = [p.numel for p in parts]
        frame = Frame(FrameKind.PUSH, 7, step=3, seq=1, session=5, body=body).to_bytes()
        if self.rng.random() < 0.2:
            frame = mutate(self.rng, frame, frame)

        expect = numels if self.rng.random() < 0.7 else None

        def decode(d):
            msg = Frame.from_bytes(d).message(expect, sender=7)
            for j, p in enumerate(msg.payloads):  # frames decode with the default size cap
                check_payload(p, None if expect is None else expect[j], cap=DEFAULT_MAX_NUMEL)
            assert expect is not None or sum(p.numel for p in msg.payloads) <= DEFAULT_MAX_NUMEL

        self.run_one(decode, frame)

    def unpack(self) -> None:
        rows = []
        for _ in range(UNPACK_ROWS):
            p = seed_payload(self.rng, UNPACK_N, kinds=(Kind.DENSE, Kind.SPARSE, Kind.SKIP))
            a = p.to_bytes(checksum=self.rng.random() < 0.7)
            rows.append(mutate(self.rng, a, a) if self.rng.random() < 0.9 else a)
        cap = (max(len(r) for r in rows) + 64 + 7) & ~7
        bufs = torch.zeros(len(rows), cap, dtype=torch.uint8)
        for r, raw in enumerate(rows):
            if raw:
                bufs[r, :len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        alpha = self.rng.choice([1.0, 1.0, 0.5, -2.0, 1e-3, 3.0, 1e30])
        max_abs = self.rng.choice([None, None, 1e3, 1e30])
        offs = [0 if self.rng.random() < 0.95 else -1 for _ in rows]
        self.last = b"".join(rows)
        self.count += len(rows)
        out_t = torch.zeros(UNPACK_N)
        res_t = torch_pack.unpack_scatter_add_(out_t, bufs, offs, alpha=alpha, on_error="skip", max_abs=max_abs)
        self.accepted += len(res_t.accepted)
        bad = ~torch.isfinite(out_t)
        if bool(bad.any()):  # every addend is finite (the value rule); only a running sum may overflow
            peak = _running_peak(bufs, offs, res_t.accepted, alpha, max_abs)
            assert bool((peak[bad] >= torch.finfo(torch.float32).max * (1 - 2.0 ** -20)).all()), \
                "a non-finite sum where no running sum in float64 reaches FLT_MAX"
        if native.LIB is not None:
            out_n = torch.zeros(UNPACK_N)
            res_n = native.unpack_scatter_add_(out_n, bufs, offs, alpha=alpha, on_error="skip", max_abs=max_abs)
            assert sorted(res_n.errors) == sorted(res_t.errors), (res_n.errors, res_t.errors)
            assert (res_n.ends, res_n.nnz, res_n.flags) == (res_t.ends, res_t.nnz, res_t.flags)
            assert torch.equal(out_n.view(torch.int32), out_t.view(torch.int32)), "native and torch sums differ"


def _running_peak(bufs, offs, accepted, alpha, max_abs) -> torch.Tensor:
    """max over the ranks r (added in rank order) of |sum of ranks <= r| per entry, in float64:
    the slow reference for where a float32 sum of valid payloads may legitimately overflow."""
    acc = torch.zeros(UNPACK_N, dtype=torch.float64)
    peak = torch.zeros(UNPACK_N, dtype=torch.float64)
    for r in sorted(accepted):
        one = [offs[q] if q == r else -1 for q in range(len(offs))]
        torch_pack.unpack_scatter_add_(acc, bufs, one, alpha=alpha, on_error="raise", max_abs=max_abs)
        peak = torch.maximum(peak, acc.abs())
    return peak


def test_fuzz_every_decode_entry_point():
    seed = int(os.environ.get("COMMLIB_FUZZ_SEED", str(time.time_ns() % (1 << 31))))
    fz = Fuzzer(seed)
    steps = [fz.payload] * 4 + [fz.message] * 2 + [fz.frame] * 2 + [fz.unpack] * 2
    t0 = time.monotonic()
    try:
        while fz.count < TARGET and time.monotonic() - t0 < BUDGET_S:
            fz.rng.choice(steps)()
    except BaseException as exc:
        raise AssertionError(f"fuzz failure (reproduce with COMMLIB_FUZZ_SEED={seed}) after {fz.count} inputs: "
                             f"{type(exc).__name__}: {exc}\nlast input: {fz.last.hex()[:4000]}") from exc
    elapsed = time.monotonic() - t0
    print(f"fuzz seed {seed}: {fz.count} inputs, {fz.accepted} accepted, {elapsed:.1f} s")
    if fz.count < TARGET:
        warnings.warn(f"fuzz budget of {BUDGET_S:.0f} s ran out after {fz.count} of {TARGET} inputs (seed {seed})")
    assert fz.accepted > 0.01 * fz.count  # the mutations do not only produce garbage
