"""The README's DDP script, run as written under torchrun (2 ranks, gloo), against the same
script without the commlib hook: the headline example must reach the dense accuracy."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_ddp_scripts() -> List[str]:
    """Every complete DDP script in README.md: python blocks that start a process group and register."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if "init_process_group" in b and "commlib.ddp.register(" in b]


def without_commlib_hook(script: str) -> str:
    """The same script with the hook removed: every line that touches the hook state goes."""
    lines = script.splitlines()
    kept = [ln for ln in lines if not re.search(r"\bstate\b", ln)]
    assert len(lines) - len(kept) == 2, "expected exactly the register line and the bytes line to mention state"
    return "\n".join(kept) + "\n"


def run_torchrun(script: str, tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and len(re.findall(r"rank \d+: test accuracy", out.stdout)) == 2:
        # Both ranks finished and printed, then one aborted inside gloo's teardown in
        # destroy_process_group (seen with and without commlib on a loaded machine; commlib's own
        # exit race is covered by tests/test_ddp_exit.py, without retries): run once more.
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def accuracy(stdout: str) -> float:
    accs = {int(r): float(a) for r, a in re.findall(r"rank (\d+): test accuracy ([0-9.]+)", stdout)}
    assert sorted(accs) == [0, 1] and accs[0] == accs[1], stdout  # both ranks hold the same weights
    return accs[0]


def test_readme_has_a_complete_ddp_script():
    scripts = readme_ddp_scripts()
    assert scripts, "README.md lost its runnable DDP example"
    plain = without_commlib_hook(scripts[0])
    assert "commlib.ddp.register" not in plain


@pytest.mark.slow
def test_readme_ddp_script_reaches_dense_accuracy(tmp_path):
    script = readme_ddp_scripts()[0]
    hooked = run_torchrun(script, tmp_path, "readme_train")
    plain = run_torchrun(without_commlib_hook(script), tmp_path, "readme_plain")
    acc, acc_plain = accuracy(hooked), accuracy(plain)
    print(f"README DDP script: {acc:.3f} with commlib, {acc_plain:.3f} without")
    assert acc >= acc_plain - 0.02
    assert acc_plain > 0.9  # the comparison means something: the plain run trains
    saved = re.search(r"([0-9.]+)x fewer bytes", hooked)
    assert saved and float(saved.group(1)) > 10  # the hook really compressed
