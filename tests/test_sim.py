"""The simulator on its own: every op against the dense float64 reference ``W @ X``, gradients
(Wᵀ) through autograd, torch.func.grad and bf.sim.vmap, plan reuse, helpers and errors.

Equality with the MPI backend itself is in ``tests/mpi/test_sim_equivalence.py``; here the
simulator's kernels are also compared bit for bit with the backend's combine kernel.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.backend.kernels import combine
from bluefog_fn.sim import kernels
from bluefog_fn.sim.stacked import MixOp, allreduce_sum

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# References and strategies


def dense(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``W @ X`` over the agent dimension, in float64."""
    return torch.einsum("ij,j...->i...", W.to(F64), X.to(F64))


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if x is not None]


def builders(n: int) -> list[tuple[str, T.Topology | T.DynamicTopology]]:
    """Every builder of bf.topology that accepts n (hypercube only for powers of two)."""
    out: list[tuple[str, T.Topology | T.DynamicTopology]] = [
        ("ring", T.ring(n)),
        ("star", T.star(n, center=n - 1)),
        ("mesh_grid_2d", T.mesh_grid_2d(n)),
        ("fully_connected", T.fully_connected(n)),
        ("exponential_two", T.exponential_two(n)),
        ("exponential_3", T.exponential(n, 3)),
        ("symmetric_exponential", T.symmetric_exponential(n)),
        ("one_peer_exponential_two", T.one_peer_exponential_two(n)),
        ("base_graph_1", T.base_graph(n, 1)),
        ("base_graph_2", T.base_graph(n, 2)),
    ]
    if n & (n - 1) == 0:
        out.append(("hypercube", T.hypercube(n)))
    return out


@st.composite
def topologies(draw: st.DrawFn, max_n: int = 9) -> tuple[int, T.Topology | T.DynamicTopology]:
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["builder", "builder", "builder", "matrix"]))
    if kind == "builder":
        return n, draw(st.sampled_from(builders(n)))[1]
    # A random sparse row-stochastic W (not symmetric, not doubly stochastic).
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, n, generator=g) < 0.5
    mask |= torch.eye(n, dtype=torch.bool)
    w = torch.rand(n, n, generator=g, dtype=F64) * mask
    return n, T.from_matrix(w / w.sum(1, keepdim=True))


@st.composite
def stacked_trees(draw: st.DrawFn, n: int, dtype: torch.dtype = F64) -> Any:
    """A small pytree of stacked leaves (dim 0 = agent), with a None leaf sometimes."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = draw(st.lists(st.lists(st.integers(0, 4), max_size=2).map(tuple), min_size=1, max_size=3))

    def leaf(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn((n, *shape), generator=g, dtype=F64).to(dtype)

    tree: dict[str, Any] = {f"l{i}": leaf(s) for i, s in enumerate(shapes)}
    if draw(st.booleans()):
        tree["nested"] = [leaf((3,)), (None, leaf((2, 2)))]
    return tree


# ---------------------------------------------------------------------------------------------
# neighbor_mean == W @ X


@settings(max_examples=80)
@given(data=st.data(), topo=topologies(), step=st.integers(0, 12))
def test_neighbor_mean_matches_dense_float64(data: st.DataObject, topo: tuple[int, Any], step: int) -> None:
    n, t = topo
    X = data.draw(stacked_trees(n))
    before = copy.deepcopy(X)
    with bf.simulate(n):
        out = bf.neighbor_mean(X, t, step)
    W = t.at(step).mixing_matrix()
    for a, x in zip(tensor_leaves(out), tensor_leaves(X), strict=True):
        assert a.dtype == F64 and a.shape == x.shape
        torch.testing.assert_close(a, dense(W, x), rtol=1e-12, atol=1e-12)
    for a, b in zip(tensor_leaves(X), tensor_leaves(before), strict=True):
        assert torch.equal(a, b), "neighbor_mean modified its input"


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_neighbor_mean_every_builder_float32_is_rounded_float64(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 3, 70, generator=g)
    with bf.simulate(n):
        for name, t in builders(n):
            for step in range(t.period):
                got = bf.neighbor_mean(X, t, step)
                # Every term is exact in float64 and the sum is rounded once, so float32 results
                # are the float64 result rounded (up to float64 summation order: ±1 ulp).
                torch.testing.assert_close(got, dense(t.at(step).mixing_matrix(), X).float(), rtol=2e-7, atol=1e-7, msg=name)


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(2, 8), seed=st.integers(0, 10**6), step=st.integers(0, 5))
def test_neighbor_mean_per_agent_overrides_match_dense(data: st.DataObject, n: int, seed: int, step: int) -> None:
    """self_weight / src_weights / dst_weights given per agent, as lists of n."""
    g = torch.Generator().manual_seed(seed)
    X = data.draw(stacked_trees(n))
    mode = data.draw(st.sampled_from(["self", "src", "dst", "dst_shared_scale"]))
    t = data.draw(st.sampled_from(builders(n)))[1]
    graph = t.at(step)
    W = torch.zeros(n, n, dtype=F64)
    sws = torch.rand(n, generator=g, dtype=F64).tolist()
    kwargs: dict[str, Any]
    if mode == "self":
        kwargs = {"self_weight": sws}
        W = graph.mixing_matrix().clone()
        W.diagonal().copy_(torch.tensor(sws, dtype=F64))
    elif mode == "src":
        # Reweight a random subset of each agent's in-neighbours; the others get weight 0.
        srcs = []
        for i in range(n):
            keep = {j: float(torch.rand((), generator=g)) for j in graph.in_neighbors(i) if torch.rand((), generator=g) < 0.6}
            srcs.append(keep)
            W[i, i] = sws[i]
            for j, w in keep.items():
                W[i, j] = w
        kwargs = {"self_weight": torch.tensor(sws, dtype=F64), "src_weights": srcs}
    else:
        # A per-call directed graph with sender-side scales: W[i, j] = src_i[j] · dst_j[i].
        mask = (torch.rand(n, n, generator=g) < 0.5) & ~torch.eye(n, dtype=torch.bool)
        rw = torch.rand(n, n, generator=g, dtype=F64)
        sc = torch.rand(n, n, generator=g, dtype=F64) if mode == "dst" else torch.ones(n, n, dtype=F64)
        srcs = [{j: float(rw[i, j]) for j in range(n) if mask[i, j]} for i in range(n)]
        dsts = [{i: float(sc[j, i]) for i in range(n) if mask[i, j]} for j in range(n)]
        for i in range(n):
            W[i, i] = sws[i]
            for j, w in srcs[i].items():
                W[i, j] = w * dsts[j][i]
        kwargs = {"self_weight": sws, "src_weights": srcs, "dst_weights": dsts}
        t = None  # type: ignore[assignment]  # the per-call graph needs no topology
    with bf.simulate(n):
        out = bf.neighbor_mean(X, t, step, **kwargs)
    for a, x in zip(tensor_leaves(out), tensor_leaves(X), strict=True):
        torch.testing.assert_close(a, dense(W, x), rtol=1e-12, atol=1e-12)


def test_neighbor_mean_shared_dst_rank_list_and_single_dicts() -> None:
    """A single dict / a list of ranks applies to every agent."""
    n = 4
    X = torch.arange(float(n)).unsqueeze(1)
    # Everyone keeps half and sends to nobody: src/dst empty for all agents.
    with bf.simulate(n):
        out = bf.neighbor_mean(X, None, self_weight=0.5, src_weights={}, dst_weights=[])
    assert torch.equal(out, X * 0.5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_neighbor_mean_half_types(dtype: torch.dtype, tol: float) -> None:
    n = 6
    X = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = T.exponential_two(n)
    with bf.simulate(n):
        out = bf.neighbor_mean(X, t)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense(t.mixing_matrix(), X), rtol=tol, atol=tol)


def test_neighbor_mean_outputs_share_one_buffer_and_are_contiguous() -> None:
    n = 3
    with bf.simulate(n):
        out = bf.neighbor_mean({"a": torch.ones(n, 3), "b": torch.ones(n, 2, 2)}, T.ring(n))
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()
    assert out["a"].is_contiguous() and out["b"].is_contiguous()


def test_neighbor_mean_async_and_determinism() -> None:
    n = 7
    X = {"w": torch.randn(n, 300, generator=torch.Generator().manual_seed(3))}
    t = T.one_peer_exponential_two(n)
    with bf.simulate(n):
        h = bf.neighbor_mean_async(X, t, 2)
        assert h.done()
        a = h.wait()
        b = bf.neighbor_mean(X, t, 2)
    assert torch.equal(a["w"], b["w"])


# ---------------------------------------------------------------------------------------------
# The kernels: Numba == torch path == the MPI backend's combine, bit for bit


def _random_plans_op(n: int, seed: int, scaled: bool) -> MixOp:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, n, generator=g) < 0.6) & ~torch.eye(n, dtype=torch.bool)
    srcs = [{j: float(torch.rand((), generator=g)) for j in range(n) if mask[i, j]} for i in range(n)]
    dsts = [{i: (float(torch.rand((), generator=g)) if scaled else 1.0) for i in range(n) if mask[i, j]} for j in range(n)]
    sws = torch.rand(n, generator=g, dtype=F64).tolist()
    x = torch.zeros(n, 1)
    with bf.simulate(n):
        from bluefog_fn.sim.ops import _trace_agents, exec_cache
        from bluefog_fn.tree import flatten
        from bluefog_fn.world import current

        world = current()
        flat = bf.sim.strip_agent_dim(flatten(x, "t"), n)
        plans = _trace_agents(world, "neighbor_mean", flat, None, 0, sws, srcs, dsts)
        return exec_cache(world).get("neighbor_mean", plans)


@settings(max_examples=30)
@given(
    n=st.integers(1, 9), m=st.integers(0, 5000), seed=st.integers(0, 10**6),
    dtype=st.sampled_from([torch.float32, torch.float64]), scaled=st.booleans(),
)
def test_kernels_numba_torch_and_backend_combine_agree_bitwise(n: int, m: int, seed: int, dtype: torch.dtype, scaled: bool) -> None:
    op = _random_plans_op(n, seed, scaled)
    a = op.arrays
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    out_nb = torch.empty_like(x)
    kernels.mix_numba(a, x, out_nb)
    out_t = torch.empty_like(x)
    sw, layers = kernels.torch_layers(a, x.device, *kernels.acc_dtype(dtype))
    kernels.mix_torch(sw, layers, x, out_t)
    assert torch.equal(out_nb, out_t)
    # What each MPI rank computes: the sender scales its row (in the dtype), the receiver combines.
    for i in range(n):
        d = int(a.deg[i])
        recv = torch.stack([x[a.idx[i, q]] if a.s[i, q] == 1.0 else x[a.idx[i, q]] * float(a.s[i, q]) for q in range(d)]) if d else torch.empty(0, m, dtype=dtype)
        ref = torch.empty(m, dtype=dtype)
        combine(x[i], recv, a.w[i, :d].copy(), float(a.sw[i]), ref)
        assert torch.equal(out_nb[i], ref), f"agent {i}"


@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_parallel_path_equals_torch_path_bitwise(scaled: bool) -> None:
    """Inputs large enough for the parallel kernel, rows not a multiple of a block or a chunk,
    degrees 0..8 (both the streaming and the accumulator paths)."""
    n = 9
    m = kernels._PARALLEL_MIN // n + kernels._BLOCK // 2 + 17
    assert n * m >= kernels._PARALLEL_MIN and m % kernels._BLOCK and m % kernels._CHUNK
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(0))
    op = _random_plans_op(n, 3, scaled=scaled)
    assert op.arrays.deg.max() >= 5
    ref = torch.empty_like(x)
    sw, layers = kernels.torch_layers(op.arrays, x.device, *kernels.acc_dtype(x.dtype))
    kernels.mix_torch(sw, layers, x, ref)
    got = torch.empty_like(x)
    kernels.mix_numba(op.arrays, x, got)
    assert torch.equal(got, ref)


def test_allreduce_sum_order_is_recursive_doubling() -> None:
    vals = [torch.tensor([float(v)], dtype=F64) for v in (1e16, 1.0, -1e16, 1.0, 3.0)]
    # n = 5: fold (x0 + x1), then ((x0+x1) + x2) + (x3 + x4) as a balanced tree of 4.
    expected = ((vals[0] + vals[1]) + vals[2]) + (vals[3] + vals[4])
    assert torch.equal(allreduce_sum(vals), expected)


# ---------------------------------------------------------------------------------------------
# Gradients: Wᵀ


def _grad_setup(n: int) -> tuple[T.Topology, torch.Tensor, torch.Tensor, torch.Tensor]:
    t = T.from_matrix(torch.softmax(torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=F64), dim=1))
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, 4, 3, generator=g, dtype=F64)
    C = torch.randn(n, 4, 3, generator=g, dtype=F64)
    return t, X, C, dense(t.mixing_matrix().T, C)


def test_gradient_stacked_autograd_is_transpose() -> None:
    n = 5
    t, X, C, expected = _grad_setup(n)
    x = X.clone().requires_grad_(True)
    with bf.simulate(n):
        (bf.neighbor_mean({"x": x}, t)["x"] * C).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_gradient_torch_func_grad_on_stacked_and_second_order() -> None:
    n = 4
    t, X, C, expected = _grad_setup(n)
    with bf.simulate(n):
        g = torch.func.grad(lambda x: (bf.neighbor_mean(x, t) * C).sum())(X)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
        # d/dX of <W X, W X> is 2 WᵀW X; its Hessian-vector product with V is 2 WᵀW V.
        V = torch.randn_like(X)
        grad_f = torch.func.grad(lambda x: (bf.neighbor_mean(x, t) ** 2).sum())
        hvp = torch.func.grad(lambda x: (grad_f(x) * V).sum())(X)
    W = t.mixing_matrix()
    torch.testing.assert_close(hvp, 2 * dense(W.T @ W, V), rtol=1e-12, atol=1e-12)


def test_gradient_vmap_grad_is_transpose() -> None:
    """Per-agent code with torch.func.grad inside bf.sim.vmap: agent i gets Σ_k W[k, i] c_k."""
    n = 6
    t, X, C, expected = _grad_setup(n)

    def local_grad(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda x: (bf.neighbor_mean(x, t) * c).sum())(x)

    with bf.simulate(n):
        g = bf.sim.vmap(local_grad)(X, C)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_gradient_autograd_through_vmap_and_global_mean() -> None:
    n = 4
    t, X, C, expected = _grad_setup(n)
    x = X.clone().requires_grad_(True)
    with bf.simulate(n):
        y = bf.sim.vmap(lambda v: bf.neighbor_mean(v, t))(x)
        (y * C).sum().backward()
        assert x.grad is not None
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
        # global_mean is 11ᵀ/n: every agent's gradient is the mean of all agents' c.
        g = bf.sim.vmap(torch.func.grad(lambda v, c: (bf.global_mean(v) * c).sum()))(X, C)
    torch.testing.assert_close(g, C.mean(0, keepdim=True).expand_as(C), rtol=1e-12, atol=1e-12)


def test_outer_vmap_around_stacked_ops() -> None:
    n, B = 4, 3
    t = T.exponential_two(n)
    Xb = torch.randn(B, n, 5, dtype=F64)
    with bf.simulate(n):
        out = torch.func.vmap(lambda X: bf.neighbor_mean(X, t))(Xb)
        nested = torch.func.vmap(lambda X: bf.sim.vmap(lambda x: bf.neighbor_mean(x, t))(X))(Xb)
    ref = torch.stack([dense(t.mixing_matrix(), x) for x in Xb])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nested, ref, rtol=1e-12, atol=1e-12)


def test_vmap_per_agent_step_equals_stacked_calls() -> None:
    n = 5
    t = T.one_peer_exponential_two(n)
    P = {"w": torch.randn(n, 3, dtype=F64), "b": torch.randn(n, dtype=F64)}

    def step(p: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        q = {key: v * (1.0 + bf.sim.agent_index()) for key, v in p.items()}
        return bf.neighbor_mean(q, t, k)

    with bf.simulate(n):
        got = bf.sim.vmap(step, in_dims=(0, None))(P, 3)
        scale = torch.arange(1.0, n + 1, dtype=F64)
        ref = bf.neighbor_mean({"w": P["w"] * scale[:, None], "b": P["b"] * scale}, t, 3)
    assert torch.equal(got["w"], ref["w"]) and torch.equal(got["b"], ref["b"])


# ---------------------------------------------------------------------------------------------
# Collectives and neighbor_gather


@settings(max_examples=30)
@given(data=st.data(), n=st.integers(1, 9))
def test_collectives_match_dense(data: st.DataObject, n: int) -> None:
    X = data.draw(stacked_trees(n))
    root = data.draw(st.integers(0, n - 1))
    with bf.simulate(n):
        gm, gs = bf.global_mean(X), bf.global_sum(X)
        bc = bf.broadcast(X, root=root)
        nonempty = {k: v for k, v in X.items() if k != "nested" and v.dim() > 1}
        ag = bf.allgather(nonempty) if nonempty else {}
    for m, s, b, x in zip(tensor_leaves(gm), tensor_leaves(gs), tensor_leaves(bc), tensor_leaves(X), strict=True):
        total = x.sum(0, keepdim=True).expand_as(x)
        torch.testing.assert_close(s, total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m, total / n, rtol=1e-12, atol=1e-12)
        assert torch.equal(b, x[root].expand_as(x))
    for k, v in ag.items():
        x = nonempty[k]
        assert v.shape == (n, n * x.shape[1], *x.shape[2:])
        for i in range(n):
            assert torch.equal(v[i], x.reshape(n * x.shape[1], *x.shape[2:]))


def test_global_sum_integers_and_half_mean() -> None:
    n = 3
    with bf.simulate(n):
        s = bf.global_sum(torch.arange(6).view(n, 2))
        m = bf.global_mean(torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float16))
        allg = bf.sim.vmap(bf.allgather)(torch.arange(6.0).view(n, 2))
    assert torch.equal(s, torch.tensor([[6, 9]] * n))
    assert m.dtype == torch.float16 and torch.allclose(m.float(), torch.full((n, 1), 7 / 3), atol=2e-3)
    assert torch.equal(allg, torch.arange(6.0).expand(n, 6))
    with bf.simulate(n), pytest.raises(TypeError, match=r"global_mean: tree leaf <root> has dtype torch\.int64"):
        bf.global_mean(torch.arange(3))


def test_neighbor_gather_is_a_list_of_per_agent_dicts() -> None:
    n = 5
    t = T.exponential_two(n)
    X = {"i": torch.arange(n * 2).view(n, 2), "f": torch.randn(n, 3)}
    with bf.simulate(n):
        got = bf.neighbor_gather(X, t)
        sub = bf.neighbor_gather(X, t, src_weights=[{t.in_neighbors(i)[0]: 1.0} for i in range(n)])
    assert isinstance(got, list) and len(got) == n
    for i in range(n):
        assert sorted(got[i]) == list(t.in_neighbors(i))
        for j, tree in got[i].items():
            assert torch.equal(tree["i"], X["i"][j]) and torch.equal(tree["f"], X["f"][j])
        assert list(sub[i]) == [t.in_neighbors(i)[0]]
    # A per-call graph (agent i sends to i + 1) and inputs that require grad: no gradient flows
    # through a gather, as on MPI.
    x = torch.randn(n, 2, requires_grad=True)
    with bf.simulate(n):
        shifted = bf.neighbor_gather(
            x, None, src_weights=[{(i - 1) % n: 1.0} for i in range(n)], dst_weights=[[(i + 1) % n] for i in range(n)]
        )
    for i in range(n):
        (j, v), = shifted[i].items()
        assert j == (i - 1) % n and torch.equal(v, x[j].detach()) and not v.requires_grad


def test_trace_in_simulated_world_describes_one_agent() -> None:
    n = 4
    with bf.simulate(n):
        plan = bf.trace(bf.neighbor_mean, {"w": torch.zeros(n, 3)}, T.ring(n), rank=2)
    assert plan.rank == 2 and plan.layout.nbytes == 12 and [s for s, _ in plan.recvs] == [1, 3]


# ---------------------------------------------------------------------------------------------
# Plans are cached as on MPI


def test_plan_cache_hits_on_repeated_calls() -> None:
    n = 8
    t = T.one_peer_exponential_two(n)
    X = {"w": torch.zeros(n, 4)}
    sim = bf.simulate(n)
    with sim:
        for step in range(t.period):
            bf.neighbor_mean(X, t, step)
        first = bf.plan_cache_info()
        for step in range(t.period, 3 * t.period):
            bf.neighbor_mean(X, t, step)
        again = bf.plan_cache_info()
    assert first.misses == n * t.period
    assert again.misses == first.misses and again.hits - first.hits == 2 * n * t.period
    # The same simulate object (e.g. a decorator) keeps its world and its plans.
    with sim:
        bf.neighbor_mean(X, t, 0)
        assert bf.plan_cache_info().misses == first.misses


# ---------------------------------------------------------------------------------------------
# The world and the helpers


def test_simulate_context_decorator_and_nesting() -> None:
    outside = bf.size()

    @bf.simulate(3)
    def inner() -> int:
        with bf.simulate(5):
            assert bf.size() == 5 and bf.rank() == 0
        return bf.size()

    assert inner() == 3
    assert bf.size() == outside


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4", None])
def test_simulate_rejects_bad_n(bad: object) -> None:
    with pytest.raises(ValueError, match="simulate: n must be an int >= 1"):
        bf.simulate(bad)  # type: ignore[arg-type]


def test_stack_unstack_shard_seeds() -> None:
    trees = [{"w": torch.full((2,), float(r)), "b": None} for r in range(3)]
    s = bf.sim.stack(trees)
    assert s["b"] is None and torch.equal(s["w"][:, 0], torch.arange(3.0))
    back = bf.sim.unstack(s)
    assert all(torch.equal(a["w"], b["w"]) and a["b"] is None for a, b in zip(back, trees, strict=True))
    with pytest.raises(ValueError, match=r"stack: leaf \['w'\] is torch.float32 \(2,\) for agent 0 but torch.float32 \(3,\) for agent 1"):
        bf.sim.stack([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match=r"unstack: leaf \['w'\] has shape \(2, 2\)"):
        bf.sim.unstack({"w": torch.zeros(2, 2)}, 3)
    assert bf.sim.shard({"x": torch.arange(10)}, 3)["x"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    a = [torch.randn(4, generator=g) for g in bf.sim.generators(5, 3)]
    b = [torch.randn(4, generator=g) for g in bf.sim.generators(5, 3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[0], a[1])
    with bf.simulate(4):
        assert bf.sim.per_agent(lambda r: torch.tensor([r])).view(-1).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Errors name the argument


def test_error_leaf_without_agent_dimension_names_the_leaf() -> None:
    with bf.simulate(4), pytest.raises(ValueError, match=r"neighbor_mean: tree leaf \['b'\] has shape \(3, 2\), but inside bf.simulate\(4\)"):
        bf.neighbor_mean({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)}, T.ring(4))
    with bf.simulate(4), pytest.raises(ValueError, match=r"global_sum: tree leaf <root> has shape \(\)"):
        bf.global_sum(torch.tensor(1.0))


def test_error_per_agent_weights_wrong_length_or_type() -> None:
    with bf.simulate(3):
        with pytest.raises(ValueError, match="self_weight has 2 entries but the simulated world has 3 agents"):
            bf.neighbor_mean(torch.zeros(3, 1), T.ring(3), self_weight=[0.5, 0.5])
        with pytest.raises(ValueError, match=r"self_weight tensor must have shape \(3,\)"):
            bf.neighbor_mean(torch.zeros(3, 1), T.ring(3), self_weight=torch.ones(2))
        with pytest.raises(TypeError, match=r"src_weights\[1\] must be a dict"):
            bf.neighbor_mean(torch.zeros(3, 1), T.ring(3), self_weight=0.5, src_weights=[{}, 3, {}])
        with pytest.raises(ValueError, match=r"src_weights names rank 0, this rank itself.*simulated agent 0"):
            bf.neighbor_mean(torch.zeros(3, 1), T.ring(3), self_weight=0.5, src_weights={0: 0.5})


def test_error_inconsistent_per_call_graph_names_agents() -> None:
    n = 3
    with bf.simulate(n), pytest.raises(bf.MismatchError, match="agent 0 sends to agent 1 but agent 1 does not receive from agent 0"):
        bf.neighbor_mean(
            torch.zeros(n, 2), None, self_weight=0.5,
            src_weights=[{}, {}, {}], dst_weights=[{1: 1.0}, {}, {}],
        )


def test_error_vmap_misuse() -> None:
    with pytest.raises(RuntimeError, match=r"bf.sim.vmap must run inside bf.simulate"):
        bf.sim.vmap(lambda x: x)(torch.zeros(2))
    with pytest.raises(RuntimeError, match="agent_index"):
        bf.sim.agent_index()
    with bf.simulate(3):
        with pytest.raises(ValueError, match=r"argument 0 leaf \['w'\] has shape \(4, 2\)"):
            bf.sim.vmap(lambda p: p)({"w": torch.zeros(4, 2)})
        with pytest.raises(TypeError, match=r"neighbor_gather cannot run inside bf\.sim\.vmap"):
            bf.sim.vmap(lambda x: bf.neighbor_gather(x, T.ring(3)))(torch.zeros(3, 2))
        with pytest.raises(ValueError, match="same for every agent"):
            bf.sim.vmap(lambda x: bf.neighbor_mean(torch.ones(2), T.ring(3)) + x)(torch.zeros(3, 2))
        with pytest.raises(ValueError, match="vmap of size 2 but the simulated world has 3 agents"):
            bf.sim.vmap(lambda x: torch.func.vmap(lambda y: bf.neighbor_mean(y, T.ring(3)))(x))(torch.zeros(3, 2, 1))


def test_mixing_float_matches_mpi_semantics_for_zero_weight_in_neighbours() -> None:
    """src_weights leaving an in-neighbour out gives it weight 0 (its value still 'arrives')."""
    n = 4
    X = torch.tensor([[1.0], [np.inf], [3.0], [4.0]])
    t = T.ring(n)
    with bf.simulate(n):
        out = bf.neighbor_mean(X, t, self_weight=0.5, src_weights=[{3: 0.5}, {0: 0.5}, {3: 0.5}, {0: 0.5}])
    # As on MPI, 0 · inf = nan reaches agents 0 and 2, whose in-neighbour 1 has weight 0.
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert out[3].item() == 2.5


def test_hierarchical_neighbor_mean_with_simulated_machines() -> None:
    """local_size splits the agents into machines: W = W_M ⊗ I_L after the machine mean."""
    machines, local = 3, 2
    n = machines * local
    wm = T.ring(machines)
    X = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    with bf.simulate(n, local_size=local):
        assert (bf.machine_size(), bf.local_size()) == (machines, local)
        out = bf.hierarchical_neighbor_mean(X, wm)
    machine_mean = X.view(machines, local, 4).mean(1)
    expected = dense(wm.mixing_matrix(), machine_mean).repeat_interleave(local, 0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="local_size must be an int that divides n = 6, got 4"):
        bf.simulate(6, local_size=4)


def test_vmap_keyword_arguments_are_shared() -> None:
    with bf.simulate(3):
        out = bf.sim.vmap(lambda x, *, scale: x * scale)(torch.ones(3, 2), scale=2.0)
    assert torch.equal(out, torch.full((3, 2), 2.0))
