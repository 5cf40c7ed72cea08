"""The simulator equals the MPI backend: every rank runs the op for real and the simulator with
n = world size on all ranks' (deterministic) data, and compares its own row.

Runs under ``bfrun -np 2`` and ``-np 4`` (tests/run_all.sh) and at size 1 in plain pytest.  Every
rank draws the same hypothesis examples (the conftest derandomizes) and calls the same MPI ops in
the same order; checks are reported on all ranks.

What is bitwise and what is not (asserted as such below):

* ``neighbor_mean`` (float32/float64, any weights, per-call graphs), ``neighbor_gather``,
  ``broadcast``, ``allgather``: bitwise — same arithmetic, same order;
* ``global_sum`` / ``global_mean``: bitwise with MPICH (the simulator adds in MPICH's
  recursive-doubling order), within float rounding with other MPI libraries, whose reduction
  order is their own choice;
* float16/bfloat16 ``neighbor_mean``: within one unit in the last place (the MPI kernel may fuse
  a multiply-add in float32 that the simulator rounds twice);
* a 20-step training run through ``torch.func.grad``: within 1e-5 (batched vs per-rank matmuls).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import dense_mix, leaves, rank_tree

N = bf.size()
ME = bf.rank()


def _mpich() -> bool:
    if N == 1:
        return True  # a sum of one term: any order is exact
    from mpi4py import MPI

    return "MPICH" in MPI.Get_library_version()


MPICH = _mpich()


def _topologies() -> dict[str, T.Topology | T.DynamicTopology]:
    out: dict[str, T.Topology | T.DynamicTopology] = {
        "ring": T.ring(N),
        "star": T.star(N),
        "mesh_grid_2d": T.mesh_grid_2d(N),
        "fully_connected": T.fully_connected(N),
        "exponential_two": T.exponential_two(N),
        "exponential_3": T.exponential(N, 3),
        "symmetric_exponential": T.symmetric_exponential(N),
        "one_peer_exponential_two": T.one_peer_exponential_two(N),
        "base_graph_1": T.base_graph(N, 1),
        "base_graph_2": T.base_graph(N, 2),
    }
    if N & (N - 1) == 0:
        out["hypercube"] = T.hypercube(N)
    return out


TOPOLOGIES = _topologies()


def agent_tree(r: int, seed: int, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed * 131 + r)
    return {f"l{k}": torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in enumerate(shapes)}


def sim_row(fn: Any, stacked: Any) -> Any:
    """Run ``fn(stacked)`` in a simulated world of N agents and return this rank's row."""
    with bf.simulate(N):
        out = fn(stacked)
    return bf.sim.unstack(out, N)[ME]


def bitwise(a: Any, b: Any) -> bool:
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb, strict=True))


tree_shapes = st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=25)
@given(
    shapes=tree_shapes,
    name=st.sampled_from(sorted(TOPOLOGIES)),
    step=st.integers(0, 20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_sim_equals_mpi_neighbor_mean_bitwise(
    shapes: list[tuple[int, ...]], name: str, step: int, dtype: torch.dtype, seed: int
) -> None:
    topo = TOPOLOGIES[name]
    trees = [agent_tree(r, seed, shapes, dtype) for r in range(N)]
    mpi = bf.neighbor_mean(trees[ME], topo, step)
    sim = sim_row(lambda x: bf.neighbor_mean(x, topo, step), bf.sim.stack(trees))
    all_ranks_agree(bitwise(sim, mpi), f"sim == MPI bitwise, {name} step {step} {dtype}")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, e in zip(leaves(sim), leaves(dense_mix(topo.at(step).mixing_matrix(), trees, ME)), strict=True):
        assert_close_everywhere(a.double(), e, f"sim == dense W @ X, {name}", atol=tol, rtol=tol)


@settings(max_examples=15)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sim_equals_mpi_per_call_graph_bitwise(data: st.DataObject, dtype: torch.dtype) -> None:
    """self_weight / src_weights / dst_weights with sender scales: a list of N dicts in the simulator."""
    others = [[j for j in range(N) if j != i] for i in range(N)]
    sends = [sorted(data.draw(st.sets(st.sampled_from(others[i]), max_size=N - 1))) if others[i] else [] for i in range(N)]
    scale = {(i, j): data.draw(st.floats(0.1, 2.0)) for i in range(N) for j in sends[i]}
    recv_w = {(i, j): data.draw(st.floats(0.0, 1.0)) for i in range(N) for j in sends[i]}
    self_w = [data.draw(st.floats(0.0, 1.0)) for _ in range(N)]
    srcs = [{j: recv_w[(j, i)] for j in range(N) if i in sends[j]} for i in range(N)]
    dsts = [{j: scale[(i, j)] for j in sends[i]} for i in range(N)]
    trees = [rank_tree(r, seed=12, dtype=dtype) for r in range(N)]
    mpi = bf.neighbor_mean(trees[ME], None, self_weight=self_w[ME], src_weights=srcs[ME], dst_weights=dsts[ME])
    sim = sim_row(lambda x: bf.neighbor_mean(x, None, self_weight=self_w, src_weights=srcs, dst_weights=dsts), bf.sim.stack(trees))
    all_ranks_agree(bitwise(sim, mpi), "per-call graph: sim == MPI bitwise")
    # And the backward pass (Wᵀ through reversed edges, sender and receiver weights swapped).
    x = trees[ME]["w"].clone().requires_grad_(True)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(ME), dtype=torch.float64).to(dtype)
    (bf.neighbor_mean(x, None, self_weight=self_w[ME], src_weights=srcs[ME], dst_weights=dsts[ME]) * c).sum().backward()
    cs = torch.stack([torch.randn(x.shape, generator=torch.Generator().manual_seed(r), dtype=torch.float64).to(dtype) for r in range(N)])
    xs = bf.sim.stack([t["w"] for t in trees]).requires_grad_(True)
    with bf.simulate(N):
        (bf.neighbor_mean(xs, None, self_weight=self_w, src_weights=srcs, dst_weights=dsts) * cs).sum().backward()
    assert x.grad is not None and xs.grad is not None
    all_ranks_agree(torch.equal(xs.grad[ME], x.grad), "per-call graph backward: sim == MPI bitwise")


def test_sim_equals_mpi_src_and_self_weight_overrides_bitwise() -> None:
    topo = T.exponential_two(N)
    ins = [topo.in_neighbors(i) for i in range(N)]
    srcs = [{j: 0.1 * (k + 1) for k, j in enumerate(ins[i][:1])} for i in range(N)]
    trees = [rank_tree(r, seed=13, dtype=torch.float32) for r in range(N)]
    mpi_a = bf.neighbor_mean(trees[ME], topo, self_weight=0.25)
    mpi_b = bf.neighbor_mean(trees[ME], topo, self_weight=0.5, src_weights=srcs[ME])
    sim_a = sim_row(lambda x: bf.neighbor_mean(x, topo, self_weight=0.25), bf.sim.stack(trees))
    sim_b = sim_row(lambda x: bf.neighbor_mean(x, topo, self_weight=[0.5] * N, src_weights=srcs), bf.sim.stack(trees))
    all_ranks_agree(bitwise(sim_a, mpi_a) and bitwise(sim_b, mpi_b), "self/src overrides: sim == MPI bitwise")


def test_sim_equals_mpi_gradient_bitwise() -> None:
    topo = T.exponential_two(N) if N > 2 else T.star(N)
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r)) for r in range(N)]
    cs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + r)) for r in range(N)]
    x = xs[ME].clone().requires_grad_(True)
    (bf.neighbor_mean(x, topo) * cs[ME]).sum().backward()
    X = torch.stack(xs).requires_grad_(True)
    with bf.simulate(N):
        (bf.neighbor_mean(X, topo) * torch.stack(cs)).sum().backward()
    assert x.grad is not None and X.grad is not None
    all_ranks_agree(torch.equal(X.grad[ME], x.grad), "gradient Wᵀ: sim == MPI bitwise")


def test_sim_equals_mpi_half_types_within_one_ulp() -> None:
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        trees = [rank_tree(r, seed=14, dtype=dtype) for r in range(N)]
        topo = T.exponential_two(N)
        mpi = bf.neighbor_mean(trees[ME], topo)
        sim = sim_row(lambda x, topo=topo: bf.neighbor_mean(x, topo), bf.sim.stack(trees))
        for a, e in zip(leaves(sim), leaves(mpi), strict=True):
            assert a.dtype == dtype
            assert_close_everywhere(a.double(), e.double(), f"half {dtype}", atol=tol, rtol=tol)


def test_sim_equals_mpi_neighbor_gather() -> None:
    topo = T.exponential_two(N)
    trees = [{"i": torch.arange(4) + 10 * r, "f": torch.randn(2, 3, generator=torch.Generator().manual_seed(r))} for r in range(N)]
    mpi = bf.neighbor_gather(trees[ME], topo)
    with bf.simulate(N):
        sim = bf.neighbor_gather(bf.sim.stack(trees), topo)[ME]
    ok = sorted(sim) == sorted(mpi) and all(bitwise(sim[j], mpi[j]) for j in mpi)
    all_ranks_agree(ok, "neighbor_gather: sim == MPI")


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]), root=st.integers(0, 63))
def test_sim_equals_mpi_collectives(seed: int, dtype: torch.dtype, root: int) -> None:
    root %= N
    trees = [agent_tree(r, seed, [(3,), (2, 4), (0, 2)], dtype) for r in range(N)]
    stacked = bf.sim.stack(trees)
    mpi_b, mpi_a = bf.broadcast(trees[ME], root=root), bf.allgather(trees[ME])
    sim_b = sim_row(lambda x: bf.broadcast(x, root=root), stacked)
    sim_a = sim_row(bf.allgather, stacked)
    all_ranks_agree(bitwise(sim_b, mpi_b) and bitwise(sim_a, mpi_a), "broadcast/allgather: sim == MPI bitwise")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for op in (bf.global_sum, bf.global_mean):
        mpi = op(trees[ME])
        sim = sim_row(op, stacked)
        if MPICH:
            all_ranks_agree(bitwise(sim, mpi), f"{op.__name__}: sim == MPICH bitwise")
        for a, e in zip(leaves(sim), leaves(mpi), strict=True):
            assert a.dtype == e.dtype
            assert_close_everywhere(a.double(), e.double(), f"{op.__name__}: sim == MPI", atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# The same per-agent training step, 20 steps, under MPI and in the simulator


def _data(r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(bf.sim.agent_seed(3, r))
    x = torch.randn(16, 5, generator=g)
    y = x @ torch.arange(1.0, 6.0) + 0.1 * torch.randn(16, generator=g) + r
    return x, y


def _init(r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(bf.sim.agent_seed(4, r))
    return {"w": torch.randn(5, generator=g), "b": torch.zeros(())}


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


TOPO = T.one_peer_exponential_two(N)


def train_step(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
    """One agent's decentralized SGD step, the same code for an MPI rank and a simulated agent."""
    g = torch.func.grad(_loss)(p, x, y)
    p = {k: v - 0.05 * g[k] for k, v in p.items()}
    return bf.neighbor_mean(p, TOPO, t)


def train_step_through_mix(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
    """The gradient flows through neighbor_mean: agent i gets Σ_k W[k, i] ∇L_k (Wᵀ)."""
    g = torch.func.grad(lambda q: _loss(bf.neighbor_mean(q, TOPO, t), x, y))(p)
    return {k: v - 0.05 * g[k] for k, v in p.items()}


def test_sim_equals_mpi_training_20_steps() -> None:
    # The very same per-agent functions run on MPI ranks and over simulated agents.
    for mpi_fn, sim_fn in ((train_step, train_step), (train_step_through_mix, train_step_through_mix)):
        x, y = _data(ME)
        p = _init(ME)
        for t in range(20):
            p = mpi_fn(p, x, y, t)
        with bf.simulate(N):
            X, Y = bf.sim.per_agent(_data)
            P = bf.sim.per_agent(_init)
            run = bf.sim.vmap(sim_fn, in_dims=(0, 0, 0, None))
            for t in range(20):
                P = run(P, X, Y, t)
        for k in p:
            assert_close_everywhere(P[k][ME], p[k].detach(), f"{sim_fn.__name__} {k} after 20 steps", atol=1e-5, rtol=1e-5)
