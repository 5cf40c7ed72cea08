"""Shared pytest setup: hypothesis profiles and a report header naming the world."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import bluefog_fn as bf

# Under MPI every rank must draw the same examples and stay in lock-step: derandomized, no
# database, no shrinking (ranks would shrink differently and stop matching each other's calls).
settings.register_profile(
    "mpi",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[p for p in __import__("hypothesis").Phase if p.name in ("explicit", "reuse", "generate")],
)
settings.register_profile("default", deadline=None, derandomize=True, database=None)
settings.load_profile("mpi" if bf.size() > 1 else "default")


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"bluefog-fn world: rank {bf.rank()} of {bf.size()}"]
    if bf.size() > 1:
        from mpi4py import MPI

        lines.append(f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
    lines.append(f"BLUEFOG_FN_TIMEOUT={os.environ.get('BLUEFOG_FN_TIMEOUT', '(default)')}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    # Under bfrun every rank runs its own pytest: each gets its own temporary-directory root in
    # the job's private directory, or the ranks race removing each other's old ones.
    job = os.environ.get("BLUEFOG_FN_JOB_DIR")
    if bf.size() > 1 and job and config.option.basetemp is None:
        config.option.basetemp = os.path.join(job, f"pytest-rank{bf.rank()}")
