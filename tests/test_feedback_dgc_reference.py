"""DGC momentum correction through the Scheme's worker and server halves, step by step, against a
direct implementation of Lin et al. 2018 (arXiv 1712.01887) §3.2-3.3 with exact top-k:

    worker i, compressed tensor:  u_i = m u_i + g_i;  v_i = v_i + u_i;  send v_i at the top-k of |v_i|;
                                  u_i, v_i = 0 there (momentum factor masking)
    aggregate:                    mean of the sparse v_i (the optimizer applies it as plain SGD)
    dense tensor (bias):          u = m u + mean_i g_i on the server, applied as is

Two workers, a matrix and a bias, several steps with fresh gradients each step; the encoder that
writes into a send buffer (the DDP hook's path, fused native kernel for DGC's selection) and the
plain encoder must both match.
"""
import math

import pytest
import torch

from commlib import Scheme
from commlib.wire import MESSAGE_HEADER_BYTES, Message

M, RATIO, STEPS, WORLD = 0.9, 0.05, 6, 2
SHAPES = [(8, 10), (8,)]
KEYS = ["w", "b"]


def reference(grads):
    """grads[step][rank][j] -> the directions per step, by the paper's update rule."""
    u = [[torch.zeros(math.prod(s)) for s in SHAPES] for _ in range(WORLD)]
    v = [[torch.zeros(math.prod(s)) for s in SHAPES] for _ in range(WORLD)]
    u_dense = [torch.zeros(math.prod(s)) for s in SHAPES]
    out = []
    for per_rank in grads:
        dirs = []
        for j, shape in enumerate(SHAPES):
            if len(shape) < 2:  # sent dense; momentum after aggregation
                u_dense[j].mul_(M).add_(sum(g[j] for g in per_rank) / WORLD)
                dirs.append(u_dense[j].clone())
                continue
            acc = torch.zeros(math.prod(shape))
            for r in range(WORLD):
                u[r][j].mul_(M).add_(per_rank[r][j])
                v[r][j].add_(u[r][j])
                sel = v[r][j].abs().topk(math.ceil(RATIO * v[r][j].numel())).indices
                acc[sel] += v[r][j][sel]
                v[r][j][sel] = 0.0
                u[r][j][sel] = 0.0
            dirs.append(acc / WORLD)
        out.append(dirs)
    return out


def via_scheme(scheme, grads, into_buffer):
    workers = [scheme.worker(r, WORLD) for r in range(WORLD)]
    server = scheme.server(WORLD)
    out = []
    for per_rank in grads:
        received = []
        for r, w in enumerate(workers):
            if into_buffer:
                cap = Message.capacity(w.max_bytes(k, s, torch.float32) for k, s in zip(KEYS, SHAPES))
                buf = torch.zeros((cap + 7) & ~7, dtype=torch.uint8)
                payloads, _ = w.encode_group_into(buf, MESSAGE_HEADER_BYTES, KEYS, per_rank[r], shapes=SHAPES)
            else:
                payloads = w.encode_group(KEYS, per_rank[r], shapes=SHAPES)
            received.append(payloads)
            w.end_step()
        dirs = server.decode_group(KEYS, [math.prod(s) for s in SHAPES], received,
                                   dense=[scheme.sends_dense(s) for s in SHAPES])
        out.append([d.clone() for d in dirs])  # a direction may be server state (valid until the next step)
        server.end_step()
    return out


# sample_ratio=1: DGC's sampled threshold is the exact k-th largest magnitude, so its selection is the top-k
@pytest.mark.parametrize("compressor,copts", [("topk", {}), ("dgc", {"sample_ratio": 1.0})])
@pytest.mark.parametrize("into_buffer", [False, True])
def test_dgc_momentum_correction_matches_direct_reference(compressor, copts, into_buffer):
    gen = torch.Generator().manual_seed(3)
    grads = [[[torch.randn(math.prod(s), generator=gen) for s in SHAPES] for _ in range(WORLD)] for _ in range(STEPS)]
    scheme = Scheme(compressor, ratio=RATIO, feedback="dgc", feedback_options={"momentum": M},
                    compressor_options=copts)
    got = via_scheme(scheme, [[[g.clone() for g in gr] for gr in step] for step in grads], into_buffer)
    want = reference(grads)
    for step, (g_dirs, w_dirs) in enumerate(zip(got, want)):
        for j, (a, b) in enumerate(zip(g_dirs, w_dirs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"step {step}, tensor {KEYS[j]}")
