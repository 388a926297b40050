"""The sharded parameter server (commlib/ps/shards.py, sharded_local.py): key ranges, one shard
equals today's server bit for bit, three shards equal one (coordinate-wise rules bit for bit,
distance-based rules through the summed Gram matrix), the shards' agreement, checkpoints and
resume per shard, and what is refused."""

import pytest
import torch

from commlib.aggregate.points import Part, Points, vectors_in_parts
from commlib.errors import ConfigError
from commlib.ps import InprocJob, PSConfig, WorkerHooks
from commlib.ps.shards import InprocShardExchange, shard_ranges
from commlib.ps.sharded_local import ShardedInprocJob
from ps_task import DDPJobTask


def cfg(**kw):
    base = dict(steps=4, step_timeout=20.0, optimizer={"name": "sgd", "lr": 0.05}, worker_timeout=0.5,
                shutdown_timeout=2.0)
    base.update(kw)
    return PSConfig(**base)


def plain(scheme, n, config):
    job = InprocJob(DDPJobTask(), scheme, config, n)
    res = job.run()
    assert res["steps"] == config.steps
    return {k: v.detach().clone() for k, v in job.server.model.state_dict().items()}


def sharded(scheme, n, config, k):
    res = ShardedInprocJob(DDPJobTask(), scheme, config, n, k).run()
    assert res["status"] == "done" and res["steps"] == config.steps, res["status"]
    assert all(s["totals"]["applied"] == n * config.steps for s in res["shards"])
    return res["model_state"]


def close(a, b, atol=0.0):
    return all((torch.equal(a[k], b[k]) if atol == 0 else torch.allclose(a[k], b[k], rtol=0, atol=atol)) for k in a)


@pytest.mark.parametrize("numels,k", [([5, 5, 5, 5], 2), ([100, 1, 1, 1, 100], 3), ([2048, 64, 4096, 64, 256, 4], 3),
                                      ([7], 1), ([3, 9, 2, 8, 1], 5)])
def test_shard_ranges_are_contiguous_nonempty_and_minimise_the_largest_shard(numels, k):
    import itertools

    ranges = shard_ranges(numels, k)
    assert len(ranges) == k and ranges[0].start == 0 and ranges[-1].stop == len(numels)
    assert all(len(r) > 0 and a.stop == b.start for r, a, b in zip(ranges, ranges, ranges[1:] + [range(len(numels),
                                                                                                   len(numels))]))
    best = min(max(sum(numels[a:b]) for a, b in zip((0,) + c, c + (len(numels),)))
               for c in itertools.combinations(range(1, len(numels)), k - 1))  # brute force
    assert max(sum(numels[r.start:r.stop]) for r in ranges) == best
    with pytest.raises(ConfigError):
        shard_ranges(numels, len(numels) + 1)


def test_gram_and_distances_of_parts_sum_to_the_whole():
    import threading

    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.float64)
    x[2] *= 50  # a far row
    whole = Points(x)
    cuts = [0, 13, 29, 40]
    ex = InprocShardExchange(3, timeout=10)
    out = {}

    def part(i):
        with vectors_in_parts(Part(lambda t: ex.allreduce(i, t), cuts[i], 40)):
            p = Points(x[:, cuts[i]:cuts[i + 1]].clone())
            out[i] = (p.source.center, p.sq_dists(), p.sq_norms())

    threads = [threading.Thread(target=part, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        c, d, q = out[i]
        assert c == whole.source.center
        assert torch.allclose(d, whole.sq_dists(), rtol=1e-12, atol=1e-9)
        assert torch.allclose(q, whole.sq_norms(), rtol=1e-12)
        assert torch.equal(d, out[0][1])  # every part sees the same bits


def test_one_shard_equals_the_unsharded_server_bit_for_bit():
    scheme = {"compressor": "topk", "ratio": 0.1, "feedback": "ef21"}
    assert close(sharded(scheme, 3, cfg(), 1), plain(scheme, 3, cfg()))


@pytest.mark.parametrize("scheme", [
    {"compressor": "identity"},
    {"compressor": "topk", "ratio": 0.1, "feedback": "ef21"},
    {"aggregator": "cwmed"},
    {"aggregator": "trimmed-mean", "aggregator_options": {"f": 1}},
])
def test_three_shards_equal_one_bit_for_bit_for_per_coordinate_rules(scheme):
    one = sharded(scheme, 4, cfg(), 1)
    assert close(sharded(scheme, 4, cfg(), 3), one)


@pytest.mark.parametrize("scheme,atol", [
    ({"aggregator": "krum", "aggregator_options": {"f": 1}}, 0.0),
    ({"aggregator": "multi-krum", "aggregator_options": {"f": 1}}, 0.0),
    ({"aggregator": "nnm", "aggregator_options": {"f": 1, "base": "cwmed"}}, 0.0),
    ({"aggregator": "monna", "aggregator_options": {"f": 1}}, 0.0),
    ({"aggregator": "geomed"}, 1e-6),
    ({"aggregator": "flag", "aggregator_options": {"f": 1}}, 1e-6),
])
def test_three_shards_equal_one_for_distance_based_rules(scheme, atol):
    # the whole vectors' Gram matrix is the sum of the shards' partial ones, added in another
    # order than one pass over the whole rows: rules that select rows (Krum, NNM) pick the same
    # ones and come out bit for bit; rules whose weights are computed from the Gram values
    # (Weiszfeld, Flag's eigenvectors) agree to 1e-6 (about 1.5e-8 measured)
    n = 5
    one = sharded(scheme, n, cfg(), 1)
    three = sharded(scheme, n, cfg(), 3)
    assert close(three, one, atol=atol)
    assert close(one, plain(scheme, n, cfg()))  # one shard is the unsharded server


class Garble(WorkerHooks):
    """Flip a byte of the push of ``step`` (the receiver's CRC check rejects it)."""

    def __init__(self, step):
        self.step = step

    def before_send(self, worker, step, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if step == self.step else data


def test_a_push_one_shard_rejects_is_applied_by_no_shard():
    # worker 0's push of step 2 reaches shards 0 and 2 intact, shard 1 garbled: the shards agree
    # to leave it out everywhere, as the unsharded server leaves out a rejected push
    scheme, config = {"compressor": "identity"}, cfg(steps=4, max_misses=10, step_timeout=2.0)
    job = InprocJob(DDPJobTask(), scheme, config, 3, hooks={0: Garble(2)})
    ref = job.run()
    assert ref["totals"]["rejected"] == 1
    res = ShardedInprocJob(DDPJobTask(), scheme, config, 3, 3, hooks={0: {1: Garble(2)}}).run()
    rejected = [s["totals"]["rejected"] for s in res["shards"]]
    assert rejected == [0, 1, 0] and [s["shard"]["dropped"] for s in res["shards"]] == [1, 0, 1]
    assert all(s["workers"][0]["applied"] == 3 for s in res["shards"])
    assert close(res["model_state"], {k: v.detach() for k, v in job.server.model.state_dict().items()})


def test_shards_checkpoint_and_resume_each_to_the_uninterrupted_run(tmp_path):
    scheme = {"compressor": "identity"}
    full = sharded(scheme, 3, cfg(steps=6), 3)
    path = str(tmp_path / "server.pt")
    sharded(scheme, 3, cfg(steps=3, checkpoint=path), 3)
    assert all((tmp_path / f"server.pt.shard{i}").exists() for i in range(3))
    res = ShardedInprocJob(DDPJobTask(), scheme, cfg(steps=6, checkpoint=path, resume=True), 3, 3).run()
    assert res["steps"] == 6 and all(s["incarnation"] == 1 for s in res["shards"])
    assert close(res["model_state"], full)


def test_sharding_refuses_what_cannot_be_split_by_keys():
    with pytest.raises(ConfigError, match="async"):
        ShardedInprocJob(DDPJobTask(), {"compressor": "identity"}, cfg(mode="async"), 2, 2)
    with pytest.raises(ConfigError, match="coding"):
        ShardedInprocJob(DDPJobTask(), {"compressor": "identity"}, cfg(coding="auto", straggler_tolerance=1), 2, 2)
    with pytest.raises(ConfigError):
        ShardedInprocJob(DDPJobTask(), {"compressor": "identity"}, cfg(), 2, 7)  # 6 parameters
