"""Training jobs run on each rank by tests/test_ddp.py (importable so spawned processes find them)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commlib
from commlib import Scheme


def make_data(n=512, d=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


class Net(nn.Module):
    def __init__(self, d=32, h=64, classes=4, frozen=False, unused=False):
        super().__init__()
        torch.manual_seed(123)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.out = nn.Linear(h, classes)
        self.frozen = nn.Linear(d, d) if frozen else None
        if frozen:
            self.frozen.requires_grad_(False)
        self.extra = nn.Linear(h, classes) if unused else None

    def forward(self, x):
        if self.frozen is not None:
            x = self.frozen(x)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def shard(x, y, rank, world, step, batch):
    """Each rank gets a different slice of the batch for this step."""
    n = x.shape[0]
    start = (step * batch * world + rank * batch) % n
    idx = torch.arange(start, start + batch) % n
    return x[idx], y[idx]


def train(rank, world, scheme, steps, *, bucket_cap_mb=25.0, lr=0.05, momentum=0.0, accumulate=1,
          frozen=False, unused=False, batch=16, loss_scale=1.0, nan_at=None, corrupt_rank=None,
          state_in=None, state_out=None, start_step=0, blocking=False, bucket_view=False,
          corrupt_late=False):
    x, y = make_data()
    model = Net(frozen=frozen, unused=unused)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, find_unused_parameters=unused, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
    hs = None
    if scheme is not None:
        hs = commlib.ddp.register(ddp, scheme, optimizer=opt, blocking=blocking)
    if state_in is not None:
        ck = torch.load(state_in.format(rank=rank), weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if hs is not None:
            hs.load_state_dict(ck["hook"])
    if corrupt_rank is not None and rank == corrupt_rank:
        import commlib.ddp.packed as P

        orig = P.seal  # the hook writes each message's header (and CRCs) here

        def bad(msg, buf, checksum=False):
            end = orig(msg, buf, checksum)
            if corrupt_late:  # on odd steps, the last payload's first index points past its tensor:
                if msg.step % 2 and msg.payloads[-1].nnz:  # rejected after the earlier payloads were added
                    pos = end - msg.payloads[-1].nbytes + 64
                    buf[pos:pos + 4] = torch.tensor([1 << 30], dtype=torch.int32).view(torch.uint8)
            else:
                buf[:4] = 0  # destroy the magic
            return end

        P.seal = bad
    lossf = nn.CrossEntropyLoss()
    for step in range(start_step, start_step + steps):
        opt.zero_grad()
        for micro in range(accumulate):
            xb, yb = shard(x, y, rank, world, step * accumulate + micro, batch)
            ctx = ddp.no_sync() if micro < accumulate - 1 else _null()
            with ctx:
                loss = lossf(ddp(xb), yb) * loss_scale
                if nan_at is not None and (step, rank) == nan_at:
                    loss = loss * float("nan")
                loss.backward()
        opt.step()
    if state_out is not None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "hook": hs.state_dict() if hs else None,
                    "stats": hs.stats.as_dict() if hs else None,
                    "last": dict(hs.stats.last) if hs else None,
                    "rejected": dict(hs.rejected_by_rank) if hs else None},
                   state_out.format(rank=rank))
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def job_train(rank, world, scheme_cfg, steps, out, kw):
    scheme = Scheme(**scheme_cfg) if scheme_cfg is not None else None
    train(rank, world, scheme, steps, state_out=out, **kw)


def job_resume(rank, world, scheme_cfg, steps, state_in, out, start_step, kw):
    scheme = Scheme(**scheme_cfg) if scheme_cfg is not None else None
    train(rank, world, scheme, steps, state_in=state_in, state_out=out, start_step=start_step, **kw)


def job_monna(rank, world, steps, f, attack, out, lr=0.2, beta=0.9):
    """Decentralised MoNNA: every rank trains its own model and mixes half steps."""
    from commlib.ddp import MoNNAMixer

    x, y = make_data()
    model = Net()
    mixer = MoNNAMixer(model, lr=lr, f=f, beta=beta, attack=attack)
    lossf = nn.CrossEntropyLoss()
    for step in range(steps):
        model.zero_grad()
        xb, yb = shard(x, y, rank, world, step, 16)
        lossf(model(xb), yb).backward()
        mixer.step()
    torch.save({"model": model.state_dict(), "mixer": mixer.state_dict()}, out.format(rank=rank))


def job_sync(rank, world, scheme_cfg, steps, out):
    """Explicit gradient sync (no DDP wrapper): must equal DDP with the same scheme."""
    from commlib.ddp import HookState, sync_gradients

    x, y = make_data()
    model = Net()
    state = HookState(Scheme(**scheme_cfg), model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lossf = nn.CrossEntropyLoss()
    for step in range(steps):
        opt.zero_grad()
        xb, yb = shard(x, y, rank, world, step, 16)
        lossf(model(xb), yb).backward()
        sync_gradients(state, list(model.parameters()))
        opt.step()
    torch.save({"model": model.state_dict()}, out.format(rank=rank))


def _stage(kind, rank, same_seed=False):
    from commlib.privacy import DIFF2Worker, DPSGD, EFDPSGD

    seed = 100 if same_seed else 100 + rank
    if kind == "dpsgd0":
        return DPSGD(clip=0.5, sigma=0.0, seed=seed)
    if kind == "diff2-0":
        return DIFF2Worker(clip1=0.5, clip2=0.2, sigma1=0.0, sigma2=0.0, period=3, seed=seed)
    if kind == "efdpsgd":
        return EFDPSGD(clip1=0.5, clip2=1.0, sigma=1.0, seed=seed)
    raise ValueError(kind)


def job_private(rank, world, kind, scheme_cfg, steps, out, same_seed=False):
    from commlib.ddp import private_trainer

    x, y = make_data()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = _stage(kind, rank, same_seed)
    acc = None
    if stage.private:  # ε spent, tracked as the steps happen (q = batch / shard size)
        from commlib.privacy.accounting import Accountant

        acc = Accountant(1e-5)
    trainer = private_trainer(model, nn.functional.cross_entropy, stage, opt, scheme=Scheme(**scheme_cfg),
                              accountant=acc, sample_rate=8 / (x.shape[0] // world), expected_batch_size=8)
    for step in range(steps):
        xb, yb = shard(x, y, rank, world, step, 8)
        trainer.step(xb, yb)
    torch.save({"model": model.state_dict(), "epsilon": None if acc is None else acc.epsilon},
               out.format(rank=rank))


def private_reference(kind, world, steps):
    """One process, the union of all ranks' batches: what the distributed run must equal
    (clipped mean of 2B samples = mean of the ranks' clipped means of B samples each)."""
    from commlib.privacy import PrivateTrainer

    x, y = make_data()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = PrivateTrainer(model, nn.functional.cross_entropy, _stage(kind, 0), opt)
    for step in range(steps):
        parts = [shard(x, y, r, world, step, 8) for r in range(world)]
        tr.step(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return model.state_dict()
