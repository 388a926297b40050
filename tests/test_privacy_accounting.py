"""Accounting through dp-accounting: ε matches the library's direct computation; refusals."""
from __future__ import annotations

import math

import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant  # noqa: E402
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant  # noqa: E402

from commlib.errors import ConfigError  # noqa: E402
from commlib.privacy import DIFF2Worker  # noqa: E402
from commlib.privacy.accounting import (  # noqa: E402
    Accountant,
    PrivacyWarning,
    calibrate_diff2,
    calibrate_sigma,
    diff2_epsilon,
    epsilon,
)


def _direct_dpsgd_eps(sigma, delta, q, steps, acc=RdpAccountant):
    ev = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    return acc().compose(ev, steps).get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (0.8, 0.05, 300), (4.0, 0.2, 50)])
def test_epsilon_matches_library_rdp(sigma, q, steps):
    assert epsilon(sigma, 1e-5, q, steps) == pytest.approx(_direct_dpsgd_eps(sigma, 1e-5, q, steps), rel=1e-12)


def test_epsilon_matches_library_pld_and_opacus_rdp():
    assert epsilon(1.0, 1e-5, 0.02, 200, method="pld") == pytest.approx(
        _direct_dpsgd_eps(1.0, 1e-5, 0.02, 200, PLDAccountant), rel=1e-9)
    from opacus.accountants import RDPAccountant  # an independent implementation

    op = RDPAccountant()
    op.history = [(1.0, 0.02, 200)]
    assert epsilon(1.0, 1e-5, 0.02, 200) == pytest.approx(op.get_epsilon(1e-5), rel=1e-4)


def test_full_batch_is_plain_gaussian_composition():
    direct = RdpAccountant().compose(dp_event.GaussianDpEvent(30.0), 100).get_epsilon(1e-5)
    assert epsilon(30.0, 1e-5, 1.0, 100) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("target", [2.0, 5.0])
def test_calibrate_sigma_hits_target(target):
    sigma = calibrate_sigma(target, 1e-5, 0.05, 400, tol=1e-4)
    assert epsilon(sigma, 1e-5, 0.05, 400) <= target
    assert epsilon(sigma - 2e-4, 1e-5, 0.05, 400) > target  # minimal within tol
    assert epsilon(sigma, 1e-5, 0.05, 400) > target - 0.02


def test_diff2_composed_event_matches_direct_composition():
    s1, s2, q, rounds, period = 1.2, 2.5, 0.1, 10, 4
    restarts = 0
    w = DIFF2Worker(1.0, 1.0, 1.0, 1.0, period=period)
    for _ in range(rounds):
        restarts += not w.needs_previous
        w.round += 1
    assert restarts == math.ceil(rounds / period) == 3
    acc = RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s1)), restarts)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s2)), rounds - restarts)
    assert diff2_epsilon(s1, s2, 1e-5, q, rounds, period) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # equal multipliers, or every round a restart, reduce to DP-SGD
    assert diff2_epsilon(1.3, 1.3, 1e-5, q, rounds, period) == pytest.approx(epsilon(1.3, 1e-5, q, rounds), rel=1e-12)
    assert diff2_epsilon(1.3, 9.9, 1e-5, q, rounds, 1) == pytest.approx(epsilon(1.3, 1e-5, q, rounds), rel=1e-12)


def test_calibrate_diff2():
    s1, s2 = calibrate_diff2(3.0, 1e-5, 1.0, 60, 6, ratio=2.0)
    assert s2 == pytest.approx(2.0 * s1)
    eps = diff2_epsilon(s1, s2, 1e-5, 1.0, 60, 6)
    assert 2.97 < eps <= 3.0


def test_accountant_tracks_spent_epsilon_and_round_trips():
    acc = Accountant(1e-5, target_epsilon=2.0)
    for k in range(1, 301):
        acc.record(1.1, 0.01)
        if k in (1, 50, 300):
            assert acc.epsilon == pytest.approx(epsilon(1.1, 1e-5, 0.01, k), rel=1e-12)
    assert acc.ledger == [[1.1, 0.01, 300]] and not acc.over_budget
    acc.record(0.9, 0.02, count=2000)
    mixed = RdpAccountant()
    mixed.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 300)
    mixed.compose(dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(0.9)), 2000)
    assert acc.epsilon == pytest.approx(mixed.get_epsilon(1e-5), rel=1e-12)
    assert acc.over_budget
    restored = Accountant(1e-3)
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon == acc.epsilon and restored.steps == 2300


def test_refusals():
    with pytest.raises(ConfigError, match="missing"):
        calibrate_sigma(2.0, None, 0.01, 100)
    with pytest.raises(ConfigError, match="missing"):
        Accountant(None)
    for bad_delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ConfigError):
            epsilon(1.0, bad_delta, 0.01, 10)
    for bad_eps in (0.0, -1.0, math.inf, None):
        with pytest.raises(ConfigError):
            calibrate_sigma(bad_eps, 1e-5, 0.01, 100)
    with pytest.raises(ConfigError, match="not private"):
        Accountant(1e-5, target_epsilon=2.0).record(0.0)
    with pytest.raises(ConfigError, match="not private"):
        epsilon(0.0, 1e-5, 0.01, 10)
    with pytest.raises(ConfigError):
        diff2_epsilon(1.0, 0.0, 1e-5, 1.0, 10, 3)
    for bad_q in (0.0, 1.5):
        with pytest.raises(ConfigError):
            epsilon(1.0, 1e-5, bad_q, 10)
    for bad_steps in (0, 2.5):
        with pytest.raises(ConfigError):
            epsilon(1.0, 1e-5, 0.01, bad_steps)
    with pytest.raises(ConfigError):
        epsilon(1.0, 1e-5, 0.01, 10, method="moments")
    with pytest.raises(ConfigError):
        calibrate_diff2(2.0, 1e-5, 0.1, 10, 3, ratio=0.0)


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(PrivacyWarning, match="1/N"):
        calibrate_sigma(2.0, 1e-3, 0.1, 10, dataset_size=1000)
    with pytest.warns(PrivacyWarning):
        Accountant(0.01, dataset_size=100)


def test_accountant_records_each_release_as_its_stage_declares_it():
    """No name-based mapping: DP-SGD/DIFF2 releases are Poisson-subsampled at q, EF-DPSGD's are
    unsampled (q = 1) whatever q the runtime passes; the ε is the library's for exactly that."""
    import torch

    from commlib.privacy import DPSGD, EFDPSGD, PrivacyPipeline, Release
    from commlib.privacy.accounting import calibrate_stage_sigma, release_event

    g = torch.randn(4, 6)
    for stage, q_expected in [(DPSGD(1.0, 1.3, seed=0), 0.05), (EFDPSGD(1.0, 1.0, 1.3, seed=0), 1.0)]:
        acc = Accountant(1e-5)
        pipe = PrivacyPipeline(stage, accountant=acc, sample_rate=0.05, normalizer=4.0)
        for _ in range(7):
            pipe.release(lambda at: g, [])
        assert acc.ledger == [[1.3, q_expected, 7]]
        assert acc.epsilon == pytest.approx(epsilon(1.3, 1e-5, q_expected, 7), rel=1e-12)
    d2 = DIFF2Worker(1.0, 0.1, 1.2, 2.5, period=3, seed=0)
    acc = Accountant(1e-5)
    pipe = PrivacyPipeline(d2, accountant=acc, sample_rate=0.1, normalizer=4.0)
    for _ in range(10):
        pipe.release(lambda at: g, [torch.zeros(1)])
    assert acc.epsilon == pytest.approx(diff2_epsilon(1.2, 2.5, 1e-5, 0.1, 10, 3), rel=1e-12)
    # calibration follows the same declaration
    assert calibrate_stage_sigma(EFDPSGD, 3.0, 1e-5, 0.05, 50) == pytest.approx(calibrate_sigma(3.0, 1e-5, 1.0, 50))
    assert calibrate_stage_sigma(DPSGD, 3.0, 1e-5, 0.05, 50) == pytest.approx(calibrate_sigma(3.0, 1e-5, 0.05, 50))
    with pytest.raises(ConfigError, match="protects nothing"):
        release_event(Release("gradient", 1.0, math.inf, True))
    with pytest.raises(ConfigError, match="no release"):
        Accountant(1e-5).record_release(None)


def test_subsampled_accounting_refuses_the_realised_batch_size():
    """Poisson batches: the realised size is data-dependent, so it cannot be the normaliser."""
    from commlib.errors import ConfigError
    from commlib.privacy import DPSGD
    from commlib.privacy.accounting import Accountant
    from commlib.privacy.pipeline import PrivacyPipeline

    with pytest.raises(ConfigError, match="public normaliser"):
        PrivacyPipeline(DPSGD(clip=1.0, sigma=1.0, seed=0), accountant=Accountant(1e-5), sample_rate=0.1)
    PrivacyPipeline(DPSGD(clip=1.0, sigma=1.0, seed=0), accountant=Accountant(1e-5), sample_rate=0.1,
                    normalizer=10.0)  # q·N given: fine
