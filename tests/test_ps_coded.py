"""Gradient coding in the sync parameter server (commlib/ps/coded.py; Tandon et al. 2017):
the coded run with injected stragglers gives the weights of the uncoded run that waits for
every worker (float32 to 1e-6, float64 to 1e-12), the decoded gradient equals the sum of the
partition gradients for every straggler set, fallbacks outside the model are counted, the
non-linear schemes are refused, and one short run on local Ray."""
import itertools
import os
import time

import pytest
import torch
import torch.nn as nn

from commlib.coding import make_gradient_code
from commlib.errors import ConfigError
from commlib.ps import InprocJob, PSConfig, Task, WorkerHooks
from commlib.ps.coded import CodedServer, CodedWorker

TESTS = os.path.dirname(os.path.abspath(__file__))
PLAIN = {"compressor": "identity", "feedback": "none", "aggregator": "mean"}


class TinyTask(Task):
    """Linear regression, 6 features, batch 8 per (worker, step); any dtype."""

    def __init__(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(3)
        self.dtype = dtype
        self.x = torch.randn(512, 6, generator=g, dtype=torch.float64).to(dtype)
        self.y = (self.x @ torch.arange(1.0, 7.0, dtype=dtype) + 0.1).unsqueeze(1)

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(6, 1).to(self.dtype)

    def loss(self, model, worker, n_workers, step, *, flip_labels=False):
        i = ((step * n_workers + worker) * 8) % 504
        return nn.functional.mse_loss(model(self.x[i:i + 8]), self.y[i:i + 8])


class Slow(WorkerHooks):
    """Sleep ``delay`` before computing at the given steps (a straggler)."""

    def __init__(self, steps, delay):
        self.steps, self.delay = set(steps), delay

    def before_compute(self, worker, step):
        if step in self.steps:
            time.sleep(self.delay)


def cfg(**kw):
    base = dict(steps=6, step_timeout=10.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=0.5,
                shutdown_timeout=2.0, max_misses=100)
    base.update(kw)
    return PSConfig(**base)


def direct_sgd(task, n, steps, lr=0.05):
    """Obviously-correct reference: full-batch SGD on the mean of the n partition gradients."""
    model = task.build_model()
    for t in range(steps):
        model.zero_grad()
        sum(task.loss(model, p, n, t) for p in range(n)).div(n).backward()
        with torch.no_grad():
            for prm in model.parameters():
                prm -= lr * prm.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights(job):
    return {k: v.detach().clone() for k, v in job.server.model.state_dict().items()}


@pytest.mark.parametrize("coding,n,s", [("frc", 4, 1), ("cyclic", 3, 1), ("cyclic", 5, 2)])
def test_decoded_gradient_equals_partition_sum_for_every_straggler_set(coding, n, s):
    task = TinyTask(torch.float64)
    model = task.build_model()
    params = list(model.parameters())
    code = make_gradient_code(n, s, coding, seed=1)
    pushes = {w: CodedWorker(code, w).payloads(task, model, params, step=2)[0] for w in range(n)}
    ref = []  # direct: mean over partitions of each partition's gradient
    for j, prm in enumerate(params):
        acc = torch.zeros(prm.numel(), dtype=torch.float64)
        for p in range(n):
            model.zero_grad()
            task.loss(model, p, n, 2).backward()
            acc += params[j].grad.reshape(-1)
        ref.append(acc / n)
    server = CodedServer(code)
    numels = [p.numel() for p in params]
    for stragglers in itertools.combinations(range(n), s):
        got = {w: pl for w, pl in pushes.items() if w not in stragglers}
        for d, r in zip(server.decode(got, numels), ref):
            assert torch.allclose(d, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_coded_ps_with_stragglers_equals_uncoded_wait_for_all(dtype, tol):
    n, s = 4, 1
    if dtype == torch.float32:  # the uncoded sync PS that waits for all (it sums in float32)
        ref = InprocJob(TinyTask(dtype), PLAIN, cfg(), n)
        ref.run()
        want = weights(ref)
    else:  # float64: against direct SGD on the full gradient
        want = direct_sgd(TinyTask(dtype), n, 6)
    slow = {0: Slow([1, 2], 0.6), 3: Slow([4], 0.6)}  # at most one straggler per step
    job = InprocJob(TinyTask(dtype), PLAIN, cfg(coding="frc", straggler_tolerance=s), n, hooks=slow)
    t0 = time.monotonic()
    res = job.run()
    assert res["status"] == "done" and res["steps"] == 6
    assert res["coding"]["fallbacks"] == 0 and res["coding"]["decoded"] == 6
    assert res["coding"]["rounds_skipping_stragglers"] >= 3  # did not wait for the sleepers
    assert time.monotonic() - t0 < 6 * 0.6  # never waited a whole straggler delay per round
    a, b = want, weights(job)
    for k in a:
        assert b[k].dtype == dtype
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), k


def test_pattern_outside_model_falls_back_and_stays_exact():
    n = 3
    slow = {0: Slow([1], 0.8), 1: Slow([1], 0.8)}  # two stragglers at step 1, s = 1
    job = InprocJob(TinyTask(torch.float64), PLAIN,
                    cfg(steps=3, coding="cyclic", straggler_tolerance=1, step_timeout=0.3), n, hooks=slow)
    res = job.run()
    assert res["steps"] == 3 and res["coding"]["fallbacks"] == 1
    a, b = direct_sgd(TinyTask(torch.float64), n, 3), weights(job)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


@pytest.mark.parametrize("scheme,word", [
    ({"compressor": "topk", "ratio": 0.1, "feedback": "ef21"}, "compressor"),
    ({"compressor": "identity", "feedback": "ef"}, "feedback"),
    ({"aggregator": "cwmed"}, "aggregator"),
])
def test_non_linear_schemes_are_refused(scheme, word):
    with pytest.raises(ConfigError, match=word):
        InprocJob(TinyTask(), scheme, cfg(coding="auto", straggler_tolerance=1), 4).make_server()


def test_bad_coding_options_are_refused():
    with pytest.raises(ConfigError):
        PSConfig(coding="lt")
    with pytest.raises(ConfigError):
        PSConfig(coding="frc", mode="async")
    with pytest.raises(ConfigError):
        InprocJob(TinyTask(), PLAIN, cfg(coding="frc", straggler_tolerance=1), 3).make_server()  # 2 does not divide 3
    with pytest.raises(ConfigError):
        InprocJob(TinyTask(), PLAIN, cfg(coding="cyclic", straggler_tolerance=3), 3).make_server()


def run_on_local_ray(task, config, n, delays):
    """One PS run on a local Ray (started here if none runs); ``delays``: worker -> compute delays."""
    pytest.importorskip("ray")
    import ray

    from commlib.comm.ray_transport import ray_start
    from commlib.ps.ray_runner import run_ray
    from commlib.sim.driver import HOOKS_FACTORY

    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    started = ray_start(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        hooks = {w: {"factory": HOOKS_FACTORY, "options": {"compute_delays": d}} for w, d in delays.items()}
        return run_ray(task, PLAIN, config, n, hooks=hooks)
    finally:
        if started:
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_coded_ps_on_local_ray_with_stragglers():
    task = {"name": "classification", "dataset": "digits", "width": 16, "batch": 8, "seed": 1}
    config = cfg(steps=5, coding="frc", straggler_tolerance=1)
    res = run_on_local_ray(task, config, 4, {2: [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]})
    assert res["status"] == "done" and res["steps"] == 5
    assert res["coding"]["decoded"] == 5 and res["coding"]["fallbacks"] == 0
    ref = InprocJob(task, PLAIN, cfg(steps=5), 4)
    ref.run()
    want = ref.server.model.state_dict()
    for k, v in want.items():
        assert torch.allclose(res["model_state"][k], v, rtol=0, atol=1e-6), k
