"""The API reference pages, generated from ``__all__`` so no public name can be left out.

``bluefog_fn.__all__`` lists the top-level names; those that are modules (``bf.topology``,
``bf.optim``, ...) get a page of their own listing their ``__all__``.  Each name becomes one
mkdocstrings block (``::: bluefog_fn.topology.ring``) rendered from its docstring.
"""

from __future__ import annotations

import importlib
import inspect
import types
from dataclasses import dataclass

PACKAGE = "bluefog_fn"
# Submodules the design promises as public (``bf.timeline``, ``bf.checkpoint``...): documented as
# soon as they exist, even before the package's ``__all__`` lists them.
PROMISED_SUBMODULES = ("topology", "optim", "sim", "timeline", "checkpoint")


@dataclass(frozen=True)
class ReferencePage:
    """One generated page: the module it documents and the public names on it."""

    module: str
    names: tuple[str, ...]
    submodules: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """Where the page lives inside the docs (``api/bluefog_fn.topology.md``)."""
        return f"api/{self.module}.md"

    @property
    def title(self) -> str:
        return "bf" if self.module == PACKAGE else "bf." + self.module.removeprefix(PACKAGE + ".")

    def markdown(self) -> str:
        # The module's own docstring first (its overview), without its members: those follow,
        # one block per public name, in __all__ order.
        lines = [
            f"# `{self.title}`", "",
            f"::: {self.module}", "    options:", "      members: false", "      show_root_heading: false", "",
        ]
        if self.submodules:
            lines += ["Modules:", ""]
            for sub in self.submodules:
                short = sub.removeprefix(PACKAGE + ".")
                lines.append(f"* [`bf.{short}`]({sub}.md)")
            lines.append("")
        lines += [f"Module `{self.module}`: {len(self.names)} public names.", ""]
        for name in self.names:
            lines += [f"::: {self.module}.{name}", ""]
        return "\n".join(lines)


def public_names(module: types.ModuleType) -> tuple[str, ...]:
    """The module's ``__all__``; without one, the functions and classes it defines itself
    (names without a leading underscore, in definition order)."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return tuple(names)
    return tuple(
        name for name, value in vars(module).items()
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    )


def pages() -> list[ReferencePage]:
    """The top-level page, then one page per public submodule (recursively), in order."""
    out: list[ReferencePage] = []

    def visit(module_name: str) -> None:
        module = importlib.import_module(module_name)
        names, subs = [], []
        for name in public_names(module):
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) and value.__name__.startswith(PACKAGE + "."):
                subs.append(value.__name__)
            else:
                names.append(name)
        if module_name == PACKAGE:
            for name in PROMISED_SUBMODULES:
                value = getattr(module, name, None)
                full = f"{PACKAGE}.{name}"
                if isinstance(value, types.ModuleType) and full not in subs:
                    subs.append(full)
        out.append(ReferencePage(module_name, tuple(names), tuple(subs)))
        for sub in subs:
            visit(sub)

    visit(PACKAGE)
    return out


def index_markdown(all_pages: list[ReferencePage]) -> str:
    """The reference's landing page: every module with its names, linked to their entries."""
    lines = [
        "# API reference",
        "",
        "Every public name of the package, generated from the docstrings. The pages are built "
        "from each module's `__all__`, so a name added to the package appears here without "
        "editing the docs.",
        "",
    ]
    for page in all_pages:
        lines += [f"## [`{page.title}`]({page.path.removeprefix('api/')})", ""]
        lines.append(", ".join(f"[`{n}`]({page.path.removeprefix('api/')}#{page.module}.{n})" for n in page.names))
        lines.append("")
    return "\n".join(lines)
