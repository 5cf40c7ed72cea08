"""Helpers for tests that run on every rank of an MPI world (and at size 1 without mpiexec)."""

from __future__ import annotations

import pytest
import torch

import bluefog_fn as bf


def all_ranks_agree(ok: bool, what: str) -> None:
    """Fail on every rank if the check failed on any rank, so ranks never drift apart."""
    flags = bf.allgather(torch.tensor([0 if ok else 1], dtype=torch.int64))
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if bad:
        pytest.fail(f"{what}: failed on rank(s) {bad}")


def assert_close_everywhere(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol: float) -> None:
    """``torch.testing.assert_close`` evaluated on each rank, reported on all of them."""
    try:
        torch.testing.assert_close(actual, expected, **tol)  # type: ignore[arg-type]
        ok, msg = True, ""
    except AssertionError as exc:
        ok, msg = False, str(exc)
    if not ok:
        print(f"rank {bf.rank()}: {what}: {msg}")
    all_ranks_agree(ok, what)
