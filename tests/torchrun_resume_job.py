"""Run under torchrun (2 processes, gloo): the README's training loop with a checkpoint that
rank 0 writes with every rank's hook state (commlib.ddp.gather_state), then a resume from it
(commlib.ddp.load_gathered_state). Rank 0 writes OUT/{full,resumed}.pt (final weights)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commlib
from commlib.local.data import digits, shard

X, Y, X_TEST, Y_TEST = digits()


def train(epochs, ckpt_in=None, ckpt_out=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = commlib.ddp.register(model, commlib.Scheme("topk", ratio=0.01, feedback="ef"), optimizer=opt)
    start = 0
    if ckpt_in:
        ck = torch.load(ckpt_in, weights_only=True)
        model.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        commlib.ddp.load_gathered_state(state, ck["hook"])
        start = ck["epoch"]
    for epoch in range(start, epochs):
        for b in shard(len(X), rank, world, epoch).split(32):
            opt.zero_grad(); torch.nn.functional.cross_entropy(model(X[b]), Y[b]).backward(); opt.step()
    if ckpt_out:
        ck = {"model": model.module.state_dict(), "opt": opt.state_dict(), "epoch": epochs,
              "hook": commlib.ddp.gather_state(state)}  # a collective: every rank calls it
        if rank == 0:
            torch.save(ck, ckpt_out)
        dist.barrier()
    return model.module


def main(out: str) -> None:
    dist.init_process_group("gloo")
    full = train(20)
    ck = os.path.join(out, "half.pt")
    train(10, ckpt_out=ck)
    resumed = train(20, ckpt_in=ck)
    if dist.get_rank() == 0:
        torch.save(full.state_dict(), os.path.join(out, "full.pt"))
        torch.save(resumed.state_dict(), os.path.join(out, "resumed.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
