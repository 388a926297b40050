"""The DDP hook's packed path (commlib.ddp.packed, SchemeWorker.encode_group_into) against the
payload-by-payload reference (encode_group + Message.decode_from + SchemeServer.decode_group),
on the native and on the pure-torch ops."""
import pytest
import torch

from commlib import Scheme
from commlib.ddp import packed
from commlib.ops import native
from commlib.wire import MESSAGE_HEADER_BYTES, Message, Payload

BACKENDS = ["torch"] + (["native"] if native.LIB is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(native, "LIB", None)  # every op dispatches to its torch reference
    return request.param


SHAPES = [(100, 100), (100,), (50, 40), (7,), (3, 3)]


def _grads(step, gen):
    gs = [torch.randn(s, generator=gen).reshape(-1) for s in SHAPES]
    if step == 0:  # DGC's adaptation: the strided sample sees two huge entries, 60 others lie between
        g = torch.randn(10000, generator=gen) * 0.1
        g[::50] = 0.0
        g[0], g[50] = 100.0, -100.0
        g[torch.arange(60) * 50 + 7] = 70.0 + 0.01 * torch.arange(60.0)
        gs[0] = g
    return gs


SCHEMES = [
    dict(compressor="dgc", ratio=0.01, feedback="dgc"),
    dict(compressor="dgc", ratio=0.01, feedback="dgc", feedback_options={"nesterov": True}),
    dict(compressor="dgc", ratio=0.01, feedback="dgc", warmup="dgc", steps_per_epoch=2),
    dict(compressor="dgc", ratio=0.02, feedback="ef"),
    dict(compressor="dgc", ratio=0.02, feedback="ef21"),
    dict(compressor="topk", ratio=0.05, feedback="econtrol", feedback_options={"eta": 0.2}),
    dict(compressor="randk", ratio=0.1, feedback="ef"),
    dict(compressor="bf16", feedback="ef"),
    dict(compressor="dgc", ratio=0.02, feedback="ef21-w", feedback_options={"smoothness": [1.0, 3.0]}),
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c['compressor']}-{c['feedback']}-{len(c)}")
def test_encode_group_into_equals_encode_group(backend, cfg):
    ref, fast = Scheme(**cfg).worker(1, 2), Scheme(**cfg).worker(1, 2)
    keys = [f"p{i}" for i in range(len(SHAPES))]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        grads = _grads(step, gen)
        cap = Message.capacity(fast.max_bytes(k, s, torch.float32) for k, s in zip(keys, SHAPES))
        buf = torch.full(((cap + 7) & ~7,), 0xAB, dtype=torch.uint8)
        want = ref.encode_group(keys, [g.clone() for g in grads], shapes=SHAPES)
        got, end = fast.encode_group_into(buf, MESSAGE_HEADER_BYTES, keys, [g.clone() for g in grads], shapes=SHAPES)
        msg = Message(got, sender=1, step=step)
        assert end == msg.nbytes and packed.seal(msg, buf, True) == end
        dec = Message.decode_from(buf, numels=[g.numel() for g in grads], require_checksum=True)
        for a, b in zip(want, dec.payloads):
            assert (a.kind, a.nnz, a.scale, a.flags) == (b.kind, b.nnz, b.scale, b.flags)
            assert torch.equal(a.to_dense(), b.to_dense())
        for k in keys:
            for name, t in ref.state.get(k, {}).items():
                assert torch.equal(t, fast.state[k][name]), (step, k, name)
        ref.end_step()
        fast.end_step()


def _rows(n, numels, gen, corrupt=None):
    cap = MESSAGE_HEADER_BYTES + sum(64 + 8 * m + 8 for m in numels)
    cap = (cap + 7) & ~7
    rows = torch.zeros(n, cap, dtype=torch.uint8)
    for r in range(n):
        pl = []
        for j, m in enumerate(numels):
            if (r + j) % 5 == 4:
                pl.append(Payload.skip(m, slot=j))
            elif j % 2:
                pl.append(Payload.dense(torch.randn(m, generator=gen), slot=j))
            else:
                idx = torch.randperm(m, generator=gen)[: m // 3].sort().values
                pl.append(Payload.sparse(idx, torch.randn(idx.numel(), generator=gen), m, scale=0.5, slot=j))
        if corrupt and r in corrupt:
            pl = corrupt[r](pl)
        Message(pl, sender=r, step=3).encode_into(rows[r], checksum=True)
    return rows


def _reference(rows, numels, scheme):
    received, rejected = [], []
    for r in range(rows.size(0)):
        try:
            m = Message.decode_from(rows[r], numels=numels, require_checksum=True)
            if m.sender != r or m.step != 3:
                raise ValueError
            received.append(m.payloads)
        except Exception:
            rejected.append(r)
            received.append([None] * len(numels))
    out = scheme.server(rows.size(0)).decode_group([f"k{j}" for j in range(len(numels))], numels, received)
    return out, rejected


def _nan_at_slot1(pl):
    pl[1] = Payload.dense(torch.full((pl[1].numel,), float("nan")), slot=1)
    return pl


def _huge(pl):
    pl[1] = Payload.dense(torch.full((pl[1].numel,), 3.0e38), slot=1)
    return pl


@pytest.mark.parametrize("corrupt", [None, {2: _nan_at_slot1}, {0: _huge, 1: _huge, 3: _nan_at_slot1}])
@pytest.mark.parametrize("feedback", ["none", "ef21"])
def test_gathered_mean_equals_decode_group(backend, corrupt, feedback):
    gen = torch.Generator().manual_seed(1)
    numels = [300, 40, 125, 9]
    rows = _rows(5, numels, gen, corrupt)
    rows[4, 12] ^= 1  # rank 4 claims another sender
    scheme = Scheme("identity", feedback=feedback)
    want, want_rej = _reference(rows, numels, scheme)
    bucket = torch.full((sum(numels),), 7.0)
    rejected = []
    packed.gathered_mean(rows, list(torch.split(bucket, numels)), step=3, increments=scheme.feedback.increments,
                         checksum=True, max_abs=None, reject=rejected.append)
    assert sorted(rejected) == want_rej
    assert torch.isfinite(bucket).all()
    for a, b in zip(torch.split(bucket, numels), want):
        assert torch.equal(a, b)


def test_gathered_mean_rejects_a_flipped_bit_by_checksum(backend):
    gen = torch.Generator().manual_seed(2)
    numels = [64, 10]
    rows = _rows(3, numels, gen)
    rows[1, MESSAGE_HEADER_BYTES + 64 + 3] ^= 0x40  # one bit of rank 1's first payload, after the CRC
    bucket = torch.zeros(sum(numels))
    rejected = []
    packed.gathered_mean(rows, list(torch.split(bucket, numels)), step=3, increments=False, checksum=True,
                         max_abs=None, reject=rejected.append)
    assert rejected == [1]
    want, _ = _reference(rows, numels, Scheme("identity"))
    assert all(torch.equal(a, b) for a, b in zip(torch.split(bucket, numels), want))


def _sparse_rows(n, numels, gen, step, dense_slot=None):
    """n ranks' messages: sparse payloads (a fresh random support each call), dense at dense_slot."""
    rows = torch.zeros(n, MESSAGE_HEADER_BYTES + sum(64 + 8 * m + 8 for m in numels), dtype=torch.uint8)
    for r in range(n):
        pl = []
        for j, m in enumerate(numels):
            if j == dense_slot:
                pl.append(Payload.dense(torch.randn(m, generator=gen), slot=j))
            else:
                idx = torch.randperm(m, generator=gen)[: m // 10].sort().values
                pl.append(Payload.sparse(idx, torch.randn(idx.numel(), generator=gen), m, slot=j))
        Message(pl, sender=r, step=step).encode_into(rows[r])
    return rows


def test_output_buffer_reused_across_steps_equals_a_fresh_bucket(backend):
    """The reused output resets only what it wrote last; every step must equal a zeroed bucket
    (sparse supports change, a dense step, a rejected rank, a write from outside)."""
    gen = torch.Generator().manual_seed(3)
    numels = [500, 30, 200]
    out = packed.OutputBuffer()
    for step in range(6):
        rows = _sparse_rows(3, numels, gen, step, dense_slot=2 if step == 2 else None)
        if step == 3:
            rows[1, MESSAGE_HEADER_BYTES + 64 + 4 * 3] ^= 0xFF  # an index of rank 1's first payload
        fresh = torch.full((sum(numels),), 5.0)
        rej_fresh, rej = [], []
        packed.gathered_mean(rows, list(torch.split(fresh, numels)), step=step, increments=False, checksum=False,
                             max_abs=None, reject=rej_fresh.append)
        buf = out.take(numels, torch.device("cpu"))
        touched = packed.gathered_mean(rows, out.sections, step=step, increments=False, checksum=False,
                                       max_abs=None, reject=rej.append, clear=out.clear)
        out.done(touched)
        assert rej == rej_fresh == ([1] if step == 3 else [])
        assert torch.equal(buf, fresh), step
        assert touched[2] is None if step == 2 else touched[2] is not None
        for t, sec in zip(touched, out.sections):  # nonzero only where it says
            if t is not None:
                rest = torch.ones(sec.numel(), dtype=torch.bool)
                rest[t] = False
                assert not sec[rest].any()
        if step == 4:
            buf[7] = 1.0  # someone else wrote into it: the next step must zero it whole
