"""A one-process, event-driven replica of the asynchronous parameter server, for tuning grids.

The real server (``commlib.ps``, ``benchmarks/async_braking_ps.py``) runs one thread per worker
and takes seconds per run; this replica reproduces its arithmetic without threads or sleeps:

* n workers start on version 0; worker w finishes a gradient after ``1 + jitter * Exp(1)`` time
  units; ``jitter=0`` makes every push exactly n - 1 versions old (a fixed delay). The default
  ``JITTER`` is calibrated on the real server of ``benchmarks/async_braking_ps.py``, whose
  staleness is far more regular than its sleep model suggests (likely because the threads share one
  interpreter): 16 workers, standard deviation of the staleness 1.8-2.1 real, 2.1 here; 4 workers,
  1.1 real, 0.6 here;
* the earliest finisher's gradient, computed on the weights it was sent, is applied at once with
  the server's optimizer (``commlib.ps.config.build_optimizer``), and the worker is sent the new
  weights; staleness = (server version) - (version the worker computed on);
* worker w's k-th gradient uses the task's minibatch of step k (k = 1, 2, ...), as the real
  worker does;
* ``mode="sync"``: rounds of the mean of the n workers' gradients at the same weights;
* the lr schedule is the server's (``commlib.ps.config.build_schedule``, a function of the
  version), over the run's optimizer steps (sync: evals // n rounds; async: evals pushes).

It uses the same task (``commlib.ps.task.ClassificationTask``), model initialisation and
optimizer construction as the real server; only the timing is simulated.
"""
from __future__ import annotations

import heapq
import random
import statistics
from typing import Any, Dict, List, Mapping, Tuple

import torch

from commlib.ps.config import build_optimizer, build_schedule
from commlib.ps.task import ClassificationTask

JITTER = 0.1


def replica_run(task_spec: Mapping[str, Any], n: int, optimizer: Mapping[str, Any], evals: int,
                seed: int, mode: str = "async", jitter: float = JITTER) -> Dict[str, Any]:
    """Train for ``evals`` gradient evaluations; returns test accuracy/loss, the staleness and
    (async AB) the mean braking factor in each quarter of the run."""
    spec = dict(task_spec, seed=seed)
    spec.pop("name", None)
    task = ClassificationTask(**spec)
    model = task.build_model()
    params = list(model.parameters())
    opt = build_optimizer(dict(optimizer), params, mode, n)
    schedule = build_schedule(dict(optimizer), opt, mode, evals // n if mode == "sync" else evals)
    staleness: List[int] = []
    factors: List[float] = []  # AB: mean braking factor 1 - rho cos over the tensors, per step
    if mode == "sync":
        for t in range(evals // n):
            opt.zero_grad(set_to_none=True)
            for w in range(n):  # the mean of n worker gradients at the same weights
                (task.loss(model, w, n, t) / n).backward()
            schedule.set(t)
            opt.step()
    else:
        worker_model = task.build_model()
        worker_params = list(worker_model.parameters())
        rng = random.Random(seed)

        def compute_time() -> float:
            return 1.0 + jitter * rng.expovariate(1.0) if jitter > 0 else 1.0

        sent: Dict[int, Tuple[int, List[torch.Tensor]]] = {}
        pushes = [0] * n
        queue: List[Tuple[float, int]] = []
        for w in range(n):
            sent[w] = (0, [p.detach().clone() for p in params])
            heapq.heappush(queue, (compute_time() + w * 1e-9, w))  # ties: lower worker first
        version = 0
        while version < evals:
            now, w = heapq.heappop(queue)
            v_sent, weights = sent[w]
            with torch.no_grad():
                for p, s in zip(worker_params, weights):
                    p.copy_(s)
            worker_model.zero_grad(set_to_none=True)
            pushes[w] += 1
            task.loss(worker_model, w, n, pushes[w]).backward()
            staleness.append(version - v_sent)
            for p, q in zip(params, worker_params):
                p.grad = q.grad
            schedule.set(version)
            opt.step()
            used = [float(opt.state[p]["braking_factor"]) for p in params if "braking_factor" in opt.state[p]]
            if used:
                factors.append(statistics.fmean(used))
            opt.zero_grad(set_to_none=True)
            version += 1
            sent[w] = (version, [p.detach().clone() for p in params])
            heapq.heappush(queue, (now + compute_time(), w))
    metrics = task.evaluate(model)
    acc = metrics["accuracy"] if metrics["loss"] == metrics["loss"] else 0.0  # NaN loss: diverged
    q = len(factors) // 4
    return {"test_accuracy": acc, "test_loss": metrics["loss"],
            "mean_staleness": statistics.fmean(staleness) if staleness else 0.0,
            "max_staleness": max(staleness) if staleness else 0,
            "braking_factor_by_quarter": [statistics.fmean(factors[i * q:(i + 1) * q]) for i in range(4)] if q else []}
