"""Plugins: your own module that registers tasks and findings with the lab
(``causalmix lab run --plugin my_module``, or ``--plugin path/to/my_findings.py``).

A plugin is imported once per process, before the suite's jobs are listed; importing it is
what registers: it calls :func:`~causalmix.lab.register_finding` (and, to name its task
classes, :func:`~causalmix.lab.register_task`) at import time. ``examples/lab_plugin.py`` is
one, run by the test suite.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["PluginError", "load_plugin"]


class PluginError(ValueError):
    """A plugin could not be imported; the message names the plugin and what it raised."""


def _is_path(plugin: str) -> bool:
    return plugin.endswith(".py") or "/" in plugin or "\\" in plugin


def _from_path(path: Path) -> ModuleType:
    path = path.resolve()
    if not path.is_file():
        raise PluginError(f"--plugin {path}: no such file")
    # one module per file: a second load (another command in the same process) is the first
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"causalmix_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugin(plugin: str) -> ModuleType:
    """Import ``plugin``: a module name (``my_package.lab_findings``, found on ``sys.path``) or
    the path of a ``.py`` file. Returns the module; importing it again returns it again
    without running it twice. Raises :class:`PluginError` naming the plugin when the import
    fails, whatever the plugin raised (a missing module, a syntax error, a finding whose key
    is taken)."""
    if not isinstance(plugin, str) or not plugin.strip():
        raise PluginError(f"--plugin must name a module or a .py file, got {plugin!r}")
    try:
        if _is_path(plugin):
            return _from_path(Path(plugin))
        return importlib.import_module(plugin)
    except PluginError:
        raise
    except Exception as err:  # the plugin's own code: any error is reported, one line
        why = " ".join(str(err).split()) or "no message"
        raise PluginError(f"--plugin {plugin} failed to import: {type(err).__name__}: "
                          f"{why}") from err
