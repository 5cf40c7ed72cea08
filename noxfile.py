"""nox sessions: tests, tests_mpi (2 and 4 ranks), lint, typecheck, bench, docs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "tests_mpi"]
PY = "3.11"


def _install(session: nox.Session, extras: str = "dev") -> None:
    # The CPU wheel first; an open torch range on an empty venv would pull a CUDA build.
    session.install("torch==2.13.0")
    session.install("-e", f".[{extras}]")


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    """Single-process tests (world of one, simulator, planner, topology)."""
    _install(session)
    session.run("python", "-m", "pytest", "tests", "-q", *session.posargs)


@nox.session(python=PY)
@nox.parametrize("np", [2, 4])
def tests_mpi(session: nox.Session, np: int) -> None:
    """The MPI tests under bfrun -np 2 and -np 4."""
    _install(session)
    session.run(
        "timeout", "1500", "bfrun", "-np", str(np), "python", "-m", "pytest", "tests/mpi", "-q",
        "-o", "addopts=--strict-markers", "--timeout", "240", "-x", *session.posargs,
        external=True, env={"BLUEFOG_FN_TIMEOUT": "60"},
    )


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    """ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")


@nox.session(python=PY)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the backend (as ``bluefog_fn.backend``)."""
    _install(session)
    session.run("python", "tools/typecheck.py")


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """The benchmarks at 2 ranks (the only unoversubscribed setting on a 2-core machine)."""
    _install(session)
    session.run("bfrun", "-np", "2", "python", "bench/neighbor_mean.py", external=True)
    session.run("bfrun", "-np", "2", "python", "bench/train_throughput.py", external=True)
    session.run("python", "bench/simulator.py")


@nox.session(python=PY)
def docs(session: nox.Session) -> None:
    """The docstring examples (a world of one), then the site, strict: a warning or a broken link fails."""
    _install(session, "dev,docs")
    session.run("python", "-m", "pytest", "--doctest-modules", "bluefog_fn", "backend", "-q",
                "-o", "addopts=--strict-markers", "-p", "no:cacheprovider")
    session.run("python", "-m", "pytest", "tests/test_docs.py", "tests/test_tutorial.py", "-q", "-p", "no:cacheprovider")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
