"""The commlib command.

    commlib train [--workers 4] [--compressor dgc --ratio 0.01 --feedback ef21] ...   DDP job on a local cluster
    commlib simulate [--workers 6 --crash 2@40 --attack 4:alie ...]                 parameter server with faults
    commlib bench [--only ddp_schemes ...]                                          quick benchmarks -> report.md
    commlib info                                                                    what is installed

Every subcommand has --help. Bad options are refused before any process starts (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional

from commlib.errors import ConfigError


def plain_text(doc: Optional[str]) -> str:
    """Docstring to terminal text: ``code`` and `code` lose their backticks."""
    return re.sub(r"``?([^`]+)``?", r"\1", doc or "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every option's default."""


TRAIN_DOC = """DDP training on N local processes joined by gloo on loopback: an MLP on a shipped data set
(scikit-learn's digits; nothing is downloaded), gradients exchanged through commlib's DDP hook
with the scheme given by --compressor/--ratio/--feedback/--aggregator, or a torch baseline.
Rank 0 prints a progress bar and each epoch's loss, test accuracy and bytes sent vs dense, and
writes OUT/summary.json; every rank checkpoints after every epoch (--resume continues).

    commlib train --workers 4
    commlib train --workers 2 --compressor topk --ratio 0.01 --feedback ef
    commlib train --workers 5 --aggregator krum --f 1
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="DDP training on a local simulated cluster (N gloo processes) with a scheme",
                       description=TRAIN_DOC, formatter_class=HelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=4, help="number of worker processes (DDP ranks)")
    g = p.add_argument_group("scheme (see commlib info for every name)")
    g.add_argument("--compressor", default="dgc", help="identity, fp16, bf16, topk, dgc, randk")
    g.add_argument("--ratio", type=float, default=0.01,
                   help="fraction of entries sent by sparsifiers (topk, dgc, randk), in (0, 1]")
    g.add_argument("--feedback", default="ef21", help="none, ef, ef21, ef21-sgdm, ef21-w, econtrol, dgc")
    g.add_argument("--aggregator", default="mean", help="mean or a robust rule (krum, trimmed-mean, ...)")
    g.add_argument("--f", type=int, default=0, help="Byzantine workers the robust aggregator tolerates")
    g.add_argument("--warmup", default=None, help="'dgc' for DGC's sparsity warm-up")
    g.add_argument("--baseline", default=None,
                   help="a torch hook instead of a scheme: allreduce, torch-fp16, torch-powersgd-1, torch-powersgd-4")
    g = p.add_argument_group("training")
    g.add_argument("--dataset", default="digits", choices=["digits", "mixture"],
                   help="digits: scikit-learn's 8x8 digits; mixture: a generated Gaussian mixture")
    g.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    g.add_argument("--batch", type=int, default=16, help="per-worker batch size")
    g.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum (with --feedback dgc it moves into the scheme and the optimizer gets 0)")
    g.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size in MB")
    g.add_argument("--seed", type=int, default=0, help="seed of the data split, shuffles and initialisation")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="directory for summary.json and the per-rank checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_scheme(args) -> Optional[Dict[str, Any]]:
    """The scheme config of the train flags, validated here (before any process starts)."""
    from commlib.local.ddp_job import BASELINES

    for name, value, low in (("--workers", args.workers, 1), ("--epochs", args.epochs, 1),
                             ("--batch", args.batch, 1), ("--width", args.width, 1), ("--f", args.f, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not args.bucket_cap_mb > 0:
        raise ConfigError(f"--bucket-cap-mb must be > 0, got {args.bucket_cap_mb}")
    if args.baseline:
        if args.baseline not in BASELINES:
            raise ConfigError(f"--baseline must be one of {', '.join(BASELINES)}, got {args.baseline!r}")
        return None
    scheme: Dict[str, Any] = {"compressor": args.compressor, "feedback": args.feedback, "aggregator": args.aggregator}
    if args.compressor not in ("identity", "fp16", "bf16"):
        scheme["ratio"] = args.ratio
    if args.warmup:
        scheme["warmup"] = args.warmup
    if args.f:
        scheme["aggregator_options"] = {"f": args.f}
    from commlib import Scheme

    built = Scheme(**scheme)  # unknown names, bad options
    built.aggregator.check_n(args.workers)  # e.g. Krum needs n >= 2f + 3
    if args.workers > _train_size(args.dataset, args.seed):
        raise ConfigError(f"--workers {args.workers} is more than the {args.dataset} training set has samples")
    _warn_optimizer(built, args)
    return scheme


def _warn_optimizer(scheme, args) -> None:
    """Print (once, here) what check_optimizer would warn about in every worker."""
    import warnings

    import torch

    from commlib.ddp.checks import check_optimizer

    momentum = 0.0 if scheme.worker_momentum else args.momentum  # the job moves DGC's momentum into the scheme
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_optimizer(scheme, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr, momentum=momentum))
    for w in caught:
        print(f"commlib: warning: {w.message}", file=sys.stderr)


def _train_size(dataset: str, seed: int) -> int:
    from commlib.local import data as datasets

    return int(datasets.load(dataset, seed)[0].shape[0])


def _train(args) -> int:
    from commlib.local.ddp_job import TrainConfig, train_local

    scheme = _train_scheme(args)
    cfg = TrainConfig(workers=args.workers, scheme=scheme, baseline=args.baseline, dataset=args.dataset,
                      width=args.width, epochs=args.epochs, batch=args.batch, lr=args.lr,
                      momentum=args.momentum, bucket_cap_mb=args.bucket_cap_mb, seed=args.seed, out=args.out,
                      progress=not args.no_progress, resume=args.resume)
    print(f"commlib train: {args.workers} workers on a local gloo cluster, {cfg.describe()}, "
          f"data={args.dataset}, {args.epochs} epochs -> {args.out}")
    s = train_local(cfg)
    print()
    print(f"{'scheme':<28}{'params':>9}{'steps':>7}{'final acc':>11}{'sent/step':>12}{'dense/step':>12}{'saved':>9}")
    print(f"{s['name']:<28}{s['params']:>9}{s['steps']:>7}{s['final_test_acc']:>11.4f}"
          f"{s['payload_bytes_per_step'] / 1024:>10.1f}KB{s['dense_bytes_per_step'] / 1024:>10.1f}KB"
          f"{s['compression']:>8.1f}x")
    print(f"summary: {args.out}/summary.json   checkpoints: {args.out}/ckpt_rank*.pt")
    return 0


def _bench(args) -> int:
    from commlib.bench import run_all

    run_all(args.only or None, out=args.out, quick=not args.full)
    return 0


def _info(args) -> int:
    import torch

    import commlib
    from commlib import ops
    from commlib.aggregate import AGGREGATORS
    from commlib.compress import COMPRESSORS
    from commlib.feedback import FEEDBACKS

    info = {"commlib": commlib.__version__, "torch": torch.__version__, "sparse_ops_backend": ops.backend(),
            "compressors": COMPRESSORS.names(), "feedback": FEEDBACKS.names(), "aggregators": AGGREGATORS.names()}
    print(json.dumps(info, indent=1))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="commlib", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    from commlib.sim import cli as sim_cli

    sim_cli.add_parser(sub)
    sub.add_parser("info", help="show version, sparse-ops backend and the registered pieces")
    b = sub.add_parser("bench", help="run the quick benchmarks and write a markdown report",
                       formatter_class=HelpFormatter)
    b.add_argument("--only", nargs="*", help="benchmark names (default: all)")
    b.add_argument("--out", default="runs/bench", help="directory for the results and report.md")
    b.add_argument("--full", action="store_true", help="full runs instead of --quick (much longer)")
    b.add_argument("--quick", action="store_true", help="the default; accepted for symmetry")
    args = parser.parse_args(argv)
    from commlib.errors import CommlibError

    try:
        return {"train": _train, "info": _info, "bench": _bench, "simulate": sim_cli.run}[args.cmd](args)
    except CommlibError as exc:
        print(f"commlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
