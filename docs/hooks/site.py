"""MkDocs hooks of the causalmix site (``mkdocs.yml``: ``hooks:``).

At every build, nothing of it checked in:

- one API reference page per public module (``public_api.MODULES``), an entry for every name of
  its ``__all__`` (so a new public name appears, and a name without a docstring fails the strict
  build with a warning);
- the figures of ``figures.FIGURES`` (mask and weight pictures drawn from the code with
  matplotlib), written as SVG under ``figures/`` of the site.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

from mkdocs.structure.files import File

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))  # the tree being documented, installed or not

import figures  # noqa: E402
import public_api  # noqa: E402

log = logging.getLogger("mkdocs.plugins.causalmix")

_INTRO = {
    "causalmix": "The spec and the functional mixers: `import causalmix` or "
                 "`from causalmix import ...`.",
    "causalmix.stream": "Streaming and decode executors ([Modes](../modes.md)).",
    "causalmix.distributed": "Sequence parallel over `torch.distributed` "
                             "([Modes](../modes.md#sequence-parallel)).",
    "causalmix.nn": "Layers, blocks and models.",
    "causalmix.hf": "The Hugging Face bridge ([the bridge](../hf.md)); needs the `hf` extra.",
}


def reference_page(module: str, entries: list[public_api.Entry]) -> str:
    """The Markdown of one reference page: the module docstring, then every public name."""
    lines = [f"# `{module}`", "", _INTRO.get(module, ""), "",
             f"::: {module}", "    options:", "      members: false",
             "      show_root_heading: false", "      show_root_toc_entry: false", ""]
    for e in entries:
        if e.first is None:
            lines += [f"::: {e.module}.{e.name}", ""]
        else:
            lines += [f"## `{e.module}.{e.name}` {{ #{e.module}.{e.name} }}", "",
                      f"The same object as [`{e.first}`][{e.first}], re-exported here.", ""]
    return "\n".join(lines)


def on_files(files, config):
    """Add the generated reference pages and figures to the build."""
    start = time.perf_counter()
    missing = public_api.undocumented()
    for name in missing:
        log.warning("public name without a docstring of its own: %s", name)
    by_module: dict[str, list[public_api.Entry]] = {}
    for e in public_api.entries():
        by_module.setdefault(e.module, []).append(e)
    for module, page in public_api.MODULES.items():
        files.append(File.generated(config, page,
                                    content=reference_page(module, by_module.get(module, []))))
    for name, draw in figures.FIGURES.items():
        files.append(File.generated(config, f"figures/{name}.svg", content=draw()))
    log.info("causalmix: %d reference pages, %d figures in %.1f s", len(public_api.MODULES),
             len(figures.FIGURES), time.perf_counter() - start)
    return files


def on_config(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
    return config
