"""The house rules of ``src/causalmix``, checked by reading the tree (AST scans), and the README's
and docstrings' examples, executed.

- no module imports another package's private (underscore) modules or names, nor reads private
  attributes defined only in another package;
- no function takes more than 6 positional parameters (``self`` / ``cls`` count), none is longer
  than 60 lines, no file is longer than 600 lines;
- one implementation registry per mixer family (:class:`causalmix.ops.registry.Registry`);
- every ``python`` block of the README runs, and so does every ``Examples`` section (doctest).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import pkgutil
import re
import types

import pytest

import causalmix
from causalmix.ops.registry import Registry

SRC = pathlib.Path(causalmix.__file__).resolve().parent  # src/causalmix
REPO = SRC.parents[1]
MAX_POSITIONAL, MAX_LINES, MAX_FILE_LINES = 6, 60, 600


def _modules() -> list[tuple[str, pathlib.Path, ast.Module]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path, ast.parse(path.read_text())))
    return out


MODULES = _modules()
PACKAGES = {name for name, path, _ in MODULES if path.name == "__init__.py"}


def _package_of(module: str) -> str:
    """The package a module belongs to (a package belongs to itself)."""
    return module if module in PACKAGES else module.rsplit(".", 1)[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports(module: str, tree: ast.Module):
    """``(imported module, imported name or None, line)`` of every causalmix import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("causalmix"):
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("causalmix"):
                    yield alias.name, None, node.lineno


def test_no_module_imports_another_packages_private_modules_or_names():
    offenders = []
    for module, path, tree in MODULES:
        for target, name, line in _imports(module, tree):
            parts = target.split(".")
            owners = [".".join(parts[:k]) for k, p in enumerate(parts) if _private(p)]
            if name is not None and _private(name):
                owners.append(_package_of(target))
            if name is not None and f"{target}.{name}" in {m for m, _, _ in MODULES} \
                    and _private(name):
                owners.append(target)
            for owner in owners:
                if not _inside(module, owner):
                    what = target if name is None else f"{target}.{name}"
                    offenders.append(f"{path.relative_to(SRC)}:{line} imports {what} "
                                     f"(private to {owner})")
    assert not offenders, "\n".join(offenders)


def _defined_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, assigned names and attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # object.__setattr__(self, "_x", ...), getattr(o, "_x")
    return {n for n in names if _private(n)}


#: Private attributes of torch objects the package reads (not causalmix's own members), and the
#: public methods of NamedTuples (underscored to keep clear of field names).
TORCH_PRIVATE = {"_version", "_dynamo", "_C", "_inductor", "_functorch", "_higher_order_ops"}
NAMEDTUPLE = {"_replace", "_asdict", "_fields", "_make"}

def _top_package(module: str) -> str:
    """``causalmix.<sub>`` (top-level modules of causalmix are their own package)."""
    return ".".join(module.split(".")[:2])


def test_no_module_reads_private_attributes_defined_in_another_package():
    defined: dict[str, set[str]] = {}
    for module, _, tree in MODULES:
        defined.setdefault(_top_package(module), set()).update(_defined_private_names(tree))
    offenders = []
    for module, path, tree in MODULES:
        own = defined[_top_package(module)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own \
                    and node.attr not in TORCH_PRIVATE | NAMEDTUPLE:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert not offenders, "\n".join(offenders)


def _functions():
    for _, path, tree in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC), node


def test_no_function_takes_more_than_6_positional_parameters():
    offenders = {f"{rel} {node.name}": f"{rel}:{node.lineno} {node.name} ({n} positional)"
                 for rel, node in _functions()
                 if (n := len(node.args.posonlyargs) + len(node.args.args)) > MAX_POSITIONAL}
    assert not offenders, "\n".join(offenders.values())


def test_no_function_is_longer_than_60_lines():
    offenders = {f"{rel} {node.name}": f"{rel}:{node.lineno} {node.name} ({n} lines)"
                 for rel, node in _functions()
                 if (n := node.end_lineno - node.lineno + 1) > MAX_LINES}
    assert not offenders, "\n".join(offenders.values())


def test_no_file_is_longer_than_600_lines():
    offenders = {str(path.relative_to(SRC)): f"{path.relative_to(SRC)} ({n} lines)"
                 for _, path, _ in MODULES
                 if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    assert not offenders, "\n".join(offenders.values())


def _families() -> list[str]:
    ops = SRC / "ops"
    return sorted(p.name for p in ops.iterdir() if (p / "impl").is_dir())


def test_every_mixer_family_has_one_registry_of_its_impl_modules():
    families = _families()
    assert {"softmax", "linear"} <= set(families)
    for family in families:
        pkg = importlib.import_module(f"causalmix.ops.{family}")
        registries = [(name, value) for mod_name in
                      [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
                      + [pkg.__name__]
                      for name, value in vars(importlib.import_module(mod_name)).items()
                      if isinstance(value, Registry)]
        owners = {id(value) for _, value in registries}
        assert len(owners) == 1, f"{family}: registries {[n for n, _ in registries]}"
        registry = registries[0][1]
        impl_dir = SRC / "ops" / family / "impl"
        modules = {p.stem for p in impl_dir.glob("*.py") if p.stem != "__init__"}
        assert set(registry) == modules, f"{family}: registry {set(registry)} vs {modules}"
        for name, mod in registry.items():
            assert isinstance(mod, types.ModuleType) and mod.__name__.endswith(f".impl.{name}")
            assert callable(mod.can_serve) and callable(mod.run)


def test_impl_modules_never_import_each_other():
    offenders = []
    for module, path, tree in MODULES:
        if ".impl." not in module:
            continue
        family_impl = module.rsplit(".", 1)[0]
        for target, name, line in _imports(module, tree):
            full = target if name is None else f"{target}.{name}"
            if _inside(full, family_impl) or (target == family_impl and name is not None):
                offenders.append(f"{path.relative_to(SRC)}:{line} imports {full}")
    assert not offenders, "\n".join(offenders)


def test_package_ships_py_typed():
    assert (SRC / "py.typed").exists()


# ------------------------------------------------------------------ examples that run
def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_in_order():
    """Every ``python`` block of the README, run top to bottom in one namespace (a block may use
    what an earlier block defined, as a reader would)."""
    blocks = _readme_blocks()
    assert blocks, "the README has no python block"
    namespace: dict = {"__name__": "__readme__"}
    for n, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {n + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - re-raised with the block's number
            raise AssertionError(f"README python block {n + 1} failed: {e!r}\n{block}") from e


def _doctest_modules() -> list[str]:
    names = []
    for module, path, _ in MODULES:
        if ">>>" in path.read_text():
            names.append(module)
    return names


def test_every_examples_section_is_a_doctest():
    """A docstring with an ``Examples`` section shows runnable ``>>>`` lines (run below)."""
    offenders = []
    for _, path, tree in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                if re.search(r"^\s*Examples?:?\s*$", doc, flags=re.M) and ">>>" not in doc:
                    offenders.append(f"{path.relative_to(SRC)} {getattr(node, 'name', '')}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module", _doctest_modules())
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed"
