"""neighbor_mean / neighbor_gather on every rank against the dense reference ``W @ X``."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import dense_mix, leaves, rank_tree

N = bf.size()
ME = bf.rank()

STATIC = {
    "ring": T.ring,
    "star": T.star,
    "exponential_two": T.exponential_two,
    "mesh_grid_2d": T.mesh_grid_2d,
    "fully_connected": T.fully_connected,
    "symmetric_exponential": T.symmetric_exponential,
}


def _check_mix(topo: bf.topology.Topology | bf.topology.DynamicTopology, step: int, dtype: torch.dtype, tol: float) -> None:
    trees = [rank_tree(r, seed=step, dtype=dtype) for r in range(N)]
    mine = trees[ME]
    before = copy.deepcopy(mine)
    out = bf.neighbor_mean(mine, topo, step)
    expected = dense_mix(topo.at(step).mixing_matrix(), trees, ME)
    for a, e in zip(leaves(out), leaves(expected), strict=True):
        assert a.dtype == dtype
        assert_close_everywhere(a.to(torch.float64), e, f"neighbor_mean {topo} step {step}", atol=tol, rtol=tol)
    for a, b in zip(leaves(mine), leaves(before), strict=True):
        assert torch.equal(a, b), "neighbor_mean modified its input"


@pytest.mark.parametrize("name", sorted(STATIC))
def test_neighbor_mean_static_float64(name: str) -> None:
    _check_mix(STATIC[name](N), 0, torch.float64, 1e-12)


@pytest.mark.parametrize("step", [0, 1, 2, 3, 7])
def test_neighbor_mean_one_peer_exp2_steps(step: int) -> None:
    _check_mix(T.one_peer_exponential_two(N), step, torch.float64, 1e-12)


@pytest.mark.parametrize("step", [0, 1, 2, 5])
def test_neighbor_mean_base_graph_steps(step: int) -> None:
    _check_mix(T.base_graph(N, 1), step, torch.float64, 1e-12)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
)
def test_neighbor_mean_low_precision(dtype: torch.dtype, tol: float) -> None:
    _check_mix(T.exponential_two(N), 0, dtype, tol)


def test_neighbor_mean_async_equals_sync() -> None:
    topo = T.ring(N)
    x = rank_tree(ME, seed=3)
    handle = bf.neighbor_mean_async(x, topo)
    sync = bf.neighbor_mean(x, topo)
    got = handle.wait()
    assert handle.done()
    for a, b in zip(leaves(got), leaves(sync), strict=True):
        assert torch.equal(a, b)


def test_neighbor_mean_outputs_share_one_buffer() -> None:
    out = bf.neighbor_mean({"a": torch.ones(3), "b": torch.ones(2, 2)}, T.ring(N))
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()


def test_neighbor_mean_gradient_is_transpose() -> None:
    topo = T.exponential_two(N) if N > 2 else T.star(N)
    W = topo.mixing_matrix()
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(N)]
    cs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64) for r in range(N)]
    x = xs[ME].clone().requires_grad_(True)
    y = bf.neighbor_mean({"x": x}, topo)["x"]
    (y * cs[ME]).sum().backward()
    expected = sum(W[i, ME] * cs[i] for i in range(N))
    assert x.grad is not None
    assert_close_everywhere(x.grad, expected, "grad = Wᵀ C", atol=1e-12, rtol=1e-12)


def _override_weights(r: int) -> tuple[float, dict[int, float], dict[int, float]]:
    """A per-call directed graph: r sends to r+1 scaled 0.5 and to r+2 unscaled (n > 2)."""
    dst = {(r + 1) % N: 0.5}
    if N > 2:
        dst[(r + 2) % N] = 1.0
    src = {(r - 1) % N: 0.6}
    if N > 2:
        src[(r - 2) % N] = 0.1
    return 0.3, src, dst


@pytest.mark.skipif(N < 2, reason="per-call graphs need at least 2 ranks")
def test_neighbor_mean_dst_weights_match_bluefog() -> None:
    W = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        sw, src, _ = _override_weights(i)
        W[i, i] = sw
        for j, w in src.items():
            W[i, j] += w * _override_weights(j)[2][i]
    sw, src, dst = _override_weights(ME)
    trees = [rank_tree(r, seed=5) for r in range(N)]
    out = bf.neighbor_mean(trees[ME], None, self_weight=sw, src_weights=src, dst_weights=dst)
    for a, e in zip(leaves(out), leaves(dense_mix(W, trees, ME)), strict=True):
        assert_close_everywhere(a, e, "dst_weights", atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(N < 2, reason="needs neighbours")
def test_neighbor_mean_src_weights_reweight_in_neighbours() -> None:
    topo = T.ring(N)
    graph = topo.at(0)
    ins = graph.in_neighbors(ME)
    src = {ins[0]: 0.25}  # other in-neighbours get weight 0
    W = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        W[i, i] = 0.75
        W[i, graph.in_neighbors(i)[0]] = 0.25
    trees = [rank_tree(r, seed=6) for r in range(N)]
    out = bf.neighbor_mean(trees[ME], topo, self_weight=0.75, src_weights=src)
    for a, e in zip(leaves(out), leaves(dense_mix(W, trees, ME)), strict=True):
        assert_close_everywhere(a, e, "src_weights", atol=1e-12, rtol=1e-12)


def test_neighbor_mean_self_weight_only() -> None:
    topo = T.ring(N)
    W = topo.mixing_matrix()
    W.fill_diagonal_(0.5)
    trees = [rank_tree(r, seed=7) for r in range(N)]
    out = bf.neighbor_mean(trees[ME], topo, self_weight=0.5)
    for a, e in zip(leaves(out), leaves(dense_mix(W, trees, ME)), strict=True):
        assert_close_everywhere(a, e, "self_weight", atol=1e-12, rtol=1e-12)


def test_neighbor_gather_returns_in_neighbour_trees() -> None:
    topo = T.exponential_two(N)
    trees = [{"i": torch.arange(4) + 10 * r, "f": torch.full((2,), float(r))} for r in range(N)]
    got = bf.neighbor_gather(trees[ME], topo)
    assert sorted(got) == list(topo.in_neighbors(ME))
    ok = all(torch.equal(got[j]["i"], trees[j]["i"]) and torch.equal(got[j]["f"], trees[j]["f"]) for j in got)
    all_ranks_agree(ok, "neighbor_gather values")


@pytest.mark.skipif(N < 2, reason="a mismatch needs two ranks")
def test_neighbor_mean_shape_mismatch_raises_on_every_rank() -> None:
    x = {"w": torch.zeros(3 if ME == 1 else 2)}
    with pytest.raises(bf.MismatchError, match="shape"):
        bf.neighbor_mean(x, T.ring(N))
    bf.barrier()


@pytest.mark.skipif(N < 2, reason="a mismatch needs two ranks")
def test_neighbor_mean_dst_without_matching_src_raises_on_every_rank() -> None:
    # Every rank sends to r+1 but claims to receive from r+1 as well: inconsistent for n > 2.
    # For n = 2 that graph is consistent, so the ranks pass different tree shapes instead.
    dst = [(ME + 1) % N]
    src = {(ME + 1) % N: 0.5}
    x = torch.ones(2) if N > 2 else torch.ones(2 + ME)
    with pytest.raises(bf.MismatchError):
        bf.neighbor_mean(x, None, self_weight=0.5, src_weights=src, dst_weights=dst)
    bf.barrier()


def test_plan_cache_reuses_plans_for_dynamic_topology() -> None:
    topo = T.one_peer_exponential_two(N)
    x = {"w": torch.ones(7, dtype=torch.float64)}
    bf.plan_cache_clear()
    for step in range(3 * topo.period):
        bf.neighbor_mean(x, topo, step)
    info = bf.plan_cache_info()
    assert info.misses <= topo.period
    assert info.hits == 3 * topo.period - info.misses


tree_shapes = st.lists(
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)


@settings(max_examples=15)
@given(
    shapes=tree_shapes,
    topo_name=st.sampled_from([*sorted(STATIC), "one_peer", "base2"]),
    step=st.integers(0, 20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_neighbor_mean_random_trees(
    shapes: list[tuple[int, ...]], topo_name: str, step: int, dtype: torch.dtype, seed: int
) -> None:
    if topo_name == "one_peer":
        topo: T.Topology | T.DynamicTopology = T.one_peer_exponential_two(N)
    elif topo_name == "base2":
        topo = T.base_graph(N, 2)
    else:
        topo = STATIC[topo_name](N)

    def tree(r: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 131 + r)
        return [torch.randn(tuple(s), generator=g, dtype=torch.float64).to(dtype) for s in shapes]

    trees = [tree(r) for r in range(N)]
    out = bf.neighbor_mean(trees[ME], topo, step)
    expected = dense_mix(topo.at(step).mixing_matrix(), trees, ME)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, e in zip(out, expected, strict=True):
        assert_close_everywhere(a.double(), e, "random tree", atol=tol, rtol=tol)


@settings(max_examples=10)
@given(data=st.data())
def test_neighbor_mean_random_override_weights(data: st.DataObject) -> None:
    # Each rank draws all ranks' overrides from the same derandomized stream.
    sends = [sorted(data.draw(st.sets(st.sampled_from([j for j in range(N) if j != i]) if N > 1 else st.nothing(), max_size=N - 1))) for i in range(N)]
    scale = {(i, j): data.draw(st.floats(0.1, 2.0)) for i in range(N) for j in sends[i]}
    recv_w = {(i, j): data.draw(st.floats(0.0, 1.0)) for i in range(N) for j in sends[i]}
    self_w = [data.draw(st.floats(0.0, 1.0)) for _ in range(N)]
    W = torch.zeros(N, N, dtype=torch.float64)
    for (j, i), s in scale.items():
        W[i, j] = recv_w[(j, i)] * s
    W += torch.diag(torch.tensor(self_w, dtype=torch.float64))
    trees = [rank_tree(r, seed=11) for r in range(N)]
    src = {j: recv_w[(j, ME)] for j in range(N) if ME in sends[j]}
    dst = {j: scale[(ME, j)] for j in sends[ME]}
    out = bf.neighbor_mean(trees[ME], None, self_weight=self_w[ME], src_weights=src, dst_weights=dst)
    for a, e in zip(leaves(out), leaves(dense_mix(W, trees, ME)), strict=True):
        assert_close_everywhere(a, e, "random overrides", atol=1e-12, rtol=1e-12)


def test_torch_func_grad_through_neighbor_mean_and_global_mean() -> None:
    topo = T.exponential_two(N)
    W = topo.mixing_matrix()
    cs = [torch.randn(3, generator=torch.Generator().manual_seed(200 + r), dtype=torch.float64) for r in range(N)]
    x = torch.randn(3, generator=torch.Generator().manual_seed(ME), dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (bf.neighbor_mean({"v": v}, topo)["v"] * cs[ME]).sum() + (bf.global_mean(v) * cs[ME]).sum()

    g = torch.func.grad(loss)(x)
    expected = sum(W[i, ME] * cs[i] for i in range(N)) + sum(cs) / N
    assert_close_everywhere(g, expected, "torch.func.grad = Wᵀc + mean(c)", atol=1e-12, rtol=1e-12)


OUT_KINDS = ["shared_tree", "plain", "in_place", "result"]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_neighbor_mean_out_gives_the_same_bits_whatever_out_is(data: st.DataObject) -> None:
    # derandomize: every rank draws the same examples, so the ranks' calls match.
    topo = data.draw(st.sampled_from([T.exponential_two(N), T.one_peer_exponential_two(N), T.ring(N)]), label="topology")
    shapes = data.draw(st.lists(st.lists(st.integers(0, 300), max_size=2).map(tuple), min_size=1, max_size=4), label="shapes")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), label="dtype")
    kinds = (data.draw(st.sampled_from(OUT_KINDS), label="first out"), data.draw(st.sampled_from(OUT_KINDS), label="second out"))
    step = data.draw(st.integers(0, 5), label="step")
    gen = torch.Generator().manual_seed(97 * ME + step)
    xs = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(2)]
    want = [bf.neighbor_mean(x, topo, step + k) for k, x in enumerate(xs)]
    outs, sources = [], []
    for kind, x in zip(kinds, xs, strict=True):
        source = [t.clone() for t in x]
        if kind == "shared_tree":
            out = bf.shared_tree([torch.zeros_like(t) for t in x])
        elif kind == "plain":
            out = [torch.full_like(t, 7.0) for t in x]
        elif kind == "in_place":
            out = source  # out= the tree itself: updated in place
        else:
            out = bf.neighbor_mean(source, topo, step)  # a result's fused leaves
        outs.append(out)
        sources.append(source)
    # Both in flight, waited newest first.
    handles = [bf.neighbor_mean_async(s, topo, step + k, out=o) for k, (s, o) in enumerate(zip(sources, outs, strict=True))]
    got = [h.wait() for h in reversed(handles)][::-1]
    ok = all(g is o for g, o in zip(got, outs, strict=True))
    ok = ok and all(
        a.dtype == b.dtype and torch.equal(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)
    )
    untouched = all(
        torch.equal(leaf, leaf0)
        for kind, source, x in zip(kinds, sources, xs, strict=True) if kind != "in_place"
        for leaf, leaf0 in zip(source, x, strict=True)
    )
    all_ranks_agree(ok and untouched, f"out= {kinds} ({dtype}, {shapes}): same bits {ok}, inputs untouched {untouched}")
