"""bf.Window and bf.optim.push_sum over MPI one-sided ops, against the simulator on the same data.

Every rank builds every rank's data deterministically (``reference.rank_tree``), runs the same
calls for all agents in ``bf.simulate(N)`` and compares its row with the MPI result.  Phases
(puts, then updates) are separated by ``bf.barrier()`` so results are deterministic.  At world
size 1 (plain pytest) the same tests compare the local world with a simulated world of one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
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
        second = win.update(self_weight=0.0, src_weights=[in_all(topo, r) for r in range(N)], reset=True)
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
        assert_close_everywhere(total, torch.tensor([float(N)], dtype=F64), f"{name}: Σ w at step {k}", **TOL)
    state.window.free()
    assert_close_everywhere(xi, expected, f"{name}: {algorithm} iterate vs simulator", **TOL)
    assert_close_everywhere(state.weight, expected_w, f"{name}: {algorithm} weight vs simulator", **TOL)


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
    assert_close_everywhere(total_w, torch.tensor([float(N)], dtype=F64), "async push_sum: Σ w", **TOL)
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
    assert_close_everywhere(got, expected, "accumulated mass collected exactly once", atol=0.0, rtol=0.0)


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
    assert_close_everywhere(out, torch.ones(3, dtype=F64), "nothing moved after the failed calls", atol=0.0, rtol=0.0)
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
