"""A griffe extension (loaded by mkdocstrings, see ``mkdocs.yml``): causalmix's docstrings are
written for ``help()`` and the source, with a few reStructuredText habits; the reference renders
them as Markdown. Each docstring is read, never changed in the source:

- ``:class:`~causalmix.x.Name``` and the other roles become code spans (``Name``);
- a paragraph ending in ``::`` ends in ``:`` (the indented block after it is a code block);
- doctest lines (``>>>`` and their output) become fenced ``pycon`` blocks;
- an ``Args:`` entry naming several parameters (``q_offset, k_offset: ...``) becomes one entry
  per parameter, the later ones pointing at the first;
- an attribute with no docstring takes the ``#:`` comment lines right above its assignment, or
  (a class field) the comment at the end of its line.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|attr|data|exc|obj|const):`([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(1).strip()
    titled = re.fullmatch(r"(.+?)\s*<(.+)>", target)
    if titled:
        return f"`{titled.group(1)}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def _fence_doctests(lines: list[str]) -> list[str]:
    """Wrap each run of ``>>>`` lines and their output (up to a blank line) in a pycon fence."""
    out: list[str] = []
    k = 0
    while k < len(lines):
        line = lines[k]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            k += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while k < len(lines) and lines[k].strip():
            out.append(lines[k])
            k += 1
        out.append(f"{indent}```")
    return out


_SHARED_ARG = re.compile(r"^(\s+)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)+):(\s.*)?$")


def _split_shared_args(lines: list[str]) -> list[str]:
    """``a, b: text`` in an ``Args:`` section -> ``a: text`` then ``b: As `a`.``"""
    out: list[str] = []
    in_args, k = False, 0
    while k < len(lines):
        line = lines[k]
        if re.fullmatch(r"\s*(Args|Arguments|Parameters):\s*", line):
            in_args = True
        elif line.strip() and not line.startswith((" ", "\t")):
            in_args = False
        match = _SHARED_ARG.match(line) if in_args else None
        if not match:
            out.append(line)
            k += 1
            continue
        indent, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
        out.append(f"{indent}{names[0]}:{match.group(3) or ''}")
        k += 1
        while k < len(lines) and lines[k].strip() and \
                len(lines[k]) - len(lines[k].lstrip()) > len(indent):
            out.append(lines[k])
            k += 1
        out += [f"{indent}{name}: As `{names[0]}`." for name in names[1:]]
    return out


def markdown(text: str) -> str:
    """The docstring ``text`` as Markdown (the rules in the module docstring)."""
    text = _ROLE.sub(_role, text)
    lines = []
    for line in text.split("\n"):
        if line.rstrip().endswith("::") and not line.lstrip().startswith(">>>"):
            stripped = line.rstrip()[:-2].rstrip()
            line = stripped + ":" if stripped.strip() else ""
        lines.append(line)
    return "\n".join(_fence_doctests(_split_shared_args(lines)))


def _comment_doc(obj: griffe.Attribute) -> str:
    """The ``#:`` lines right above an attribute's assignment, joined; for a class field, else
    the comment at the end of its line."""
    try:
        lines = obj.module.lines  # the whole file: lineno counts from its top
    except (AttributeError, OSError):
        return ""
    comment = []
    row = (obj.lineno or 0) - 2
    while 0 <= row < len(lines) and lines[row].lstrip().startswith("#:"):
        comment.insert(0, lines[row].lstrip()[2:].strip())
        row -= 1
    if not comment and isinstance(obj.parent, griffe.Class) and 0 <= row + 1 < len(lines):
        code, sep, trailing = lines[row + 1].partition("  # ")
        if sep and ":" in code and not trailing.lstrip().startswith(("noqa", "type:")):
            comment = [trailing.strip()]  # a field's trailing comment: `lse: Tensor  # [B, T]`
    return "\n".join(comment)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.docstring is None and isinstance(obj, griffe.Attribute):
            text = _comment_doc(obj)
            if text:
                obj.docstring = griffe.Docstring(text, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
        for member in list(obj.members.values()):
            if not member.is_alias:
                self._walk(member, seen)
