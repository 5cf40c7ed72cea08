"""The documentation site: every public name is in the API reference, and the site builds.

The reference pages are generated from ``__all__`` (``tools/docs_reference.py``); these tests
check the generated pages and the built HTML, so a public name that the reference misses, or a
docstring that breaks the strict build (a warning, a broken link), fails here.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import bluefog_fn as bf

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


docs_reference = _load("docs_reference")


def _public_modules() -> dict[str, types.ModuleType]:
    """``bluefog_fn`` and every public submodule that exists (listed or promised)."""
    out = {"bluefog_fn": bf}
    for name in bf.__all__:
        value = getattr(bf, name)
        if isinstance(value, types.ModuleType):
            out[value.__name__] = value
    for name in docs_reference.PROMISED_SUBMODULES:
        value = getattr(bf, name, None)
        if isinstance(value, types.ModuleType):
            out[value.__name__] = value
    return out


def _expected() -> list[tuple[str, str]]:
    """(module, name) for every public non-module name."""
    return [
        (module_name, name)
        for module_name, module in _public_modules().items()
        for name in docs_reference.public_names(module)
        if not isinstance(getattr(module, name), types.ModuleType)
    ]


def test_public_modules_include_the_promised_ones() -> None:
    assert {"bluefog_fn.topology", "bluefog_fn.optim", "bluefog_fn.sim"} <= set(_public_modules())


def test_reference_pages_list_every_public_name() -> None:
    pages = {page.module: page for page in docs_reference.pages()}
    assert set(pages) == set(_public_modules())
    missing = [f"{m}.{n}" for m, n in _expected() if f"::: {m}.{n}\n" not in pages[m].markdown()]
    assert not missing, f"public names missing from the API reference: {missing}"


def test_reference_pages_document_nothing_private() -> None:
    for page in docs_reference.pages():
        module = sys.modules[page.module]
        assert set(page.names) <= set(docs_reference.public_names(module)), page.module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs tooling is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="the docs tooling is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strictly_with_an_entry_per_public_name(site: Path) -> None:
    missing = []
    for module_name, name in _expected():
        html = (site / "api" / module_name / "index.html").read_text()
        if f'id="{module_name}.{name}"' not in html:
            missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an entry in the built reference: {missing}"


def test_site_has_the_generated_figures(site: Path) -> None:
    docs_figures_paths = ["static_topologies.png", "one_peer_exponential_two.png", "mixing_matrices.png", "consensus.png"]
    for name in docs_figures_paths:
        data = (site / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "spectral gap" in (site / "concepts" / "index.html").read_text()


def test_griffe_knows_every_relocated_subpackage() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    pytest.importorskip("griffe", reason="the docs tooling is not installed (pip install -e '.[docs]')")
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    relocated = {name: path.replace("/", ".") for name, path in mapping.items() if path != name.replace(".", "/")}
    assert relocated == _load("griffe_package_dirs").MAPPED_SUBPACKAGES


def test_every_environment_variable_of_the_package_is_documented() -> None:
    sources = [*(ROOT / "bluefog_fn").rglob("*.py"), *(ROOT / "backend").rglob("*.py")]
    used = {m for path in sources for m in re.findall(r"\bBLUEFOG_FN_[A-Z0-9_]+", path.read_text())}
    page = (ROOT / "docs" / "environment.md").read_text()
    assert used, "expected the package to read BLUEFOG_FN_* variables"
    missing = sorted(v for v in used if f"`{v}`" not in page)
    assert not missing, f"docs/environment.md does not document {missing}"


def test_tutorial_and_quickstart_pages_include_the_tested_code(site: Path) -> None:
    # The pages pull code from files the test suite runs; an emptied snippet must not pass.
    tutorial = html.unescape(re.sub(r"<[^>]+>", "", (site / "tutorial" / "index.html").read_text()))
    for needle in ("def extra(lr", "class ExtraState", "def make_data(", "def run(opt",
                   "simulated = bf.size() == 1", "def _dense_extra(", "def test_extra_matches_the_dense_reference"):
        assert needle in tutorial, needle
    quickstart = html.unescape(re.sub(r"<[^>]+>", "", (site / "quickstart" / "index.html").read_text()))
    assert "opt = bf.optim.atc(bf.optim.sgd(0.05)" in quickstart
