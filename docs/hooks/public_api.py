"""The public names the API reference documents, and whether each one is documented.

Used by the site build (``docs/hooks/site.py`` writes one reference page per module from these
lists) and by ``tests/test_docs.py`` (which needs nothing but causalmix): both fail when a name of
an ``__all__`` below has no docstring of its own.

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
from typing import NamedTuple

#: The modules whose ``__all__`` the reference documents, with the page each one gets.
MODULES = {
    "causalmix": "reference/causalmix.md",
    "causalmix.stream": "reference/stream.md",
    "causalmix.distributed": "reference/distributed.md",
    "causalmix.nn": "reference/nn.md",
    "causalmix.hf": "reference/hf.md",
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


def undocumented() -> list[str]:
    """``module.name`` of every public name without a docstring of its own."""
    missing = []
    for e in entries():
        obj = getattr(importlib.import_module(e.module), e.name)
        if inspect.isclass(obj):
            doc = vars(obj).get("__doc__") or ""
            ok = bool(doc.strip()) and not _written_by_python(obj, doc)
        elif inspect.isroutine(obj):
            ok = bool((obj.__doc__ or "").strip())
        else:
            ok = bool(constant_doc(e.module, e.name))
        if not ok:
            missing.append(f"{e.module}.{e.name}")
    return missing
