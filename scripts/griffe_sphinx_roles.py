"""A griffe extension for the API reference (``mkdocs.yml`` loads it). The docstrings use
Sphinx's markup, which mkdocstrings would show as it is, so before they are rendered it rewrites

- a role (``:meth:`search```, ``:class:`~.engine.MemoryStore```, ...) to its name as inline code,
  linked to the object's entry when the site shows it (an optional autorefs reference: plain code
  with the full path as its tooltip otherwise);
- a literal block (a paragraph ending in ``::``, then an indented block) to a fenced code block
  after the paragraph with one colon; ``Example::`` becomes a Google "Examples:" section;
- a ``.. code-block:: python`` directive and its block to a fenced block (a "Setup:" line over
  one, as LangChain writes them, to a paragraph followed by the code).

The docstrings themselves stay as they are; only the loaded copy mkdocstrings renders changes.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(meth|func|class|data|attr|exc|mod|obj|const):`(~?)([\w.]+)`")
DIRECTIVE = re.compile(r"\s*\.\. code(?:-block)?::\s*(\w*)\s*$")
SECTIONS = {"example", "examples"}  # a literal block under one of these is that section


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewritten(obj.docstring.value, obj)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and every object defined in it (imported names are rewritten where defined)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_objects(member))  # type: ignore[arg-type]
    return found


def rewritten(text: str, obj: griffe.Object) -> str:
    lines = _sections_unindented(text.splitlines())
    out: list[str] = []
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        end = _literal_block_end(lines, i) if not fenced else i
        if end == i:
            out.append(line if fenced else _roles(line, obj))
            i += 1
            continue
        out.extend(_literal_block(lines[i], lines[i + 1 : end], obj))
        i = end
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _sections_unindented(lines: list[str]) -> list[str]:
    """A line ending in ``:`` with an indented ``.. code-block::`` under it (LangChain's
    "Setup:" sections): its body moves to its indentation, the line becomes a paragraph."""
    lines = list(lines)
    for i, line in enumerate(lines):
        if not DIRECTIVE.match(line):
            continue
        head = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
        if head is None or not lines[head].rstrip().endswith(":"):
            continue
        base, shift = _indent(lines[head]), _indent(line) - _indent(lines[head])
        body = head + 1
        while body < len(lines) and (not lines[body].strip() or _indent(lines[body]) > base):
            depth = _indent(lines[body]) - base
            lines[body] = lines[body][min(shift, depth) :] if lines[body].strip() else ""
            body += 1
    return lines


def _literal_block_end(lines: list[str], i: int) -> int:
    """If ``lines[i]`` ends in ``::`` and an indented block follows, the index after the block;
    else ``i``."""
    if not lines[i].rstrip().endswith("::") and not DIRECTIVE.match(lines[i]):
        return i
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(lines[i])):
        end += 1
    while end > i + 1 and not lines[end - 1].strip():
        end -= 1
    return end if any(line.strip() for line in lines[i + 1 : end]) else i


def _literal_block(head: str, block: list[str], obj: griffe.Object) -> list[str]:
    indent = " " * _indent(head)
    code = textwrap.dedent("\n".join(block)).strip("\n").splitlines()
    directive = DIRECTIVE.match(head)
    if directive:  # ".. code-block:: python"
        return ["", *(f"{indent}{line}".rstrip() for line in _fence(code, directive.group(1)))]
    title = head.rstrip()[:-2]
    if title.strip().lower() in SECTIONS:  # "Example::" -> griffe's "Examples" section
        body = code if code[0].startswith(">>>") else _fence(code)
        return [f"{indent}Examples:", *(f"{indent}    {line}".rstrip() for line in body)]
    # reST shows "text::" as "text:", "text ::" as "text", and a lone "::" not at all
    paragraph = title if title.endswith(" ") else f"{title}:"
    shown = [_roles(paragraph.rstrip(), obj)] if title.strip() else []
    return [*shown, "", *(f"{indent}{line}".rstrip() for line in _fence(code))]


def _fence(code: list[str], language: str = "") -> list[str]:
    return ["```" + (language or _language(code)), *code, "```"]


def _language(code: list[str]) -> str:
    if code[0].startswith(">>>"):
        return "pycon"
    try:
        ast.parse("\n".join(code))
    except SyntaxError:
        return "text"
    return "python"


def _roles(line: str, obj: griffe.Object) -> str:
    def replace(match: re.Match[str]) -> str:
        role, short, name = match.groups()
        shown = name.rsplit(".", 1)[-1] if short else name.lstrip(".")
        target = _target(obj, role, name)
        if target is None:
            return f"`{shown}`"
        return f'<autoref identifier="{target}" optional>`{shown}`</autoref>'

    return ROLE.sub(replace, line)


def _target(obj: griffe.Object, role: str, name: str) -> str | None:
    """The full path of the object ``name`` stands for in ``obj``'s docstring (a module for
    ``:mod:``, else anything but a module): looked up in ``obj``'s scope, then in its parents'
    up to the package, then as a full path. A name with leading dots is looked up from ``obj``'s
    module, whatever their number (``.keys`` and ``..keys`` both find the package's ``keys``
    module from anywhere in it, as Sphinx would)."""
    first, *rest = name.lstrip(".").split(".")
    scope: griffe.Object | None = obj.module if name.startswith(".") else obj
    while scope is not None:
        starts = [scope.members.get(first)]
        if scope.name == first and not scope.is_module:  # a class naming its own method
            starts.append(scope)
        for start in starts:
            found = _member(start, rest)
            if found is not None and found.is_module == (role == "mod"):
                return found.path
        scope = scope.parent
    found = _member(obj.package, rest) if first == obj.package.name else None
    return found.path if found is not None else None


def _member(obj: griffe.Object | griffe.Alias | None, parts: list[str]) -> griffe.Object | None:
    """The object at ``parts`` under ``obj``, imported names followed to where they are defined
    (``None`` if there is none, or it is outside the loaded packages)."""
    for part in [None, *parts]:
        if obj is not None and part is not None:
            obj = obj.members.get(part)
        if obj is None:
            return None
        if obj.is_alias:
            try:
                obj = obj.final_target  # type: ignore[union-attr]
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
    return obj  # type: ignore[return-value]
