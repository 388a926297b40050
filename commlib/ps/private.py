"""Differential privacy in the parameter server: each worker privatises its gradient before
it is encoded and pushed, through its own ``commlib.privacy.PrivacyPipeline`` (per-sample
grads -> stage -> accountant), so nothing un-noised ever leaves a worker; the stage's
server half (DIFF2's estimator) runs on the server.

It is a Task wrapper, so the worker loop is unchanged: ``loss()`` computes the per-sample
gradients of the inner task's batch, runs the stage, and returns a surrogate whose value is
the batch loss and whose gradient is exactly the privatised vector v:
    surrogate = L.detach() + sum_p <p, v_p> - sum_p <p, v_p>.detach()

Noise streams: each worker's stage is seeded from ``seed``, its worker id and the server's
(incarnation, state epoch) at which its state last started (or drawn from the OS CSPRNG with
``secure=True``). Two releases must never share a noise draw (their difference would reveal
the clipped gradients): so a worker that rolls its state back (a push the server did not
keep) restores its error/round state but *not* its noise generator, and a restarted worker
process, which cannot know where its predecessor's stream stopped, makes the server start a
new state epoch (``restarts_state_on_rejoin``) whose key reseeds every worker.

    task = {"name": "private", "task": {"name": "classification"},
            "stage": {"name": "dpsgd", "clip": 1.0, "sigma": 1.1}, "seed": 7, "delta": 1e-5}

Accounting (``delta`` given): every worker's pipeline records each release in a
:class:`commlib.privacy.Accountant` (dp-accounting) as the stage describes it: releases the
stage declares subsampled at rate ``batch / shard size`` (the inner task's shuffled shards,
accounted as Poisson sampling like Opacus and most DP-SGD code), the others (EF-DPSGD) at
q = 1; ``PSWorker.report()["privacy"]`` has ε spent. Releases are counted when they leave
the worker, applied by the server or not.

DIFF2 (Murata & Suzuki 2023): each worker also computes its batch's per-sample gradients at
the previous round's point (kept per worker), and the server keeps the estimator
(``server_directions``, called by the server before its optimizer step). Its restart schedule
counts rounds on both sides, so DIFF2 needs every worker in every round: the server refuses a
quorum below n and asynchronous mode (``requires_full_quorum``). The estimator is in the
server checkpoint and the workers' round counters and previous points are in their rollback
snapshots, so a server restart continues the period; a new state epoch restarts it on both
sides (a restart round).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from commlib.errors import ConfigError
from commlib.privacy import PRIVACY_STAGES, PrivacyPipeline, PrivacyStage, ServerHalf, model_grads_at, unflatten
from commlib.ps.task import TASKS, Task, build_task
from commlib.scheme import _mix_seed

#: (server incarnation, state epoch) at which a worker's privacy state started
StateKey = Tuple[int, int]


@TASKS.register("private")
class PrivateTask(Task):
    """Wraps a task whose batches are ``batch_indices(worker, n, step)`` into ``xtr``/``ytr``
    with cross-entropy loss (e.g. ``classification``).

    Args:
        task: the inner task's spec.
        stage: the privacy stage's spec (``{"name": "dpsgd" | "efdpsgd" | "diff2", ...}``).
        seed: base seed of the workers' noise (mixed per worker and state epoch).
        secure: draw noise from the OS CSPRNG instead (no seed).
        delta: δ of the (ε, δ) accounting; None: no accounting.
        target_epsilon: reported as ``over_budget`` once ε spent exceeds it.
    """

    #: a worker process that comes back without its state makes the server start a new state epoch
    restarts_state_on_rejoin = True
    #: gradient coding recomputes a partition on several workers: each copy would be a release
    #: with its own noise (and its own error-feedback state), unaccounted per data owner
    supports_coding = False
    coding_refusal = "a private task releases noised gradients per worker; coded copies would be extra releases"

    def __init__(self, task: Dict[str, Any], stage: Dict[str, Any], seed: int = 0, secure: bool = False,
                 delta: Optional[float] = None, target_epsilon: Optional[float] = None) -> None:
        self.inner = build_task(task)
        for attr in ("batch_indices", "xtr", "ytr"):
            if not hasattr(self.inner, attr):
                raise ConfigError(f"the private wrapper needs a task with {attr!r} (e.g. 'classification')")
        st = dict(stage)
        name = st.pop("name", None)
        if name is None:
            raise ConfigError("stage spec needs a 'name' (dpsgd, efdpsgd, diff2)")
        for key in ("seed", "secure"):
            if key in st:
                raise ConfigError(f"give {key!r} on the private task, not in the stage (it is mixed per worker)")
        self._stage_cls = PRIVACY_STAGES.get(name)
        self._stage_opts = st
        self._stage_spec = dict(stage)
        self.inner_spec = dict(task)
        self.seed, self.secure = int(seed), bool(secure)
        self.delta = None if delta is None else float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.pipelines: Dict[int, PrivacyPipeline] = {}  # one per worker id (in-process runs share this object)
        self._keys: Dict[int, StateKey] = {}  # worker -> state key its noise stream was seeded with
        self._accountants: Dict[int, Any] = {}  # per worker, across its pipelines (it is about the data)
        probe = self._stage_cls(seed=0, **st)  # fail fast on bad options (refusals: noise without clipping, ...)
        if self.delta is not None:
            from commlib.privacy.accounting import Accountant

            if not probe.private:
                raise ConfigError("delta was given but the stage adds no noise or does not clip: "
                                  "nothing would be private")
            probe.require_accountable()  # a stage without a proven sensitivity: no ε to report
            Accountant(self.delta, target_epsilon=self.target_epsilon)  # checks delta / target now
        #: a stage whose server half counts rounds with the workers (DIFF2): every worker, every round
        self.requires_full_quorum = probe.needs_full_quorum
        self._server: Optional[ServerHalf] = probe.make_server()  # on the server

    @property
    def stages(self) -> Dict[int, PrivacyStage]:
        """Each worker's stage (read-only view)."""
        return {w: p.stage for w, p in self.pipelines.items()}

    # ------------------------------------------------------------------ worker state
    def _accountant(self, worker: int) -> Optional[Any]:
        if self.delta is None:
            return None
        acc = self._accountants.get(worker)
        if acc is None:
            from commlib.privacy.accounting import Accountant

            acc = self._accountants[worker] = Accountant(self.delta, target_epsilon=self.target_epsilon,
                                                         dataset_size=int(self.inner.xtr.shape[0]))
        return acc

    def _pipeline_for(self, worker: int) -> PrivacyPipeline:
        pipe = self.pipelines.get(worker)
        if pipe is None:
            key = self._keys.get(worker, (0, 0))
            seed = None if self.secure else _mix_seed(self.seed, worker, 0x5EED, key[0], key[1])
            stage = self._stage_cls(seed=seed, secure=self.secure, **self._stage_opts)
            # the server half runs on the server; the sampling rate is set per round (it depends on n)
            pipe = self.pipelines[worker] = PrivacyPipeline(stage, accountant=self._accountant(worker), server=None)
        return pipe

    def _stage_for(self, worker: int) -> PrivacyStage:
        return self._pipeline_for(worker).stage

    def start_worker(self, worker: int, key: StateKey = (0, 0)) -> None:
        """A worker's privacy state starts (a new process, or a new state epoch ``key``): no
        error / round / previous point, a noise stream of its own for ``key``. The accountant
        keeps counting (it is about the data, not the process)."""
        self.pipelines.pop(worker, None)
        self._keys[worker] = (int(key[0]), int(key[1]))

    def worker_state(self, worker: int) -> Dict[str, Any]:
        """The state a worker rolls back to (``PSWorker`` snapshots): the stage's error / round
        and DIFF2's previous point, but not its noise generator (never replayed)."""
        pipe = self.pipelines.get(worker)
        return {"pipeline": None if pipe is None else pipe.rollback_state()}

    def load_worker_state(self, worker: int, state: Dict[str, Any]) -> None:
        """Roll a worker back to :meth:`worker_state`; its noise stream goes on where it is."""
        pipe = self.pipelines.get(worker)
        if pipe is None:
            return
        if state.get("pipeline") is None:  # back to before the first release: the initial state
            pipe.reset()
        else:
            pipe.load_rollback_state(state["pipeline"])

    # ------------------------------------------------------------------ accounting
    def sample_rate(self, n_workers: int) -> float:
        """q = batch / shard size: a sample's chance to be in one round's batches."""
        shard = self.inner.xtr.shape[0] // max(1, int(n_workers))
        batch = len(self.inner.batch_indices(0, n_workers, 0))
        if shard < 1 or batch < 1:
            raise ConfigError(f"no data to account: shard {shard}, batch {batch}")
        return min(1.0, batch / shard)

    def privacy_report(self, worker: int) -> Optional[Dict[str, Any]]:
        """ε spent by ``worker``'s releases at ``delta`` (None without accounting)."""
        if self.delta is None:
            return None
        acc = self._accountants.get(worker)
        if acc is None:
            return {"epsilon": 0.0, "delta": self.delta, "releases": 0, "over_budget": False}
        return {"epsilon": acc.epsilon, "delta": self.delta, "releases": acc.steps,
                "over_budget": acc.over_budget, "target_epsilon": self.target_epsilon}

    # ------------------------------------------------------------------ the task
    def build_model(self) -> nn.Module:
        return self.inner.build_model()

    def loss(self, model: nn.Module, worker: int, n_workers: int, step: int, *, flip_labels: bool = False):
        from commlib.attacks import flip_labels as flip

        b = self.inner.batch_indices(worker, n_workers, step)
        x, y = self.inner.xtr[b], self.inner.ytr[b]
        if flip_labels:
            y = flip(y, self.inner.num_classes)
        params = [p for p in model.parameters() if p.requires_grad]
        pipe = self._pipeline_for(worker)
        pipe.sample_rate = self.sample_rate(n_workers)
        pipe.normalizer = float(len(b))  # fixed-size batches: the size is public
        # clipped + noised and accounted: all that leaves the worker
        v = pipe.release(model_grads_at(model, F.cross_entropy, x, y, params), params)
        with torch.no_grad():
            true_loss = F.cross_entropy(model(x), y)
        lin = sum((p * g.detach()).sum() for p, g in zip(params, unflatten(v, params)))
        return true_loss + lin - lin.detach()

    # ------------------------------------------------------------------ server half
    def server_directions(self, dirs):
        """Server half (DIFF2's estimator ṽ) applied to the aggregated directions; identity for
        stages without one."""
        if self._server is None:
            return dirs
        flat = torch.cat([d.reshape(-1) for d in dirs])
        est = self._server.step(flat)
        return [e.view_as(d) for e, d in zip(torch.split(est, [d.numel() for d in dirs]), dirs)]

    def server_state(self) -> Optional[Dict[str, Any]]:
        """The server half's state for the server checkpoint (DIFF2's estimator and round)."""
        return None if self._server is None else self._server.state_dict()

    def load_server_state(self, state: Optional[Dict[str, Any]]) -> None:
        if (self._server is None) != (state is None):
            raise ConfigError("the checkpoint's privacy server state does not match this task's stage")
        if self._server is not None:
            self._server.load_state_dict(state)

    def restart_server(self) -> None:
        """A new state epoch: the server half starts over (DIFF2: the next round is a restart)."""
        if self._server is not None:
            self._server = self._stage_cls(seed=0, **self._stage_opts).make_server()

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return self.inner.evaluate(model)

    def spec(self) -> Dict[str, Any]:
        return {"name": "private", "task": self.inner_spec, "stage": self._stage_spec, "seed": self.seed,
                "secure": self.secure, "delta": self.delta, "target_epsilon": self.target_epsilon}
