"""The hook on CUDA: the clear it queues while the all-gather runs must come before the callback's
sums, which run on a pool stream synchronised with the collective's kernels only."""
import pytest
import torch
import torch.distributed as dist

import commlib
from commlib.ddp import packed
from commlib.ddp.hooks import run_group

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_reused_output_clear_is_ordered_before_the_callback_on_cuda(tmp_path, monkeypatch):
    """A busy compute stream (a sleep queued before each clear) delays the clear of the entries the
    previous step wrote; the same support each step, so a clear that lands after the sums zeroes
    the whole result. Must equal the same hook on the CPU (gloo) bit for bit, every step."""
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        orig = packed.OutputBuffer.clear

        def busy_then_clear(self, j):
            if self.buf.is_cuda:
                torch.cuda._sleep(50_000_000)
            orig(self, j)

        monkeypatch.setattr(packed.OutputBuffer, "clear", busy_then_clear)
        scheme = dict(compressor="topk", ratio=0.1)
        on_cuda = commlib.ddp.HookState(commlib.Scheme(**scheme))
        on_cpu = commlib.ddp.HookState(commlib.Scheme(**scheme))
        params = [torch.nn.Parameter(torch.zeros(100, 300)), torch.nn.Parameter(torch.zeros(40, 100))]
        cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
        g = torch.randn(34000, generator=torch.Generator().manual_seed(0))
        for step in range(4):
            a = run_group(on_cuda, 0, g.cuda(), cuda_params, True).wait()
            b = run_group(on_cpu, 0, g.clone(), params, True).wait()
            assert b.any() and torch.equal(a.cpu(), b), step
    finally:
        dist.destroy_process_group()
