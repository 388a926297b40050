"""Run under ``accelerate launch`` (2 CPU processes): an MLP on digits with Accelerate, without
and with commlib, uninterrupted and saved + resumed with ``save_state`` / ``load_state``.
Rank 0 writes OUT/result.json and the final weights of every run (tests/test_integrations.py)."""
from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset

import commlib
import commlib.integrations.accelerate as commlib_accelerate
from commlib.local.data import digits

X, Y, X_TEST, Y_TEST = digits()
EPOCHS = 20


def run(scheme, epochs=(0, EPOCHS), save_to=None, load_from=None, momentum=0.9):
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    loader = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = None
    if scheme is not None:
        state = commlib_accelerate.register(accelerator, model, scheme, optimizer=opt)
    if load_from:
        accelerator.load_state(load_from)
    for epoch in range(*epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
    if save_to:
        accelerator.save_state(save_to)
    net = accelerator.unwrap_model(model)
    acc = (net(X_TEST).argmax(1) == Y_TEST).float().mean().item()
    return accelerator, net, acc, (state.stats.bytes_sent if state is not None else None)


def main(out: str) -> None:
    scheme = commlib.Scheme("topk", ratio=0.01, feedback="ef")
    res, nets = {}, {}
    acc_, nets["plain"], res["plain_acc"], _ = run(None)
    acc_, nets["full"], res["full_acc"], res["full_bytes"] = run(scheme)
    ck = os.path.join(out, "half")
    run(scheme, epochs=(0, EPOCHS // 2), save_to=ck)
    acc_, nets["resumed"], res["resumed_acc"], _ = run(scheme, epochs=(EPOCHS // 2, EPOCHS), load_from=ck)
    try:
        run(commlib.Scheme("dgc", ratio=0.01, feedback="dgc"), epochs=(0, 1))
        res["double_momentum"] = "accepted"
    except commlib.ConfigError as exc:
        res["double_momentum"] = str(exc)
    if acc_.is_main_process:
        for name, m in nets.items():
            torch.save(m.state_dict(), os.path.join(out, f"{name}.pt"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    acc_.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
