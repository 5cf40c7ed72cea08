"""Ranks out of step inside window operations end with errors on every rank, never hang.

Each case is a small program run by ``bfrun -np 2`` in a subprocess with a hard timeout and a
short ``BLUEFOG_FN_TIMEOUT``.  Every rank reports the error it ended with on stdout, then
lingers a little longer than the timeout so that its peer can report too (an early exit would
make the launcher end the peer before it says anything).  A rank stuck in a blocking MPI call
would never report, and the test would see its silence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bluefog_fn.backend.watchdog import EXIT_STATUS

BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")
TIMEOUT = 3.0
ENV = {**os.environ, "BLUEFOG_FN_TIMEOUT": str(TIMEOUT)}
for key in (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "PMI_FD",
):
    ENV.pop(key, None)

PRELUDE = f"""
import os, sys, time, traceback
import torch
import bluefog_fn as bf

def report(exc):
    notes = " | ".join(getattr(exc, "__notes__", []))
    line = f"RESULT rank={{bf.rank()}} {{type(exc).__name__}}: {{exc}} NOTES: {{notes}}".replace("\\n", " ")
    os.write(1, (line + "\\n").encode())
    time.sleep({TIMEOUT} + 4)  # let the peer report before the launcher ends the job
    os._exit(1)

def run(main):
    try:
        main()
    except BaseException as exc:
        report(exc)
    os.write(1, f"RESULT rank={{bf.rank()}} OK\\n".encode())
"""


def launch(
    tmp_path: Path, body: str
) -> tuple[subprocess.CompletedProcess[str], dict[int, str], float]:
    script = tmp_path / "case.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    start = time.monotonic()
    try:
        out = subprocess.run(
            [BFRUN, "-np", "2", sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
    finally:
        leftover = subprocess.run(
            ["pgrep", "-f", str(script)], capture_output=True, text=True
        ).stdout.split()
        for pid in leftover:  # only processes running this test's own script
            subprocess.run(["kill", "-9", pid], check=False)
    elapsed = time.monotonic() - start
    assert not leftover, f"processes left running after the job ended: {leftover}"
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT rank="):
            rank, _, rest = line[len("RESULT rank=") :].partition(" ")
            results[int(rank)] = rest
    return out, results, elapsed


def test_window_free_while_peer_is_still_working_errors_on_both_ranks(tmp_path: Path) -> None:
    # Issue 8's case: rank 0's check fails between two barriers and it leaves the window's
    # block (freeing it); rank 1 carries on with the window and then waits in a barrier.
    out, results, elapsed = launch(
        tmp_path,
        """
        def main():
            x = torch.ones(3)
            with bf.Window(x, bf.topology.ring(bf.size())) as win:
                win.put(x)
                bf.barrier()
                if bf.rank() == 0:
                    raise AssertionError("rank 0's check failed")
                win.put(x)
                bf.barrier()
        run(main)
        """,
    )
    assert out.returncode != 0
    assert set(results) == {0, 1}, (
        f"a rank never reported (stuck in MPI?)\n{out.stdout}\n{out.stderr}"
    )
    assert results[0].startswith("AssertionError: rank 0's check failed"), results[0]
    # Rank 0's free either gives up on rank 1 (then its note names rank 1) or, when rank 1's
    # barrier timed out first and rank 1 reached free in time, frees the window normally.
    note = results[0].partition("NOTES:")[2]
    assert not note.strip() or ("Window.free" in note and "rank(s) [1]" in note), results[0]
    assert results[1].startswith("CommTimeoutError"), results[1]
    assert elapsed < 60


def test_window_free_out_of_step_with_a_later_free_errors_on_both_ranks(tmp_path: Path) -> None:
    # Rank 1 reaches free only after rank 0 gave up on it: rank 0's stale "I am here" token
    # must not let rank 1 enter the collective release alone.
    out, results, elapsed = launch(
        tmp_path,
        f"""
        def main():
            x = torch.ones(3)
            win = bf.Window(x, bf.topology.ring(bf.size()))
            if bf.rank() == 1:
                time.sleep({TIMEOUT} + 1.5)
            win.free()
        run(main)
        """,
    )
    assert set(results) == {0, 1}, (
        f"a rank never reported (stuck in MPI?)\n{out.stdout}\n{out.stderr}"
    )
    assert results[0].startswith("CommTimeoutError: Window.free: rank(s) [1] did not reach"), (
        results[0]
    )
    assert results[1].startswith("CommTimeoutError: Window.free: rank(s) [0] did not confirm"), (
        results[1]
    )
    assert out.returncode != 0 and elapsed < 60


def test_window_mutex_held_by_out_of_step_rank_errors_on_both_ranks(tmp_path: Path) -> None:
    # Rank 0 keeps rank 1's mutex past the timeout, then waits in a barrier rank 1 never joins.
    out, results, elapsed = launch(
        tmp_path,
        f"""
        def main():
            x = torch.ones(3)
            win = bf.Window(x, bf.topology.ring(bf.size()))
            if bf.rank() == 0:
                with win.mutex([1]):
                    time.sleep({TIMEOUT} + 2)
                bf.barrier()
            else:
                time.sleep(0.5)
                with win.mutex([1]):
                    pass
        run(main)
        """,
    )
    assert set(results) == {0, 1}, (
        f"a rank never reported (stuck in MPI?)\n{out.stdout}\n{out.stderr}"
    )
    assert results[0].startswith("CommTimeoutError") and "barrier" in results[0], results[0]
    assert results[1].startswith(
        "CommTimeoutError: Window.mutex (ranks [1]): the mutex of rank 1"
    ), results[1]
    assert out.returncode != 0 and elapsed < 60


def test_window_async_ops_out_of_step_complete_without_the_peer(tmp_path: Path) -> None:
    # One-sided operations never wait for the target: rank 0 puts, accumulates and reads while
    # rank 1 is busy elsewhere, and both finish normally.
    out, results, _ = launch(
        tmp_path,
        """
        def main():
            x = torch.ones(3)
            with bf.Window(x, bf.topology.ring(bf.size())) as win:
                if bf.rank() == 0:
                    win.accumulate_async(x).wait()
                    win.put_async(x).wait()
                    win.get_async().wait()
                    win.update()
                else:
                    time.sleep(1.0)  # no MPI calls at all
        run(main)
        """,
    )
    assert results == {0: "OK", 1: "OK"}, f"{out.stdout}\n{out.stderr}"
    assert out.returncode == 0


def test_watchdog_ends_a_process_stuck_past_its_deadline() -> None:
    code = (
        "import time; from bluefog_fn.backend.watchdog import Watchdog\n"
        "w = Watchdog()\n"
        "with w.guard('Window.free: MPI_Win_free', 0.5):\n"
        "    time.sleep(30)\n"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert out.returncode == EXIT_STATUS
    assert "Window.free: MPI_Win_free did not return within 0.5 s" in out.stderr
    assert time.monotonic() - start < 20


def test_watchdog_guard_that_returns_in_time_does_nothing() -> None:
    from bluefog_fn.backend.watchdog import Watchdog

    w = Watchdog()
    with w.guard("quick", 5.0):
        pass
    with w.guard("no deadline", 0.0):
        pass
    w.close()
    with (
        pytest.raises(ZeroDivisionError),
        w.guard("raising", 5.0),
    ):  # errors pass through, disarming
        1 / 0  # noqa: B018
    w.close()
