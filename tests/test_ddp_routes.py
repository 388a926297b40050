"""The same checks on every route into the DDP hook, gathered checkpoints, and FSDP refusal
(2 gloo processes each)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commlib
from commlib.ddp.checks import CommlibWarning, HookNotRunWarning, check_optimizer
from commlib.errors import ConfigError
from commlib.local.cluster import launch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _step(model, opt, rank, step=0):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _write(path, rank, obj):
    with open(f"{path}.{rank}.json", "w") as f:
        json.dump(obj, f)


def _read(path, world=2):
    return [json.load(open(f"{path}.{r}.json")) for r in range(world)]


# -- one set of checks on every route -------------------------------------------------------
def _hookstate_double_momentum(rank, world, out):
    model = DDP(_net())
    state = commlib.ddp.HookState(commlib.Scheme("dgc", ratio=0.01, feedback="dgc"))
    model.register_comm_hook(state, commlib.ddp.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _step(model, opt, rank)
        res = "accepted"
    except ConfigError as exc:
        res = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _write(out, rank, {"res": res, "unchanged": unchanged})


def test_hookstate_route_refuses_double_momentum_at_the_first_step(tmp_path):
    out = str(tmp_path / "r")
    launch(_hookstate_double_momentum, 2, out, errdir=str(tmp_path / "err"))
    for r in _read(out):
        assert r["res"].startswith("double momentum"), r
        assert r["unchanged"]  # refused before the optimizer touched the weights


def _hook_never_installed(rank, world, out):
    model = DDP(_net())
    state = commlib.ddp.HookState(commlib.Scheme("topk", ratio=0.1, feedback="ef"))  # built, never registered
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, opt, rank, 0)
        _step(model, opt, rank, 1)
    n = sum(isinstance(w.message, HookNotRunWarning) for w in caught)
    # installed: no warning
    model2 = DDP(_net())
    commlib.ddp.register(model2, commlib.Scheme("topk", ratio=0.1, feedback="ef"), optimizer=None)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught2:
        warnings.simplefilter("always")
        _step(model2, opt2, rank, 0)
    n2 = sum(isinstance(w.message, HookNotRunWarning) for w in caught2)
    _write(out, rank, {"warned": n, "warned_installed": n2, "runs": state.hook_runs})


def test_hook_that_never_ran_warns_once(tmp_path):
    out = str(tmp_path / "r")
    launch(_hook_never_installed, 2, out, errdir=str(tmp_path / "err"))
    for r in _read(out):
        assert r == {"warned": 1, "warned_installed": 0, "runs": 0}


def test_ef21_with_heavy_ball_momentum_at_high_sparsity_warns_naming_the_fix():
    params = [nn.Parameter(torch.zeros(3))]
    bad = commlib.Scheme("dgc", ratio=0.001, feedback="ef21")
    with pytest.warns(CommlibWarning, match="feedback='ef'"):
        check_optimizer(bad, torch.optim.SGD(params, lr=0.1, momentum=0.9))
    with pytest.warns(CommlibWarning):
        check_optimizer(commlib.Scheme("topk", ratio=0.005, feedback="econtrol"), torch.optim.Adam(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_optimizer(bad, torch.optim.SGD(params, lr=0.1))  # no momentum: fine
        sgdm = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        check_optimizer(commlib.Scheme("dgc", ratio=0.001, feedback="ef"), sgdm)
        check_optimizer(commlib.Scheme("topk", ratio=0.01, feedback="ef21"), sgdm)


# -- gathered checkpoints and load checks -----------------------------------------------------
def _gather_roundtrip(rank, world, out):
    scheme = commlib.Scheme("topk", ratio=0.1, feedback="ef")
    model = DDP(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = commlib.ddp.register(model, scheme, optimizer=opt)
    for s in range(3):
        _step(model, opt, rank, s)
    blob = commlib.ddp.gather_state(state)
    own = state.state_dict()
    fresh = commlib.ddp.HookState(commlib.Scheme("topk", ratio=0.1, feedback="ef"), model=model)
    commlib.ddp.load_gathered_state(fresh, blob)
    restored = fresh.state_dict()
    same = all(torch.equal(own["worker"]["state"][k][s], restored["worker"]["state"][k][s])
               for k in own["worker"]["state"] for s in own["worker"]["state"][k])
    errors = {}
    other = blob["ranks"][1 - rank]
    for name, call in {
        "other_rank": lambda: fresh.load_state_dict(other),
        "other_world": lambda: fresh.load_state_dict(dict(own, world_size=4)),
        "other_scheme": lambda: commlib.ddp.HookState(commlib.Scheme("topk", ratio=0.2, feedback="ef"),
                                                      model=model).load_state_dict(own),
        "gathered_world": lambda: commlib.ddp.load_gathered_state(
            fresh, dict(blob, world_size=3, ranks=blob["ranks"] + [own])),
        "not_gathered": lambda: commlib.ddp.load_gathered_state(fresh, own),
    }.items():
        try:
            call()
            errors[name] = None
        except ConfigError as exc:
            errors[name] = str(exc)
    _write(out, rank, {"same": same, "ranks": [r["rank"] for r in blob["ranks"]], "errors": errors,
                       "differs": not torch.equal(blob["ranks"][0]["worker"]["state"]["0.weight"]["e"],
                                                  blob["ranks"][1]["worker"]["state"]["0.weight"]["e"])})


def test_gather_state_and_load_gathered_state(tmp_path):
    out = str(tmp_path / "r")
    launch(_gather_roundtrip, 2, out, errdir=str(tmp_path / "err"))
    for r in _read(out):
        assert r["same"] and r["ranks"] == [0, 1] and r["differs"]
        e = r["errors"]
        assert "saved by rank" in e["other_rank"]
        assert "world size 4" in e["other_world"]
        assert "state was saved for" in e["other_scheme"]
        assert "gathered from 3 ranks" in e["gathered_world"]
        assert "not a commlib.ddp.gather_state object" in e["not_gathered"]


# -- FSDP --------------------------------------------------------------------------------------
def _fsdp(rank, world, out):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    res = {}
    for strategy in (ShardingStrategy.NO_SHARD, ShardingStrategy.FULL_SHARD):
        model = FSDP(_net(), sharding_strategy=strategy, device_id=torch.device("cpu"))
        try:
            commlib.ddp.register(model, commlib.Scheme("topk", ratio=0.1, feedback="ef"))
            res[f"register_{strategy.name}"] = "accepted"
        except ConfigError as exc:
            res[f"register_{strategy.name}"] = str(exc)
        model.register_comm_hook(commlib.ddp.HookState(commlib.Scheme("topk", ratio=0.1, feedback="ef")),
                                 commlib.ddp.hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            _step(model, opt, rank)
            res[f"hook_{strategy.name}"] = "accepted"
        except Exception as exc:  # noqa: BLE001 - the test asserts the type below
            res[f"hook_{strategy.name}"] = f"{type(exc).__name__}: {exc}"
    try:  # the Lightning callback, given a strategy whose model FSDP wrapped
        from types import SimpleNamespace

        from commlib.integrations.lightning import CommlibCallback

        trainer = SimpleNamespace(strategy=SimpleNamespace(model=model), optimizers=[])
        try:
            CommlibCallback(commlib.Scheme("topk", ratio=0.1, feedback="ef")).on_fit_start(trainer, None)
            res["lightning"] = "accepted"
        except ConfigError as exc:
            res["lightning"] = str(exc)
    except ImportError:
        pass
    _write(out, rank, res)


def test_fsdp_is_refused_on_every_route_with_the_reason(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "r")
    launch(_fsdp, 2, out, errdir=str(tmp_path / "err"))
    for r in _read(out):
        for key, msg in r.items():
            assert "FSDP is not supported" in msg, (key, msg)
            if key.startswith("hook_"):
                assert msg.startswith("ConfigError"), msg
