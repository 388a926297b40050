"""One rank of a 2-process gloo job that ends the moment its last step is done: a few DDP steps
with a commlib hook, the last one under a 10 s GIL switch interval (so the training thread keeps
the GIL from the moment the hook's callback returns until the interpreter shuts down), then a
plain exit. Without commlib.ddp.exit_guard this rank aborts at exit in about half the runs
("terminate called without an active exception", SIGABRT). argv: scheme name."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commlib

SCHEMES = {"topk-ef": dict(compressor="topk", ratio=0.01, feedback="ef"),  # all-gather path
           "identity": dict(compressor="identity"),  # in-place all-reduce path
           "fp16": dict(compressor="fp16")}  # all-reduce with a send buffer

dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
commlib.ddp.register(model, commlib.Scheme(**SCHEMES[sys.argv[1]]), optimizer=opt)
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
for i in range(4):
    if i == 3:
        sys.setswitchinterval(10.0)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(f"rank {dist.get_rank()} done", flush=True)
