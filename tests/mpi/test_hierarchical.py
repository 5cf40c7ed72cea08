"""local_mean and hierarchical_neighbor_mean against dense float64 references.

Run with one machine (``bfrun -np 2/4``) and with 4 ranks faked as 2 machines of 2
(``BLUEFOG_FN_RANKS_PER_MACHINE=2``, see tests/run_all.sh).  The reference of the hierarchical
op is ``(W_M ⊗ I_L)(I_M ⊗ 11ᵀ/L)``; of local_mean ``I_M ⊗ 11ᵀ/L``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import dense_mix, leaves, rank_tree

N, ME = bf.size(), bf.rank()
M, L = bf.machine_size(), bf.local_size()
MINE = ME // L


def test_world_is_homogeneous() -> None:
    assert bf.is_homogeneous()


def _data(r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(40 + r)
    return {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}


def _world_matrix(wm: torch.Tensor) -> torch.Tensor:
    """The world-level matrix of the hierarchical op for a machine-level W_M."""
    return torch.kron(wm.to(torch.float64), torch.full((L, L), 1.0 / L, dtype=torch.float64))


def _local_matrix() -> torch.Tensor:
    return _world_matrix(torch.eye(M, dtype=torch.float64))


def _assert_tree_close(out: Any, expected: Any, what: str, tol: float = 1e-12) -> None:
    for k, (a, e) in enumerate(zip(leaves(out), leaves(expected), strict=True)):
        assert_close_everywhere(a.to(torch.float64), e, f"{what} leaf {k}", atol=tol, rtol=tol)


def _same_on_machine(out: Any, what: str) -> None:
    """Every rank of a machine holds bitwise the same result (the leader's buffer)."""
    flat = torch.cat([x.reshape(-1).to(torch.float64) for x in leaves(out)]).unsqueeze(0)
    rows = bf.allgather(flat)
    mine = rows[MINE * L : (MINE + 1) * L]
    all_ranks_agree(bool((mine == mine[0]).all()), what)


@pytest.mark.parametrize("make", [T.ring, T.fully_connected, T.one_peer_exponential_two, T.machine_one_peer_exponential_two])
@pytest.mark.parametrize("step", [0, 1])
def test_hierarchical_neighbor_mean_matches_machine_level_reference(make: object, step: int) -> None:
    topo = make(M)  # type: ignore[operator]
    W = topo.at(step).mixing_matrix()
    trees = [_data(r) for r in range(N)]
    out = bf.hierarchical_neighbor_mean(trees[ME], topo, step)
    for key in ("w", "b"):
        means = [sum(trees[m * L + j][key] for j in range(L)) / L for m in range(M)]
        expected = sum(W[MINE, m] * means[m] for m in range(M))
        assert_close_everywhere(out[key], expected, f"hierarchical {key}", atol=1e-12, rtol=1e-12)
    _same_on_machine(out, "hierarchical result differs within a machine")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hierarchical_neighbor_mean_nested_tree_against_dense(dtype: torch.dtype) -> None:
    topo = T.exponential_two(M)
    trees = [rank_tree(r, seed=7, dtype=dtype) for r in range(N)]
    mine = rank_tree(ME, seed=7, dtype=dtype)
    before = [x.clone() for x in leaves(mine)]
    out = bf.hierarchical_neighbor_mean(mine, topo)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_tree_close(out, dense_mix(_world_matrix(topo.mixing_matrix()), trees, ME), "nested", tol)
    assert out["nested"][1][1] is None and out["empty"].shape == (0, 3)
    all_ranks_agree(all(torch.equal(a, b) for a, b in zip(leaves(mine), before, strict=True)), "input mutated")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_mean_against_dense(dtype: torch.dtype) -> None:
    trees = [rank_tree(r, seed=3, dtype=dtype) for r in range(N)]
    mine = rank_tree(ME, seed=3, dtype=dtype)
    out = bf.local_mean(mine)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_tree_close(out, dense_mix(_local_matrix(), trees, ME), "local_mean", tol)
    _same_on_machine(out, "local_mean result differs within a machine")
    all_ranks_agree(out["b"].dtype == dtype, "local_mean changed the dtype")


def test_local_mean_async_equals_sync() -> None:
    x = _data(ME)
    h = bf.local_mean_async(x)
    s = bf.local_mean(x)
    all_ranks_agree(all(torch.equal(h.wait()[k], s[k]) for k in s), "local_mean async != sync")


def test_hierarchical_async_equals_sync() -> None:
    topo = T.ring(M)
    x = _data(ME)
    h = bf.hierarchical_neighbor_mean_async(x, topo)
    s = bf.hierarchical_neighbor_mean(x, topo)
    all_ranks_agree(all(torch.equal(h.wait()[k], s[k]) for k in s), "hierarchical async != sync")


@pytest.mark.skipif(M < 2, reason="machine weights need at least 2 machines")
def test_hierarchical_src_machine_weights_reweight_the_graph() -> None:
    topo = T.ring(M)
    graph = topo.at(0)
    ins = sorted(graph.in_neighbors(MINE))
    # Machine m keeps 0.25 + 0.05·m and splits the rest over its in-neighbour machines, the
    # first getting twice the others' share.
    wm = torch.zeros(M, M, dtype=torch.float64)
    for m in range(M):
        ins_m = sorted(graph.in_neighbors(m))
        wm[m, m] = 0.25 + 0.05 * m
        shares = [2.0] + [1.0] * (len(ins_m) - 1)
        for j, s in zip(ins_m, shares, strict=True):
            wm[m, j] = (1 - wm[m, m]) * s / sum(shares)
    trees = [_data(r) for r in range(N)]
    out = bf.hierarchical_neighbor_mean(
        trees[ME], topo, self_weight=float(wm[MINE, MINE]), src_machine_weights={j: float(wm[MINE, j]) for j in ins}
    )
    _assert_tree_close(out, dense_mix(_world_matrix(wm), trees, ME), "src_machine_weights")


@pytest.mark.skipif(M < 2, reason="machine weights need at least 2 machines")
def test_hierarchical_dst_machine_weights_per_call_graph() -> None:
    # Machine m sends to m+1 only, scaled by 0.5 + 0.1·m; receives from m-1 with weight 0.6.
    nxt, prv = (MINE + 1) % M, (MINE - 1) % M
    wm = torch.zeros(M, M, dtype=torch.float64)
    for m in range(M):
        wm[m, m] = 0.4
        wm[m, (m - 1) % M] += 0.6 * (0.5 + 0.1 * ((m - 1) % M))
    trees = [_data(r) for r in range(N)]
    out = bf.hierarchical_neighbor_mean(
        trees[ME], None, self_weight=0.4, src_machine_weights={prv: 0.6}, dst_machine_weights={nxt: 0.5 + 0.1 * MINE}
    )
    _assert_tree_close(out, dense_mix(_world_matrix(wm), trees, ME), "dst_machine_weights")


def test_hierarchical_plan_only_leaders_cross_machines() -> None:
    """The traced plans: non-leaders send to their leader only; leaders send one model per
    out-neighbour machine across machines, and nothing else leaves a machine."""
    topo = T.one_peer_exponential_two(M)
    tree = _data(ME)
    nbytes = sum(x.numel() * 8 for x in leaves(tree))
    for step in range(max(topo.period, 1)):
        graph = topo.at(step)
        total = 0
        for r in range(N):
            plan = bf.trace(bf.hierarchical_neighbor_mean, tree, topo, step, rank=r)
            assert isinstance(plan, bf.StagedPlan)
            assert [p.op for p in plan.stages] == (
                ["local_reduce", "machine_exchange", "local_broadcast"] if M > 1 else ["local_reduce", "local_broadcast"]
            )
            if r % L:
                assert plan.bytes_across_machines == 0
                assert all(d == r - r % L for p in plan.stages for d, _ in p.sends)
            else:
                assert plan.bytes_across_machines == nbytes * (len(graph.out_neighbors(r // L)) if M > 1 else 0)
            total += plan.bytes_across_machines
        assert total == nbytes * sum(len(graph.out_neighbors(m)) for m in range(M)) * (M > 1)


def test_hierarchical_gradient_is_transpose() -> None:
    topo = T.exponential_two(M)
    wf = _world_matrix(topo.mixing_matrix())
    xs = [_data(r)["w"] for r in range(N)]
    gs = [torch.randn(3, 2, generator=torch.Generator().manual_seed(90 + r), dtype=torch.float64) for r in range(N)]
    x = xs[ME].clone().requires_grad_()
    out = bf.hierarchical_neighbor_mean(x, topo)
    (grad,) = torch.autograd.grad(out, x, gs[ME])
    expected = sum(wf[k, ME] * gs[k] for k in range(N))
    assert_close_everywhere(grad, expected, "hierarchical gradient", atol=1e-12, rtol=1e-12)
    y = xs[ME].clone().requires_grad_()
    (lgrad,) = torch.autograd.grad(bf.local_mean(y), y, gs[ME])
    lm = _local_matrix()
    assert_close_everywhere(lgrad, sum(lm[k, ME] * gs[k] for k in range(N)), "local_mean gradient", atol=1e-12, rtol=1e-12)


def test_hierarchical_torch_func_grad() -> None:
    topo = T.ring(M)
    wf = _world_matrix(topo.mixing_matrix())
    g = torch.func.grad(lambda x: (bf.hierarchical_neighbor_mean(x, topo) * (ME + 1)).sum())(torch.ones(2, dtype=torch.float64))
    expected = torch.full((2,), float(sum(wf[k, ME] * (k + 1) for k in range(N))), dtype=torch.float64)
    assert_close_everywhere(g, expected, "torch.func.grad", atol=1e-12, rtol=1e-12)


def test_hierarchical_equals_simulator_bitwise() -> None:
    """bf.simulate(n, local_size=L) returns bitwise what every rank computes."""
    topo = T.ring(M)
    trees = [rank_tree(r, seed=11, dtype=torch.float32) for r in range(N)]
    out = bf.hierarchical_neighbor_mean(trees[ME], topo)
    lm = bf.local_mean(trees[ME])
    with bf.simulate(N, local_size=L):
        stacked = bf.sim.stack(trees)
        sim = bf.sim.unstack(bf.hierarchical_neighbor_mean(stacked, topo))[ME]
        sim_lm = bf.sim.unstack(bf.local_mean(stacked))[ME]
    ok = all(torch.equal(a, b) for a, b in zip(leaves(out), leaves(sim), strict=True))
    ok = ok and all(torch.equal(a, b) for a, b in zip(leaves(lm), leaves(sim_lm), strict=True))
    all_ranks_agree(ok, "MPI and simulator differ")


def test_hierarchical_rejects_wrong_machine_topology_size() -> None:
    with pytest.raises(ValueError, match=f"machine_topology has size {M + 1} but the world has {M} machines"):
        bf.hierarchical_neighbor_mean(torch.ones(2), T.ring(M + 1))


def test_hierarchical_rejects_bad_machine_weights_before_sending() -> None:
    with pytest.raises(ValueError, match=f"src_machine_weights has machine {M} but the world has {M} machines"):
        bf.hierarchical_neighbor_mean(torch.ones(2), T.ring(M), self_weight=0.5, src_machine_weights={M: 0.5})
    with pytest.raises(ValueError, match="self_weight is required when src_machine_weights is given"):
        bf.hierarchical_neighbor_mean(torch.ones(2), T.ring(M), src_machine_weights={})
    with pytest.raises(ValueError, match="needs src_machine_weights and self_weight"):
        bf.hierarchical_neighbor_mean(torch.ones(2), None, dst_machine_weights=[])
    with pytest.raises(TypeError, match=r"local_mean: tree leaf .* has dtype torch.int64"):
        bf.local_mean(torch.ones(2, dtype=torch.int64))
    # Nothing was sent: a correct call still works on every rank.
    assert_close_everywhere(bf.local_mean(torch.ones(2)), torch.ones(2), "after errors")


@pytest.mark.skipif(M < 2, reason="machine weights need at least 2 machines")
def test_hierarchical_gradient_with_per_call_machine_graph() -> None:
    """Backward of a per-call machine graph with sender scales is Wᵀ (each side uses only its
    own weights)."""
    nxt, prv = (MINE + 1) % M, (MINE - 1) % M
    wm = torch.zeros(M, M, dtype=torch.float64)
    for m in range(M):
        wm[m, m] = 0.25
        wm[m, (m - 1) % M] += 0.75 * (2 + (m - 1) % M) / 5
    wf = _world_matrix(wm)
    gs = [torch.randn(3, 2, generator=torch.Generator().manual_seed(70 + r), dtype=torch.float64) for r in range(N)]
    x = _data(ME)["w"].clone().requires_grad_()
    out = bf.hierarchical_neighbor_mean(
        x, None, self_weight=0.25, src_machine_weights={prv: 0.75}, dst_machine_weights={nxt: (2 + MINE) / 5}
    )
    (grad,) = torch.autograd.grad(out, x, gs[ME])
    assert_close_everywhere(grad, sum(wf[k, ME] * gs[k] for k in range(N)), "per-call gradient", atol=1e-12, rtol=1e-12)
