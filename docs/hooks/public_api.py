"""The public names the API reference documents, the reference pages, and whether each name is
documented.

Used by the site build (``docs/hooks/site.py`` writes the reference pages of
:func:`reference_page`, one per module of ``MODULES``) and by ``tests/test_docs.py`` (which needs
nothing but causalmix): both fail when a name of an ``__all__`` below has no docstring of its own
or no entry on its page, and :func:`problems` says which name, which page and where to write it.

A class or function is documented by its own docstring (not one that Python writes itself, as for
a NamedTuple or a dataclass without a docstring). Any other value (a constant) is documented by
``#:`` comment lines right above its assignment in the module that assigns it, or by a string
right after it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re
from typing import NamedTuple

#: The modules whose ``__all__`` the reference documents, with the page each one gets.
MODULES = {
    "causalmix": "reference/causalmix.md",
    "causalmix.stream": "reference/stream.md",
    "causalmix.distributed": "reference/distributed.md",
    "causalmix.nn": "reference/nn.md",
    "causalmix.hf": "reference/hf.md",
}


#: The guide pages each reference page links to (paths relative to ``docs/reference/``).
GUIDES = {
    "causalmix": "Guides: [Concepts](../concepts.md), [softmax](../mixers/softmax.md), "
                 "[linear](../mixers/linear.md), [delta rule](../mixers/delta.md).",
    "causalmix.stream": "Guide: [Modes](../modes.md#streaming-and-latency-causalmixstream).",
    "causalmix.distributed": "Guide: [Modes](../modes.md#sequence-parallel).",
    "causalmix.nn": "Guide: [Layers and models](../models.md).",
    "causalmix.hf": "Guide: [the Hugging Face bridge](../hf.md) (needs the `hf` extra).",
}


class Entry(NamedTuple):
    module: str  # the public module, e.g. "causalmix.stream"
    name: str  # the name in its __all__
    first: str | None  # "module.name" of an earlier entry for the same object, or None


def entries() -> list[Entry]:
    """Every public name, module by module, in ``__all__`` order; an object exported by two
    modules (``causalmix.hf.ValidKeys``) points at its first entry."""
    seen: dict[int, str] = {}
    out = []
    for module in MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            key = id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) else None
            first = seen.get(key) if key is not None else None
            if key is not None and first is None:
                seen[key] = f"{module}.{name}"
            out.append(Entry(module, name, first))
    return out


def _module_tree(module: str) -> tuple[ast.Module, list[str]]:
    path = pathlib.Path(importlib.import_module(module).__file__)
    text = path.read_text()
    return ast.parse(text), text.splitlines()


def _assigned(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    return isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
        and node.target.id == name


def _source_of(module: str, name: str, depth: int = 0) -> tuple[str, ast.Module, list[str], int]:
    """``(module, tree, lines, index of the statement)`` where ``name`` is assigned, following
    ``from X import name`` re-exports."""
    tree, lines = _module_tree(module)
    for k, node in enumerate(tree.body):
        if _assigned(node, name):
            return module, tree, lines, k
        if isinstance(node, ast.ImportFrom) and node.level == 0 and depth < 10:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _source_of(node.module, alias.name, depth + 1)
    raise LookupError(f"{module}.{name}: no assignment found")


def constant_doc(module: str, name: str) -> str:
    """The ``#:`` comment lines above the assignment of ``name`` (or the string right after it),
    joined; ``""`` if there are none."""
    _, tree, lines, k = _source_of(module, name)
    node = tree.body[k]
    comment = []
    row = node.lineno - 2
    while row >= 0 and lines[row].lstrip().startswith("#:"):
        comment.insert(0, lines[row].lstrip()[2:].strip())
        row -= 1
    if comment:
        return " ".join(comment)
    if k + 1 < len(tree.body):
        after = tree.body[k + 1]
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            return after.value.value.strip()
    return ""


def _written_by_python(obj: type, doc: str) -> bool:
    """A docstring Python made up: a NamedTuple's ``Name(a, b)``, a dataclass's signature."""
    return doc.startswith(f"{obj.__name__}(") and doc.rstrip().endswith(")") \
        and "\n" not in doc.strip()


def _documented(e: Entry) -> bool:
    obj = getattr(importlib.import_module(e.module), e.name)
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__") or ""
        return bool(doc.strip()) and not _written_by_python(obj, doc)
    if inspect.isroutine(obj):
        return bool((obj.__doc__ or "").strip())
    try:
        return bool(constant_doc(e.module, e.name))
    except LookupError:  # assigned by code the source does not show (no comment possible)
        return False


def undocumented() -> list[str]:
    """``module.name`` of every public name without a docstring of its own."""
    return [f"{e.module}.{e.name}" for e in entries() if not _documented(e)]


def _where(e: Entry) -> str:
    """``path:line`` (relative to ``src/`` when inside it) of the definition of a public name."""
    obj = getattr(importlib.import_module(e.module), e.name)
    try:
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            raise TypeError
        path, line = inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        try:
            module, tree, _, k = _source_of(e.module, e.name)
        except LookupError:
            return f"its definition (no assignment of {e.name} found in {e.module}'s source)"
        path, line = importlib.import_module(module).__file__, tree.body[k].lineno
    parts = pathlib.Path(path).resolve().parts
    shown = pathlib.Path(*parts[parts.index("src"):]) if "src" in parts else pathlib.Path(path)
    return f"{shown}:{line}"


def _anchors(markdown: str) -> set[str]:
    """The names a reference page has an entry for (``::: name`` or ``{ #name }``)."""
    return set(re.findall(r"^::: ([\w.]+)$", markdown, flags=re.M)) \
        | set(re.findall(r"\{ #([\w.]+) \}", markdown))


def problems() -> list[str]:
    """One line per public name the reference does not document, saying which name, the page
    its entry is on and what to write where; ``[]`` when every name is documented."""
    out = []
    by_module: dict[str, list[Entry]] = {}
    for e in entries():
        by_module.setdefault(e.module, []).append(e)
    for module, page in MODULES.items():
        listed = by_module.get(module, [])
        present = _anchors(reference_page(module, listed))
        for e in listed:
            full = f"{e.module}.{e.name}"
            where = f"docs/{page} (the reference page of {module}, written from its __all__ by " \
                    f"docs/hooks/site.py)"
            if full not in present:
                out.append(f"{full}: no entry on {where}: docs/hooks/public_api.py "
                           f"reference_page lost it")
            elif not _documented(e):
                obj = getattr(importlib.import_module(e.module), e.name)
                what = "a docstring" if inspect.isclass(obj) or inspect.isroutine(obj) else \
                    "'#:' comment lines right above its assignment"
                out.append(f"{full}: undocumented: its entry on {where} is empty. Write {what} "
                           f"at {_where(e)}")
    return out


def reference_page(module: str, listed: list[Entry]) -> str:
    """The Markdown of one reference page: the module docstring, then every public name (an
    object already documented under an earlier name gets a pointer to it)."""
    lines = [f"# `{module}`", "", GUIDES.get(module, ""), "",
             f"::: {module}", "    options:", "      members: false",
             "      show_root_heading: false", "      show_root_toc_entry: false", ""]
    for e in listed:
        if e.first is None:
            lines += [f"::: {e.module}.{e.name}", ""]
        else:
            lines += [f"## `{e.module}.{e.name}` {{ #{e.module}.{e.name} }}", "",
                      f"The same object as [`{e.first}`][{e.first}], re-exported here.", ""]
    return "\n".join(lines)
