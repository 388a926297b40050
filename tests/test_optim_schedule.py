"""The lr schedule of commlib.optim.schedule (warm-up then cosine decay, a pure function of the
step) and its use by the parameter server (docs/algorithms.md §5.4)."""
import math

import pytest
import torch

from commlib.errors import ConfigError
from commlib.optim.schedule import LRSchedule, warmup_cosine_factor
from commlib.ps.config import build_optimizer, build_schedule


def slow_factor(step, total, warmup):
    """The formula written out: linear ramp to 1 over W = max(1, floor(warmup * total)) steps,
    times half a cosine period from 1 (step 0) to 0 (step total)."""
    w = max(1, math.floor(warmup * total))
    ramp = (step + 1) / w if step + 1 < w else 1.0
    t = step if step < total else total
    return ramp * (math.cos(math.pi * t / total) + 1.0) / 2.0


@pytest.mark.parametrize("total,warmup", [(100, 0.05), (1600, 0.05), (7, 0.0), (10, 0.5), (1, 0.05)])
def test_factor_matches_the_formula(total, warmup):
    for step in list(range(0, total + 3)):
        assert warmup_cosine_factor(step, total, warmup) == pytest.approx(slow_factor(step, total, warmup), abs=1e-15)


def test_known_values():
    assert warmup_cosine_factor(0, 100) == pytest.approx(0.2)  # W = 5: first step 1/5 of the lr
    assert warmup_cosine_factor(4, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.04)))
    assert warmup_cosine_factor(50, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100) == 0.0 and warmup_cosine_factor(250, 100) == 0.0
    factors = [warmup_cosine_factor(s, 200) for s in range(10, 201)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # non-increasing after the warm-up


def test_schedule_sets_every_group_from_the_base_lrs_it_was_made_with():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.4}], momentum=0.9)
    sched = LRSchedule(opt, 100)
    assert sched.set(50) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.2])
    opt.load_state_dict(opt.state_dict())  # a resumed optimizer holds the last scheduled lr ...
    sched.set(0)  # ... the schedule still scales the lrs it was made with
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.08])
    const = LRSchedule(opt, 100, "constant")
    assert const.set(99) == 1.0 and [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.08])


def test_bad_schedules_are_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="schedule"):
        LRSchedule(opt, 10, "step")
    with pytest.raises(ConfigError, match="warmup"):
        LRSchedule(opt, 10, "cosine", warmup=1.0)
    with pytest.raises(ConfigError, match="warmup"):
        warmup_cosine_factor(0, 10, -0.1)
    with pytest.raises(ConfigError, match="total"):
        LRSchedule(opt, 0)
    with pytest.raises(ConfigError, match="step"):
        warmup_cosine_factor(-1, 10)


def test_async_defaults_to_cosine_sync_to_constant_and_the_spec_overrides():
    p = [torch.nn.Parameter(torch.zeros(3))]
    # the schedule keys are not optimizer arguments: build_optimizer leaves them to build_schedule
    opt = build_optimizer({"lr": 0.8, "warmup": 0.1, "schedule": "cosine"}, p, "async", 16)
    assert build_schedule({}, opt, "async", 10).kind == "cosine"
    assert build_schedule({}, opt, "sync", 10).kind == "constant"
    assert build_schedule({"schedule": "constant"}, opt, "async", 10).kind == "constant"
    s = build_schedule({"schedule": "cosine", "warmup": 0.2}, opt, "sync", 10)
    assert s.kind == "cosine" and s.warmup == 0.2
    assert s.base_lrs == [opt.param_groups[0]["lr"]]  # the converted per-push lr is what is scaled


def test_the_async_server_applies_the_schedule_by_its_version():
    from commlib.ps.config import PSConfig
    from commlib.ps.local import InprocJob

    task = {"name": "classification", "dataset": "digits", "width": 8, "batch": 8, "seed": 0}
    job = InprocJob(task, {"compressor": "identity"}, PSConfig(mode="async", steps=20, optimizer={"lr": 0.3}), 3)
    server = job.make_server()
    seen = []
    step = server.optimizer.step

    def record(*a, **kw):
        seen.append((server.version, server.optimizer.param_groups[0]["lr"]))
        return step(*a, **kw)

    server.optimizer.step = record
    assert job.run()["status"] == "done"
    base = job.server.schedule.base_lrs[0]
    assert base == pytest.approx(0.3 / 3 * 2.5)  # the async conversion happens first
    assert [v for v, _ in seen] == list(range(20))
    assert [lr for _, lr in seen] == pytest.approx([base * warmup_cosine_factor(v, 20) for v in range(20)])


def test_an_optimizer_handed_to_the_server_keeps_its_lr_unless_asked():
    from commlib import Scheme
    from commlib.comm.inproc import InprocHub
    from commlib.ps import ParameterServer, PSConfig
    from commlib.ps.task import ClassificationTask

    task = ClassificationTask(width=8, batch=8)
    for spec, kind in (({}, "constant"), ({"schedule": "cosine"}, "cosine")):
        model = task.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        server = ParameterServer(InprocHub(3).endpoint(0), Scheme.from_config({"compressor": "identity"}), model,
                                 PSConfig(mode="async", steps=5, optimizer=spec), optimizer=opt)
        assert server.schedule.kind == kind
