"""MkDocs hooks: add the generated API reference, figures and tables to the site at build time.

Nothing generated is written into ``docs/``: the pages and PNGs exist only inside the build, so
they always describe the code being built.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

sys.path.insert(0, os.path.dirname(__file__))

import docs_figures
import docs_reference

_REFERENCE_TITLE = "API reference"
# Placeholders a page may contain, replaced by generated Markdown.
_SNIPPETS = {"<!-- generated: spectral-gap-table -->": docs_figures.spectral_gap_table}


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Expand the nav's "API reference" entry into one page per public module."""
    pages = docs_reference.pages()
    entries: list[Any] = [{"Overview": "api/index.md"}] + [{p.title: p.path} for p in pages]
    nav = config.nav or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and _REFERENCE_TITLE in item:
            nav[i] = {_REFERENCE_TITLE: entries}
            break
    else:
        raise RuntimeError(f"mkdocs.yml: the nav needs an entry {_REFERENCE_TITLE!r}")
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    pages = docs_reference.pages()
    files.append(File.generated(config, "api/index.md", content=docs_reference.index_markdown(pages)))
    for page in pages:
        files.append(File.generated(config, page.path, content=page.markdown()))
    for path, render in docs_figures.FIGURES.items():
        files.append(File.generated(config, path, content=render()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    for marker, render in _SNIPPETS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
