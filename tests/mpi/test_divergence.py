"""Divergence after agreement: peers catch a rank whose calls no longer match, within one call.

Every call pattern here is agreed first (a correct call on every rank), so what catches the
divergence is the call number each message carries, not the agreement collective.  Ranks pair up
as (0, 1), (2, 3), ...: the pair (0, 1) diverges, any other pair keeps working and must be
unaffected.  Runs under ``bfrun -np 2`` and ``-np 4``.

Tree shapes here are used by no other test: an agreed pattern is remembered for the whole
session, and a later test that expects its own first-call agreement must not find it agreed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.backend.errors import CallMismatchError
from bluefog_fn.world import current

from .conftest import all_ranks_agree

N, ME = bf.size(), bf.rank()
PARTNER = ME ^ 1
pytestmark = pytest.mark.skipif(N < 2 or N % 2, reason="needs an even number (>= 2) of ranks")


def pairs_graph(self_weight: float) -> T.Topology:
    """Each rank averages with its partner (rank ^ 1) only."""
    w = torch.zeros(N, N, dtype=torch.float64)
    for r in range(N):
        w[r, r] = self_weight
        w[r, r ^ 1] = 1.0 - self_weight
    return T.from_matrix(w)


def resync() -> None:
    """Leave the world as a correct program would: nothing queued, call numbers equal."""
    world = current()
    comm = world.executor.transport.comm  # type: ignore[attr-defined]
    status = MPI.Status()
    for _ in range(2):
        comm.Barrier()
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
            comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    world.calls.count = max(comm.allgather(world.calls.count))
    channel = world.executor.exchanges.channel  # type: ignore[attr-defined]
    if channel is not None:  # same-host transfers of the failed calls are forgotten too
        channel.reset()


def outcome(fn: object) -> tuple[str | None, object]:
    try:
        return None, fn()  # type: ignore[operator]
    except CallMismatchError as exc:
        return str(exc), None


def check_pair_failed(error: str | None, what: str) -> None:
    """Ranks 0 and 1 raised naming each other; every other rank raised nothing."""
    if ME in (0, 1):
        ok = error is not None and f"rank {PARTNER}" in error and f"rank {ME}" in error
    else:
        ok = error is None
    if not ok:
        print(f"rank {ME}: {what}: {error}")
    all_ranks_agree(ok, what)


def test_rank_running_another_step_of_a_dynamic_topology() -> None:
    topo = T.DynamicTopology([pairs_graph(0.5), pairs_graph(0.75)])
    x = {"w": torch.full((13,), float(ME), dtype=torch.float64)}
    for step in range(2):  # agree both patterns on every rank
        bf.neighbor_mean(x, topo, step)

    def run() -> list[torch.Tensor]:
        steps = [2, 4, 5] if ME == 1 else [2, 3, 4]  # rank 1 skipped step 3
        return [bf.neighbor_mean(x, topo, s)["w"] for s in steps]

    error, _ = outcome(run)
    resync()
    check_pair_failed(error, "another step")
    if ME in (0, 1):
        assert error is not None and "another step of a dynamic topology" in error


def test_rank_skipping_a_call_then_calling_another_op() -> None:
    topo = pairs_graph(0.5)
    x = {"w": torch.full((17,), float(ME))}
    bf.neighbor_mean(x, topo)
    bf.neighbor_gather(x, topo)

    def run() -> None:
        if ME != 1:
            bf.neighbor_mean(x, topo)
        bf.neighbor_gather(x, topo)  # rank 1's gather meets rank 0's neighbor_mean

    error, _ = outcome(run)
    resync()
    check_pair_failed(error, "skipped call")


def test_per_call_graph_that_the_receiver_does_not_share() -> None:
    x = torch.full((19,), float(ME))
    mine = {"self_weight": 0.5, "src_weights": {PARTNER: 0.5}, "dst_weights": [PARTNER]}
    bf.neighbor_mean(x, None, **mine)  # agreed once per tree signature, never again

    def run() -> torch.Tensor:
        if ME == 1:  # believes this call has no edges: sends nothing, expects nothing
            bf.neighbor_mean(x, None, self_weight=1.0, src_weights={}, dst_weights=[])
        else:
            bf.neighbor_mean(x, None, **mine)
        out: torch.Tensor = bf.neighbor_mean(x, None, **mine)
        return out

    error, out = outcome(run)
    resync()
    check_pair_failed(error, "per-call graph")
    if ME == 1:  # rank 0's message is found queued, or lands in rank 1's next receive
        assert error is not None and ("never received" in error or "rank 0 is at its call" in error)
    if ME >= 2:  # the healthy pairs computed exact averages throughout
        assert out is not None and torch.equal(out, torch.full((19,), (ME + PARTNER) / 2))


def test_per_call_graphs_run_no_agreement_collective_after_the_first_call() -> None:
    world = current()
    transport = world.executor.transport  # type: ignore[attr-defined]
    calls = []
    original = transport.allgather_object  # type: ignore[union-attr]

    def counting(obj: object, what: str = "agreement") -> list[object]:
        calls.append(obj)
        return original(obj, what)

    transport.allgather_object = counting  # type: ignore[union-attr,method-assign]
    try:
        x = torch.full((23,), float(ME), dtype=torch.float64)
        period = max(1, (N - 1).bit_length())
        for t in range(3 * period):
            shift = 1 << (t % period)
            dst, src = (ME + shift) % N, (ME - shift) % N
            out = bf.neighbor_mean(x, None, self_weight=0.5, src_weights={src: 0.5}, dst_weights=[dst])
            assert torch.equal(out, torch.full((23,), (ME + src) / 2, dtype=torch.float64))
    finally:
        del transport.allgather_object  # type: ignore[union-attr]
    all_ranks_agree(len(calls) <= 1, f"agreement collectives on per-call graphs: {len(calls)}")
