"""Differential privacy in the parameter server: each worker privatises its gradient before
it is encoded and pushed (per-sample clipping + noise: DP-SGD or EF-DPSGD from
``commlib.privacy``), so nothing un-noised ever leaves a worker.

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

Accounting (``delta`` given): every worker records each release in a
:class:`commlib.privacy.Accountant` (dp-accounting) at sampling rate ``batch / shard size``
(the inner task's shuffled shards, accounted as Poisson sampling like Opacus and most DP-SGD
code); ``PSWorker.report()["privacy"]`` has ε spent. Releases are counted when they leave the
worker, applied by the server or not.

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
        from commlib.privacy import PRIVACY_STAGES

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
        self.stages: Dict[int, Any] = {}  # one per worker id (in-process runs share this object)
        self._keys: Dict[int, StateKey] = {}  # worker -> state key its noise stream was seeded with
        self._prev: Dict[int, list] = {}  # DIFF2: each worker's parameters at its previous round
        self._accountants: Dict[int, Any] = {}
        self._server = None  # DIFF2's estimator, on the server
        probe = self._stage_cls(seed=0, **st)  # fail fast on bad options (refusals: noise without clipping, ...)
        if self.delta is not None:
            from commlib.privacy.accounting import Accountant

            if not probe.private:
                raise ConfigError("delta was given but the stage adds no noise or does not clip: "
                                  "nothing would be private")
            Accountant(self.delta, target_epsilon=self.target_epsilon)  # checks delta / target now
        #: a stage with a server half (DIFF2) counts rounds on both sides: every worker, every round
        self.requires_full_quorum = probe.server() is not None

    # ------------------------------------------------------------------ worker state
    def _new_stage(self, worker: int, key: StateKey):
        seed = None if self.secure else _mix_seed(self.seed, worker, 0x5EED, key[0], key[1])
        return self._stage_cls(seed=seed, secure=self.secure, **self._stage_opts)

    def _stage_for(self, worker: int):
        stage = self.stages.get(worker)
        if stage is None:
            stage = self.stages[worker] = self._new_stage(worker, self._keys.get(worker, (0, 0)))
        return stage

    def start_worker(self, worker: int, key: StateKey = (0, 0)) -> None:
        """A worker's privacy state starts (a new process, or a new state epoch ``key``): no
        error / round / previous point, a noise stream of its own for ``key``. The accountant
        keeps counting (it is about the data, not the process)."""
        self.stages.pop(worker, None)
        self._prev.pop(worker, None)
        self._keys[worker] = (int(key[0]), int(key[1]))

    def worker_state(self, worker: int) -> Dict[str, Any]:
        """The state a worker rolls back to (``PSWorker`` snapshots): the stage's error / round
        and DIFF2's previous point, but not its noise generator (never replayed)."""
        stage = self.stages.get(worker)
        st = None
        if stage is not None:
            st = stage.state_dict()
            st.pop("noise")
        prev = self._prev.get(worker)
        return {"stage": st, "prev": None if prev is None else [p.clone() for p in prev]}

    def load_worker_state(self, worker: int, state: Dict[str, Any]) -> None:
        """Roll a worker back to :meth:`worker_state`; its noise stream goes on where it is."""
        stage = self.stages.get(worker)
        if stage is not None:
            saved = state["stage"]
            if saved is None:  # back to before the first release: the initial state
                saved = dict(self._stage_cls(seed=0, **self._stage_opts).state_dict())
            stage.load_state_dict({**saved, "noise": stage.noise.state_dict()})
        if state["prev"] is None:
            self._prev.pop(worker, None)
        else:
            self._prev[worker] = [p.clone() for p in state["prev"]]

    # ------------------------------------------------------------------ accounting
    def sample_rate(self, n_workers: int) -> float:
        """q = batch / shard size: a sample's chance to be in one round's batches."""
        shard = self.inner.xtr.shape[0] // max(1, int(n_workers))
        batch = len(self.inner.batch_indices(0, n_workers, 0))
        if shard < 1 or batch < 1:
            raise ConfigError(f"no data to account: shard {shard}, batch {batch}")
        return min(1.0, batch / shard)

    def _record(self, worker: int, n_workers: int, stage: Any) -> None:
        if self.delta is None:
            return
        acc = self._accountants.get(worker)
        if acc is None:
            from commlib.privacy.accounting import Accountant

            acc = self._accountants[worker] = Accountant(self.delta, target_epsilon=self.target_epsilon,
                                                         dataset_size=int(self.inner.xtr.shape[0]))
        acc.record(stage.last_noise_multiplier, self.sample_rate(n_workers))

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
        from commlib.privacy import per_sample_grads, unflatten

        b = self.inner.batch_indices(worker, n_workers, step)
        x, y = self.inner.xtr[b], self.inner.ytr[b]
        if flip_labels:
            y = flip(y, self.inner.num_classes)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = per_sample_grads(model, F.cross_entropy, x, y, params)
        stage = self._stage_for(worker)
        previous = None
        if stage.needs_previous:  # DIFF2 difference round: same samples at x_{r-2}
            prev = self._prev.get(worker)
            if prev is None:
                raise ConfigError("DIFF2 difference round without a previous point: the worker missed a round")
            previous = per_sample_grads(model, F.cross_entropy, x, y, params, at=prev)
        v = stage.step(grads, previous)  # clipped + noised: all that leaves the worker
        self._record(worker, n_workers, stage)
        self._prev[worker] = [p.detach().clone() for p in params]
        with torch.no_grad():
            true_loss = F.cross_entropy(model(x), y)
        lin = sum((p * g.detach()).sum() for p, g in zip(params, unflatten(v, params)))
        return true_loss + lin - lin.detach()

    # ------------------------------------------------------------------ server half
    def _server_half(self):
        if self._server is None:
            self._server = self._stage_cls(seed=0, **self._stage_opts).server() or False
        return self._server

    def server_directions(self, dirs):
        """Server half (DIFF2's estimator ṽ) applied to the aggregated directions; identity for
        stages without one."""
        half = self._server_half()
        if half is False:
            return dirs
        flat = torch.cat([d.reshape(-1) for d in dirs])
        est = half.step(flat)
        return [e.view_as(d) for e, d in zip(torch.split(est, [d.numel() for d in dirs]), dirs)]

    def server_state(self) -> Optional[Dict[str, Any]]:
        """The server half's state for the server checkpoint (DIFF2's estimator and round)."""
        half = self._server_half()
        return None if half is False else half.state_dict()

    def load_server_state(self, state: Optional[Dict[str, Any]]) -> None:
        half = self._server_half()
        if half is False or state is None:
            if (half is False) != (state is None):
                raise ConfigError("the checkpoint's privacy server state does not match this task's stage")
            return
        half.load_state_dict(state)

    def restart_server(self) -> None:
        """A new state epoch: the server half starts over (DIFF2: the next round is a restart)."""
        half = self._server_half()
        if half is not False:
            self._server = self._stage_cls(seed=0, **self._stage_opts).server()

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return self.inner.evaluate(model)

    def spec(self) -> Dict[str, Any]:
        return {"name": "private", "task": self.inner_spec, "stage": self._stage_spec, "seed": self.seed,
                "secure": self.secure, "delta": self.delta, "target_epsilon": self.target_epsilon}
