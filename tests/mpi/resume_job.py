"""Run by ``tests/test_checkpoint.py`` under ``bfrun -np 2``: ``full DIR`` runs every resume case
to 2K (saving at K), ``resume DIR`` starts fresh processes from the step-K files; each writes its
final numbers to ``DIR/<case>.<full|resumed>.<rank>.pt`` for the test to compare."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resume_cases as rc

import bluefog_fn as bf


def main(mode: str, directory: str) -> None:
    n, me = bf.size(), bf.rank()
    tag = "full" if mode == "full" else "resumed"
    for case in sorted(rc.CASES):
        path = os.path.join(directory, case + ".{rank}.pt")
        result = (rc.uninterrupted if mode == "full" else rc.resumed)(case, path, n, me)
        bf.checkpoint.save(os.path.join(directory, f"{case}.{tag}.{{rank}}.pt"), rc.numbers(result))
        rc.free_windows(result)
    for style in ("atc", "awc"):
        path = os.path.join(directory, f"module_{style}.{{rank}}.pt")
        out = rc.module_run(style, path, n, me, resume=mode != "full")
        bf.checkpoint.save(os.path.join(directory, f"module_{style}.{tag}.{{rank}}.pt"), out)
    bf.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
