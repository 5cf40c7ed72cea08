"""``neighbor_mean(..., out=)`` in one process: a world of one and ``bf.simulate(n)``.

The multi-rank cases (shared trees, in-place updates, async calls in flight) are in
tests/mpi/test_neighbor.py and tests/mpi/test_shared_memory.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=2).map(tuple), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(["plain", "in_place", "async"]),
    seed=st.integers(0, 2**16),
)
def test_simulated_out_equals_the_dense_reference(n: int, shapes: list[tuple[int, ...]], dtype: torch.dtype, kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn((n, *s), generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    x0 = [t.clone() for t in x]
    topo = T.exponential_two(n)
    with bf.simulate(n):
        out = x if kind == "in_place" else [torch.full_like(t, 3.0) for t in x]
        if kind == "async":
            got = bf.neighbor_mean_async(x, topo, out=out).wait()
        else:
            got = bf.neighbor_mean(x, topo, out=out)
    assert got is out
    w = topo.mixing_matrix()
    for o, t in zip(out, x0, strict=True):
        want = torch.einsum("ij,j...->i...", w, t.to(torch.float64))
        torch.testing.assert_close(o.to(torch.float64), want, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)
    if kind != "in_place":
        assert all(torch.equal(a, b) for a, b in zip(x, x0, strict=True))


def test_out_of_a_shared_tree_is_written_in_place_in_a_world_of_one() -> None:
    x = {"w": torch.arange(6.0).reshape(2, 3), "b": [torch.ones(2, dtype=torch.float64)], "n": None}
    a, b = bf.shared_tree(x), bf.shared_tree(x)
    pointers = [b["w"].data_ptr(), b["b"][0].data_ptr()]
    for step in range(4):
        src, dst = (a, b) if step % 2 == 0 else (b, a)
        src["w"].add_(1.0)
        got = bf.neighbor_mean(src, T.ring(1), step, out=dst)
        assert got is dst and torch.equal(dst["w"], src["w"]) and torch.equal(dst["b"][0], src["b"][0])
    assert [b["w"].data_ptr(), b["b"][0].data_ptr()] == pointers


def test_out_is_refused_with_gradients() -> None:
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="out= is not differentiable"):
        bf.neighbor_mean(x, T.ring(1), out=torch.zeros(3))
    with torch.no_grad():
        assert torch.equal(bf.neighbor_mean(x, T.ring(1), out=torch.zeros(3)), torch.ones(3))
