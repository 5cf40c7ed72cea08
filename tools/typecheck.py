"""mypy --strict over bluefog_fn with backend/ mounted where it is imported from.

The top-level ``backend/`` folder is installed as ``bluefog_fn.backend`` (a setuptools
package-dir mapping) which mypy cannot follow, so this script builds a throw-away view of the
package — symlinks, no copies — and checks that.

    python tools/typecheck.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "bluefog_fn")
        os.mkdir(pkg)
        for entry in os.listdir(os.path.join(ROOT, "bluefog_fn")):
            if entry != "__pycache__":
                os.symlink(os.path.join(ROOT, "bluefog_fn", entry), os.path.join(pkg, entry))
        os.symlink(os.path.join(ROOT, "backend"), os.path.join(pkg, "backend"))
        cmd = [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"), "-p", "bluefog_fn"]
        return subprocess.call(cmd, cwd=tmp, env={**os.environ, "MYPYPATH": tmp})


if __name__ == "__main__":
    sys.exit(main())
