"""``bfrun``: launch a program on N ranks through the mpiexec installed next to this Python.

    bfrun -np 4 python train.py --lr 0.1
    bfrun -np 8 --timeline /tmp/tl python train.py
    bfrun --version

Options other than ``-np``/``-n``, ``--timeline`` and ``--version`` before the program are passed
to mpiexec unchanged.  The program starts at the first word that is not an option or an option's
value; mpiexec options that take values (``-bind-to core``, ``-hosts a,b``, ``-genv K V``...) are
known by name, and ``--`` ends the options explicitly for anything else:

    bfrun -np 8 -bind-to core -hosts n1,n2 python train.py
    bfrun -np 8 -someopt value -- python train.py

If a rank fails, the whole job ends (see :mod:`bluefog_fn.launch_watch`) and bfrun exits non-zero
after one line naming the rank and its error; otherwise its exit status is the program's.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from . import timeline_merge

USAGE = "usage: bfrun -np N [--timeline PATH] [mpiexec options] [--] program [args...]"

# How many values common mpiexec options (MPICH hydra and Open MPI) take after their name.
_OPTION_VALUES = {
    "-bind-to": 1, "--bind-to": 1, "-map-by": 1, "--map-by": 1, "-hosts": 1, "-host": 1, "--host": 1,
    "-f": 1, "-hostfile": 1, "--hostfile": 1, "-machinefile": 1, "-ppn": 1, "-wdir": 1, "-launcher": 1,
    "-iface": 1, "-rmk": 1, "-genvlist": 1, "-envlist": 1, "-genv": 2, "-env": 2, "-x": 1, "--mca": 2,
    "-mca": 2, "-npernode": 1, "--npernode": 1, "-configfile": 1,
}


def find_mpiexec() -> str | None:
    """The mpiexec of this environment (next to the interpreter), else the first on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def build_command(argv: Sequence[str], mpiexec: str) -> tuple[list[str], dict[str, str]]:
    """Parse ``argv`` (without the program name) into the mpiexec command line and extra env.

    Example:
        >>> build_command(["-np", "4", "-bind-to", "core", "python", "a.py"], "mpiexec")[0]
        ['mpiexec', '-n', '4', '-bind-to', 'core', 'python', 'a.py']
    """
    args = list(argv)
    sep = args.index("--") if "--" in args else None
    np_value: str | None = None
    extra_env: dict[str, str] = {}
    passthrough: list[str] = []
    i = 0
    unknown_until_sep = False  # an unknown option met before "--": its values run up to "--"
    while i < len(args):
        a = args[i]
        if a == "--" and i == sep:
            i += 1
            break
        if a in ("-np", "-n", "--np"):
            if i + 1 >= len(args):
                raise SystemExit(f"bfrun: {a} needs a number of processes\n{USAGE}")
            np_value = args[i + 1]
            i += 2
        elif a == "--timeline" or a.startswith("--timeline="):
            if "=" in a:
                extra_env["BLUEFOG_FN_TIMELINE"] = a.split("=", 1)[1]
                i += 1
            else:
                if i + 1 >= len(args):
                    raise SystemExit(f"bfrun: --timeline needs a path\n{USAGE}")
                extra_env["BLUEFOG_FN_TIMELINE"] = args[i + 1]
                i += 2
        elif a.startswith("-"):
            arity = _OPTION_VALUES.get(a)
            if arity is None:
                arity = 0
                unknown_until_sep = sep is not None and sep > i
            if i + arity >= len(args):
                raise SystemExit(f"bfrun: mpiexec option {a} needs {arity} value(s)\n{USAGE}")
            passthrough.extend(args[i : i + 1 + arity])
            i += 1 + arity
        elif unknown_until_sep:
            passthrough.append(a)  # a value of an option we do not know; "--" ends them
            i += 1
        else:
            break
    program = args[i:]
    if np_value is None:
        raise SystemExit(f"bfrun: -np N is required\n{USAGE}")
    try:
        n = int(np_value)
    except ValueError:
        raise SystemExit(f"bfrun: -np must be a positive integer, got {np_value!r}") from None
    if n < 1:
        raise SystemExit(f"bfrun: -np must be a positive integer, got {n}")
    if not program:
        raise SystemExit(f"bfrun: no program to run\n{USAGE}")
    return [mpiexec, "-n", str(n), *passthrough, *program], extra_env


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bfrun`` console script; returns the program's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-V"]):
        from . import __version__

        print(f"bfrun (bluefog-fn) {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ if args else USAGE)
        return 0 if args else 2
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise SystemExit(
            "bfrun: no mpiexec found next to this Python or on PATH; install an MPI "
            "(`pip install mpich`, which bluefog-fn depends on) or add yours to PATH"
        )
    cmd, extra_env = build_command(args, mpiexec)
    timeline = extra_env.get("BLUEFOG_FN_TIMELINE")
    if timeline is not None:
        timeline = extra_env["BLUEFOG_FN_TIMELINE"] = os.path.abspath(timeline)
        timeline_merge.clear_parts(timeline)
    from .launch_watch import run_job

    try:
        return run_job(cmd, {**os.environ, **extra_env}, size=int(cmd[2]))
    finally:
        if timeline is not None:
            timeline_merge.merge_after_job(timeline)


if __name__ == "__main__":
    sys.exit(main())
