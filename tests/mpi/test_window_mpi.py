"""bf.Window and bf.optim.push_sum over MPI one-sided ops, against the simulator on the same data.

Every rank builds every rank's data deterministically (``reference.rank_tree``), runs the same
calls for all agents in ``bf.simulate(N)`` and compares its row with the MPI result.  Phases
(puts, then updates) are separated by ``bf.barrier()`` so results are deterministic.  At world
size 1 (plain pytest) the same tests compare the local world with a simulated world of one.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import leaves, rank_tree

N = bf.size()
ME = bf.rank()
F64 = torch.float64
TOL = {"atol": 1e-12, "rtol": 1e-12}


def chord(n: int) -> T.Topology:
    """A directed ring with one chord 0 → 2 (n ≥ 3): W is not doubly stochastic."""
    A = torch.eye(n, dtype=F64)
    for i in range(n):
        A[(i + 1) % n, i] = 1.0
    if n >= 3:
        A[2, 0] = 1.0
    return T.from_matrix(A / A.sum(1, keepdim=True))


TOPOLOGIES = {
    "ring": lambda: T.ring(N),
    "exp2": lambda: T.exponential_two(N),
    "chord": lambda: chord(N),
    "one_peer": lambda: T.one_peer_exponential_two(N),
}


def stacked(seed: int) -> Any:
    return bf.sim.stack([rank_tree(r, seed) for r in range(N)])


def row(tree: Any, i: int) -> Any:
    return pytree.tree_map(lambda t: None if t is None else t[i], tree)


def assert_tree_close(actual: Any, expected: Any, what: str) -> None:
    a, e = leaves(actual), leaves(expected)
    ok = len(a) == len(e)
    assert_close_everywhere(torch.tensor(float(ok)), torch.tensor(1.0), f"{what}: leaf count")
    for k, (x, y) in enumerate(zip(a, e, strict=True)):
        assert_close_everywhere(x, y, f"{what}: leaf {k}", **TOL)


def in_all(topo: Any, r: int) -> dict[int, float]:
    return {j: 1.0 for k in range(topo.period) for j in topo.at(k).in_neighbors(r)}


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_window_mpi_put_update_equals_simulator(name: str) -> None:
    topo = TOPOLOGIES[name]()
    x, y = rank_tree(ME, 1), rank_tree(ME, 2)
    with bf.simulate(N):
        win = bf.Window(stacked(1), topo)
        win.put(stacked(2), step=1)
        expected = win.update(reset=True, step=1)
        expected2 = win.collect()
        win.free()
    win = bf.Window(x, topo)
    win.put(y, step=1)
    bf.barrier()
    out = win.update(reset=True, step=1)
    bf.barrier()
    out2 = win.collect()
    win.free()
    assert_tree_close(out, row(expected, ME), f"{name}: put + update")
    assert_tree_close(out2, row(expected2, ME), f"{name}: collect after reset")


@pytest.mark.parametrize("name", ["exp2", "chord"])
def test_window_mpi_accumulate_get_weights_equal_simulator(name: str) -> None:
    topo = TOPOLOGIES[name]()
    scale = [{d: 0.5 + d + r for d in topo.out_neighbors(r)} for r in range(N)]
    src = [{j: 1.0 + 0.25 * j for j in topo.in_neighbors(r)} for r in range(N)]
    with bf.simulate(N):
        win = bf.Window(stacked(3), topo)
        win.accumulate(stacked(4), scale)
        win.accumulate(stacked(5))
        first = win.update(self_weight=[0.5] * N, src_weights=src)
        win.get(src)
        second = win.update(
            self_weight=0.0, src_weights=[in_all(topo, r) for r in range(N)], reset=True
        )
        win.free()
    win = bf.Window(rank_tree(ME, 3), topo)
    win.accumulate(rank_tree(ME, 4), scale[ME])
    win.accumulate(rank_tree(ME, 5))
    bf.barrier()
    out1 = win.update(self_weight=0.5, src_weights=src[ME])
    bf.barrier()
    win.get(src[ME])
    bf.barrier()  # update changes the exposed own value, which the neighbours' gets read
    out2 = win.update(self_weight=0.0, src_weights=in_all(topo, ME), reset=True)
    win.free()
    assert_tree_close(out1, row(first, ME), f"{name}: accumulate + weighted update")
    assert_tree_close(out2, row(second, ME), f"{name}: weighted get + update")


ALGORITHMS = {"push_sum": bf.optim.push_sum, "push_diging": bf.optim.push_diging}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("name", ["exp2", "chord", "one_peer"])
def test_push_sum_mpi_equals_simulator_and_conserves_mass(name: str, algorithm: str) -> None:
    topo = TOPOLOGIES[name]()
    factory = ALGORITHMS[algorithm]
    x0 = torch.randn(N, 4, generator=torch.Generator().manual_seed(11), dtype=F64)
    target = torch.randn(N, 4, generator=torch.Generator().manual_seed(12), dtype=F64)
    steps = 30
    with bf.simulate(N):
        opt = factory(0.05, topo)
        state = opt.init(x0)
        x = x0
        for k in range(steps):
            x, state = opt.step(x, x - target, state, k)
        expected, expected_w = x[ME], state.weight[ME]
        state.window.free()
    opt = factory(0.05, topo)
    xi = x0[ME].clone()
    state = opt.init(xi)
    for k in range(steps):
        xi, state = opt.step(xi, xi - target[ME], state, k)
        total = bf.global_sum(state.weight.reshape(1))
        assert_close_everywhere(
            total, torch.tensor([float(N)], dtype=F64), f"{name}: Σ w at step {k}", **TOL
        )
    state.window.free()
    assert_close_everywhere(xi, expected, f"{name}: {algorithm} iterate vs simulator", **TOL)
    assert_close_everywhere(
        state.weight, expected_w, f"{name}: {algorithm} weight vs simulator", **TOL
    )


def test_push_sum_mpi_reaches_exact_average() -> None:
    topo = chord(N) if N >= 3 else T.exponential_two(N)
    x0 = torch.randn(N, 3, generator=torch.Generator().manual_seed(13), dtype=F64)
    opt = bf.optim.push_sum(0.1, topo)
    x = x0[ME].clone()
    state = opt.init(x)
    for k in range(300):
        x, state = opt.step(x, torch.zeros_like(x), state, k)
    state.window.free()
    assert_close_everywhere(x, x0.mean(0), "push_sum consensus", atol=1e-10, rtol=0.0)


def test_push_sum_mpi_asynchronous_conserves_mass() -> None:
    """No barriers inside the steps: accumulates race with the neighbours' collects.  Once all
    ranks stopped pushing (a barrier) and collected, no mass was lost or counted twice."""
    topo = T.exponential_two(N)
    x0 = torch.full((64,), float(ME + 1), dtype=F64)
    opt = bf.optim.push_sum(0.1, topo, synchronous=False)
    state = opt.init(x0)
    x = x0
    for k in range(200):
        x, state = opt.step(x, torch.zeros_like(x), state, k)
    bf.barrier()
    numerator, weight = state.window.collect()
    bf.barrier()
    state.window.free()
    total_w = bf.global_sum(weight.reshape(1))
    total_u = bf.global_sum(numerator)
    assert_close_everywhere(
        total_w, torch.tensor([float(N)], dtype=F64), "async push_sum: Σ w", **TOL
    )
    expected_u = torch.full((64,), N * (N + 1) / 2, dtype=F64)
    assert_close_everywhere(total_u, expected_u, "async push_sum: Σ u", **TOL)


def test_window_mpi_concurrent_accumulates_land_once() -> None:
    """Every rank accumulates ones into every out-neighbour many times while each rank also
    collects (read + reset) concurrently; the collected totals account for every accumulate."""
    topo = T.exponential_two(N)
    reps = 50
    win = bf.Window(torch.zeros(128, dtype=F64), topo)
    got = torch.zeros(128, dtype=F64)
    for _ in range(reps):
        win.accumulate(torch.ones(128, dtype=F64))
        got = got + win.collect(torch.zeros(128, dtype=F64))
    bf.barrier()
    got = got + win.collect(torch.zeros(128, dtype=F64))
    win.free()
    expected = torch.full((128,), float(reps * len(topo.in_neighbors(ME))), dtype=F64)
    assert_close_everywhere(
        got, expected, "accumulated mass collected exactly once", atol=0.0, rtol=0.0
    )


def test_window_mpi_validation_raises_everywhere_before_rma() -> None:
    topo = T.ring(N)
    win = bf.Window(torch.ones(3, dtype=F64), topo)
    bad = N + 3
    try:
        win.put(torch.ones(3, dtype=F64), {bad: 1.0})
        ok = False
    except ValueError as exc:
        ok = f"dst_weights has rank {bad}" in str(exc)
    all_ranks_agree(ok, "put with an out-of-world rank raised ValueError")
    try:
        win.accumulate(torch.ones(4, dtype=F64))
        ok = False
    except ValueError as exc:
        ok = "tree must match" in str(exc)
    all_ranks_agree(ok, "accumulate with a wrong shape raised ValueError")
    bf.barrier()
    out = win.update(self_weight=1.0, src_weights=in_all(topo, ME))
    assert_close_everywhere(
        out, torch.ones(3, dtype=F64), "nothing moved after the failed calls", atol=0.0, rtol=0.0
    )
    win.free()
    try:
        win.update()
        ok = False
    except RuntimeError as exc:
        ok = "freed" in str(exc)
    all_ranks_agree(ok, "a freed window raised RuntimeError")


@pytest.mark.skipif(N < 2, reason="a mismatch between ranks needs at least 2 ranks")
def test_window_mpi_mismatched_trees_raise_on_every_rank() -> None:
    try:
        bf.Window(torch.ones(3 + (ME == 1), dtype=F64), T.ring(N))
        ok = False
    except bf.MismatchError:
        ok = True
    all_ranks_agree(ok, "Window creation with different shapes raised MismatchError")


# ---------------------------------------------------------------------------------------------
# async handles, integer leaves, mutex, asynchronous push-sum under random delays


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_window_mpi_async_ops_equal_simulator(name: str) -> None:
    topo = TOPOLOGIES[name]()
    g0 = topo.at(0)
    scale = [{d: 0.5 + d + r for d in g0.out_neighbors(r)} for r in range(N)]
    src = [{j: 1.0 + 0.25 * j for j in g0.in_neighbors(r)} for r in range(N)]
    ones = [in_all(topo, r) for r in range(N)]
    with bf.simulate(N):
        win = bf.Window(stacked(6), topo)
        win.put_async(stacked(7), step=1).wait()
        win.accumulate_async(stacked(8), scale).wait()
        first = win.update(self_weight=[0.5] * N, src_weights=src, reset=True)
        win.get_async(src).wait()
        second = win.update(self_weight=0.0, src_weights=ones, reset=True)
        win.free()
    with bf.Window(rank_tree(ME, 6), topo) as win:
        h1 = win.put_async(rank_tree(ME, 7), step=1)
        h2 = win.accumulate_async(rank_tree(ME, 8), scale[ME])
        h1.wait()
        h2.wait()
        assert h1.done() and h2.done()
        bf.barrier()
        out1 = win.update(self_weight=0.5, src_weights=src[ME], reset=True)
        bf.barrier()
        h3 = win.get_async(src[ME])
        h3.wait()
        bf.barrier()
        out2 = win.update(self_weight=0.0, src_weights=ones[ME], reset=True)
    assert_tree_close(out1, row(first, ME), f"{name}: async put + accumulate + update")
    assert_tree_close(out2, row(second, ME), f"{name}: async get + update")


def test_window_mpi_integer_put_get_accumulate_equal_dense_reference() -> None:
    topo = chord(N) if N >= 3 else T.ring(N)
    big = 2**60
    x = {
        "i": torch.arange(3, dtype=torch.int64) + big + 10 * ME,
        "c": torch.full((2,), ME + 1, dtype=torch.int8),
    }
    X = torch.stack([torch.arange(3, dtype=torch.int64) + big + 10 * r for r in range(N)])
    E = torch.zeros(N, N, dtype=torch.int64)
    for i in range(N):
        for j in topo.in_neighbors(i):
            E[i, j] = 1
    ones = {j: 1 for j in topo.in_neighbors(ME)}
    with bf.Window(x, topo) as win:
        win.put(x)
        win.accumulate_async(x, {d: 3 for d in topo.out_neighbors(ME)}).wait()
        bf.barrier()
        got = win.collect()
        bf.barrier()
        win.get({j: 2 for j in topo.in_neighbors(ME)})
        bf.barrier()
        fetched = win.update(self_weight=0, src_weights=ones)
    expect_i = X[ME] + 4 * (E @ X)[ME]
    ok = got["i"].dtype == torch.int64 and torch.equal(got["i"], expect_i)
    ok = ok and torch.equal(
        got["c"],
        torch.full((2,), ME + 1 + 4 * sum(j + 1 for j in topo.in_neighbors(ME)), dtype=torch.int8),
    )
    all_ranks_agree(ok, "integer put + accumulate + collect exact")
    collected = torch.stack([X[r] + 4 * (E @ X)[r] for r in range(N)])
    all_ranks_agree(torch.equal(fetched["i"], 2 * (E @ collected)[ME]), "integer get exact")


@pytest.mark.skipif(N < 2, reason="mutual exclusion needs at least 2 ranks")
def test_window_mpi_mutex_critical_sections_never_overlap() -> None:
    import time

    win = bf.Window(torch.zeros(1, dtype=F64), T.ring(N))
    spans = []
    bf.barrier()
    for _ in range(5):
        with win.mutex([0]):
            start = time.monotonic()  # one clock for every process of this machine
            time.sleep(0.002)
            spans.append((start, time.monotonic()))
    win.free()
    everyone = bf.allgather(torch.tensor(spans, dtype=F64))
    ordered = sorted(everyone.tolist())
    overlaps = [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]
    all_ranks_agree(
        len(ordered) == 5 * N and not overlaps, f"mutex-protected sections overlap: {overlaps[:3]}"
    )


@settings(derandomize=True, max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    phases=st.integers(1, 3),
    max_delay_ms=st.sampled_from([0.0, 1.0, 3.0]),
)
def test_window_mpi_async_push_sum_conserves_mass_under_random_delays(
    seed: int, phases: int, max_delay_ms: float
) -> None:
    """Every rank sleeps its own random time around each push; after every quiescent point (a
    barrier, then collecting what is still in the slots) Σ u and Σ w over ranks are exactly the
    initial sums, and the estimates u/w converge to the average."""
    import random
    import time

    rng = random.Random(seed * 1009 + ME)  # same examples on every rank, different delays per rank
    topo = T.exponential_two(N)
    u0 = torch.arange(8, dtype=F64) + 3.0 * ME
    average = torch.arange(8, dtype=F64) + 1.5 * (N - 1)
    u, w = u0.clone(), torch.ones((), dtype=F64)
    win = bf.Window((u, w), topo)
    k = 0
    for _ in range(phases):
        for _ in range(15):
            time.sleep(rng.uniform(0.0, max_delay_ms) / 1000)
            share = win.uniform_share(k)
            pushed = (u * share, w * share)
            handle = win.accumulate_async(pushed, step=k)
            time.sleep(rng.uniform(0.0, max_delay_ms) / 1000)  # local work overlapping the push
            u, w = win.collect(pushed, step=k)
            assert handle.done()
            k += 1
        bf.barrier()  # quiescent: every push completed (each collect completed its rank's pushes)
        u, w = win.collect((u, w))
        bf.barrier()
        assert_close_everywhere(bf.global_sum(u), bf.global_sum(u0), "Σ u conserved", **TOL)
        assert_close_everywhere(
            bf.global_sum(w.reshape(1)), torch.tensor([float(N)], dtype=F64), "Σ w = n", **TOL
        )
    for _ in range(80):  # finish synchronously: the estimates reach the average
        share = win.uniform_share(k)
        pushed = (u * share, w * share)
        win.accumulate(pushed, step=k)
        bf.barrier()
        u, w = win.collect(pushed, step=k)
        bf.barrier()
        k += 1
    win.free()
    assert_close_everywhere(u / w, average, "push-sum estimate = average", atol=1e-10, rtol=0.0)
