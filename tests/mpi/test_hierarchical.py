"""hierarchical_neighbor_mean against ``W_M · (machine means)`` (machines faked with
BLUEFOG_FN_RANKS_PER_MACHINE in tests/run_all.sh, or one real machine)."""

from __future__ import annotations

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import assert_close_everywhere

N, ME = bf.size(), bf.rank()
M, L = bf.machine_size(), bf.local_size()


def _data(r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(40 + r)
    return {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("make", [T.ring, T.fully_connected, T.one_peer_exponential_two])
@pytest.mark.parametrize("step", [0, 1])
def test_hierarchical_neighbor_mean_matches_machine_level_reference(make: object, step: int) -> None:
    topo = make(M)  # type: ignore[operator]
    W = topo.at(step).mixing_matrix()
    trees = [_data(r) for r in range(N)]
    out = bf.hierarchical_neighbor_mean(trees[ME], topo, step)
    mine = ME // L
    for key in ("w", "b"):
        means = [sum(trees[m * L + j][key] for j in range(L)) / L for m in range(M)]
        expected = sum(W[mine, m] * means[m] for m in range(M))
        assert_close_everywhere(out[key], expected, f"hierarchical {key}", atol=1e-12, rtol=1e-12)


def test_hierarchical_async_equals_sync() -> None:
    topo = T.ring(M)
    x = _data(ME)
    h = bf.hierarchical_neighbor_mean_async(x, topo)
    s = bf.hierarchical_neighbor_mean(x, topo)
    assert all(torch.equal(h.wait()[k], s[k]) for k in s)


def test_hierarchical_rejects_wrong_machine_topology_size() -> None:
    with pytest.raises(ValueError, match=f"machine_topology has size {M + 1} but the world has {M} machines"):
        bf.hierarchical_neighbor_mean(torch.ones(2), T.ring(M + 1))
