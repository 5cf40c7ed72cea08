"""bf.Window and bf.optim.push_sum in the simulator (and a world of one), against dense references.

References are computed from the topology's mixing matrix / edge lists in float64.  MPI equality
with the simulator is in ``tests/mpi/test_window_mpi.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T

F64 = torch.float64
EXACT = {"atol": 1e-12, "rtol": 1e-12}


def chord(n: int) -> T.Topology:
    """A directed ring with one chord 0 → 2: strongly connected, W not doubly stochastic."""
    A = torch.eye(n, dtype=F64)
    for i in range(n):
        A[(i + 1) % n, i] = 1.0
    if n >= 3:
        A[2, 0] = 1.0
    return T.from_matrix(A / A.sum(1, keepdim=True))


def data(n: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, 3, 2, generator=g, dtype=F64),
        "b": torch.randn(n, 4, generator=g, dtype=torch.float32),
        "none": None,
    }


def dense(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,j...->i...", W.to(F64), X.to(F64))


def adjacency(graph: T.Topology) -> torch.Tensor:
    """``E[i, j] = 1`` when j sends to i (j ≠ i)."""
    n = graph.size
    E = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in graph.in_neighbors(i):
            E[i, j] = 1.0
    return E


TOPOLOGIES = {
    "ring5": lambda: T.ring(5),
    "exp2_6": lambda: T.exponential_two(6),
    "star4": lambda: T.star(4),
    "chord5": lambda: chord(5),
}


# ---------------------------------------------------------------------------------------------
# put / accumulate / get / update


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_window_put_update_is_W_x(name: str) -> None:
    topo = TOPOLOGIES[name]()
    n = topo.size
    x = data(n)
    saved = copy.deepcopy(x)
    W = topo.mixing_matrix()
    with bf.simulate(n):
        win = bf.Window(x, topo)
        win.put(x)
        out = win.update()
        win.free()
    torch.testing.assert_close(out["w"], dense(W, x["w"]), **EXACT)
    torch.testing.assert_close(out["b"], dense(W, x["b"]).float(), atol=1e-6, rtol=1e-6)
    assert out["none"] is None and out["b"].dtype == torch.float32
    for k in ("w", "b"):
        assert torch.equal(x[k], saved[k]), "Window ops modified their input"


def test_window_accumulate_twice_and_reset() -> None:
    topo = chord(5)
    n = 5
    x = data(n)["w"]
    W, E = topo.mixing_matrix(), adjacency(topo)
    with bf.simulate(n):
        win = bf.Window(x, topo)
        win.accumulate(x)
        win.accumulate(2.0 * x)
        out = win.update(reset=True)
        # Expected: w_ii x_i + Σ_j w_ij (3 x_j), then the own value becomes that result.
        expected = dense(torch.diag(torch.diag(W)) + 3.0 * (W - torch.diag(torch.diag(W))), x)
        torch.testing.assert_close(out, expected, **EXACT)
        # After reset the slots are zero: collecting returns the stored own value unchanged.
        torch.testing.assert_close(win.collect(), expected, **EXACT)
        # No reset: the slots keep their content and are read again.
        win.accumulate(x)
        first = win.update(
            self_weight=1.0, src_weights=[{j: 1.0 for j in topo.in_neighbors(i)} for i in range(n)]
        )
        torch.testing.assert_close(first, expected + dense(E, x), **EXACT)
        second = win.update(
            self_weight=0.0, src_weights=[{j: 1.0 for j in topo.in_neighbors(i)} for i in range(n)]
        )
        torch.testing.assert_close(second, dense(E, x), **EXACT)
        win.free()


def test_window_put_dst_weights_and_update_src_weights() -> None:
    topo = T.exponential_two(4)
    n = 4
    x = torch.arange(n * 2, dtype=F64).view(n, 2) + 1.0
    scale = [{d: float(i + d + 1) for d in topo.out_neighbors(i)} for i in range(n)]
    src = [{j: 0.5 + j for j in topo.in_neighbors(i)} for i in range(n)]
    with bf.simulate(n):
        win = bf.Window(x, topo)
        win.put(x, scale)
        out = win.update(self_weight=[0.25 * (i + 1) for i in range(n)], src_weights=src)
        win.free()
    expected = torch.stack(
        [
            0.25 * (i + 1) * x[i]
            + sum((0.5 + j) * (i + j + 1) * x[j] for j in topo.in_neighbors(i))
            for i in range(n)
        ]
    )
    torch.testing.assert_close(out, expected, **EXACT)


def test_window_put_overwrites_and_partial_destinations() -> None:
    topo = T.ring(4)
    n = 4
    x = torch.ones(n, 3, dtype=F64)
    with bf.simulate(n):
        win = bf.Window(x, topo)
        win.put(5.0 * x)
        win.put(x, [[(i + 1) % n] for i in range(n)])  # overwrite only the right neighbour
        out = win.update(
            self_weight=0.0, src_weights=[{j: 1.0 for j in topo.in_neighbors(i)} for i in range(n)]
        )
        win.free()
    # Each agent's slot from its left neighbour holds 1, from its right neighbour still 5.
    torch.testing.assert_close(out, torch.full((n, 3), 6.0, dtype=F64), **EXACT)


def test_window_get_fetches_own_values() -> None:
    topo = chord(5)
    n = 5
    x = data(n, seed=3)["w"]
    with bf.simulate(n):
        win = bf.Window(x, topo)
        win.get()
        torch.testing.assert_close(win.update(), dense(topo.mixing_matrix(), x), **EXACT)
        # The own value is now W x; a weighted get fetches 2·(W x)_j.
        wx = dense(topo.mixing_matrix(), x)
        win.get([{j: 2.0 for j in topo.in_neighbors(i)} for i in range(n)])
        out = win.update(
            self_weight=0.0, src_weights=[{j: 1.0 for j in topo.in_neighbors(i)} for i in range(n)]
        )
        win.free()
    torch.testing.assert_close(out, 2.0 * dense(adjacency(topo), wx), **EXACT)


def test_window_dynamic_topology_steps() -> None:
    topo = T.one_peer_exponential_two(8)
    n = 8
    x = data(n, seed=5)["w"]
    expected = x.clone()
    with bf.simulate(n):
        win = bf.Window(x, topo)
        assert win.in_neighbors(0) == tuple(
            sorted({j for k in range(topo.period) for j in topo.at(k).in_neighbors(0)})
        )
        cur = x
        for k in range(5):
            win.put(cur, step=k)
            cur = win.update(reset=True, step=k)
            expected = dense(topo.at(k).mixing_matrix(), expected)
            torch.testing.assert_close(cur, expected, **EXACT)
        win.free()


def test_window_half_precision_is_stored_as_float32() -> None:
    topo = T.ring(3)
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.bfloat16)
    with bf.simulate(3):
        win = bf.Window(x, topo)
        win.accumulate(x)
        out = win.update()
        win.free()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense(topo.mixing_matrix(), x), atol=1e-2, rtol=1e-2)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shape=st.sampled_from([(), (0,), (5,), (3, 4), (2, 3, 5), (4097,)]),
    k=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_window_combine_is_the_float64_sum_rounded_once(
    dtype: torch.dtype, shape: tuple[int, ...], k: int, seed: int
) -> None:
    # The compiled combine must give the bits of the left-to-right float64 sum, rounded once.
    from bluefog_fn.ops.window import combine_update

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    slots = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(k)]
    weights = torch.rand(k, generator=g, dtype=F64).div(3).tolist()
    acc = x.to(F64) * (1 / 3)
    for s, w in zip(slots, weights, strict=True):
        acc += s.to(F64) * w
    x_before = x.clone()
    out = combine_update(x, slots, weights, 1 / 3)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, acc.to(dtype))
    assert torch.equal(x, x_before)


def test_window_world_of_one() -> None:
    win = bf.Window({"a": torch.ones(2), "b": None}, T.ring(bf.size()))
    win.put({"a": torch.ones(2), "b": None})
    out = win.update(self_weight=2.0)
    assert out["b"] is None
    if bf.size() == 1:
        assert out["a"].tolist() == [2.0, 2.0]
    win.free()


# ---------------------------------------------------------------------------------------------
# Mass conservation and push-sum


def _topology(kind: str, n: int) -> Any:
    return {
        "ring": T.ring,
        "star": T.star,
        "exp2": T.exponential_two,
        "one_peer": T.one_peer_exponential_two,
        "chord": chord,
        "base": T.base_graph,
    }[kind](n)


@settings(max_examples=25)
@given(
    kind=st.sampled_from(["ring", "star", "exp2", "one_peer", "chord", "base"]),
    n=st.integers(1, 9),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_push_sum_conserves_mass(kind: str, n: int, steps: int, seed: int) -> None:
    topo = _topology(kind, n)
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with bf.simulate(n):
        opt = bf.optim.push_sum(0.1, topo)
        state = opt.init(x0)
        x = x0
        for k in range(steps):
            x, state = opt.step(x, torch.zeros_like(x), state, k)
            torch.testing.assert_close(
                state.weight.sum(), torch.tensor(float(n), dtype=F64), **EXACT
            )
            torch.testing.assert_close(state.numerator.sum(0), x0.sum(0), atol=1e-12, rtol=1e-12)
        state.window.free()


def _push_sum_reference(
    topo: Any, x0: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense push-sum: ``u ← A_k u``, ``w ← A_k w`` with column-stochastic uniform shares."""
    n = x0.shape[0]
    u, w = x0.clone(), torch.ones(n, dtype=F64)
    for k in range(steps):
        g = topo.at(k)
        A = torch.zeros(n, n, dtype=F64)
        for i in range(n):
            share = 1.0 / (len(g.out_neighbors(i)) + 1)
            A[i, i] = share
            for j in g.out_neighbors(i):
                A[j, i] = share
        u, w = A @ u, A @ w
    return u / w[:, None], w


@pytest.mark.parametrize("kind,n", [("exp2", 6), ("one_peer", 8), ("chord", 5), ("chord", 7)])
def test_push_sum_reaches_exact_average_on_directed_graphs(kind: str, n: int) -> None:
    topo = _topology(kind, n)
    x0 = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    with bf.simulate(n):
        opt = bf.optim.push_sum(0.1, topo)
        state = opt.init(x0)
        x = x0
        for k in range(12):
            x, state = opt.step(x, torch.zeros_like(x), state, k)
        ref, ref_w = _push_sum_reference(topo, x0, 12)
        torch.testing.assert_close(x, ref, **EXACT)
        torch.testing.assert_close(state.weight, ref_w, **EXACT)
        for k in range(12, 400):
            x, state = opt.step(x, torch.zeros_like(x), state, k)
        state.window.free()
    assert (x - x0.mean(0)).abs().max().item() < 1e-10


def test_push_sum_beats_plain_mixing_on_non_doubly_stochastic_graph() -> None:
    topo = chord(5)
    assert not topo.is_doubly_stochastic()
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    with bf.simulate(5):
        x = x0
        for _ in range(400):
            x = bf.neighbor_mean(x, topo)
    # Plain mixing converges, but to a weighted average (the left Perron vector), not the mean.
    assert (x - x0.mean(0)).abs().max().item() > 1e-3


def test_push_sum_gradient_step_matches_reference() -> None:
    topo = chord(4)
    n = 4
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    target = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    lr = 0.05
    with bf.simulate(n):
        opt = bf.optim.push_sum(lr, topo)
        state = opt.init(x0)
        x = x0
        u, w = x0.clone(), torch.ones(n, dtype=F64)
        for k in range(10):
            g = x - target  # ∇ ½‖x − t_i‖²
            x, state = opt.step(x, g, state, k)
            A = torch.zeros(n, n, dtype=F64)
            for i in range(n):
                share = 1.0 / (len(topo.out_neighbors(i)) + 1)
                A[i, i] = share
                for j in topo.out_neighbors(i):
                    A[j, i] = share
            u, w = A @ (u - lr * g), A @ w
            torch.testing.assert_close(x, u / w[:, None], **EXACT)
        state.window.free()


# ---------------------------------------------------------------------------------------------
# Validation


def test_window_validation_errors() -> None:
    topo = T.ring(4)
    x = torch.ones(4, 3, dtype=F64)
    with bf.simulate(4):
        with pytest.raises(TypeError, match=r"dtype torch\.bool"):
            bf.Window(torch.ones(4, 3, dtype=torch.bool), topo)
        with pytest.raises(ValueError, match="topology has size 5"):
            bf.Window(x, T.ring(5))
        with pytest.raises(TypeError, match="topology must be"):
            bf.Window(x, "ring")  # type: ignore[arg-type]
        win = bf.Window(x, topo)
        win.accumulate(x)
        with pytest.raises(ValueError, match=r"Window.put: tree must match"):
            win.put(torch.ones(4, 2, dtype=F64))
        with pytest.raises(ValueError, match=r"Window.accumulate: tree must match"):
            win.accumulate(torch.ones(4, 3, dtype=torch.float32))
        with pytest.raises(
            ValueError, match=r"dst_weights names rank\(s\) \[2\] that have no slot for rank 0"
        ):
            win.put(x, [[2]] + [[(i + 1) % 4] for i in range(1, 4)])
        with pytest.raises(ValueError, match="dst_weights has rank 9"):
            win.accumulate(x, {9: 1.0})
        with pytest.raises(
            ValueError, match=r"src_weights names rank\(s\) \[2\] that have no slot at rank 0"
        ):
            win.get([{2: 1.0}, {}, {}, {}])
        with pytest.raises(ValueError, match="self_weight is required"):
            win.update(src_weights={})
        with pytest.raises(ValueError, match="self_weight"):
            win.update(self_weight=-1.0)
        with pytest.raises(TypeError, match="reset must be a bool"):
            win.update(reset=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="step must be"):
            win.put(x, step=-1)
        # Nothing moved: the failed calls left the slots as the successful accumulate made them.
        E = adjacency(topo)
        out = win.update(
            self_weight=0.0, src_weights=[{j: 1.0 for j in topo.in_neighbors(i)} for i in range(4)]
        )
        torch.testing.assert_close(out, dense(E, x), **EXACT)
        win.free()
        with pytest.raises(RuntimeError, match=r"Window\.update: the window was freed"):
            win.update()
        with pytest.raises(RuntimeError, match=r"Window\.put: the window was freed"):
            win.put(x)
    with bf.simulate(2):
        win = bf.Window(torch.ones(2, 1), T.ring(2))
    with pytest.raises(RuntimeError, match="belongs to another world"):
        win.update()


def test_push_sum_validation() -> None:
    with pytest.raises(TypeError, match="push_sum: topology must be"):
        bf.optim.push_sum(0.1, "ring")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="push_sum: synchronous must be a bool"):
        bf.optim.push_sum(0.1, T.ring(2), synchronous=1)  # type: ignore[arg-type]
    opt = bf.optim.push_sum(0.1, T.ring(bf.size()))
    x = torch.ones(2)
    state = opt.init(x)
    with pytest.raises(TypeError, match="push_sum: state must be a PushSumState"):
        opt.step(x, x, (1, 2), 0)
    state.window.free()


# ---------------------------------------------------------------------------------------------
# Push-DIGing


def _shares(graph: T.Topology) -> torch.Tensor:
    """Column-stochastic push-sum matrix: ``A[j, i] = 1/(d_i + 1)`` for j ∈ out(i) ∪ {i}."""
    n = graph.size
    A = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        share = 1.0 / (len(graph.out_neighbors(i)) + 1)
        A[i, i] = share
        for j in graph.out_neighbors(i):
            A[j, i] = share
    return A


@pytest.mark.parametrize("kind,n", [("chord", 5), ("one_peer", 8), ("exp2", 6)])
def test_push_diging_matches_reference_and_reaches_exact_optimum(kind: str, n: int) -> None:
    topo = _topology(kind, n)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(n, 3, generator=g, dtype=F64)
    target = torch.randn(n, 3, generator=g, dtype=F64)  # f_i = ½‖x − t_i‖², optimum mean(t)
    lr = 0.2
    with bf.simulate(n):
        opt = bf.optim.push_diging(lr, topo)
        state = opt.init(x0)
        x = x0
        u, w, z, prev = (
            x0.clone(),
            torch.ones(n, dtype=F64),
            torch.zeros_like(x0),
            torch.zeros_like(x0),
        )
        for k in range(15):
            grad = x - target
            x, state = opt.step(x, grad, state, k)
            y = z + grad - prev
            A = _shares(topo.at(k))
            u, w, z, prev = A @ (u - lr * y), A @ w, A @ y, grad
            torch.testing.assert_close(x, u / w[:, None], **EXACT)
            torch.testing.assert_close(
                state.weight.sum(), torch.tensor(float(n), dtype=F64), **EXACT
            )
            # Tracking: the trackers' sum is the sum of the latest gradients.
            torch.testing.assert_close(state.tracker.sum(0), grad.sum(0), atol=1e-12, rtol=1e-12)
        for k in range(15, 500):
            x, state = opt.step(x, x - target, state, k)
        state.window.free()
    assert (x - target.mean(0)).abs().max().item() < 1e-10


def test_push_diging_validation() -> None:
    with pytest.raises(TypeError, match="push_diging: topology must be"):
        bf.optim.push_diging(0.1, None)  # type: ignore[arg-type]
    opt = bf.optim.push_diging(0.1, T.ring(bf.size()))
    x = {"a": torch.ones(2), "none": None}
    state = opt.init(x)
    with pytest.raises(ValueError, match="push_diging: grads must have the structure"):
        opt.step(x, {"b": torch.ones(2)}, state, 0)
    state.window.free()


# ---------------------------------------------------------------------------------------------
# async handles, integer leaves, mutex, context manager, timeline


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_window_async_ops_equal_dense_reference(name: str) -> None:
    topo = TOPOLOGIES[name]()
    n = topo.size
    x, y = data(n, seed=7), data(n, seed=8)
    saved = copy.deepcopy(y)
    W, E = topo.mixing_matrix(), adjacency(topo)
    ones = [{j: 1.0 for j in topo.in_neighbors(i)} for i in range(n)]
    with bf.simulate(n), bf.Window(x, topo) as win:
        handles = [
            win.put_async(y),
            win.accumulate_async(y),
            win.accumulate_async(y, [{d: 2.0 for d in topo.out_neighbors(i)} for i in range(n)]),
        ]
        y["w"].add_(100.0)  # the tree was copied at the call
        assert all(h.done() for h in handles) and [h.wait() for h in handles] == [None] * 3
        out = win.update(self_weight=1.0, src_weights=ones, reset=True)
        torch.testing.assert_close(out["w"], x["w"] + 4.0 * dense(E, saved["w"]), **EXACT)
        h = win.get_async()
        h.wait()
        fetched = win.update(self_weight=0.0, src_weights=ones)
    assert win._freed
    torch.testing.assert_close(fetched["w"], dense(E, out["w"]), **EXACT)
    torch.testing.assert_close(fetched["b"], dense(E, out["b"]).float(), atol=1e-6, rtol=1e-6)
    del W


def test_window_integer_leaves_put_get_accumulate_exact() -> None:
    topo = chord(5)
    n = 5
    big = 2**60  # beyond float64's exact integers: arithmetic must stay in int64
    x = {
        "i": torch.arange(n * 3, dtype=torch.int64).view(n, 3) + big,
        "c": torch.arange(n * 2, dtype=torch.int8).view(n, 2),
    }
    E = adjacency(topo).to(torch.int64)
    ones = [{j: 1 for j in topo.in_neighbors(i)} for i in range(n)]
    with bf.simulate(n), bf.Window(x, topo) as win:
        win.put(x)
        got = win.update(self_weight=0, src_weights=ones)
        assert got["i"].dtype == torch.int64 and got["c"].dtype == torch.int8
        assert torch.equal(got["i"], E @ x["i"]) and torch.equal(
            got["c"], (E @ x["c"].long()).to(torch.int8)
        )
        win.accumulate(x, [{d: 3 for d in topo.out_neighbors(i)} for i in range(n)])
        win.accumulate(x)
        summed = win.collect()
        assert torch.equal(summed["i"], got["i"] + E @ x["i"] * 4 + E @ x["i"])
        win.get([{j: 2 for j in topo.in_neighbors(i)} for i in range(n)])
        fetched = win.update(self_weight=0, src_weights=ones)
        assert torch.equal(fetched["i"], 2 * (E @ summed["i"]))
        with pytest.raises(
            ValueError,
            match=r"integer leaves, so dst_weights must be whole numbers; got dst_weights\[1\] = 0.5",
        ):
            win.put(x, {1: 0.5})
        with pytest.raises(
            ValueError,
            match=r"integer leaves, so src_weights \(the topology's weights\) must be whole",
        ):
            win.update()  # chord's default weights are fractions
        with pytest.raises(ValueError, match=r"self_weight must be whole numbers"):
            win.update(self_weight=0.5, src_weights=ones)
        after = win.update(self_weight=1, src_weights=ones)
        assert torch.equal(after["i"], fetched["i"] + 2 * (E @ summed["i"])), (
            "failed calls changed nothing"
        )


def test_window_rejects_bool_and_complex_leaves() -> None:
    with bf.simulate(2):
        for dtype in (torch.bool, torch.complex64):
            with pytest.raises(
                TypeError, match=rf"Window: tree leaf .* has dtype {dtype}; a window holds"
            ):
                bf.Window(torch.zeros(2, 1, dtype=dtype), T.ring(2))


def test_window_mutex_validation_and_reentrance() -> None:
    topo = T.ring(4)
    with bf.simulate(4), bf.Window(torch.zeros(4, 2), topo) as win:
        with win.mutex([2, 0]), win.mutex(1):
            win.put(torch.ones(4, 2))
        with win.mutex():  # default: each agent's out-neighbours
            pass
        with (
            pytest.raises(RuntimeError, match=r"already holds the mutex of rank\(s\) \[2\]"),
            win.mutex([2]),
            win.mutex([3, 2]),
        ):
            pass
        with (
            win.mutex([2]),  # released after the failure above
            pytest.raises(
                RuntimeError,
                match=r"Window.free: called while holding the mutex of rank\(s\) \[2\]",
            ),
        ):
            win.free()
        with pytest.raises(
            ValueError, match=r"Window.mutex: ranks has rank 4 but the world has 4 ranks"
        ):
            win.mutex([4]).__enter__()
        with pytest.raises(ValueError, match=r"must not repeat a rank, got \[1, 1\]"):
            win.mutex([1, 1]).__enter__()
        with pytest.raises(TypeError, match=r"ranks must be int ranks, got str '1'"):
            win.mutex(["1"]).__enter__()  # type: ignore[list-item]
        assert not win._held


def test_window_context_manager_frees_on_error_and_reraises() -> None:
    with bf.simulate(3):
        with pytest.raises(KeyError, match="boom"), bf.Window(torch.zeros(3, 1), T.ring(3)) as win:
            raise KeyError("boom")
        with pytest.raises(RuntimeError, match=r"Window\.put: the window was freed"):
            win.put(torch.zeros(3, 1))
        with bf.Window(torch.zeros(3, 1), T.ring(3)) as win2:
            win2.free()  # freeing inside the block is allowed; leaving it does nothing more
    with bf.Window(torch.zeros(1), T.ring(bf.size())) as win3:
        win3.accumulate_async(torch.ones(1)).wait()
    with pytest.raises(RuntimeError, match="freed"):
        win3.update()


def test_window_ops_record_timeline_events(tmp_path: Any) -> None:
    import json

    from bluefog_fn.timeline import Timeline
    from bluefog_fn.timeline_merge import merge
    from bluefog_fn.world import current

    world = current()
    saved, world.timeline = world.timeline, Timeline(str(tmp_path / "tl"), 0)
    try:
        with bf.Window(torch.zeros(2), T.ring(bf.size())) as win:
            win.put(torch.ones(2))
            win.accumulate_async(torch.ones(2)).wait()
            win.get_async().wait()
            with win.mutex([0]):
                win.collect()
        assert world.timeline is not None
        world.timeline.close()
        merge(world.timeline.path)  # per-rank files -> the one trace (what bfrun does at the end)
        with open(world.timeline.path) as f:
            names = [e["name"] for e in json.load(f)["traceEvents"]]
    finally:
        world.timeline = saved
    for expected in (
        "Window.create",
        "Window.put",
        "Window.accumulate_async",
        "Window.get_async",
        "Window.mutex_acquire",
        "Window.update",
        "Window.free",
    ):
        assert expected in names, (expected, names)
