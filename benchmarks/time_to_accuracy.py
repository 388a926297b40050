"""Time to accuracy: wall-clock training time until a target test accuracy, per communication
scheme, on 2 emulated hosts joined by a shaped link (100 Mbit/s and 1 Gbit/s).

Choices (each one the same for every scheme):

- Task: MNIST-1D (Greydanus 2020, arXiv 2011.14439), generated here by the ``mnist1d`` package
  with its default generator (nothing downloaded): 10000 examples, 8000 train / 2000 test.
- Model: a 1-D CNN (benchmarks/tta_worker.py), width 64, hidden 384: 570k parameters, 99.85% of
  them in the 5 weight tensors DGC compresses (the 842 bias entries travel dense, as in the DGC
  paper). Large enough that a dense gradient (2.3 MB) dominates a step at 100 Mbit/s (about
  180 ms on the wire against about 10 ms of compute on a quiet core), and that DGC 99.9% with
  its 64-byte payload headers and dense biases still reaches about 280x compression; at hidden
  256 the same scheme stays at 257x, below the paper's lower figure.
- Training: per-rank batch 32 (125 steps per epoch on 2 ranks), 12 epochs = 1500 steps. SGD
  lr 0.05, linear lr warm-up over the first epoch (Goyal et al. 2017, arXiv 1706.02677; DGC's
  warm-up training, Lin et al. 2018 §3.4, also starts with a smaller rate), x0.1 for the last
  quarter (a step decay, as in the DGC paper's CIFAR-10 runs). Momentum 0.9 in the optimizer,
  except where the scheme keeps it on the worker: DGC (momentum correction 0.9 with momentum
  factor masking, §3.2-3.3; the optimizer is plain SGD, biases get momentum after aggregation)
  and EF21-SGDM / EControl (plain SGD, their own eta 0.1). Heavy-ball momentum 0.9 at lr 0.05
  moves about 0.5 gradients per step; EF21-SGDM's momentum is an average and EControl has none,
  so at the common lr they move 10x less: they also run with lr x10 (the "lr x10" rows). No
  gradient clipping (the paper clips locally for its RNNs only).
- Target: 95% test accuracy; dense all-reduce passes it after about a thousand steps.
- DGC's sparsity warm-up (the "+ warm-up" variants): the paper's densities 25%, 6.25%, 1.5625%,
  0.4% over the first 4 epochs, then the target. With 12 epochs that is a third of the run
  (the paper: 4 of 164 epochs on CIFAR-10), so those variants are also run without it.
- Compression = dense gradient bytes / bytes this rank hands to collectives (the fixed-capacity
  all-gather buffer for commlib's sparse schemes), over the whole run and, separately, from
  epoch 5 on (after the sparsity warm-up; the paper's 270x-600x are per-iteration sizes at the
  final sparsity). The issue's goal for DGC at 100 Mbit/s is checked against the latter and
  both are reported.
- Time: training wall time on rank 0 (zero_grad .. optimizer step; DDP waits for every bucket's
  communication inside backward), test evaluations every 25 steps excluded. Run on a shared
  2-core machine: the 1-min load average before, during (sampled every 30 s) and after is
  recorded, and step times under load are indicative only.

Hosts, links and jobs are benchmarks/bandwidth.py's: Linux network namespaces joined by a veth
pair, a tc token-bucket filter per direction, one torchrun node (gloo) per namespace. All runs of
one invocation go in one torchrun job (100 Mbit/s runs first); the worker asks for each run's
link rate. The workers import this checkout's commlib (PYTHONPATH is set for them). The
accuracy curve of a scheme does not depend on the link (the same arithmetic in the same order);
only its time axis does.

Schemes: all-reduce (DDP's default), torch's fp16 and PowerSGD (rank 1, 4) hooks, commlib DGC
at 99% and 99.9% with and without its sparsity warm-up, top-k 1% with EF, EF21-SGDM and EControl
(the last two also at lr x10).

Reported per (link, scheme): wall time of training to the target test accuracy and the step at
which it was reached, final test accuracy after the same number of epochs, compression (whole
run, after warm-up), mean step time, and a plot of test accuracy against training wall time
(one panel per link).

    python benchmarks/time_to_accuracy.py            # full: 12 epochs, 2 links, 13 schemes (root)
    python benchmarks/time_to_accuracy.py --quick    # a few minutes: smaller CNN, 10 epochs, 4 schemes

Needs root (network namespaces, tc); exits with 2 otherwise. ``--timeout`` bounds the torchrun
job; the runs finished by then are still reported (and the unfinished ones named). Writes
benchmarks/results/time_to_accuracy{,_quick}.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's commlib, not whatever an editable install points at

from bandwidth import RATE_LABEL, RATES, Testbed, cannot_emulate, link_check, run_job  # noqa: E402
from tta_worker import SCHEMES  # noqa: E402

from commlib.scheme import DGC_WARMUP  # noqa: E402

FULL = dict(samples=10000, width=64, hidden=384, epochs=12, target=0.95, eval_every=25,
            schemes=tuple(SCHEMES), links=("100mbit", "1gbit"))
QUICK = dict(samples=4000, width=32, hidden=128, epochs=10, target=0.70, eval_every=10,
             schemes=("allreduce", "torch-powersgd-1", "dgc-99.9", "topk-ef"), links=("100mbit", "1gbit"))
LR, MOMENTUM, BATCH, SEED = 0.05, 0.9, 32, 0
LR_WARMUP_EPOCHS, LR_DECAY_AT = 1, 0.75  # linear lr warm-up over the first epoch; x0.1 for the last quarter
DGC_GOAL = {"compression": 270.0, "accuracy_points": 0.5}  # Lin et al. 2018: 270x-600x without loss


def make_data(samples: int, path: Path) -> Dict[str, Any]:
    """MNIST-1D with the package's default generator settings (seed 42) and ``samples`` examples
    (80% train), written as a pickle-free .npz."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(samples)
    d = make_dataset(args)
    np.savez(path, x=d["x"].astype(np.float32), y=d["y"].astype(np.int64),
             x_test=d["x_test"].astype(np.float32), y_test=d["y_test"].astype(np.int64))
    return {"train": int(len(d["y"])), "test": int(len(d["y_test"])), "length": int(d["x"].shape[1]),
            "generator": "mnist1d.data.make_dataset (default args, seed 42)"}


def time_to_target(rec: Dict[str, Any], target: float) -> Optional[Dict[str, float]]:
    """The first evaluation at or above the target: its training wall time and step."""
    for e in rec["evals"]:
        if e["test_acc"] >= target:
            return {"train_s": e["train_s"], "step": e["step"], "epoch": e["epoch"]}
    return None


def resume_records(path: Path, cfg: Dict[str, Any]) -> Any:
    """The finished runs of an earlier invocation, keyed by (scheme, link); refuses one made with
    another configuration (data, model, epochs, optimizer, schedule)."""
    old = json.loads(path.read_text())
    meta = old["meta"]
    keys = ("samples", "width", "hidden", "epochs", "eval_every")
    was = {**{k: meta["config"][k] for k in keys}, "lr": meta["lr"], "momentum": meta["momentum"],
           "batch": meta["batch_per_rank"], "schedule": meta.get("lr_schedule")}
    now = {**{k: cfg[k] for k in keys}, "lr": LR, "momentum": MOMENTUM, "batch": BATCH,
           "schedule": lr_schedule()}
    if was != now:
        raise SystemExit(f"--resume {path}: made with {was}, this run is {now}")
    kept = {(rec["scheme"], rec["link"]): dict(rec, job=rec.get("job", 0)) for rec in old["records"]}
    return kept, {k: meta.get(k) for k in ("loadavg_before", "loadavg_after", "loadavg_1min_during", "wall_s",
                                           "link_goodput_bit_s", "timeout_s", "missing_runs")}


def jobs_note(records: List[Dict[str, Any]], earlier_meta: Dict[str, Any]) -> str:
    """Which runs came from the earlier job (--resume) and under what load."""
    first = [f"{r['scheme']}@{r['link']}" for r in records if r.get("job") == 0]
    second = [f"{r['scheme']}@{r['link']}" for r in records if r.get("job") != 0]
    during = earlier_meta.get("loadavg_1min_during") or {}
    how = "stopped early" if earlier_meta.get("missing_runs") else "finished"
    return (f"Two jobs, same configuration and data: {len(first)} runs come from a first job that {how} "
            f"(1-min load average {during.get('mean', float('nan')):.1f} mean, {during.get('min', float('nan')):.1f}-"
            f"{during.get('max', float('nan')):.1f}; {earlier_meta.get('wall_s') or 0:.0f} s), the other "
            f"{len(second)} ({', '.join(second)}) from a second one; the load figures above are the second job's.")


def lr_schedule() -> Dict[str, Any]:
    return {"base": LR, "linear_warmup_epochs": LR_WARMUP_EPOCHS, "times_0.1_from_fraction": LR_DECAY_AT}


def build_rows(records: List[Dict[str, Any]], target: float) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        hit = time_to_target(r, target)
        link = r["link"]
        rows.append({"link": link, "scheme": r["scheme"], "label": r["label"],
                     "time_to_target_s": hit["train_s"] if hit else None, "steps_to_target": hit["step"] if hit else None,
                     "final_test_acc": r["final_test_acc"], "best_test_acc": max(e["test_acc"] for e in r["evals"]),
                     "compression": r["compression"], "compression_after_warmup": r.get("compression_after_warmup"),
                     "after_warmup_from_step": r.get("after_warmup_from_step"), "train_s": r["train_s"],
                     "step_ms": 1000 * r["train_s"] / r["steps"],
                     "steps": r["steps"], "epochs": r["epochs"]})
    return rows


def evaluate_goals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's goal for DGC at 100 Mbit/s: reaches the target no later than any other scheme,
    final accuracy within 0.5 point of all-reduce's, at least 270x compression."""
    goals: Dict[str, Any] = {}
    at = {r["scheme"]: r for r in rows if r["link"] == "100mbit"}
    dense = at.get("allreduce")
    for name in ("dgc-99.9", "dgc-99.9-warmup", "dgc-99", "dgc-99-warmup"):
        d = at.get(name)
        if d is None:
            continue
        others = [r for s, r in at.items() if not s.startswith("dgc-") and r["time_to_target_s"] is not None]
        first = d["time_to_target_s"] is not None and all(d["time_to_target_s"] <= o["time_to_target_s"] for o in others)
        g = {"time_to_target_s": d["time_to_target_s"], "steps_to_target": d["steps_to_target"],
             "fastest_other": min(((o["time_to_target_s"], o["scheme"]) for o in others), default=None),
             "reaches_target_first": first, "compression_whole_run": d["compression"],
             "compression_after_warmup": d["compression_after_warmup"],
             # the paper's 270x is the per-iteration gradient size at the final sparsity, i.e. after warm-up
             "compression_at_least_270x": (d["compression_after_warmup"] or 0) >= DGC_GOAL["compression"]}
        if dense is not None:
            g["accuracy_gap_points"] = 100 * (dense["final_test_acc"] - d["final_test_acc"])
            g["within_0.5_point_of_dense"] = g["accuracy_gap_points"] <= DGC_GOAL["accuracy_points"]
        g["met"] = bool(first and g["compression_at_least_270x"] and g.get("within_0.5_point_of_dense", False))
        goals[f"{name}_at_100mbit"] = g
    return goals


def markdown(rows: List[Dict[str, Any]], target: float, goals: Dict[str, Any], meta: Dict[str, Any]) -> str:
    out = [f"# Time to accuracy (MNIST-1D, 1-D CNN, 2 hosts)\n",
           f"{meta['notes']}\n",
           f"| link | scheme | time to {target:.0%} test acc (s) | steps to it | final test acc ({meta['epochs']} "
           f"epochs) | best test acc | compression (whole run) | "
           f"compression (epochs {meta['after_warmup_epoch'] + 1}+) "
           "| step (ms) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {k: i for i, k in enumerate(RATES)}
    sorder = {k: i for i, k in enumerate(SCHEMES)}
    for r in sorted(rows, key=lambda r: (order[r["link"]], sorder[r["scheme"]])):
        tt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        st = str(r["steps_to_target"]) if r["steps_to_target"] is not None else "–"
        comp = f"{r['compression']:.0f}x" if r["compression"] else "–"
        after = f"{r['compression_after_warmup']:.0f}x" if r.get("compression_after_warmup") else "–"
        out.append(f"| {RATE_LABEL[r['link']]} | {r['label']} | {tt} | {st} | {r['final_test_acc']:.3f} | "
                   f"{r['best_test_acc']:.3f} | {comp} | {after} | {r['step_ms']:.1f} |")
    out.append("\n## Goal (DGC at 100 Mbit/s)\n")
    out.append("Reaches the target no later than any other scheme, final accuracy within 0.5 point of all-reduce, "
               "at least 270x compression after the sparsity warm-up (epochs "
               f"{meta['after_warmup_epoch'] + 1}+; the whole-run figure is given too).\n")
    for name, g in goals.items():
        nums = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in g.items() if k != "met")
        out.append(f"- {name}: {'met' if g['met'] else 'MISSED'} ({nums})")
    out.append(f"\n![accuracy vs wall time]({meta['plot']})\n")
    return "\n".join(out) + "\n"


def plot(records: List[Dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [k for k in RATES if any(r["link"] == k for r in records)]
    fig, axes = plt.subplots(1, len(links), figsize=(6.5 * len(links), 4.5), squeeze=False)
    colour = {name: plt.cm.tab20(i % 20) for i, name in enumerate(SCHEMES)}  # one colour per scheme, both panels
    for ax, link in zip(axes[0], links):
        for r in records:
            if r["link"] != link:
                continue
            ax.plot([e["train_s"] for e in r["evals"]], [e["test_acc"] for e in r["evals"]], label=r["label"],
                    color=colour[r["scheme"]], linewidth=1.2,
                    linestyle="--" if r["scheme"].startswith(("allreduce", "torch-")) else "-")
        ax.axhline(target, color="grey", linewidth=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.set_xscale("log")
        ax.set_xlabel("training wall time (s, log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"MNIST-1D, 2 hosts, {RATE_LABEL[link]}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller CNN, 10 epochs, 4 schemes (a few minutes)")
    ap.add_argument("--schemes", default=None, help=f"comma list of {','.join(SCHEMES)}")
    ap.add_argument("--links", default=None, help=f"comma list of {','.join(RATES)}")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--target", type=float, default=None, help="target test accuracy")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--burst", default="256kb", help="tbf burst")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds the torchrun job may take")
    ap.add_argument("--resume", default=None, help="a JSON this script wrote with the same configuration whose "
                    "runs stopped early (--timeout): keep its finished runs, run the others, report all together")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/time_to_accuracy[_quick].json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("epochs", "target"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.schemes:
        cfg["schemes"] = tuple(args.schemes.split(","))
    if args.links:
        cfg["links"] = tuple(args.links.split(","))
    bad = [s for s in cfg["schemes"] if s not in SCHEMES] + [k for k in cfg["links"] if k not in RATES]
    if bad:
        ap.error(f"unknown scheme or link: {', '.join(bad)}")
    why = cannot_emulate("time_to_accuracy.py")
    if why:
        print(why, file=sys.stderr)
        return 2
    out = Path(args.out or RESULTS / f"time_to_accuracy{'_quick' if args.quick else ''}.json")
    runs = [{"scheme": s, "link": link, "rate": None if RATES[link] is None else link, "epochs": cfg["epochs"],
             "batch": BATCH, "lr": LR, "momentum": MOMENTUM, "width": cfg["width"], "hidden": cfg["hidden"],
             "seed": SEED, "eval_every": cfg["eval_every"],
             "lr_warmup_epochs": LR_WARMUP_EPOCHS, "lr_decay_at": LR_DECAY_AT,
             "sparsity_warmup_epochs": len(DGC_WARMUP)} for link in cfg["links"] for s in cfg["schemes"]]
    earlier, earlier_meta = resume_records(Path(args.resume), cfg) if args.resume else ({}, None)
    if not [r for r in runs if (r["scheme"], r["link"]) not in earlier]:
        ap.error(f"every run is in {args.resume} already")
    todo = [r for r in runs if (r["scheme"], r["link"]) not in earlier]
    t_start, load_before = time.monotonic(), os.getloadavg()
    load_samples: List[Any] = []
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(30.0):
            load_samples.append((round(time.monotonic() - t_start), os.getloadavg()[0]))

    threading.Thread(target=sample_load, daemon=True).start()
    bed = Testbed(args.hosts, args.burst)
    meta: Dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="commlib-tta-") as tmp:
            meta["data"] = make_data(cfg["samples"], Path(tmp) / "data.npz")
            bed.open()
            goodput = {}
            for link in cfg["links"]:
                bed.shape(None if RATES[link] is None else link)
                goodput[link] = link_check(bed)
            bed.shape(None)
            print(f"{len(todo)} runs on {args.hosts} hosts ({len(earlier)} kept from {args.resume}); "
                  "measured TCP goodput: "
                  + ", ".join(f"{RATE_LABEL[k]} {v / 1e6:.0f} Mbit/s" for k, v in goodput.items()), flush=True)
            # the workers import this checkout's commlib too (they run under `ip netns exec env ...`)
            try:
                res = run_job(bed, todo, {}, "tta", Path(tmp), args.timeout,
                              worker=HERE / "tta_worker.py", progress="steps in")
            except (TimeoutError, RuntimeError) as exc:  # keep the runs that finished (the worker rewrites
                part = Path(tmp) / "out-tta.json"               # its output after each)
                if not part.exists():
                    raise
                print(f"{exc}\nreporting the runs that finished", file=sys.stderr, flush=True)
                res = json.loads(part.read_text())
                res["stopped"] = str(exc).splitlines()[0]
    finally:
        sampling.set()
        bed.close()
    for run, rec in zip(todo, res["records"]):
        rec["link"] = run["link"]
        earlier[(run["scheme"], run["link"])] = dict(rec, job=1 if args.resume else 0)
    records = [earlier[(r["scheme"], r["link"])] for r in runs if (r["scheme"], r["link"]) in earlier]
    if not records:
        raise RuntimeError("no run finished")
    missing = [f"{r['scheme']}@{r['link']}" for r in runs if (r["scheme"], r["link"]) not in earlier]
    rows = build_rows(records, cfg["target"])
    goals = evaluate_goals(rows)
    load_after = os.getloadavg()
    png = out.with_suffix(".png")
    meta.update({"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "lr": LR,
                 "momentum": MOMENTUM, "batch_per_rank": BATCH, "hosts": args.hosts, "burst": args.burst,
                 "link_goodput_bit_s": goodput, "ops_backend": res["ops_backend"],
                 "native_status": res["native_status"], "python": platform.python_version(),
                 "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
                 "wall_s": time.monotonic() - t_start, "quick": args.quick, "epochs": cfg["epochs"],
                 "plot": png.name, "after_warmup_epoch": len(DGC_WARMUP),
                 "lr_schedule": lr_schedule(),
                 "commlib_file": records[0].get("commlib_file"), "missing_runs": missing,
                 "timeout_s": args.timeout, "earlier_job": earlier_meta,
                 "stopped": res.get("stopped")})
    loads = [x for _, x in load_samples] or [load_before[0]]
    meta["loadavg_1min_during"] = {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads),
                                   "samples": load_samples}
    meta["notes"] = (
        f"{args.hosts} hosts (network namespaces, veth, tc tbf), gloo; MNIST-1D {meta['data']['train']} train / "
        f"{meta['data']['test']} test, 1-D CNN width {cfg['width']} hidden {cfg['hidden']} "
        f"({records[0]['params']} parameters), batch {BATCH} per rank ({records[0]['steps_per_epoch']} steps per "
        f"epoch), {cfg['epochs']} epochs. SGD lr {LR}, linear lr warm-up over the first {LR_WARMUP_EPOCHS} epoch, "
        f"x0.1 from {LR_DECAY_AT:.0%} of the run, the same for every scheme; momentum {MOMENTUM} in the optimizer, "
        f"except DGC (momentum correction {MOMENTUM} on the worker, plain SGD) and EF21-SGDM / EControl (plain SGD). "
        f"DGC's sparsity warm-up: densities {', '.join(f'{d:g}' for d in DGC_WARMUP)} over the first "
        f"{len(DGC_WARMUP)} epochs. Test accuracy every {cfg['eval_every']} steps. Time = training wall time on "
        f"rank 0, evaluations excluded. Compression = dense gradient bytes / bytes handed to collectives, over the "
        f"whole run and from epoch {len(DGC_WARMUP) + 1} on. 1-min load average {load_before[0]:.1f} before, "
        f"{meta['loadavg_1min_during']['mean']:.1f} mean ({meta['loadavg_1min_during']['min']:.1f}-"
        f"{meta['loadavg_1min_during']['max']:.1f}) during, on {os.cpu_count()} CPUs"
        + (" (a loaded machine: times are indicative only)"
           if meta["loadavg_1min_during"]["mean"] > 0.5 * (os.cpu_count() or 1) else "")
        + (f". Runs not finished ({res.get('stopped')}): {', '.join(missing)}." if missing else "."))
    if earlier_meta:
        meta["notes"] += " " + jobs_note(records, earlier_meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "goals": goals, "rows": rows, "records": records}, indent=1))
    plot(records, cfg["target"], png)
    md = markdown(rows, cfg["target"], goals, meta)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"{meta['wall_s']:.0f} s in all. Wrote {out}, {out.with_suffix('.md')} and {png}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
