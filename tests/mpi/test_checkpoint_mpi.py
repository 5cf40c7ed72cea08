"""bf.checkpoint under MPI: resuming from a per-rank checkpoint gives the uninterrupted iterates,
bit for bit; window contents (mass in flight) survive a save/load; consensus is the global mean.

At size 1 (plain pytest) the same tests run in the local world.  Every rank writes its own file
(``{rank}`` in the path) into a directory that rank 0 creates and broadcasts.
"""

from __future__ import annotations

import os

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from . import resume_cases as rc
from .conftest import all_ranks_agree

N = bf.size()
ME = bf.rank()


@pytest.fixture
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One directory for all ranks (they share a file system): rank 0's, broadcast by name."""
    name = str(tmp_path_factory.mktemp("ckpt")) if ME == 0 else ""
    data = torch.zeros(512, dtype=torch.uint8)
    data[: len(name)] = torch.tensor(list(name.encode()), dtype=torch.uint8)
    got = bf.broadcast(data, 0)
    return bytes(got[got != 0].tolist()).decode()


@pytest.mark.parametrize("case", sorted(rc.CASES))
def test_checkpoint_resume_equals_uninterrupted(case: str, shared_dir: str) -> None:
    path = os.path.join(shared_dir, case + ".{rank}.pt")
    full = rc.uninterrupted(case, path, N, ME)
    again = rc.resumed(case, path, N, ME)
    ok = rc.bitwise_equal(rc.numbers(full), rc.numbers(again))
    rc.free_windows(full)
    rc.free_windows(again)
    all_ranks_agree(ok, f"{case}: resumed run differs from the uninterrupted one")
    assert os.path.exists(path.replace("{rank}", str(ME)))


@pytest.mark.parametrize("style", ["atc", "awc"])
def test_checkpoint_resume_decentralized_optimizer(style: str, shared_dir: str) -> None:
    path = os.path.join(shared_dir, f"module_{style}.{{rank}}.pt")
    full = rc.module_run(style, path, N, ME, resume=False)
    again = rc.module_run(style, path, N, ME, resume=True)
    all_ranks_agree(rc.bitwise_equal(full, again), f"DecentralizedOptimizer {style}: resumed run differs")


def test_checkpoint_window_in_flight_mass_survives(shared_dir: str) -> None:
    """Mass sent but not yet collected sits in the slots; the checkpoint keeps it."""
    topo = T.exponential_two(N)
    opt = bf.optim.push_sum(0.1, topo, synchronous=False)
    x = {"w": torch.full((3,), float(ME), dtype=torch.float64)}
    state = opt.init(x)
    x, state = opt.step(x, {"w": torch.zeros(3, dtype=torch.float64)}, state, 0)
    # One more push without a collect: mass in flight at every out-neighbour.
    share = state.window.uniform_share(1)
    pushed = ({"w": state.numerator["w"] * share}, state.weight * share)
    state.window.accumulate(pushed, step=1)
    sent = float(bf.global_sum(state.weight * share * len(topo.out_neighbors(ME))))
    path = os.path.join(shared_dir, "inflight.{rank}.pt")
    bf.checkpoint.save(path, state)
    back = bf.checkpoint.load(path, like=opt.init(x))
    original = state.window.collect()
    restored = back.window.collect()
    same = all(torch.equal(a, b) for a, b in zip(rc.numbers(original), rc.numbers(restored), strict=True))
    total = float(bf.global_sum(restored[1]))
    state.window.free()
    back.window.free()
    all_ranks_agree(same, "collect after load differs from collect on the original window")
    # Σ w was n after step 0 (own + in flight); the extra push added `sent` to the slots.
    assert total == pytest.approx(N + sent, rel=1e-12)
    if N > 1:
        assert sent > 0


def test_checkpoint_load_without_like_refuses_windows(shared_dir: str) -> None:
    opt = bf.optim.push_sum(0.1, T.ring(N))
    state = opt.init(torch.ones(2))
    path = os.path.join(shared_dir, "nolike.{rank}.pt")
    bf.checkpoint.save(path, state)
    state.window.free()
    with pytest.raises(ValueError, match=r"checkpoint\.load: .* one-sided windows .* like=opt\.init"):
        bf.checkpoint.load(path)
    bf.barrier()


def test_checkpoint_consensus_is_global_mean() -> None:
    x = {"w": torch.arange(3, dtype=torch.float64) + ME, "none": None}
    out = bf.checkpoint.consensus(x)
    expected = torch.arange(3, dtype=torch.float64) + (N - 1) / 2
    all_ranks_agree(torch.allclose(out["w"], expected, atol=1e-15, rtol=0) and out["none"] is None, "consensus")
    assert torch.equal(x["w"], torch.arange(3, dtype=torch.float64) + ME)


def test_checkpoint_save_is_atomic_and_leaves_no_temp(shared_dir: str) -> None:
    path = os.path.join(shared_dir, "atomic.{rank}.pt")
    mine = path.replace("{rank}", str(ME))
    bf.checkpoint.save(path, {"v": torch.ones(2)})
    bf.checkpoint.save(path, {"v": torch.zeros(2)})
    leftovers = [f for f in os.listdir(shared_dir) if f.startswith(f"atomic.{ME}.pt.")]
    ok = torch.equal(bf.checkpoint.load(path)["v"], torch.zeros(2)) and not leftovers and os.path.isfile(mine)
    all_ranks_agree(ok, f"atomic save (leftovers {leftovers})")
