"""A griffe extension: read the package's docstring dialect as griffe's Google style expects.

The docstrings are Google style with three habits griffe would render literally:

* reST roles (``:func:`sgd```, ``:class:`~bluefog_fn.MismatchError```) become code spans (the
  last dotted component when the target starts with ``~``);
* ``.. math::`` blocks (and the one-line ``.. math:: formula``) become fenced blocks of their
  LaTeX source;
* a paragraph ending in ``::`` (reST's literal-block marker) ends in ``:``, its indented block
  staying a code block in Markdown;
* an ``Example:`` heading becomes ``Examples:``, the section griffe parses as doctest code
  (``Example:`` alone would be an admonition whose ``>>>`` lines are read as Markdown).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_MATH_INLINE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]+(?P<formula>\S.*)$", re.MULTILINE)
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)+)", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if target.endswith("()"):
        target = target[:-2]
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _math(match: re.Match[str]) -> str:
    indent = match.group("indent")
    body = [line for line in match.group("body").splitlines()]
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    depth = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    fenced = [f"{indent}```text"] + [f"{indent}{line[depth:]}" for line in body] + [f"{indent}```", ""]
    return "\n".join(fenced) + "\n"


def _math_inline(match: re.Match[str]) -> str:
    indent = match.group("indent")
    return f"{indent}```text\n{indent}{match.group('formula').strip()}\n{indent}```"


def rewrite(text: str) -> str:
    """The docstring ``text`` in the dialect griffe's Google parser and Markdown read."""
    text = _MATH_INLINE.sub(_math_inline, _MATH.sub(_math, text))
    text = _EXAMPLE.sub(lambda m: f"{m.group('indent')}Examples:", text)
    text = _LITERAL.sub(":", text)
    return _ROLE.sub(_role, text)


class DocstringDialect(griffe.Extension):
    """Rewrites every docstring of the loaded package once the tree is complete."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
