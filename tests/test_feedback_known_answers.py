"""docs/algorithms.md §2 shared toy problem: n=2, f_i(x) = 1/2 ||x - c_i||^2, c1=(3,1), c2=(-1,2),
x0 = 0, gamma = 0.5, C = Top-1 (d = 2)."""
import pytest
import torch

from commlib import Scheme

C = [torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)]
GAMMA = 0.5


def run(feedback, steps, **fopts):
    scheme = Scheme("topk", ratio=0.5, feedback=feedback, feedback_options=fopts, compress_min_dim=1)
    workers = [scheme.worker(i, 2) for i in range(2)]
    server = scheme.server(2)
    x = torch.zeros(2, dtype=torch.float64)
    xs = [x.clone()]
    for _ in range(steps):
        payloads = [[w.encode_group(["x"], [x - c])[0]] for w, c in zip(workers, C)]
        d = server.decode_group(["x"], [2], payloads, dtype=torch.float64)[0]
        x = x - GAMMA * d
        for w in workers:
            w.end_step()
        server.end_step()
        xs.append(x.clone())
    return xs, workers, server


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_classic_ef_known_answer():
    xs, workers, _ = run("ef", 2)
    assert torch.allclose(xs[1], t(0.75, 0.5))
    assert torch.allclose(xs[2], t(0.625, 0.5))
    # docs/algorithms.md §2.2 gives e in step units (gamma * e here, since e is kept in gradient units)
    for w in workers:
        assert torch.allclose(GAMMA * w.state["x"]["e"], t(0.0, -0.75))


def test_ef21_known_answer():
    xs, workers, server = run("ef21", 2)
    assert torch.allclose(xs[1], t(0.5, 0.75))
    assert torch.allclose(xs[2], t(1.0, 1.125))
    assert torch.allclose(workers[0].state["x"]["g"], t(-3.0, -0.25))
    assert torch.allclose(workers[1].state["x"]["g"], t(1.0, -1.25))
    # one more step: g^2 = (0, -0.75)
    xs, workers, server = run("ef21", 3)
    assert torch.allclose(server.state["x"]["g"], t(0.0, -0.75))


def test_econtrol_known_answer():
    xs, workers, server = run("econtrol", 3, eta=0.5)
    assert torch.allclose(xs[2], t(1.0, 1.125))
    assert torch.allclose(xs[3], t(0.875, 1.5))
    for w in workers:
        assert torch.allclose(w.state["x"]["e"], t(0.25, 0.375))
    assert torch.allclose(workers[0].state["x"]["g"], t(-1.75, -0.25))
    assert torch.allclose(workers[1].state["x"]["g"], t(2.25, -1.25))


@pytest.mark.parametrize("feedback,opts", [("ef21", {}), ("econtrol", {"eta": 0.3}), ("ef21-sgdm", {"eta": 0.5}),
                                           ("ef21-w", {"smoothness": [1.0, 1.0]})])
def test_ef21_family_server_tracks_mean_of_workers(feedback, opts):
    xs, workers, server = run(feedback, 12, **opts)
    mean_g = sum(w.state["x"]["g"] for w in workers) / 2
    assert torch.allclose(server.state["x"]["g"], mean_g, atol=1e-12)


def test_econtrol_virtual_iterate_invariant():
    # x^t - gamma * mean e_i^t = x^0 - gamma * sum_{k<t} mean g_i^k   (any eta)
    for eta in (0.0, 0.2, 0.7):
        scheme = Scheme("topk", ratio=0.5, feedback="econtrol", feedback_options={"eta": eta}, compress_min_dim=1)
        workers = [scheme.worker(i, 2) for i in range(2)]
        server = scheme.server(2)
        x = torch.zeros(2, dtype=torch.float64)
        gsum = torch.zeros(2, dtype=torch.float64)
        for step in range(10):
            grads = [x - c for c in C]
            if step > 0:  # the first (uncompressed) step sets h; the invariant counts from x^1
                gsum += sum(grads) / 2
            payloads = [[w.encode_group(["x"], [g])[0]] for w, g in zip(workers, grads)]
            d = server.decode_group(["x"], [2], payloads, dtype=torch.float64)[0]
            if step == 0:
                x1 = x - GAMMA * d
                x = x1
                continue
            x = x - GAMMA * d
            mean_e = sum(w.state["x"]["e"] for w in workers) / 2
            assert torch.allclose(x - GAMMA * mean_e, x1 - GAMMA * gsum, atol=1e-12)


def test_classic_ef_invariant():
    scheme = Scheme("topk", ratio=0.5, feedback="ef", compress_min_dim=1)
    workers = [scheme.worker(i, 2) for i in range(2)]
    server = scheme.server(2)
    x = torch.zeros(2, dtype=torch.float64)
    gsum = torch.zeros(2, dtype=torch.float64)
    for _ in range(10):
        grads = [x - c for c in C]
        gsum += sum(grads) / 2
        payloads = [[w.encode_group(["x"], [g])[0]] for w, g in zip(workers, grads)]
        x = x - GAMMA * server.decode_group(["x"], [2], payloads, dtype=torch.float64)[0]
        mean_e = sum(w.state["x"]["e"] for w in workers) / 2
        assert torch.allclose(x - GAMMA * mean_e, -GAMMA * gsum, atol=1e-12)


def test_ef21_contraction_topk():
    # ||g_i^{t+1} - grad_i(x^{t+1})||^2 <= (1 - k/d) ||g_i^t - grad_i(x^{t+1})||^2
    torch.manual_seed(1)
    d, k = 50, 5
    scheme = Scheme("topk", ratio=k / d, feedback="ef21", compress_min_dim=1)
    w = scheme.worker(0, 1)
    w.encode_group(["x"], [torch.randn(d, dtype=torch.float64)])
    for _ in range(20):
        grad = torch.randn(d, dtype=torch.float64)
        before = (w.state["x"]["g"] - grad).pow(2).sum()
        w.encode_group(["x"], [grad])
        after = (w.state["x"]["g"] - grad).pow(2).sum()
        assert after <= (1 - k / d) * before + 1e-12


def test_ef21w_equal_weights_is_ef21():
    a, _, _ = run("ef21", 6)
    b, _, _ = run("ef21-w", 6, smoothness=[2.0, 2.0])
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-14)


def test_ef21w_server_is_weighted_sum():
    L = [1.0, 3.0]
    xs, workers, server = run("ef21-w", 8, smoothness=L)
    w = torch.tensor(L, dtype=torch.float64) / sum(L)
    expect = w[0] * workers[0].state["x"]["g"] + w[1] * workers[1].state["x"]["g"]
    assert torch.allclose(server.state["x"]["g"], expect, atol=1e-12)


def test_econtrol_identity_keeps_error_zero():
    scheme = Scheme("identity", feedback="econtrol", feedback_options={"eta": 0.5})
    w = scheme.worker(0, 1)
    for _ in range(5):
        w.encode_group(["x"], [torch.randn(7)])
        assert torch.count_nonzero(w.state["x"].get("e", torch.zeros(1))) == 0


def test_ef21_sgdm_eta1_is_ef21():
    a, _, _ = run("ef21", 6)
    b, _, _ = run("ef21-sgdm", 6, eta=1.0)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-14)
