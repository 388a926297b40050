"""The parameter server's optimizer defaults (docs/algorithms.md §5.4): async mode converts the
synchronous lr and momentum per push (lr / n, momentum capped at 0.75 with the lr raised to keep
lr / (1 - m) per gradient); sync mode and ``lr_scaling="none"`` leave them alone."""
import pytest
import torch

from commlib.errors import ConfigError
from commlib.optim import AdaptiveBrakingSGD
from commlib.ps.config import build_optimizer


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_async_default_is_adaptive_braking_with_capped_momentum():
    opt = build_optimizer({"lr": 0.08}, params(), "async", n_workers=16)
    assert isinstance(opt, AdaptiveBrakingSGD)
    g = opt.param_groups[0]
    # synchronous momentum 0.9 -> 0.75 per push; lr 0.08 / 16 * (1 - 0.75) / (1 - 0.9)
    assert g["lr"] == pytest.approx(0.0125) and g["rho"] == 1.0 and g["momentum"] == 0.75


@pytest.mark.parametrize("m,n", [(0.9, 4), (0.99, 16), (0.75, 16), (0.5, 2), (0.0, 8)])
def test_conversion_keeps_the_distance_per_gradient(m, n):
    """Steady state, constant gradient g: a push moves lr_push g / (1 - m_push); n pushes must
    move as far as one synchronous round, lr g / (1 - m), whatever the momentum becomes."""
    lr = 0.1
    opt = build_optimizer({"name": "sgd", "lr": lr, "momentum": m}, params(), "async", n)
    g = opt.param_groups[0]
    assert g["momentum"] == pytest.approx(min(m, 0.75))
    assert n * g["lr"] / (1 - g["momentum"]) == pytest.approx(lr / (1 - m))


def test_async_momentum_option_and_its_errors():
    g = build_optimizer({"lr": 0.08, "async_momentum": 0.9}, params(), "async", 16).param_groups[0]
    assert g["momentum"] == 0.9 and g["lr"] == pytest.approx(0.005)  # 0.9 kept: plain lr / n
    g = build_optimizer({"lr": 0.08, "async_momentum": 0.5}, params(), "async", 16).param_groups[0]
    assert g["momentum"] == 0.5 and g["lr"] == pytest.approx(0.08 / 16 * 5)
    with pytest.raises(ConfigError, match="async_momentum"):
        build_optimizer({"async_momentum": 1.0}, params(), "async", 4)
    with pytest.raises(ConfigError, match="async_momentum"):
        build_optimizer({"async_momentum": 0.5, "lr_scaling": "none"}, params(), "async", 4)
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer({"momentum": 1.0}, params(), "async", 4)


def test_async_scaling_applies_to_plain_sgd_and_can_be_turned_off():
    assert build_optimizer({"name": "sgd", "lr": 0.1}, params(), "async", 4).param_groups[0]["lr"] == pytest.approx(0.025)
    assert build_optimizer({"lr": 0.1, "lr_scaling": "none"}, params(), "async", 4).param_groups[0]["lr"] == 0.1


def test_sync_lr_is_never_scaled():
    opt = build_optimizer({"lr": 0.1, "momentum": 0.9}, params(), "sync", 16)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1


def test_one_async_worker_is_unscaled_and_bad_options_are_refused():
    g = build_optimizer({"lr": 0.1}, params(), "async", 1).param_groups[0]
    assert g["lr"] == 0.1 and g["momentum"] == 0.9  # no staleness: nothing to convert
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
    g = job.server.optimizer.param_groups[0]  # the lr the schedule scales (docs/algorithms.md §5.4)
    assert job.server.schedule.base_lrs == pytest.approx([0.3 / 3 * 2.5]) and g["momentum"] == 0.75
