"""``commlib bench``: run the quick version of every benchmark and write a markdown report.

Each benchmark in ``benchmarks/`` runs as its own process (``--quick``); its printed tables go
into the report verbatim, its JSON stays in ``benchmarks/results/``, and the PNG plots it
made (plus a few drawn here from the JSON) are linked. A benchmark that fails or cannot run
here (e.g. the bandwidth benchmark without root) is reported as such, not hidden.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from commlib.errors import ConfigError

#: (name, script, extra args, timeout in seconds)
BENCHMARKS = [
    ("ddp_schemes", "ddp_schemes.py", ["--quick"], 600),
    ("sparse_pack", "sparse_pack.py", ["--quick"], 600),
    ("dgc_sample", "dgc_sample.py", ["--quick"], 300),
    ("robust_speed", "robust_speed.py", ["--quick"], 600),
    ("robust_accuracy", "robust_accuracy.py", ["--quick"], 600),
    ("async_braking", "async_braking.py", ["--quick"], 600),
    ("privacy", "privacy.py", ["--quick"], 600),
    ("stragglers", "stragglers.py", ["--quick"], 600),
    ("bandwidth", "bandwidth.py", ["--quick"], 900),
    ("time_to_accuracy", "time_to_accuracy.py", ["--quick"], 900),
]


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    if not here.is_dir():
        raise ConfigError(f"benchmarks/ not found next to the package ({here}); run from a source checkout")
    return here


def _plot_ddp(results: Path, out: Path) -> Optional[Path]:
    path = results / "ddp_schemes.json"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(path.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["payload_bytes_per_step"] / 1024, r["final_test_acc"], s=40)
        ax.annotate(r["name"], (r["payload_bytes_per_step"] / 1024, r["final_test_acc"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per rank per step (KB, log)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("DDP schemes: traffic vs accuracy")
    fig.tight_layout()
    png = out / "ddp_schemes.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def run_all(names: Optional[Sequence[str]] = None, out: str = "runs/bench", quick: bool = True) -> Path:
    """Run the benchmarks (all, or those named) and write ``<out>/report.md``; return its path."""
    bdir = benchmarks_dir()
    results = bdir / "results"
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if not names or b[0] in names]
    unknown = set(names or []) - {b[0] for b in BENCHMARKS}
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {sorted(unknown)}; known: {[b[0] for b in BENCHMARKS]}")
    sections: List[str] = []
    summary: Dict[str, Dict[str, object]] = {}
    for name, script, args, timeout in chosen:
        path = bdir / script
        print(f"[bench] {name} ...", flush=True)
        if not path.exists():
            sections.append(f"## {name}\n\nnot available: {script} is missing.\n")
            summary[name] = {"status": "missing"}
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(path), *(args if quick else [])], cwd=bdir.parent,
                                  capture_output=True, text=True, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            text = proc.stdout.strip()
            if proc.returncode != 0:
                text += "\n" + proc.stderr.strip()[-3000:]
        except subprocess.TimeoutExpired as exc:
            status, text = f"timed out after {timeout} s", (exc.stdout or b"").decode(errors="replace") \
                if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
        dt = time.perf_counter() - t0
        summary[name] = {"status": status, "seconds": round(dt, 1)}
        print(f"[bench] {name}: {status} in {dt:.0f} s", flush=True)
        lines = [ln for ln in text.splitlines() if "Warning" not in ln and not ln.startswith("  return func")]
        body = "\n".join(lines[-120:])
        pngs = sorted(p.name for p in results.glob(f"{name}*.png"))
        links = "".join(f"\n![{p}](../../benchmarks/results/{p})\n" for p in pngs)
        sections.append(f"## {name}\n\nstatus: {status}, {dt:.0f} s\n\n```\n{body}\n```\n{links}")
    ddp_png = _plot_ddp(results, outdir)
    if ddp_png is not None:
        sections.append(f"## plot: DDP schemes\n\n![ddp schemes]({ddp_png.name})\n")
    report = outdir / "report.md"
    head = "# commlib benchmark report\n\n" + "\n".join(
        f"- {k}: {v['status']}" + (f" ({v['seconds']} s)" if "seconds" in v else "") for k, v in summary.items())
    report.write_text(head + "\n\n" + "\n".join(sections))
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[bench] report: {report}")
    return report
