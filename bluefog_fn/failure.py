"""What a rank of a multi-process job does when it fails, so that the job never hangs.

Installed once per process when an MPI world of more than one rank is created:

* an uncaught exception (main thread or any other thread) prints its traceback once, every line
  tagged ``[bluefog_fn rank r]``, writes a failure record for ``bfrun`` and aborts the whole job
  (``MPI_Abort``): every rank ends within seconds instead of waiting for a peer that will never
  answer (the survivors' only other way out is their ``BLUEFOG_FN_TIMEOUT``);
* at interpreter exit the process world is shut down first, with the same deadline as every
  wait: a rank whose peers never reach their end aborts the job instead of waiting forever in
  ``MPI_Finalize``.

Under ``bfrun`` the environment variable ``BLUEFOG_FN_JOB_DIR`` names a directory private to the
job: each rank writes ``rank<r>.pid`` when it starts, ``rank<r>.starting`` while MPI initializes,
``rank<r>.failure.json`` (rank, exception type, message, time) when it fails and ``rank<r>.left``
when it ends cleanly; ``bfrun`` reads them
to report which rank failed and how (see :mod:`bluefog_fn.launch_watch`).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import NoReturn

JOB_DIR_ENV = "BLUEFOG_FN_JOB_DIR"
# If MPI_Abort itself does not end this process (a broken launcher), the kernel does.
_FORWARD_GRACE_SECONDS = 0.5  # how long the traceback gets to reach the launcher before the abort
_ABORT_FALLBACK_SECONDS = 10


def record_path(job_dir: str, rank: int, kind: str) -> str:
    """Where rank ``rank`` writes its ``kind`` record (``"pid"`` or ``"failure.json"``)."""
    return os.path.join(job_dir, f"rank{rank}.{kind}")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RankFailureHook:
    """The process's ``sys.excepthook``: report an uncaught exception once, then abort the job."""

    def __init__(self, rank: int, abort: Callable[[int], NoReturn], previous: Callable[..., object]) -> None:
        self.rank = rank
        self.abort = abort
        # A hook the program installed itself keeps printing; the default one is replaced.
        self.previous = None if previous is sys.__excepthook__ else previous
        self.failing = False

    def __call__(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        self.fail(exc_type, exc, tb)

    def on_thread(self, args: threading.ExceptHookArgs) -> None:
        """``threading.excepthook``: an uncaught exception in any thread fails the rank too."""
        if args.exc_type is SystemExit or args.exc_value is None:
            return  # a thread calling sys.exit ends only itself, as in plain Python
        where = f" in thread {args.thread.name!r}" if args.thread is not None else ""
        self.fail(args.exc_type, args.exc_value, args.exc_traceback, where)

    def fail(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, where: str = ""
    ) -> NoReturn:
        """Print, record, abort; never returns.  A second failure meanwhile only aborts."""
        if not self.failing:
            self.failing = True
            # Reporting must never stand between a failure and the abort.
            with contextlib.suppress(BaseException):
                self._report(exc_type, exc, tb, where)
        self._abort(130 if issubclass(exc_type, KeyboardInterrupt) else 1)

    def _report(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, where: str) -> None:
        if self.previous is not None:
            self.previous(exc_type, exc, tb)
        else:
            tag = f"[bluefog_fn rank {self.rank}] "
            lines = [f"uncaught exception{where}; aborting the job\n", *traceback.format_exception(exc_type, exc, tb)]
            text = "".join(tag + line + "\n" for chunk in lines for line in chunk.rstrip("\n").split("\n"))
            sys.stdout.flush()
            os.write(2, text.encode(errors="replace"))  # one write: ranks' lines do not interleave
        job_dir = os.environ.get(JOB_DIR_ENV)
        if job_dir and os.path.isdir(job_dir):
            message = str(exc).strip().splitlines()
            record = {
                "rank": self.rank,
                "type": exc_type.__name__,
                "message": message[0] if len(message) == 1 else " ".join(m.strip() for m in message),
                "where": where.strip(),
                "time": time.time(),
                "pid": os.getpid(),
            }
            _write_atomically(record_path(job_dir, self.rank, "failure.json"), json.dumps(record) + "\n")

    def _abort(self, code: int) -> NoReturn:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(_ABORT_FALLBACK_SECONDS)
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        # The launcher forwards each rank's stderr through a pipe; MPI_Abort ends every process
        # of the job at once, its forwarders included, which can drop the traceback just written.
        time.sleep(_FORWARD_GRACE_SECONDS)
        self.abort(code)


def _launcher_rank() -> int | None:
    for key in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        raw = os.environ.get(key, "")
        if raw.isdigit():
            return int(raw)
    return None


@contextlib.contextmanager
def startup_deadline(timeout: float) -> Iterator[None]:
    """Bound MPI's initialization, which waits for every rank of the job and has no deadline of
    its own: past ``timeout`` seconds the process prints where it is stuck and exits with status
    1, and the launcher then ends the job."""
    rank = _launcher_rank()
    job_dir = os.environ.get(JOB_DIR_ENV)
    starting = None
    if job_dir and rank is not None and os.path.isdir(job_dir):
        _write_atomically(record_path(job_dir, rank, "pid"), f"{os.getpid()}\n")
        starting = record_path(job_dir, rank, "starting")
        _write_atomically(starting, f"{timeout:g}\n")
    # faulthandler's watchdog is a C thread: it fires even while MPI_Init holds the GIL.
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if starting is not None:
            with contextlib.suppress(OSError):
                os.remove(starting)


def install(rank: int, abort: Callable[[int], NoReturn], at_exit: Callable[[], None]) -> RankFailureHook:
    """Install the failure handling of a rank (idempotent); returns the hook.

    ``abort(code)`` ends every process of the job; ``at_exit()`` shuts the process world down
    with a deadline (it may raise; the hook then reports and aborts).
    """
    if isinstance(sys.excepthook, RankFailureHook):
        return sys.excepthook
    hook = RankFailureHook(rank, abort, sys.excepthook)
    job_dir = os.environ.get(JOB_DIR_ENV)
    sys.excepthook = hook
    threading.excepthook = hook.on_thread

    def close_at_exit() -> None:
        try:
            at_exit()
        except BaseException as exc:
            hook.fail(type(exc), exc, exc.__traceback__, " at interpreter exit")
        if job_dir and os.path.isdir(job_dir):  # this rank is ending cleanly, whatever its status
            _write_atomically(record_path(job_dir, rank, "left"), "")

    # atexit runs handlers last-in first-out, and this one is registered after MPI was
    # initialized, so it runs while MPI is still usable (MPI_Finalize comes later).
    atexit.register(close_at_exit)
    if job_dir and os.path.isdir(job_dir):
        _write_atomically(record_path(job_dir, rank, "pid"), f"{os.getpid()}\n")
    return hook
