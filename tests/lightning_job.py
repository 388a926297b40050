"""Run under torchrun (2 processes, CPU): PyTorch Lightning fits on digits, with and without
commlib's CommlibCallback, uninterrupted and interrupted + resumed. Rank 0 writes
OUT/result.json and the final weights of every run (tests/test_integrations.py reads them)."""
from __future__ import annotations

import json
import os
import sys
import warnings

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import commlib
from commlib.integrations.lightning import CommlibCallback
from commlib.local.data import digits

X, Y, X_TEST, Y_TEST = digits()


class Net(L.LightningModule):
    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


def fit(epochs: int, scheme, momentum: float = 0.9, ckpt_in=None, ckpt_out=None, comm_state=None):
    L.seed_everything(0, verbose=False)
    model = Net(momentum)
    cb = CommlibCallback(scheme) if scheme is not None else None
    kw = {}
    if comm_state is not None:  # the DDPStrategy recipe Lightning documents (CUDA-only in Lightning)
        from lightning.pytorch.strategies import DDPStrategy
        kw["strategy"] = DDPStrategy(ddp_comm_state=comm_state, ddp_comm_hook=commlib.ddp.hook)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy=kw.get("strategy", "ddp"),
                        max_epochs=epochs, callbacks=[cb] if cb else [], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    loader = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True)
    trainer.fit(model, loader, ckpt_path=ckpt_in, weights_only=True if ckpt_in else None)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    acc = (model.net(X_TEST).argmax(1) == Y_TEST).float().mean().item()
    state = cb.state if cb else comm_state
    return model, acc, (state.stats.bytes_sent if state is not None else None)


def main(out: str) -> None:
    scheme = commlib.Scheme("topk", ratio=0.01, feedback="ef")
    res = {}
    runs = {}
    runs["plain"], res["plain_acc"], _ = fit(20, None)
    runs["full"], res["full_acc"], res["full_bytes"] = fit(20, scheme)
    ck = os.path.join(out, "half.ckpt")
    _, res["half_acc"], _ = fit(10, scheme, ckpt_out=ck)
    runs["resumed"], res["resumed_acc"], _ = fit(20, scheme, ckpt_in=ck)
    # the DDPStrategy(ddp_comm_hook=...) recipe on CPU: Lightning never registers it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = commlib.ddp.HookState(scheme)
        recipe = fit(1, None, comm_state=state)
        runs["strategy_recipe"], res["strategy_recipe_acc"], res["strategy_recipe_bytes"] = recipe
    res["strategy_recipe_warned"] = any(isinstance(w.message, commlib.ddp.HookNotRunWarning) for w in caught)
    try:  # DGC's momentum correction + the optimizer's momentum: refused on this route too
        fit(1, commlib.Scheme("dgc", ratio=0.01, feedback="dgc"), momentum=0.9)
        res["double_momentum"] = "accepted"
    except commlib.ConfigError as exc:
        res["double_momentum"] = str(exc)
    if dist.get_rank() == 0:
        for name, m in runs.items():
            torch.save(m.state_dict(), os.path.join(out, f"{name}.pt"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
