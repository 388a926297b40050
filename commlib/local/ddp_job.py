"""The main job: DDP training on a local cluster with a commlib scheme (or a torch baseline).

Every rank trains an MLP on its shard of a shipped data set; rank 0 shows a progress bar
and writes ``summary.json``. Each rank checkpoints atomically at the end of every epoch
(model, optimizer, hook state), and ``resume=True`` continues from there.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib.local import data as datasets
from commlib.local.models import MLP, accuracy, num_params
from commlib.local.traffic import TrafficCounter
from commlib.ps.checkpoint import load_plain, save_atomic

BASELINES = ("allreduce", "torch-fp16", "torch-powersgd-1", "torch-powersgd-4")


@dataclass
class TrainConfig:
    workers: int = 4
    scheme: Optional[Dict[str, Any]] = field(default_factory=lambda: {
        "compressor": "dgc", "ratio": 0.01, "feedback": "ef21"})
    baseline: Optional[str] = None  # one of BASELINES instead of a commlib scheme
    dataset: str = "digits"
    width: int = 256
    depth: int = 2
    epochs: int = 10
    batch: int = 16  # per worker
    lr: float = 0.05
    momentum: float = 0.9  # DGC momentum correction takes it over (the optimizer then has none)
    bucket_cap_mb: float = 25.0
    seed: int = 0
    out: str = "runs/train"
    progress: bool = True
    checkpoint: bool = True
    resume: bool = False
    max_steps: Optional[int] = None  # stop early (benchmarks)
    target_acc: Optional[float] = None  # record time/steps to reach this test accuracy
    label: str = ""

    def describe(self) -> str:
        if self.baseline:
            return self.baseline
        s = self.scheme or {}
        return "commlib:" + "+".join(str(s.get(k)) for k in ("compressor", "feedback") if s.get(k)) + (
            f"@{s['ratio']}" if s.get("ratio") else "")


def _install_comm(cfg: TrainConfig, ddp: DDP, opt: torch.optim.Optimizer):
    """Register the hook the config asks for; return the commlib HookState (or None)."""
    if cfg.baseline in (None, ""):
        import commlib

        return commlib.ddp.register(ddp, commlib.Scheme(**cfg.scheme), optimizer=opt)
    if cfg.baseline == "allreduce":
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.baseline == "torch-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if cfg.baseline.startswith("torch-powersgd-"):
        rank = int(cfg.baseline.rsplit("-", 1)[1])
        st = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                         start_powerSGD_iter=2, random_seed=cfg.seed)
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
        return None
    raise ValueError(f"unknown baseline {cfg.baseline!r}; choose from {BASELINES}")


def run_rank(rank: int, world: int, cfg: TrainConfig) -> None:
    """Body of one worker process (the process group is already initialised)."""
    xtr, ytr, xte, yte = datasets.load(cfg.dataset, cfg.seed)
    model = MLP(xtr.shape[1], cfg.width, int(ytr.max()) + 1, cfg.depth, seed=cfg.seed)
    cap = cfg.bucket_cap_mb
    if cfg.baseline and cfg.baseline.startswith("torch-powersgd"):
        cap = max(cap, 4 * num_params(model) / 2**20 + 1)  # one bucket: torch's PowerSGD hangs on gloo otherwise
    ddp = DDP(model, bucket_cap_mb=cap)
    worker_momentum = bool(cfg.scheme and not cfg.baseline and cfg.scheme.get("feedback") == "dgc")
    if worker_momentum:
        cfg.scheme = dict(cfg.scheme)
        fo = dict(cfg.scheme.get("feedback_options") or {})
        fo.setdefault("momentum", cfg.momentum)
        cfg.scheme["feedback_options"] = fo
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.0 if worker_momentum else cfg.momentum)
    state = _install_comm(cfg, ddp, opt)
    counter = TrafficCounter(world)
    counter.install()
    ckpt = os.path.join(cfg.out, f"ckpt_rank{rank}.pt")
    start_epoch = 0
    if cfg.resume and os.path.exists(ckpt):
        ck = load_plain(ckpt)  # weights_only: a tampered checkpoint is refused, never run
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if state is not None and ck.get("hook"):
            state.load_state_dict(ck["hook"])
        start_epoch = ck["epoch"] + 1
    lossf = nn.CrossEntropyLoss()
    per_rank = xtr.shape[0] // world
    steps_per_epoch = max(1, per_rank // cfg.batch)
    total = steps_per_epoch * (cfg.epochs - start_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=cfg.label or cfg.describe(), unit="step", leave=True, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 5.0)
    dense_bytes_step = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    history: List[Dict[str, float]] = []
    step_times: List[float] = []
    done = 0
    t_start = time.perf_counter()
    reached: Optional[Dict[str, float]] = None
    for epoch in range(start_epoch, cfg.epochs):
        idx = datasets.shard(xtr.shape[0], rank, world, epoch, cfg.seed)
        loss_sum, n_loss = 0.0, 0
        for s in range(steps_per_epoch):
            if cfg.max_steps and done >= cfg.max_steps:
                break
            b = idx[s * cfg.batch:(s + 1) * cfg.batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            loss = lossf(ddp(xtr[b]), ytr[b])
            loss.backward()
            if cfg.baseline == "allreduce":
                counter.count_plain_allreduce(dense_bytes_step)  # DDP's C++ all-reduce bypasses the counter
            opt.step()
            step_times.append(time.perf_counter() - t0)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {s}")
            loss_sum += loss.item()
            n_loss += 1
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", MB=f"{counter.payload_bytes / 2**20:.2f}", refresh=False)
        stats = torch.tensor([loss_sum, float(n_loss)])
        counter.quiet_all_reduce(stats)
        acc = accuracy(model, xte, yte)
        elapsed = time.perf_counter() - t_start
        rec = {"epoch": epoch, "loss": stats[0].item() / max(1.0, stats[1].item()), "test_acc": acc,
               "steps": done, "elapsed_s": elapsed, "payload_bytes": counter.payload_bytes,
               "wire_bytes": counter.wire_bytes, "dense_bytes": dense_bytes_step * done}
        history.append(rec)
        if cfg.target_acc is not None and reached is None and acc >= cfg.target_acc:
            reached = {"steps": done, "elapsed_s": elapsed, "epoch": epoch}
        if bar is not None:
            saved = rec["dense_bytes"] / max(1, rec["payload_bytes"])
            bar.write(f"epoch {epoch:3d}  loss {rec['loss']:.4f}  test acc {acc:.4f}  "
                      f"sent {rec['payload_bytes'] / 2**20:8.2f} MB (dense {rec['dense_bytes'] / 2**20:8.2f} MB, "
                      f"{saved:6.1f}x less)")
        if cfg.checkpoint:
            os.makedirs(cfg.out, exist_ok=True)
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                          "hook": state.state_dict() if state is not None else None}, ckpt)
        if cfg.max_steps and done >= cfg.max_steps:
            break
    if bar is not None:
        bar.close()
    counter.uninstall()
    if rank == 0:
        st = sorted(step_times[len(step_times) // 5:] or step_times)
        summary = {
            "config": asdict(cfg), "name": cfg.label or cfg.describe(), "workers": world,
            "params": num_params(model), "history": history,
            "final_test_acc": history[-1]["test_acc"] if history else None,
            "steps": done, "median_step_s": st[len(st) // 2] if st else None,
            "payload_bytes_per_step": counter.payload_bytes / max(1, done),
            "wire_bytes_per_step": counter.wire_bytes / max(1, done),
            "dense_bytes_per_step": dense_bytes_step,
            "compression": dense_bytes_step * done / max(1, counter.payload_bytes),
            "reached_target": reached,
            "hook_stats": state.stats.as_dict() if state is not None else None,
        }
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


def train_local(cfg: TrainConfig) -> Dict[str, Any]:
    """Run the job on cfg.workers local processes; return rank 0's summary."""
    from commlib.local.cluster import launch

    os.makedirs(cfg.out, exist_ok=True)
    launch(run_rank, cfg.workers, cfg, errdir=os.path.join(cfg.out, "errors"))
    with open(os.path.join(cfg.out, "summary.json")) as f:
        return json.load(f)
