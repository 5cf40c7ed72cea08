"""neighbor_gather in the simulator over per-agent trees whose first dimensions differ."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T


def _tree(r: int, rows: int) -> dict[str, Any]:
    return {
        "w": torch.arange(rows * 2, dtype=torch.float64).reshape(rows, 2) + 10 * r,
        "ids": torch.arange(rows, dtype=torch.int32) * (r + 1),
        "s": torch.tensor(float(r)),
    }


def _same(a: Any, b: Any) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb, strict=True))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), rows=st.lists(st.integers(0, 4), min_size=7, max_size=7), step=st.integers(0, 5))
def test_ragged_gather_returns_each_sources_own_tree(n: int, rows: list[int], step: int) -> None:
    trees = [_tree(r, rows[r]) for r in range(n)]
    kept = [_tree(r, rows[r]) for r in range(n)]
    for topo in (T.ring(n), T.one_peer_exponential_two(n), T.star(n)):
        with bf.simulate(n):
            got = bf.neighbor_gather(bf.sim.ragged(trees), topo, step)
        assert len(got) == n
        for i in range(n):
            assert set(got[i]) == set(topo.at(step).in_neighbors(i))
            for j, tree in got[i].items():
                assert _same(tree, trees[j])
                assert tree["w"].data_ptr() != trees[j]["w"].data_ptr() or trees[j]["w"].numel() == 0
    assert all(_same(a, b) for a, b in zip(trees, kept, strict=True))


def test_ragged_gather_src_weights_select_sources_and_per_call_graphs() -> None:
    n = 4
    trees = [_tree(r, r + 1) for r in range(n)]
    with bf.simulate(n):
        sub = bf.neighbor_gather(bf.sim.ragged(trees), T.ring(n), src_weights=[{(i + 1) % n: 1.0} for i in range(n)])
        per_call = bf.neighbor_gather(
            bf.sim.ragged(trees), None,
            src_weights=[{(i - 1) % n: 1.0} for i in range(n)], dst_weights=[[(i + 1) % n] for i in range(n)],
        )
    for i in range(n):
        assert list(sub[i]) == [(i + 1) % n] and _same(sub[i][(i + 1) % n], trees[(i + 1) % n])
        assert list(per_call[i]) == [(i - 1) % n] and _same(per_call[i][(i - 1) % n], trees[(i - 1) % n])


def test_ragged_gather_carries_no_gradient() -> None:
    x = [torch.ones(r + 1, requires_grad=True) for r in range(3)]
    with bf.simulate(3):
        got = bf.neighbor_gather(bf.sim.ragged(x), T.ring(3))
    assert not got[0][1].requires_grad


def test_ragged_gather_validation() -> None:
    with bf.simulate(3):
        with pytest.raises(ValueError, match=r"neighbor_gather: bf.sim.ragged holds 2 trees but the simulated world has 3"):
            bf.neighbor_gather(bf.sim.ragged([torch.zeros(1)] * 2), T.ring(3))
        with pytest.raises(bf.MismatchError, match=r"tree leaf .* is torch.float32 of shape \(1, 2\) on agent 0 but torch.float32 of shape \(1, 3\) on agent 2"):
            bf.neighbor_gather(bf.sim.ragged([torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(1, 3)]), T.ring(3))
        with pytest.raises(bf.MismatchError, match="agent 1's tree has a different structure"):
            bf.neighbor_gather(bf.sim.ragged([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}, {"a": torch.zeros(1)}]), T.ring(3))
        with pytest.raises(bf.MismatchError, match="only first dimensions may differ"):
            bf.neighbor_gather(bf.sim.ragged([torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1)]), T.ring(3))
    with pytest.raises(TypeError, match=r"bf\.sim\.ragged: trees must be a list"):
        bf.sim.ragged(torch.zeros(3))  # type: ignore[arg-type]


def test_ragged_gather_equals_stacked_gather_when_shapes_agree() -> None:
    n = 5
    trees = [_tree(r, 3) for r in range(n)]
    with bf.simulate(n):
        stacked = bf.neighbor_gather(bf.sim.stack(trees), T.exponential_two(n), 1)
        ragged = bf.neighbor_gather(bf.sim.ragged(trees), T.exponential_two(n), 1)
    assert all(set(a) == set(b) and all(_same(a[k], b[k]) for k in a) for a, b in zip(stacked, ragged, strict=True))
