"""The parameter server's optimizer defaults (docs/algorithms.md §5.4): async mode divides the
synchronous lr by the number of workers; sync mode and ``lr_scaling="none"`` leave it alone."""
import pytest
import torch

from commlib.errors import ConfigError
from commlib.optim import AdaptiveBrakingSGD
from commlib.ps.config import build_optimizer


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_async_default_is_adaptive_braking_at_lr_over_n():
    opt = build_optimizer({"lr": 0.08}, params(), "async", n_workers=16)
    assert isinstance(opt, AdaptiveBrakingSGD)
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(0.005) and g["rho"] == 1.0 and g["momentum"] == 0.9


def test_async_scaling_applies_to_plain_sgd_and_can_be_turned_off():
    assert build_optimizer({"name": "sgd", "lr": 0.1}, params(), "async", 4).param_groups[0]["lr"] == pytest.approx(0.025)
    assert build_optimizer({"lr": 0.1, "lr_scaling": "none"}, params(), "async", 4).param_groups[0]["lr"] == 0.1


def test_sync_lr_is_never_scaled():
    opt = build_optimizer({"lr": 0.1, "momentum": 0.9}, params(), "sync", 16)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1


def test_one_async_worker_is_unscaled_and_bad_options_are_refused():
    assert build_optimizer({"lr": 0.1}, params(), "async", 1).param_groups[0]["lr"] == 0.1
    with pytest.raises(ConfigError, match="lr_scaling"):
        build_optimizer({"lr_scaling": "sqrt"}, params(), "async", 4)
    with pytest.raises(ConfigError, match="n_workers"):
        build_optimizer({}, params(), "async", 0)


def test_the_server_scales_by_its_own_number_of_workers():
    from commlib.ps.config import PSConfig
    from commlib.ps.local import InprocJob

    job = InprocJob({"name": "classification", "dataset": "digits", "width": 8, "batch": 8, "seed": 0},
                    {"compressor": "identity"}, PSConfig(mode="async", steps=6, optimizer={"lr": 0.3}), 3)
    res = job.run()
    assert res["status"] == "done"
    assert job.server.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
