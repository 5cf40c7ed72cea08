"""The lean path of cached ``neighbor_mean`` calls (executors/prepared.py) against the regular
path and the dense reference, on every rank (and in a world of one)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.world import current

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import dense_mix, leaves, rank_tree

N = bf.size()
_exchanges = getattr(current().executor, "exchanges", None)
# With the same-host transport on for every size (BLUEFOG_FN_SHM=1), neighbours on this machine
# read each other in place and the lean path (MPI messages) steps aside.
pytestmark = pytest.mark.skipif(
    _exchanges is not None and _exchanges.channel is not None and _exchanges.policy.min_bytes == 0,
    reason="the same-host transport serves every size here",
)
ME = bf.rank()


def _prepared() -> int:
    return len(current().executor.prepared)  # type: ignore[attr-defined]


def _regular(tree: Any, topo: Any, step: int) -> Any:
    """The same call forced through the regular path (an async handle never takes the lean one)."""
    return bf.neighbor_mean_async(tree, topo, step).wait()


def test_second_call_is_served_by_the_prepared_executor_and_equals_the_regular_path() -> None:
    topo = T.one_peer_exponential_two(N)
    bf.plan_cache_clear()
    trees = [rank_tree(r, seed=3) for r in range(N)]
    first = bf.neighbor_mean(trees[ME], topo, 5)
    assert _prepared() == 1
    hits = bf.plan_cache_info().hits
    second = bf.neighbor_mean(trees[ME], topo, 5)
    assert bf.plan_cache_info().hits == hits + 1, "a lean call counts as a plan-cache hit"
    regular = _regular(trees[ME], topo, 5)
    expected = dense_mix(topo.at(5).mixing_matrix(), trees, ME)
    for a, b, c, e in zip(leaves(first), leaves(second), leaves(regular), leaves(expected), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c), "lean and regular results differ"
        assert_close_everywhere(b, e, "lean neighbor_mean", atol=1e-12, rtol=1e-12)
    assert type(second) is dict and list(second) == list(trees[ME])
    assert type(second["nested"]) is list and type(second["nested"][1]) is tuple and second["nested"][1][1] is None


def test_results_of_consecutive_lean_calls_stay_independent() -> None:
    # The prepared executor reuses its receive buffers; results must never alias them.
    topo = T.ring(N)
    outs, expected = [], []
    for k in range(4):
        trees = [{"x": torch.full((3,), float(10 * k + r), dtype=torch.float64)} for r in range(N)]
        before = copy.deepcopy(trees[ME])
        outs.append(bf.neighbor_mean(trees[ME], topo))
        expected.append(dense_mix(topo.mixing_matrix(), trees, ME))
        assert torch.equal(trees[ME]["x"], before["x"]), "neighbor_mean modified its input"
    for k, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert_close_everywhere(o["x"], e["x"], f"lean call {k} after later calls", atol=1e-12, rtol=1e-12)


def test_calls_needing_the_regular_path_do_not_take_the_lean_one() -> None:
    topo = T.ring(N)
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    bf.neighbor_mean({"x": x.detach()}, topo)
    bf.neighbor_mean({"x": x.detach()}, topo)
    out = bf.neighbor_mean({"x": x}, topo)  # same pattern, but differentiable
    assert out["x"].requires_grad
    out["x"].sum().backward()
    assert x.grad is not None
    expected = topo.mixing_matrix().sum(0)[ME].item()  # (Wᵀ 1)_me
    assert torch.allclose(x.grad, torch.full((4,), expected, dtype=torch.float64))


def test_a_bad_step_still_raises_the_regular_error() -> None:
    topo = T.ring(N)
    bf.neighbor_mean({"x": torch.ones(2)}, topo)
    with pytest.raises(TypeError, match="step must be an int >= 0, got float"):
        bf.neighbor_mean({"x": torch.ones(2)}, topo, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        bf.neighbor_mean({"x": torch.ones(2)}, topo, -1)


_DTYPES = st.sampled_from([torch.float32, torch.float64])
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def _trees(depth: int = 2) -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.tuples(_SHAPES, _DTYPES), st.none())
    if depth == 0:
        return leaf
    child = _trees(depth - 1)
    return st.one_of(
        leaf,
        st.dictionaries(st.sampled_from("abcd"), child, min_size=1, max_size=3),
        st.lists(child, min_size=1, max_size=3),
        st.lists(child, min_size=1, max_size=3).map(tuple),
    )


def _materialise(spec: Any, rank: int, gen: torch.Generator) -> Any:
    if spec is None:
        return None
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        shape, dtype = spec
        return (torch.randn(shape, generator=gen, dtype=torch.float64) + rank).to(dtype)
    if isinstance(spec, dict):
        return {k: _materialise(v, rank, gen) for k, v in spec.items()}
    items = [_materialise(v, rank, gen) for v in spec]
    return items if isinstance(spec, list) else tuple(items)


# derandomize: every rank draws the same examples, so their calls match.
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=_trees(), step=st.integers(0, 9))
def test_lean_path_equals_the_dense_reference_for_random_plain_trees(spec: Any, step: int) -> None:
    topo = T.one_peer_exponential_two(N)
    trees = [_materialise(spec, r, torch.Generator().manual_seed(r)) for r in range(N)]
    if not leaves(trees[ME]):
        return
    regular = _regular(trees[ME], topo, step)
    bf.neighbor_mean(trees[ME], topo, step)  # prepares
    lean = bf.neighbor_mean(trees[ME], topo, step)
    expected = dense_mix(topo.at(step).mixing_matrix(), trees, ME)
    ok = True
    for a, b, e in zip(leaves(lean), leaves(regular), leaves(expected), strict=True):
        ok &= torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
        tol = 1e-5 if a.dtype == torch.float32 else 1e-12
        ok &= torch.allclose(a.to(torch.float64), e, atol=tol, rtol=tol)
    all_ranks_agree(ok, "lean path vs regular path and dense reference")
