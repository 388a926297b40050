"""The DDP hook's packed path (commlib.ddp.packed, SchemeWorker.encode_group_into) against the
payload-by-payload reference (encode_group + Message.decode_from + SchemeServer.decode_group),
on the native and on the pure-torch ops."""
import pytest
import torch

from commlib import Scheme
from commlib.ddp import packed
from commlib.ops import native, torch_ops
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
    if step == 0:  # DGC's threshold sample (ops.sample_plan) steers both of DGC's extra branches:
        g = torch.randn(10000, generator=gen) * 0.1
        at1 = torch_ops.sample_index(torch_ops.sample_plan(10000, 0.01))  # ratio 0.01's sample
        at2 = torch_ops.sample_index(torch_ops.sample_plan(10000, 0.02))
        g[at1], g[at2] = 0.0, 0.0
        huge = [int(i) for i in at1 if int(i) not in set(at2.tolist())][:2]
        g[huge[0]], g[huge[1]] = 100.0, -100.0  # ratio 0.01: threshold 100, too few pass: adaptation
        free = [i for i in range(10000) if g[i] != 0 and i not in set(at1.tolist())]
        g[torch.tensor(free[::100][:60])] = 70.0 + 0.01 * torch.arange(60.0)
        gs[0] = g  # ratio 0.02: its sample is all zeros, threshold 0, too many pass: exact top-k
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


def _hostile_rows(n, numels, gen, step, event):
    """n ranks' messages at ``step``: sparse payloads with a fresh support each step (indices in
    range, ascending), changed by ``event``: 'late_reject' (rank 1's last payload has an index
    out of range: rejected after its earlier payloads were added), 'huge' (values whose sum
    overflows float32: the float64 redo), 'dense' (a dense payload), 'skip' (rank 0 skips all)."""
    cap = MESSAGE_HEADER_BYTES + sum(64 + 8 * m + 8 for m in numels)
    rows = torch.zeros(n, (cap + 7) & ~7, dtype=torch.uint8)
    for r in range(n):
        pl = []
        for j, m in enumerate(numels):
            k = int(torch.randint(1, m + 1, (1,), generator=gen))
            idx = torch.randperm(m, generator=gen)[:k].sort().values
            vals = torch.randn(k, generator=gen)
            if event == "huge" and j == 0:
                vals = torch.full((k,), 3.0e38)
            if event == "dense" and j == len(numels) - 1:
                pl.append(Payload.dense(torch.randn(m, generator=gen), slot=j))
            elif event == "skip" and r == 0:
                pl.append(Payload.skip(m, slot=j))
            else:
                pl.append(Payload.sparse(idx, vals, m, scale=1.0 if event == "huge" else 0.25, slot=j))
        Message(pl, sender=r, step=step).encode_into(rows[r], checksum=True)
        if event == "late_reject" and r == 1:  # an index of the last payload points past the tensor
            pos = MESSAGE_HEADER_BYTES
            for p in pl[:-1]:
                pos += p.nbytes
            rows[r, pos + 64:pos + 68] = torch.tensor([numels[-1] + 5], dtype=torch.int32).view(torch.uint8)
    return rows


def test_output_buffer_in_hook_order_equals_decode_group_over_hostile_steps(backend):
    """The hook's order (take, clear every section while the all-gather runs, gathered_mean with
    ``already_clear``, done) over steps whose supports change and where a rank is rejected after
    some of its entries were added, a sum overflows, a payload is dense, a rank skips: every
    step equals SchemeServer.decode_group bit for bit, and nothing of an earlier step remains."""
    gen = torch.Generator().manual_seed(11)
    numels = [257, 31, 64]
    events = [None, "late_reject", None, "huge", None, "dense", None, "skip", "late_reject", None]
    out = packed.OutputBuffer()
    scheme = Scheme("identity")
    for step, event in enumerate(events):
        rows = _hostile_rows(3, numels, gen, step, event)
        received, want_rej = [], []
        for r in range(3):
            try:
                received.append(Message.decode_from(rows[r], numels=numels, require_checksum=True).payloads)
            except Exception:
                want_rej.append(r)
                received.append([None] * len(numels))
        want = scheme.server(3).decode_group([f"k{j}" for j in range(len(numels))], numels, received)
        buf = out.take(numels, torch.device("cpu"))
        for j in range(len(numels)):
            out.clear(j)
        rej = []
        touched = packed.gathered_mean(rows, out.sections, step=step, increments=False, checksum=True,
                                       max_abs=None, reject=rej.append, clear=packed.already_clear)
        out.done(touched)
        assert (touched[0] is None) == (event == "huge") and (touched[-1] is None) == (event == "dense")
        assert rej == want_rej == ([1] if event == "late_reject" else []), step
        assert torch.equal(buf, torch.cat(want)), (step, event)


def test_output_buffer_zeroed_whole_after_a_step_that_did_not_finish():
    """A step that wrote into the buffer and never reached done() (the callback raised) leaves
    values nowhere recorded: the next take must zero it whole. Here the new buffer of a changed
    layout (DDP's bucket rebuild) reaches the same version count as the old one had, which must
    not pass for 'unchanged since done()'."""
    out = packed.OutputBuffer()
    cpu = torch.device("cpu")
    out.take([4, 4], cpu)
    out.sections[0][1] = 2.0  # step 1 writes entry 1 ...
    out.done([torch.tensor([1]), torch.zeros(0, dtype=torch.int64)])  # ... and finishes
    buf = out.take([6, 6], cpu)  # another layout: a fresh buffer
    for j in range(2):
        out.clear(j)
    out.sections[1][3] = 7.0  # step 2 writes, then its callback raises: no done()
    buf = out.take([6, 6], cpu)
    for j in range(2):
        out.clear(j)
    assert not buf.any()
