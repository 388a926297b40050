"""Payload / Message: round trips and rejection of every kind of bad input."""
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commlib.errors import NonFiniteError, PayloadError
from commlib.wire import DTYPES, Flag, Kind, Message, Payload, randk_indices

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def random_payload(kind, numel, nnz, dtype, seed=0, slot=0):
    g = torch.Generator().manual_seed(seed)
    if kind == Kind.DENSE:
        return Payload.dense(torch.randn(numel, generator=g).to(dtype), slot=slot, scale=2.0)
    if kind == Kind.SPARSE:
        idx = torch.randperm(numel, generator=g)[:nnz].sort().values
        return Payload.sparse(idx, torch.randn(nnz, generator=g).to(dtype), numel, slot=slot)
    if kind == Kind.RANDK:
        return Payload.randk(torch.randn(nnz, generator=g).to(dtype), numel, seed=seed + 7, slot=slot)
    return Payload.skip(numel, slot=slot)


def same(a: Payload, b: Payload):
    assert a.kind == b.kind and a.numel == b.numel and a.slot == b.slot and a.seed == b.seed
    assert a.scale == b.scale and a.flags == b.flags
    assert torch.equal(a.values, b.values)
    assert (a.indices is None) == (b.indices is None)
    if a.indices is not None:
        assert torch.equal(a.indices, b.indices)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), numel=st.integers(1, 300), frac=st.floats(0, 1),
       dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 1000), slot=st.integers(0, 50))
def test_payload_roundtrip(kind, numel, frac, dtype, seed, slot):
    nnz = int(frac * numel)
    p = random_payload(kind, numel, nnz, dtype, seed, slot)
    q = Payload.from_bytes(p.to_bytes())
    same(p, q)
    assert len(p.to_bytes()) == p.nbytes
    assert torch.equal(p.to_dense(torch.float64), q.to_dense(torch.float64))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 6), seed=st.integers(0, 100))
def test_message_roundtrip_tensor_and_bytes(n, seed):
    kinds = list(Kind)
    ps = [random_payload(kinds[(seed + i) % 4], 20 + i, 5, torch.float32, seed + i, slot=i) for i in range(n)]
    msg = Message(ps, sender=3, step=99)
    m2 = Message.from_bytes(msg.to_bytes())
    assert (m2.sender, m2.step, len(m2.payloads)) == (3, 99, n)
    for a, b in zip(ps, m2.payloads):
        same(a, b)
    buf = torch.zeros(msg.nbytes + 40, dtype=torch.uint8)  # padded, as in a fixed-capacity collective
    msg.encode_into(buf)
    m3 = Message.decode_from(buf, numels=[p.numel for p in ps])
    for a, b in zip(ps, m3.payloads):
        same(a, b)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 10_000), seed=st.integers(0, 50))
def test_truncated_payload_rejected(cut, seed):
    data = random_payload(Kind.SPARSE, 100, 17, torch.float32, seed).to_bytes()
    cut = cut % len(data)
    with pytest.raises(PayloadError):
        Payload.from_bytes(data[:cut])


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7), seed=st.integers(0, 50))
def test_any_bit_flip_is_rejected_with_checksum(pos, bit, seed):
    data = bytearray(random_payload(Kind.SPARSE, 100, 17, torch.float32, seed).to_bytes())
    pos %= len(data)
    data[pos] ^= 1 << bit
    # a flip anywhere is caught: header fields by their checks, the body by the CRC,
    # and the CRC/flag bytes themselves by the mismatch they create
    with pytest.raises(PayloadError):
        Payload.from_bytes(bytes(data))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(min_size=0, max_size=400))
def test_random_bytes_never_crash(junk):
    for parse in (Payload.from_bytes, Message.from_bytes):
        try:
            parse(junk)
        except PayloadError:
            pass


def _hdr_patch(data: bytes, fmt: str, offset: int, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_specific_corruptions_have_clear_errors():
    p = random_payload(Kind.SPARSE, 100, 10, torch.float32)
    good = p.to_bytes(checksum=False)
    cases = {
        "magic": _hdr_patch(good, "<4s", 0, b"XXXX"),
        "version": _hdr_patch(good, "<H", 4, 9),
        "kind": _hdr_patch(good, "<B", 6, 17),
        "dtype": _hdr_patch(good, "<B", 7, 99),
        "numel": _hdr_patch(good, "<Q", 16, 1 << 50),
        "body": _hdr_patch(good, "<I", 48, 8),
        "reserved": _hdr_patch(good, "<Q", 56, 1),
    }
    for what, data in cases.items():
        with pytest.raises(PayloadError):
            Payload.from_bytes(data)
    # index out of range: a 'valid-looking' payload pointing past numel
    bad = Payload.sparse(torch.tensor([3, 100]), torch.tensor([1.0, 2.0]), 100)
    with pytest.raises(PayloadError, match="out of range"):
        Payload.from_bytes(bad.to_bytes())
    with pytest.raises(PayloadError, match="out of range"):
        Payload.sparse(torch.tensor([-1]), torch.tensor([1.0]), 10).validate()
    # trailing bytes
    with pytest.raises(PayloadError):
        Payload.from_bytes(good + b"\0" * 8)
    # receiver expectations
    with pytest.raises(PayloadError, match="expected"):
        Payload.from_bytes(good, numel=99)


def test_nonfinite_policy():
    p = Payload.dense(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteError):
        Payload.from_bytes(p.to_bytes())
    q = Payload.from_bytes(p.to_bytes(), finite="allow")
    assert torch.isnan(q.values[1])
    with pytest.raises(NonFiniteError):
        Payload.dense(torch.ones(2), scale=float("inf")).validate()


def test_randk_indices_are_a_function_of_the_seed():
    a = randk_indices(1000, 10, 42)
    assert torch.equal(a, randk_indices(1000, 10, 42))
    assert not torch.equal(a, randk_indices(1000, 10, 43))
    assert a.unique().numel() == 10 and int(a.max()) < 1000


def test_int8_and_scale_decode():
    p = Payload.dense(torch.tensor([1, -2, 3], dtype=torch.int8), scale=0.5)
    q = Payload.from_bytes(p.to_bytes())
    assert torch.equal(q.to_dense(), torch.tensor([0.5, -1.0, 1.5]))
    assert p.values.dtype in DTYPES


def test_reset_flag_survives_and_checksum_flag_is_not_leaked():
    p = Payload.dense(torch.ones(3), flags=Flag.RESET)
    q = Payload.from_bytes(p.to_bytes())
    assert q.flags == Flag.RESET


def test_clearing_the_checksum_flag_is_detected():
    data = bytearray(random_payload(Kind.SPARSE, 100, 17, torch.float32).to_bytes())
    data[8] &= ~2  # clear Flag.CHECKSUM
    with pytest.raises(PayloadError, match="checksum"):
        Payload.from_bytes(bytes(data))
    plain = random_payload(Kind.SPARSE, 100, 17, torch.float32).to_bytes(checksum=False)
    Payload.from_bytes(plain)
    with pytest.raises(PayloadError, match="requires"):
        Payload.from_bytes(plain, require_checksum=True)


def test_layers_have_no_import_cycle():
    """wire_format and value_rule are leaves (commlib.errors only); commlib.ops builds on them,
    never on commlib.wire; commlib.wire builds on all three."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "commlib"

    def imports(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return {m for m in found if m.startswith("commlib")}

    for leaf in ("wire_format.py", "value_rule.py"):
        assert imports(root / leaf) <= {"commlib.errors", "commlib.errors.PayloadError", "commlib.errors.NonFiniteError",
                                        "commlib.value_rule", "commlib.value_rule.check_values"}, leaf
    for mod in (root / "ops").glob("*.py"):
        assert not any(m == "commlib.wire" or m.startswith("commlib.wire.") for m in imports(mod)), mod.name
    assert "commlib.wire_format" in imports(root / "wire.py")
