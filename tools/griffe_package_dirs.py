"""A griffe extension: honour pyproject's ``package-dir`` mapping of subpackages.

``bluefog_fn.backend`` lives in ``backend/`` at the repository root (setuptools maps it), so
griffe, which reads source trees, cannot find it under ``bluefog_fn/``.  mkdocs.yml preloads
``backend`` as a top-level package; this extension makes ``bluefog_fn.backend`` an alias of it,
so ``bf.CommError`` (``bluefog_fn.backend.errors.CommError``) resolves to its source.
"""

from __future__ import annotations

from typing import Any

import griffe

# pyproject.toml's [tool.setuptools] package-dir entries for subpackages that live elsewhere:
# dotted name -> the top-level package griffe loads from that directory.
MAPPED_SUBPACKAGES = {"bluefog_fn.backend": "backend"}


class PackageDirs(griffe.Extension):
    """Adds each mapped subpackage to its parent package as an alias of the preloaded module."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for dotted, target in MAPPED_SUBPACKAGES.items():
            parent, _, name = dotted.rpartition(".")
            if parent == pkg.path and name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, target, parent=pkg))
