"""The commlib DDP communication hook.

Per bucket, on every rank, in the same order (so collectives never mismatch, unlike hooks
that issue collectives from future callbacks):

1. worker half: feedback(compressor) turns each parameter's gradient into a Payload;
2. one collective:
   - dense payloads + mean aggregator -> one all-reduce of the (cast) values, plus one count
     per tensor so a rank that skipped a non-finite tensor is left out of its average;
     fp16 first agrees on a per-tensor power-of-two scale (a tiny MAX all-reduce) so the sum
     cannot overflow;
   - otherwise -> one all-gather of fixed-capacity packed Messages (capacity is the same on
     every rank because it follows from the scheme, so no size exchange and no hang when a
     rank selects nothing); the worker half packs each payload straight into the send buffer
     (DGC: momentum correction, selection, masking and packing in one native pass); with
     ``scheme.checksum`` (default for robust aggregators) every payload carries a CRC-32 that
     every rank checks;
3. server half (in the future's callback; touches only this bucket's keys): validate every
   received message (layout, the value rule of commlib.wire for float32 and ``scheme.max_abs``,
   the checksum), aggregate, apply server state, write the direction into the bucket. A
   rejected message is counted per sender (``state.rejected_by_rank``) and left out. The mean
   of a float32 bucket is added straight into the bucket, one native validate+scatter per
   tensor for all ranks (commlib.ddp.packed); robust rules decode each rank to a dense row.
Every rank runs the same deterministic server half on the same bytes: bit-identical results.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from commlib.aggregate.base import mean_divisor
from commlib.compress.identity import FP16
from commlib.errors import PayloadError
from commlib.ddp import packed
from commlib.ddp.checks import check_hook_call
from commlib.ddp.exit_guard import then_released
from commlib.wire import MESSAGE_HEADER_BYTES, Kind, Message, Payload
from commlib.ddp.state import HookState


def hook(state: HookState, bucket: dist.GradBucket, *unexpected) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running ``state.scheme`` on one gradient bucket (DDP only: FSDP is refused)."""
    check_hook_call(state, bucket, unexpected)
    return run_group(state, bucket.index(), bucket.buffer(), bucket.parameters(), bucket.is_last())


def run_group(state: HookState, tag, buf: torch.Tensor, params: Sequence[torch.Tensor],
              is_last: bool = True) -> torch.futures.Future:
    """Run the scheme on one group of gradients laid out flat in ``buf`` (a DDP bucket, or a
    whole model for :func:`sync_gradients`); the future's value holds the directions: ``buf``,
    or, for the all-gathered mean when the gradients are not views of ``buf``, the group's
    reused output buffer, which the next call with the same ``tag`` overwrites (copy it out
    first, as DDP and :func:`sync_gradients` do). ``tag`` names the group's reusable buffers."""
    state.begin_bucket()
    worker = state.worker
    keys = [state.key_of(p) for p in params]
    shapes = [tuple(p.shape) for p in params]
    numels = [p.numel() for p in params]
    grads = list(torch.split(buf, numels))
    dense_path = _dense_path(state, shapes)
    flat_params = [p.detach().reshape(-1) for p in params]
    dense_flags = [state.scheme.sends_dense(s) for s in shapes]
    if dense_path:
        payloads = worker.encode_group(keys, grads, shapes=shapes, params=flat_params)
        if _in_place(state):
            fut = _allreduce_in_place(state, buf, keys, numels, payloads, dense_flags)
        else:
            fut = _allreduce(state, tag, buf, keys, numels, payloads, dense_flags)
    else:
        # fixed capacity from the configuration and state *before* this step's encode
        capacity = (Message.capacity(worker.max_bytes(k, s, buf.dtype) for k, s in zip(keys, shapes)) + 7) & ~7
        send = state.buffer(("ag-send", tag), capacity, torch.uint8, buf.device)
        payloads, _ = worker.encode_group_into(send, MESSAGE_HEADER_BYTES, keys, grads, shapes=shapes,
                                               params=flat_params)
        fut = _allgather(state, tag, buf, keys, numels, payloads, dense_flags, send,
                         grads_in_buf=_grads_are_views(params, grads))
    state.end_bucket(is_last)
    if state.blocking:
        fut.wait()
    return fut


def sync_gradients(state: HookState, params: Sequence[torch.Tensor]) -> None:
    """Synchronise ``p.grad`` of these parameters across the group with the scheme, outside
    DDP's backward (e.g. after per-sample clipping and noise for differential privacy).
    Every rank must call it with the same parameters in the same order; blocks until done."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buf = torch.cat([p.grad.reshape(-1) for p in params])
    out = run_group(state, "sync", buf, params, True).wait()
    for p, d in zip(params, torch.split(out, [p.numel() for p in params])):
        p.grad.copy_(d.view_as(p))


def _grads_are_views(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether each ``p.grad`` is the bucket's own section (DDP's ``gradient_as_bucket_view``):
    then the result must land in the bucket; otherwise DDP copies it into ``.grad`` from
    whatever tensor the hook returns."""
    return all(p.grad is not None and p.grad.data_ptr() == g.data_ptr() and p.grad.numel() == g.numel()
               for p, g in zip(params, grads))


def _dense_path(state: HookState, shapes: Sequence[Sequence[int]]) -> bool:
    """All-reduce is possible when every tensor's payload is dense and the rule is the mean.
    Decided from the configuration alone, so every rank takes the same path."""
    scheme = state.scheme
    return scheme.aggregator.is_mean and scheme.attack is None and all(scheme.compressor_for(s).kind == Kind.DENSE for s in shapes)


def _in_place(state: HookState) -> bool:
    """Compression off (identity, no feedback, mean): the payloads are views of the bucket, so
    it can be all-reduced where it lies, as DDP's own hook does. Config-decided: same on all ranks."""
    from commlib.compress.identity import Identity
    from commlib.feedback.base import NoFeedback

    sch = state.scheme
    return type(sch.compressor) is Identity and type(sch.feedback) is NoFeedback


def _allreduce_in_place(state: HookState, buf: torch.Tensor, keys: List[str], numels: List[int],
                        payloads: List[Payload], dense_flags: List[bool]) -> torch.futures.Future:
    """All-reduce the bucket in place (divided by n first, like DDP) plus one tiny all-reduce of
    per-tensor contribution counts, so a rank that skipped a non-finite tensor is left out of
    that tensor's mean. No copy of the bucket."""
    group = state.process_group
    n = state.world_size
    sections = torch.split(buf, numels)
    counts = torch.ones(len(numels), dtype=torch.float32, device=buf.device)
    for j, p in enumerate(payloads):
        if p.kind == Kind.SKIP:
            sections[j].zero_()
            counts[j] = 0
    if n > 1:
        buf.div_(n)
    state.worker.record(payloads, dense_bytes=buf.numel() * buf.element_size())
    _set_wire_bytes(state, buf.numel() * buf.element_size() + counts.numel() * 4)
    cwork = dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group, async_op=True)
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
    server = state.server

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        cwork.wait()
        cnt = counts.tolist()
        for j, c in enumerate(cnt):
            if c != n:  # some rank skipped this tensor: mean over those that sent
                sections[j].mul_(n / c) if c else sections[j].zero_()
        dirs = server.finish(keys, list(sections), dense_flags)
        return _write_back(buf, numels, dirs) if any(
            d.data_ptr() != s.data_ptr() for d, s in zip(dirs, sections)) else buf

    return then_released(work.get_future(), finish)


def _write_back(buf: torch.Tensor, numels: Sequence[int], dirs: Sequence[torch.Tensor]) -> torch.Tensor:
    for out, d in zip(torch.split(buf, list(numels)), dirs):
        if d.data_ptr() != out.data_ptr() or d.dtype != out.dtype:  # a direction may already be its section
            out.copy_(d.reshape(-1))
    return buf


def _allreduce(state: HookState, tag, buf: torch.Tensor, keys: List[str], numels: List[int],
               payloads: List[Payload], dense_flags: List[bool]) -> torch.futures.Future:
    group = state.process_group
    n = state.world_size
    # from the configuration, never from the data: a rank that skipped every tensor must still
    # contribute a buffer of the same dtype and size as the others
    comm_dtype = state.scheme.compressor.value_dtype(buf.dtype)
    # one scale per tensor: every rank must sum values expressed in the same scale
    scales = torch.tensor([p.scale for p in payloads], dtype=torch.float64, device=buf.device)
    if isinstance(state.scheme.compressor, FP16) and n > 1:
        dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=group)
    total = sum(numels)
    send = state.buffer(("ar", tag), total + len(numels), comm_dtype, buf.device)
    sections = torch.split(send[:total], numels)
    counts = send[total:]
    common = scales.tolist()
    for j, p in enumerate(payloads):
        if p.kind == Kind.SKIP:
            sections[j].zero_()
            counts[j] = 0
            continue
        if p.scale == common[j]:
            sections[j].copy_(p.values)
        else:  # rescale to the common scale (powers of two for fp16: exact but for subnormals)
            sections[j].copy_(p.values.to(torch.float32) * (p.scale / common[j]))
        counts[j] = 1
    if n > 1:
        send[:total].div_(n)  # divide before summing, as DDP's own hook does (bit-identical to it)
    state.worker.record(payloads, dense_bytes=buf.numel() * buf.element_size())
    _set_wire_bytes(state, send.numel() * send.element_size())
    work = dist.all_reduce(send, op=dist.ReduceOp.SUM, group=group, async_op=True)
    fb = state.scheme.feedback
    server = state.server

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        summed = fut.value()[0]
        secs = torch.split(summed[:total], numels)
        cnt = summed[total:].to(torch.float64).round().tolist()
        aggs = []
        for j, s in enumerate(secs):
            div = mean_divisor(n, cnt[j], fb.increments)  # values were pre-divided by n
            if not div:
                aggs.append(torch.zeros_like(s, dtype=buf.dtype))
                continue
            factor = common[j] * (n / div)
            agg = s.to(buf.dtype)
            aggs.append(agg * factor if factor != 1.0 else agg)
        return _write_back(buf, numels, server.finish(keys, aggs, dense_flags))

    return then_released(work.get_future(), finish)


def _allgather(state: HookState, tag, buf: torch.Tensor, keys: List[str], numels: List[int],
               payloads: List[Payload], dense_flags: List[bool], send: torch.Tensor,
               grads_in_buf: bool = True) -> torch.futures.Future:
    """All-gather the message whose payloads are packed in ``send`` (after its header). The mean
    is added into ``buf`` when the gradients are its views (``grads_in_buf``), else into the
    group's :class:`packed.OutputBuffer` (reset where it was written last, no bucket memset).
    Either is cleared here, while the collective runs (the encode has read the gradients: every
    payload is in ``send``), not in the callback, which runs on the collective's thread."""
    group = state.process_group
    n = state.world_size
    worker = state.worker
    capacity = send.numel()
    msg = Message(payloads, sender=state.rank, step=worker.step)
    checksum = state.scheme.checksum  # from the configuration: the same on every rank
    packed.seal(msg, send, checksum)
    worker.record(payloads, dense_bytes=buf.numel() * buf.element_size())
    _set_wire_bytes(state, capacity)
    recv = state.buffer(("ag-recv", tag), capacity * n, torch.uint8, buf.device)
    work = _all_gather_flat(recv, send, group)
    server = state.server
    step = worker.step
    max_abs = state.scheme.max_abs

    scheme = state.scheme
    fast_mean = scheme.aggregator.is_mean and scheme.attack is None and buf.dtype == torch.float32
    result = None if grads_in_buf or not fast_mean else state.output_buffer(tag)
    out, sections = buf, []
    if fast_mean:
        if result is None:
            buf.zero_()
            sections = list(torch.split(buf, numels))
        else:
            out = result.take(numels, buf.device)
            sections = result.sections
            for j in range(len(sections)):
                result.clear(j)
    cleared = _mark_stream(buf.device) if fast_mean else None

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        rows = recv.view(n, capacity)
        if fast_mean:
            if cleared is not None:  # the clear before the first sum
                torch.cuda.current_stream(buf.device).wait_event(cleared)
            touched = packed.gathered_mean(rows, sections, step=step, increments=scheme.feedback.increments,
                                           checksum=checksum, max_abs=max_abs, reject=state.count_rejected,
                                           clear=packed.already_clear)
            dirs = server.finish(keys, sections, dense_flags)
            _write_back(out, numels, dirs)
            if result is not None:
                result.done([t if d.data_ptr() == s.data_ptr() else None
                             for t, d, s in zip(touched, dirs, sections)])
            return out
        received: List[List[Optional[Payload]]] = []
        for r in range(n):
            try:
                m = Message.decode_from(rows[r], finite="reject", numels=numels, require_checksum=checksum,
                                        target=torch.float32, max_abs=max_abs)
                if m.sender != r or m.step != step:
                    raise PayloadError(f"message from rank {r} claims sender {m.sender}, step {m.step}")
                received.append(list(m.payloads))
            except PayloadError:
                state.count_rejected(r)
                received.append([None] * len(keys))
        dirs = server.decode_group(keys, numels, received, dense=dense_flags, dtype=torch.float32,
                                   device=buf.device)
        return _write_back(buf, numels, dirs)

    return then_released(work.get_future(), finish)


def _mark_stream(device: torch.device) -> Optional["torch.cuda.Event"]:
    """An event after the work queued so far on ``device``'s current stream (None off CUDA). A
    future's callback runs on a pool stream synchronised with the collective's kernels only, not
    with what the hook queued after starting it (torch.futures.Future.then)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> dist.Work:
    """All-gather equal-size flat tensors into one flat output (async)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


def _set_wire_bytes(state: HookState, nbytes: int) -> None:
    last = state.worker.stats.last
    last["wire_bytes"] = last.get("wire_bytes", 0) + nbytes
