"""A last-resort deadline for MPI calls that have no non-blocking form.

``MPI_Win_allocate``, ``MPI_Win_free``, ``MPI_Win_lock`` and ``MPI_Win_unlock`` block inside MPI
until peers cooperate (with MPICH a lock even waits until the target next enters MPI).  The
window code makes a hang unlikely (a bounded all-ranks meeting before each collective call,
epochs never held while waiting for a lock), but it cannot interrupt a call that is already
blocked.  The watchdog can: while a guarded call runs, a daemon thread (MPI releases the GIL
while it blocks) checks the deadline; when it passes, the process writes what it was waiting
for to stderr and exits with :data:`EXIT_STATUS`.  The launcher (``mpiexec``) then ends the
other ranks, so the job fails with a message instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

EXIT_STATUS = 75
"""Exit status of a process ended by the watchdog."""

_POLL_SECONDS = 0.2


class Watchdog:
    """Ends the process when a guarded call outlives its deadline.

    Arming and disarming are two attribute writes (no thread per call); the checking thread is
    started on first use, sleeps between checks and stops at :meth:`close`.
    """

    def __init__(self) -> None:
        self._armed: tuple[float, str, float] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        """Run the body with a deadline of ``timeout`` seconds (non-positive: no deadline)."""
        if timeout <= 0:
            yield
            return
        self._start()
        previous = self._armed
        self._armed = (time.monotonic() + timeout, what, timeout)
        try:
            yield
        finally:
            self._armed = previous

    def close(self) -> None:
        """Stop the checking thread (guards used later start a new one)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
            self._stop = threading.Event()

    def _start(self) -> None:
        if self._thread is None:  # only the thread that makes MPI calls arms guards
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="bluefog_fn-watchdog", daemon=True
            )
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(_POLL_SECONDS):
            armed = self._armed  # one read: the main thread replaces the tuple, never mutates it
            if armed is not None and time.monotonic() > armed[0]:
                _, what, timeout = armed
                sys.stderr.write(
                    f"bluefog_fn: {what} did not return within {timeout:g} s (a peer died, is out of "
                    "step, or has not entered MPI since); ending this process with status "
                    f"{EXIT_STATUS} so that the job fails instead of hanging (BLUEFOG_FN_TIMEOUT sets "
                    "the limit)\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_STATUS)
