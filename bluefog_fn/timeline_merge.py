"""Merging the per-rank timeline files of a job into one Chrome trace-event JSON file.

``bfrun --timeline out.json`` calls :func:`merge` when the job ends, also when it failed; a job
started by plain ``mpiexec`` with ``BLUEFOG_FN_TIMELINE=out.json`` is merged by hand:

    python -m bluefog_fn.timeline_merge out.json

Each rank's file (``out.json.rank<r>.jsonl``, see :mod:`bluefog_fn.timeline`) holds one JSON list
of events per line, after a header line with the rank's wall-clock origin.  A rank killed while
writing leaves a truncated last line: the reader skips any line that does not parse.  The merged
file has one process (``pid``) per rank, named ``rank r``, with timestamps on a common clock
starting at 0.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from .timeline import part_path

_RANK = re.compile(r"\.rank(\d+)\.jsonl$")


def part_files(path: str) -> dict[int, str]:
    """``{rank: file}`` of the per-rank files of timeline ``path`` present on disk."""
    found = {}
    for name in glob.glob(glob.escape(path) + ".rank*.jsonl"):
        m = _RANK.search(name)
        if m is not None and name == part_path(path, int(m.group(1))):
            found[int(m.group(1))] = name
    return found


def clear_parts(path: str) -> None:
    """Remove leftover per-rank files of an earlier job writing to ``path``."""
    for name in part_files(path).values():
        os.remove(name)


def read_part(name: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """One rank's file: its header, its events, and how many damaged lines were skipped."""
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    skipped = 0
    with open(name, "rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(line, list):
                skipped += 1
                continue
            for e in line:
                if not isinstance(e, dict):
                    continue
                if "bluefog_fn_timeline" in e:
                    header = e
                else:
                    events.append(e)
    return header, events, skipped


def merge(path: str, *, remove_parts: bool = True) -> int:
    """Write the one trace ``path`` from the per-rank files; returns how many ranks it holds.

    The file is written to a temporary name and renamed, so a reader never sees half of it.
    With ``remove_parts`` the per-rank files are deleted once the trace is written.

    Example:
        >>> import os, tempfile
        >>> from bluefog_fn.timeline import Timeline
        >>> d = tempfile.mkdtemp()
        >>> tl = Timeline(os.path.join(d, "t.json"), rank=0)
        >>> tl.record("neighbor_mean", tl.now(), tl.now())
        >>> tl.close()
        >>> merge(os.path.join(d, "t.json"))
        1
    """
    parts = part_files(path)
    per_rank = {rank: read_part(name) for rank, name in sorted(parts.items())}
    origins = [h["origin_us"] for h, _, _ in per_rank.values() if h is not None]
    base = min(origins) if origins else 0.0
    trace: list[dict[str, Any]] = []
    other: dict[str, Any] = {"ranks": sorted(per_rank), "damaged_lines": {}}
    for rank, (header, events, skipped) in per_rank.items():
        shift = (header["origin_us"] - base) if header is not None else 0.0
        label = f"rank {rank}"
        if header is not None:
            label += f" ({header.get('host', '?')}, pid {header.get('pid', '?')})"
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": label}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for e in events:
            if "ts" in e:
                e["ts"] = round(e["ts"] + shift, 3)
            trace.append(e)
        if skipped:
            other["damaged_lines"][str(rank)] = skipped
    tmp = f"{path}.tmp{os.getpid()}"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms", "otherData": other}, f, separators=(",", ":"))
    os.replace(tmp, path)
    if remove_parts:
        for name in parts.values():
            os.remove(name)
    return len(per_rank)


def merge_after_job(path: str) -> None:
    """``bfrun``'s last act: merge the job's timeline, saying where it is (or why it is not)."""
    if not part_files(path):
        sys.stderr.write(f"bfrun: no timeline was recorded for {path} (did the program use bluefog_fn?)\n")
        return
    try:
        n = merge(path)
    except OSError as e:
        sys.stderr.write(f"bfrun: could not write the timeline {path}: {e}; per-rank files kept\n")
        return
    sys.stderr.write(f"bfrun: timeline of {n} rank(s) written to {path}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bluefog_fn.timeline_merge PATH [--keep-parts]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep = "--keep-parts" in args
    paths = [a for a in args if a != "--keep-parts"]
    if len(paths) != 1:
        sys.stderr.write("usage: python -m bluefog_fn.timeline_merge PATH [--keep-parts]\n")
        return 2
    if not part_files(paths[0]):
        sys.stderr.write(f"timeline_merge: no per-rank files {paths[0]}.rank<r>.jsonl found\n")
        return 1
    n = merge(paths[0], remove_parts=not keep)
    sys.stderr.write(f"timeline_merge: wrote {paths[0]} ({n} ranks)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
