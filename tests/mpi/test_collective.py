"""global_sum / global_mean / broadcast / allgather / barrier on every rank."""

from __future__ import annotations

import copy

import pytest
import torch

import bluefog_fn as bf

from .conftest import all_ranks_agree, assert_close_everywhere
from .reference import leaves, rank_tree

N = bf.size()
ME = bf.rank()


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)]
)
def test_global_mean_equals_dense_mean(dtype: torch.dtype, tol: float) -> None:
    trees = [rank_tree(r, seed=1, dtype=dtype) for r in range(N)]
    before = copy.deepcopy(trees[ME])
    out = bf.global_mean(trees[ME])
    for k, a in enumerate(leaves(out)):
        expected = sum(leaves(t)[k].double() for t in trees) / N
        assert a.dtype == dtype
        assert_close_everywhere(a.double(), expected, "global_mean", atol=tol, rtol=tol)
    assert all(torch.equal(a, b) for a, b in zip(leaves(trees[ME]), leaves(before), strict=True))


def test_global_sum_integers_exact() -> None:
    x = {"i": torch.arange(6, dtype=torch.int64).reshape(2, 3) * (ME + 1), "f": torch.full((2,), float(ME))}
    out = bf.global_sum(x)
    total = N * (N + 1) // 2
    ok = torch.equal(out["i"], torch.arange(6).reshape(2, 3) * total) and torch.equal(
        out["f"], torch.full((2,), float(N * (N - 1) // 2))
    )
    all_ranks_agree(ok, "global_sum integers")


def test_global_mean_async_equals_sync() -> None:
    x = rank_tree(ME, seed=2)
    h = bf.global_mean_async(x)
    sync = bf.global_mean(x)
    assert all(torch.equal(a, b) for a, b in zip(leaves(h.wait()), leaves(sync), strict=True))


def test_global_mean_gradient() -> None:
    cs = [torch.randn(5, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(N)]
    x = torch.ones(5, dtype=torch.float64, requires_grad=True)
    (bf.global_mean(x) * cs[ME]).sum().backward()
    assert x.grad is not None
    assert_close_everywhere(x.grad, sum(cs) / N, "global_mean grad", atol=1e-12, rtol=1e-12)


def test_global_mean_rejects_integer_leaves() -> None:
    with pytest.raises(TypeError, match=r"global_mean: tree leaf \['i'\] has dtype torch.int64"):
        bf.global_mean({"i": torch.arange(3)})


@pytest.mark.parametrize("root", sorted({0, N - 1}))
def test_broadcast_from_root(root: int) -> None:
    trees = [rank_tree(r, seed=4) for r in range(N)]
    out = bf.broadcast(trees[ME], root=root)
    ok = all(torch.equal(a, b) for a, b in zip(leaves(out), leaves(trees[root]), strict=True))
    all_ranks_agree(ok, "broadcast")


def test_broadcast_rejects_bad_root() -> None:
    with pytest.raises(ValueError, match=f"broadcast: root has rank {N} but the world has {N} ranks"):
        bf.broadcast(torch.zeros(2), root=N)


def test_allgather_concatenates_in_rank_order_with_varying_first_dims() -> None:
    def part(r: int) -> dict[str, torch.Tensor]:
        return {"a": torch.full((r + 1, 2), float(r)), "b": torch.arange(r + 2, dtype=torch.int32) + 100 * r}

    out = bf.allgather(part(ME))
    ok = torch.equal(out["a"], torch.cat([part(r)["a"] for r in range(N)])) and torch.equal(
        out["b"], torch.cat([part(r)["b"] for r in range(N)])
    )
    all_ranks_agree(ok, "allgather")


def test_barrier_and_async_barrier() -> None:
    bf.barrier()
    h = bf.barrier_async()
    assert h.wait() is None
    assert h.done()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.bool])
def test_broadcast_any_dtype_bitwise(dtype: torch.dtype) -> None:
    def value(r: int) -> torch.Tensor:
        return (torch.arange(7, dtype=torch.float32) * 0.37 + r).to(dtype)

    out = bf.broadcast({"x": value(ME)}, root=N - 1)
    all_ranks_agree(torch.equal(out["x"], value(N - 1)), f"broadcast {dtype}")
