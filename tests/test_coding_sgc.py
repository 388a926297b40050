"""Sequential gradient coding (Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv 2211.13802):
SR-SGC and M-SGC schedulers. Known loads, exact decoding (float64, 1e-10) under every
(B, W, lambda) pattern at tiny n and random ones at larger n, agreement with a slow direct
reference of the scheduling rules, and the fallback API for patterns outside the model."""
from __future__ import annotations

import copy
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from commlib.coding import (
    SGC_SCHEMES,
    BurstyStragglerModel,
    CyclicRepetitionCode,
    FractionalRepetitionCode,
    MultiplexedSGC,
    NotDecodable,
    SelectiveRepeatSGC,
    admits,
    iid_stragglers,
    make_gradient_code,
    msgc_d2_fraction,
    msgc_load,
    satisfies,
    srsgc_parameters,
)
from commlib.errors import ConfigError

TOL = 1e-10


def _grads(sched, jobs: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(jobs, sched.num_partitions, d, generator=g, dtype=torch.float64)


def _answer(task, grads):
    return task.compute({p: grads[task.job, p] for p in task.partitions})


def _play_round(sched, r, row, grads):
    for w, tasks in sched.assignment(r).items():
        if not row[w]:
            sched.receive(r, w, [_answer(t, grads) for t in tasks])
    sched.end_round(r)


def _run(sched, pattern, grads):
    """Play a whole pattern; return {job: decoded} for the jobs decodable by their deadline."""
    out = {}
    for r in range(sched.num_rounds):
        _play_round(sched, r, pattern[r], grads)
        job = sched.due(r)
        if job is not None and sched.decodable(job):
            out[job] = sched.decode(job)
    return out


def _assert_exact(decoded, grads):
    for job, g in decoded.items():
        err = (g - grads[job].sum(0)).abs().max().item()
        assert err < TOL, (job, err)


# ---------------------------------------------------------------- known answers
def test_known_loads_n256():
    m = MultiplexedSGC(256, B=1, W=2, lam=27)
    assert round(m.load, 6) == 0.007543
    assert m.load_exact == msgc_load(256, 1, 2, 27) == Fraction(28 * 2, 256 * 29)
    sr = SelectiveRepeatSGC(256, B=2, W=3, lam=23)
    assert sr.s == 12 and sr.T == 2
    assert sr.load_exact == Fraction(13, 256)
    assert srsgc_parameters(256, 2, 3, 23) == (12, 2, Fraction(13, 256))
    assert make_gradient_code(256, 15).load == 16 / 256


def test_known_loads_n4():
    m = MultiplexedSGC(4, B=1, W=2, lam=1)
    assert m.load_exact == Fraction(1, 3) and m.T == 1
    assert msgc_d2_fraction(1, 2, 1) == Fraction(1, 3)
    assert make_gradient_code(4, 1).load == 0.5


@pytest.mark.parametrize("n,B,W,lam", [(4, 1, 2, 1), (7, 2, 3, 2), (6, 2, 5, 3), (5, 3, 4, 0)])
def test_msgc_structure(n, B, W, lam):
    m = MultiplexedSGC(n, B, W, lam, num_jobs=20)
    P = m.num_partitions
    assert P == n * ((W - 1) * (lam + 1) + B) and m.T == W - 2 + B
    # D1 chunks and D2 groups cover every partition exactly once
    cover = [p for w in range(n) for c in range(W - 1) for p in m.d1_partitions(w, c)]
    cover += [p for b in range(B) for p in m.d2_partitions(b)]
    assert sorted(cover) == list(range(P))
    # D2 takes the fraction d2 of the data set (arXiv 2211.13802, M-SGC)
    assert Fraction(B * n, P) == msgc_d2_fraction(B, W, lam)
    # steady state with no stragglers: W-1+B equal mini-tasks, one per job r-m, summing to the load
    r = W + B + 2
    grads = _grads(m, 20, d=1)
    for k in range(r):
        _play_round(m, k, np.zeros(n, bool), grads)
    for w in range(n):
        tasks = m.tasks(r, w)
        assert [t.job for t in tasks] == [r - k for k in range(W - 1 + B)]
        assert all(len(t.partitions) == lam + 1 for t in tasks)
        assert sum(Fraction(len(t.partitions), P) for t in tasks) == m.load_exact
        assert [t.kind for t in tasks] == ["d1"] * (W - 1) + ["d2"] * B
        assert [t.index for t in tasks[W - 1:]] == list(range(B))


def test_srsgc_structure():
    sr = SelectiveRepeatSGC(6, B=1, W=2, lam=3, num_jobs=5)  # s = ceil(3/2) = 2, FRC (3 | 6)
    assert sr.s == 2 and sr.T == 1 and isinstance(sr.code, FractionalRepetitionCode)
    tasks = sr.tasks(0, 4)
    assert len(tasks) == 1 and tasks[0].job == 0 and tasks[0].partitions == [3, 4, 5]
    assert tasks[0].size == sr.load == 0.5


def test_no_stragglers_decodes_every_job():
    for sched in (MultiplexedSGC(5, 2, 3, 1, num_jobs=6), SelectiveRepeatSGC(5, 1, 3, 2, num_jobs=6)):
        grads = _grads(sched, 6)
        decoded = _run(sched, np.zeros((sched.num_rounds, 5), bool), grads)
        assert sorted(decoded) == list(range(6))
        _assert_exact(decoded, grads)


# ---------------------------------------------------------------- exhaustive, tiny n
def _all_rows(n, lam):
    for k in range(lam + 1):
        for c in itertools.combinations(range(n), k):
            row = np.zeros(n, bool)
            row[list(c)] = True
            yield row


def _explore_all_patterns(sched, B, W, lam, grads):
    """DFS over every straggler pattern inside the model; each job must decode exactly by its
    deadline. Returns the number of complete patterns."""
    rows = list(_all_rows(sched.n, lam))
    count = 0

    def step(s, hist, r):
        nonlocal count
        if r == s.num_rounds:
            count += 1
            return
        for row in rows:
            if not admits(hist, row, B, W, lam):
                continue
            t = copy.deepcopy(s, {id(s.code): s.code})
            _play_round(t, r, row, grads)
            job = t.due(r)
            if job is not None:
                assert t.decodable(job), (np.vstack([hist, row]).astype(int), job)
                _assert_exact({job: t.decode(job)}, grads)
            step(t, np.vstack([hist, row[None]]), r + 1)

    step(sched, np.zeros((0, sched.n), bool), 0)
    return count


@pytest.mark.parametrize(
    "cls,n,B,W,lam,jobs,expected",
    [
        (MultiplexedSGC, 4, 1, 2, 1, 4, 181),
        (MultiplexedSGC, 4, 2, 3, 1, 3, 253),
        (MultiplexedSGC, 3, 1, 3, 1, 3, 43),
        (SelectiveRepeatSGC, 4, 1, 2, 2, 3, 797),
        (SelectiveRepeatSGC, 4, 1, 3, 2, 4, 963),
    ],
)
def test_every_model_pattern_decodes_exactly(cls, n, B, W, lam, jobs, expected):
    sched = cls(n, B, W, lam, num_jobs=jobs)
    grads = _grads(sched, jobs, seed=n + W)
    assert _explore_all_patterns(sched, B, W, lam, grads) == expected


# ---------------------------------------------------------------- random model patterns
@pytest.mark.parametrize(
    "cls,n,B,W,lam,code",
    [
        (MultiplexedSGC, 8, 2, 3, 2, "auto"),  # cyclic (3 does not divide 8)
        (MultiplexedSGC, 9, 2, 3, 2, "auto"),  # FRC
        (MultiplexedSGC, 7, 3, 4, 3, "auto"),
        (MultiplexedSGC, 10, 1, 4, 4, "cyclic"),
        (SelectiveRepeatSGC, 8, 1, 2, 3, "auto"),  # s = 2, cyclic
        (SelectiveRepeatSGC, 9, 2, 3, 4, "auto"),  # s = 2, FRC
        (SelectiveRepeatSGC, 10, 1, 3, 5, "auto"),  # s = 2, cyclic
        (SelectiveRepeatSGC, 7, 2, 5, 6, "auto"),  # s = 2
    ],
)
def test_random_model_patterns_decode_exactly(cls, n, B, W, lam, code):
    jobs = 14
    for seed in range(3):
        sched = cls(n, B, W, lam, num_jobs=jobs, code=code, seed=seed)
        model = BurstyStragglerModel(n, B, W, lam, seed=100 + seed, p_start=0.8, p_continue=0.8)
        pattern = model.sample(sched.num_rounds)
        assert satisfies(pattern, B, W, lam) and pattern.any()
        grads = _grads(sched, jobs, seed=seed)
        decoded = _run(sched, pattern, grads)
        assert sorted(decoded) == list(range(jobs)), (seed, pattern.astype(int))
        _assert_exact(decoded, grads)
        # every worker has a task until the last job starts; idle workers are never stragglers
        np.testing.assert_array_equal(sched.pattern[:jobs], pattern[:jobs])
        assert not (sched.pattern & ~pattern).any()


# ---------------------------------------------------------------- direct reference
def _reference_msgc(pattern, n, B, W, lam, jobs, code):
    """Slow restatement of M-SGC (docs/algorithms.md §4): counts of D1 chunks per worker and job,
    sets of D2 results per group; returns decodable-by-deadline per job."""
    d1 = {j: [0] * n for j in range(jobs)}
    d2 = {j: [set() for _ in range(B)] for j in range(jobs)}
    for r in range(jobs + W - 2 + B):
        todo = []
        for w in range(n):
            for m in range(W - 1 + B):
                j = r - m
                if not 0 <= j < jobs:
                    continue
                if m < W - 1 or d1[j][w] < W - 1:
                    if d1[j][w] < W - 1:
                        todo.append((w, j, "d1", None))
                else:
                    todo.append((w, j, "d2", m - (W - 1)))
        for w, j, kind, b in todo:
            if pattern[r, w]:
                continue
            if kind == "d1":
                d1[j][w] += 1
            else:
                d2[j][b].add(w)
    return [all(c == W - 1 for c in d1[j]) and all(code.decodable(s) for s in d2[j]) for j in range(jobs)]


def _reference_srsgc(pattern, n, B, s, jobs, code):
    got = {j: set() for j in range(jobs)}
    for r in range(jobs + B):
        old = r - B
        repeat = []
        if 0 <= old < jobs:
            absent = [w for w in range(n) if w not in got[old]]
            if len(absent) > s:
                absent.sort(key=lambda w: (not pattern[old, w], w))
                repeat = absent[: len(absent) - s]
        for w in range(n):
            j = old if w in repeat else r
            if 0 <= j < jobs and not pattern[r, w]:
                got[j].add(w)
    return [code.decodable(got[j]) for j in range(jobs)]


def _deadline_flags(sched, pattern, grads):
    flags = []
    for r in range(sched.num_rounds):
        _play_round(sched, r, pattern[r], grads)
        job = sched.due(r)
        if job is not None:
            flags.append(sched.decodable(job))
            if flags[-1]:
                _assert_exact({job: sched.decode(job)}, grads)
    return flags


@pytest.mark.parametrize("n,B,W,lam", [(6, 1, 2, 2), (7, 2, 3, 2), (6, 2, 4, 1)])
def test_msgc_matches_reference_on_arbitrary_patterns(n, B, W, lam):
    jobs = 10
    for seed in range(4):
        sched = MultiplexedSGC(n, B, W, lam, num_jobs=jobs, seed=seed)
        pattern = iid_stragglers(sched.num_rounds, n, 0.25, seed=seed)
        grads = _grads(sched, jobs, seed=seed)
        flags = _deadline_flags(sched, pattern, grads)
        assert flags == _reference_msgc(pattern, n, B, W, lam, jobs, sched.code)


@pytest.mark.parametrize("n,B,W,lam", [(6, 1, 2, 3), (7, 2, 3, 4), (5, 1, 3, 2)])
def test_srsgc_matches_reference_on_arbitrary_patterns(n, B, W, lam):
    jobs = 10
    for seed in range(4):
        sched = SelectiveRepeatSGC(n, B, W, lam, num_jobs=jobs, seed=seed)
        pattern = iid_stragglers(sched.num_rounds, n, 0.25, seed=seed)
        grads = _grads(sched, jobs, seed=seed)
        flags = _deadline_flags(sched, pattern, grads)
        assert flags == _reference_srsgc(pattern, n, B, sched.s, jobs, sched.code)


# ---------------------------------------------------------------- outside the model
@pytest.mark.parametrize("cls", [MultiplexedSGC, SelectiveRepeatSGC])
def test_pattern_outside_model_reports_and_falls_back(cls):
    n, B, W, lam, jobs = 5, 1, 2, 1, 6
    sched = cls(n, B, W, lam, num_jobs=jobs)
    grads = _grads(sched, jobs)
    pattern = np.zeros((sched.num_rounds, n), bool)
    pattern[1, :3] = True  # three stragglers at once: far outside lam = 1
    pattern[2, 0] = True
    assert not satisfies(pattern, B, W, lam)
    failed = []
    for r in range(sched.num_rounds):
        _play_round(sched, r, pattern[r], grads)
        job = sched.due(r)
        if job is None:
            continue
        if not sched.decodable(job):
            failed.append(job)
            lack = sched.missing(job)
            assert lack and all(t.job == job and t.round is None for t in lack)
            with pytest.raises(NotDecodable, match="not decodable"):
                sched.decode(job)
            for t in lack:  # the server's fallback: get exactly these results
                sched.submit(t, _answer(t, grads))
            assert sched.decodable(job) and sched.missing(job) == []
        _assert_exact({job: sched.decode(job)}, grads)
    assert failed  # the bad pattern did break a deadline, and every job was still recovered


def test_missing_lists_what_is_needed_msgc():
    sched = MultiplexedSGC(4, 1, 2, 1, num_jobs=1)
    grads = _grads(sched, 1)
    _play_round(sched, 0, np.array([1, 1, 0, 0], bool), grads)
    _play_round(sched, 1, np.array([1, 0, 0, 0], bool), grads)
    keys = {t.key for t in sched.missing(0)}
    # worker 0 never delivered its D1 chunk; worker 1 redid its chunk in the D2 slot; the D2
    # group has results from workers 2 and 3 only, and the (4, 1) FRC code needs one of 0, 1
    assert keys == {("d1", 0, 0), ("d2", 0, 0)}


# ---------------------------------------------------------------- API behaviour
def test_rounds_must_advance_in_order():
    sched = MultiplexedSGC(4, 1, 2, 1, num_jobs=3)
    with pytest.raises(ConfigError, match="before round 0"):
        sched.tasks(1, 0)
    with pytest.raises(ConfigError, match="current round"):
        sched.end_round(1)
    with pytest.raises(ConfigError, match="results for"):
        sched.receive(0, 0, [])
    with pytest.raises(ConfigError, match="out of range"):
        sched.tasks(0, 4)
    sched.end_round(0)
    assert sched.pattern.tolist() == [[True] * 4]  # nobody reported: all straggled
    assert sched.current_round == 1 and sched.due(0) is None and sched.due(1) == 0


def test_submit_rejects_foreign_tasks_and_decode_twice():
    sched = SelectiveRepeatSGC(4, 1, 2, 2, num_jobs=1)
    grads = _grads(sched, 1)
    bogus = sched.tasks(0, 1)[0]
    forged = type(bogus)(bogus.worker, 0, "gc", 0, {0: 2.0}, bogus.size)
    with pytest.raises(ConfigError, match="not one of this scheme"):
        sched.submit(forged, torch.zeros(3))
    with pytest.raises(ConfigError, match="does not exist"):
        sched.missing(5)
    _play_round(sched, 0, np.zeros(4, bool), grads)
    assert sched.decodable(0)  # SR-SGC may decode before the deadline
    _assert_exact({0: sched.decode(0)}, grads)
    with pytest.raises(ConfigError, match="already decoded"):
        sched.decode(0)
    assert sched.decodable(0)


def test_late_results_count_for_decoding_not_for_the_pattern():
    sched = MultiplexedSGC(4, 1, 2, 1, num_jobs=1)
    grads = _grads(sched, 1)
    late = sched.tasks(0, 0)
    _play_round(sched, 0, np.array([1, 1, 0, 0], bool), grads)
    sched.receive(0, 0, [_answer(t, grads) for t in late])  # worker 0's round-0 result, late
    _play_round(sched, 1, np.array([0, 0, 0, 0], bool), grads)
    assert sched.pattern[0].tolist() == [True, True, False, False]
    assert sched.decodable(0)
    _assert_exact({0: sched.decode(0)}, grads)


def test_state_dict_round_trip():
    n, B, W, lam, jobs = 6, 2, 3, 2, 8
    pattern = BurstyStragglerModel(n, B, W, lam, seed=5, p_start=0.8).sample(jobs + W - 2 + B)
    a = MultiplexedSGC(n, B, W, lam, num_jobs=jobs, seed=1)
    grads = _grads(a, jobs)
    for r in range(4):
        _play_round(a, r, pattern[r], grads)
    b = MultiplexedSGC(n, B, W, lam, num_jobs=jobs, seed=1)
    b.load_state_dict(a.state_dict())
    for r in range(4, a.num_rounds):
        for s in (a, b):
            _play_round(s, r, pattern[r], grads)
        job = a.due(r)
        if job is not None:
            assert torch.equal(a.decode(job), b.decode(job))
    with pytest.raises(ConfigError, match="other parameters"):
        MultiplexedSGC(n, B, W, lam, num_jobs=jobs, seed=2, code="cyclic").load_state_dict(a.state_dict())


def test_bad_parameters():
    with pytest.raises(ConfigError, match="B \\| \\(W-1\\)"):
        SelectiveRepeatSGC(8, 2, 4, 2)
    with pytest.raises(ConfigError, match="lam < n"):
        MultiplexedSGC(4, 1, 2, 4)
    with pytest.raises(ConfigError):
        MultiplexedSGC(4, 2, 2, 1)  # B > W-1
    with pytest.raises(ConfigError):
        SelectiveRepeatSGC(4, 1, 2, 8)  # s = 4 >= n
    with pytest.raises(ConfigError):
        MultiplexedSGC(6, 1, 2, 2, code=CyclicRepetitionCode(6, 1))


def test_registry_builds_both():
    assert isinstance(SGC_SCHEMES.build("m-sgc", n=4, B=1, W=2, lam=1), MultiplexedSGC)
    assert isinstance(SGC_SCHEMES.build("sr_sgc", n=4, B=1, W=2, lam=1), SelectiveRepeatSGC)


def test_module_docstring_example_runs():
    import commlib.coding.m_sgc as mod

    src = mod.__doc__.split("::", 1)[1]
    code = "\n".join(line[4:] for line in src.splitlines())
    exec(compile(code, "m_sgc_example", "exec"), {})
