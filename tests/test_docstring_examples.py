"""Every ``Example:`` in the library's docstrings runs and prints what it says (a world of one).

The examples run in a subprocess: some of them start the world, record a timeline or fill the
plan cache, which must not leak into the other tests of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RUNNER = r"""
import doctest, importlib, json, pkgutil
import bluefog_fn, bluefog_fn.backend
names = [m.name for m in pkgutil.walk_packages(bluefog_fn.__path__, "bluefog_fn.") if not m.name.endswith("__main__")]
names += ["bluefog_fn.backend." + m.name for m in pkgutil.iter_modules(bluefog_fn.backend.__path__)]
failed, attempted = {}, {}
for name in sorted(names):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False)
    attempted[name] = result.attempted
    if result.failed:
        failed[name] = result.failed
print("RESULT " + json.dumps({"failed": failed, "attempted": attempted}))
"""


def test_every_docstring_example_runs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "BLUEFOG_FN_TIMELINE"))}
    out = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    # doctest prints each failing example (expected and got) to stdout.
    assert result["failed"] == {}, out.stdout[-6000:]
    attempted = result["attempted"]
    assert sum(attempted.values()) >= 300, attempted
    # The public modules each show at least one example.
    for name in ("bluefog_fn.ops.neighbor", "bluefog_fn.ops.collective", "bluefog_fn.ops.window",
                 "bluefog_fn.optim.decentralized_optimizer", "bluefog_fn.timeline", "bluefog_fn.timeline_summary",
                 "bluefog_fn.topology.builders"):
        assert attempted.get(name, 0) > 0, f"{name} has no docstring example"
