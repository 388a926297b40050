"""Launch files (launch/), images (docker/) and the bandwidth benchmark's plumbing.

Cheap checks that the files parse and agree with pyproject.toml and with each other, plus two
real 2-process torchrun runs on this machine: launch/torchrun_single.sh and the bandwidth
benchmark's worker (without namespaces)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")  # PyYAML (comes with ray)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch", DOCKER / "node.sh", ROOT / "benchmarks" / "netns.sh"]
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
sys.path.insert(0, str(LAUNCH))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _pinned(requirements, name):
    for r in requirements:
        m = re.fullmatch(rf"{name}==([\w.]+)", r.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert script.exists()
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_scripts_reference_existing_files():
    """Every repository path a launch file or image names exists (launch/train.py, docker/node.sh, ...)."""
    pattern = re.compile(r"\b((?:launch|docker|benchmarks|scripts)/[\w./-]+\.(?:py|sh|sbatch|yaml|cpu|cuda))\b")
    files = SCRIPTS + DOCKERFILES + [DOCKER / "compose.yaml", LAUNCH / "ray_cluster.yaml", LAUNCH / "train.py",
                                     LAUNCH / "ray_train.py"]
    seen = set()
    for f in files:
        for ref in pattern.findall(f.read_text()):
            seen.add(ref)
            assert (ROOT / ref).exists(), f"{f.name} refers to {ref}, which does not exist"
    assert {"launch/train.py", "launch/torchrun_multi.sh", "docker/node.sh", "launch/ray_train.py"} <= seen


def test_dockerfiles_pin_what_pyproject_pins():
    torch_version = _pinned(PYPROJECT["project"]["dependencies"], "torch")
    assert _pinned(PYPROJECT["build-system"]["requires"], "torch") == torch_version
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for f in DOCKERFILES:
        text = f.read_text()
        assert f"ARG TORCH_VERSION={torch_version}\n" in text, f"{f.name} must pin torch {torch_version}"
        assert '"torch==${TORCH_VERSION}"' in text
        assert re.search(r"^FROM \$\{\w+\}$", text, re.M) and re.search(r"^ARG \w+_IMAGE=\S+:\S+$", text, re.M), \
            f"{f.name}: base image must be an ARG with a pinned tag"
        for pkg in ("setuptools", "wheel", "ninja"):
            assert re.search(rf'"{pkg}==[\d.]+"', text), f"{f.name}: {pkg} not pinned"
        m = re.search(r'pip install --no-build-isolation -e "\.\[([\w,]+)\]"', text)
        assert m and set(m.group(1).split(",")) <= extras, f"{f.name}: extras must exist in pyproject.toml"
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{f.name} copies {part}, which does not exist"
    ninja = _pinned([r for r in re.findall(r'"(ninja==[\d.]+)"', DOCKERFILES[0].read_text())], "ninja")
    assert tuple(map(int, ninja.split(".")[:2])) >= (1, 11)  # pyproject: ninja>=1.11
    py = re.search(r"python:(\d+)\.(\d+)", DOCKERFILES[0].read_text())
    assert (int(py.group(1)), int(py.group(2))) >= (3, 10)  # requires-python >= 3.10


def test_compose_file_is_a_consistent_two_node_cluster():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert sorted(services) == ["node0", "node1"]
    ranks = set()
    for svc in services.values():
        env = svc["environment"]
        assert env["MASTER_ADDR"] == "node0" and services["node0"]["hostname"] == "node0"
        assert int(env["NNODES"]) == len(services)
        ranks.add(int(env["NODE_RANK"]))
        context = (DOCKER / svc["build"]["context"]).resolve()  # relative to the compose file
        assert context == ROOT and (context / svc["build"]["dockerfile"]).exists()
        assert svc["entrypoint"] == ["bash", "docker/node.sh"]
        assert "NET_ADMIN" in svc["cap_add"]
        assert set(svc["networks"]) <= set(doc["networks"])
        from train import parser

        parser().parse_args(svc["command"])  # the command is valid launch/train.py options
    assert ranks == {0, 1}


def test_ray_cluster_config_passes_rays_schema():
    pytest.importorskip("ray")
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((LAUNCH / "ray_cluster.yaml").read_text())
    validate_config(cfg)
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    assert cfg["docker"]["image"] == "commlib:cpu"  # the tag docker/Dockerfile.cpu documents


def test_train_entry_point_builds_the_main_jobs_config(monkeypatch, capsys):
    import train

    from commlib.local.ddp_job import BASELINES, TrainConfig

    cfg = train.config(train.parser().parse_args(["--compressor", "dgc", "--ratio", "0.001", "--feedback", "dgc",
                                                  "--max-steps", "7"]), 3)
    assert isinstance(cfg, TrainConfig) and cfg.workers == 3 and cfg.max_steps == 7
    assert cfg.scheme == {"compressor": "dgc", "ratio": 0.001, "feedback": "dgc", "aggregator": "mean"}
    for b in BASELINES:
        assert train.config(train.parser().parse_args(["--baseline", b]), 2).scheme is None
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert train.main(["--max-steps", "1"]) == 2
    assert "not set: start it with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert train.main(["--compressor", "no-such-thing"]) == 2
    assert "unknown compressor" in capsys.readouterr().err


def test_bandwidth_plan_and_root_check(monkeypatch, capsys):
    import bandwidth
    from bandwidth_worker import SCHEMES, width_for

    from commlib.local.models import MLP, num_params

    for target in (1_000_000, 10_000_000):
        w = width_for(target)
        assert abs(num_params(MLP(64, w, 10, 2)) - target) / target < 0.005
    runs, skipped = bandwidth.build_plan(False, {k: tuple(bandwidth.MODELS) for k in bandwidth.RATES}, 10.0, 150)
    assert {r["link"] for r in runs if r["scheme"] == "dgc-torch"} == {"100mbit"}
    assert {r["scheme"] for r in runs} == set(SCHEMES)
    # dense schemes whose step would exceed the limit are skipped, and said so
    assert {(s["link"], s["model"], s["scheme"]) for s in skipped} >= {("10mbit", "50M", "allreduce"),
                                                                        ("100mbit", "50M", "allreduce")}
    assert all(bandwidth.est_comm_s(r["scheme"], bandwidth.MODELS[r["model"]], bandwidth.RATES[r["link"]]) <= 10
               for r in runs)
    conv = [r for r in runs if r.get("eval_every")]
    assert conv and all(r["model"] == "1M" and r["target"] == bandwidth.TARGET_ACC for r in conv)
    assert not [r for r in conv if SCHEMES[r["scheme"]].get("timing_only")]  # ddp-floor: replicas drift
    # the compute-only step is measured once per model, in a run that is kept after the scheme filter
    narrow = [r for r in bandwidth.build_plan(False, {"100mbit": ("10M", "50M")}, 6.0, 150)[0]
              if r["scheme"] in ("allreduce", "dgc")]
    bandwidth.mark_compute(narrow)
    assert sorted(r["model"] for r in narrow if r.get("compute_steps")) == ["10M", "50M"]
    quick, _ = bandwidth.build_plan(True, {"unshaped": ("1M",), "100mbit": ("1M",)}, 10.0, 110)
    assert len(quick) == 2 * len(bandwidth.QUICK) - 1  # the pure-torch DGC row only at 100 Mbit/s
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert bandwidth.main(["--quick"]) == 2
    assert "needs root" in capsys.readouterr().err


def _torchrun_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    return env


@pytest.mark.slow
def test_torchrun_single_smoke(tmp_path):
    """launch/torchrun_single.sh really trains: 2 ranks, 3 steps of the DGC + EF21 main job."""
    out = tmp_path / "run"
    r = subprocess.run(["bash", str(LAUNCH / "torchrun_single.sh"), "--max-steps", "3", "--no-progress",
                        "--no-checkpoint", "--out", str(out)], env=dict(_torchrun_env(), NPROC="2"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3
    assert summary["compression"] > 1.5  # DGC 1% + EF21 sends less than dense after its dense first step
    assert "2 ranks, 3 steps" in r.stdout


@pytest.mark.slow
def test_bandwidth_worker_smoke(tmp_path):
    """The benchmark's worker under a local torchrun: records what bandwidth.py reads."""
    plan = [dict(scheme=s, model="tiny", width=32, steps=6, warmup=2, lr=0.1, momentum=0.9,
                 eval_every=3 if s == "dgc" else 0, target=0.05, max_s=None if s == "dgc" else 60.0,
                 compute_steps=2 if s == "allreduce" else 0, paired_compute=s == "dgc")
            for s in ("allreduce", "ddp-floor", "torch-powersgd-1", "dgc")]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "benchmarks" / "bandwidth_worker.py"), "--plan", str(tmp_path / "plan.json"),
                        "--out", str(tmp_path / "out.json"), "--ifname", "lo"], env=_torchrun_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    recs = {x["scheme"]: x for x in json.loads((tmp_path / "out.json").read_text())["records"]}
    assert set(recs) == {"allreduce", "ddp-floor", "torch-powersgd-1", "dgc"}
    assert recs["ddp-floor"]["payload_bytes_per_step"] == 0  # DDP's own cost only: nothing communicated
    for rec in recs.values():
        assert rec["steps"] == 6 and len(rec["step_s"]) == 4 and rec["median_step_s"] > 0
        assert rec["rate_applied"] is False
    dense = recs["allreduce"]["dense_bytes"]
    assert recs["allreduce"]["payload_bytes_per_step"] == dense
    assert recs["dgc"]["payload_bytes_per_step"] < dense / 2
    assert recs["dgc"]["breakdown_s_per_step"]["encode"] > 0 and recs["dgc"]["evals"][0]["step"] == 3
    assert recs["dgc"]["reached"] == {"step": 3, "train_s": recs["dgc"]["evals"][0]["train_s"]}
    assert recs["allreduce"]["compute_step_s"] > 0
    # --breakdown's paired compute: one local compute step beside every measured step
    assert len(recs["dgc"]["paired_compute_step_s"]) == 4 and min(recs["dgc"]["paired_compute_step_s"]) > 0
    assert recs["allreduce"]["paired_compute_step_s"] is None


def test_ps_launchers_make_a_job_secret_on_one_node_and_demand_one_on_several():
    script = 'source launch/_python.sh && commlib_job_secret && echo "$COMMLIB_SECRET"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMLIB_SECRET") and k != "NNODES"}
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", r.stdout), r.stderr
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(env, NNODES="2"), capture_output=True, text=True)
    assert r.returncode != 0 and "COMMLIB_SECRET_FILE" in r.stderr
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(env, NNODES="2", COMMLIB_SECRET="x" * 32),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "x" * 32 + "\n"
    for name in ("ps_torchrun.sh", "ps_mpirun.sh"):
        assert "commlib_job_secret" in (ROOT / "launch" / name).read_text()
