"""The documentation site's pages, checked without the ``docs`` extra (``make docs`` builds the
site itself, strict):

- every ``python`` block of ``docs/**/*.md`` runs, page by page, top to bottom in one namespace
  per page (as a reader would run them), and every ``pycon`` block (``>>>`` lines with their
  output) is a doctest in that namespace: the output a page shows is the output the code gives;
- no other fenced language hides code: blocks are ``python``, ``pycon``, ``bash`` (commands, not
  run here) or ``text``;
- every public name of ``causalmix``, ``causalmix.stream``, ``causalmix.distributed``,
  ``causalmix.nn`` and ``causalmix.hf`` (their ``__all__``) has an entry on its module's reference
  page and a docstring of its own for it to show (``docs/hooks/public_api.py``, which the build
  uses to write the reference pages); a failure names the name, the page and where to write;
- every figure a page shows is one the build draws (``docs/hooks/figures.py``);
- a block that includes a file (``--8<-- "path"``, the page shows the file) names a script this
  module runs: ``docs/examples/sequence_parallel.py`` on torchrun with 2 processes.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

import causalmix

REPO = pathlib.Path(causalmix.__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", flags=re.S | re.M)
LANGUAGES = {"python", "pycon", "bash", "text"}
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
#: The files pages include, each run by a test (below; ``examples/lab_plugin.py`` by
#: ``tests/lab/test_plugin.py``, through the command line).
SCRIPTS = {"docs/examples/sequence_parallel.py", "examples/lab_plugin.py"}


def _blocks(page: pathlib.Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of a page."""
    text = page.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def _includes(code: str) -> list[str] | None:
    """The paths a block includes, if it is only include lines."""
    lines = [line.strip() for line in code.splitlines() if line.strip()]
    found = [INCLUDE.match(line) for line in lines]
    return [m.group(1) for m in found] if lines and all(found) else None


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _id(page: pathlib.Path) -> str:
    return str(page.relative_to(DOCS))


def test_the_site_has_pages():
    assert (DOCS / "index.md") in PAGES and len(PAGES) >= 5


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_fenced_block_has_a_known_language(page):
    bad = [f"{_id(page)}:{line} ```{lang}" for lang, _, line in _blocks(page)
           if lang not in LANGUAGES]
    assert not bad, f"fenced blocks must be one of {sorted(LANGUAGES)}: {bad}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    lang in ("python", "pycon") for lang, _, _ in _blocks(p))], ids=_id)
def test_page_code_blocks_run_in_order(page):
    """``python`` blocks run, ``pycon`` blocks are doctests, all in one namespace per page."""
    if "causalmix.hf" in page.read_text():
        pytest.importorskip("transformers")
    module = types.ModuleType(f"__docs_{page.stem}__")  # a real module: dataclasses look it up
    sys.modules[module.__name__] = module
    try:
        _run_blocks(page, module.__dict__)
    finally:
        del sys.modules[module.__name__]


def _run_blocks(page: pathlib.Path, namespace: dict) -> None:
    parser = doctest.DocTestParser()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for lang, code, line in _blocks(page):
        where = f"{_id(page)}:{line}"
        if _includes(code) is not None:
            continue  # an included script: test_included_files_are_scripts_run_here
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - re-raised with the block's place
                raise AssertionError(f"{where}: python block failed: {e!r}\n{code}") from e
        elif lang == "pycon":
            test = parser.get_doctest(code, namespace, where, str(page), line)
            runner = doctest.DocTestRunner(optionflags=flags)
            out: list[str] = []
            runner.run(test, out=out.append, clear_globs=False)
            namespace.update(test.globs)  # DocTest ran on a copy of the namespace
            assert runner.failures == 0, f"{where}: pycon block failed\n{''.join(out)}"


def test_every_public_name_is_documented_on_its_reference_page():
    pytest.importorskip("transformers")  # causalmix.hf is one of the documented modules
    public_api = _load("public_api")
    assert set(public_api.MODULES) == {"causalmix", "causalmix.stream", "causalmix.distributed",
                                       "causalmix.nn", "causalmix.hf"}
    names = [f"{e.module}.{e.name}" for e in public_api.entries()]
    assert len(names) == len(set(names)) and len(names) > 50
    for module in public_api.MODULES:  # every name of every __all__, none skipped
        listed = {n for n in names if n.rsplit(".", 1)[0] == module}
        assert listed == {f"{module}.{n}" for n in importlib.import_module(module).__all__}
    problems = public_api.problems()
    assert not problems, "public names the API reference does not document:\n" + \
        "\n".join(problems)


def test_an_undocumented_name_is_reported_with_its_page(monkeypatch):
    """The check itself: a public name without a docstring is named, with its page and where
    its definition is."""
    pytest.importorskip("transformers")
    import causalmix.distributed as dist

    public_api = _load("public_api")

    def new_op(x):
        return x

    monkeypatch.setattr(dist, "new_op", new_op, raising=False)
    monkeypatch.setattr(dist, "__all__", [*dist.__all__, "new_op"])
    problems = public_api.problems()
    assert len(problems) == 1, problems
    assert problems[0].startswith("causalmix.distributed.new_op: undocumented: its entry on "
                                  "docs/reference/distributed.md")
    assert f"tests/test_docs.py:{new_op.__code__.co_firstlineno}" in problems[0]


def test_every_figure_shown_is_drawn_by_the_build():
    pytest.importorskip("matplotlib")
    drawn = set(_load("figures").FIGURES)
    shown = {(_id(p), m) for p in PAGES
             for m in re.findall(r"figures/([\w-]+)\.svg", p.read_text())}
    assert shown, "no page shows a figure"
    missing = sorted(f"{page}: {name}" for page, name in shown if name not in drawn)
    assert not missing, missing


def test_included_files_are_scripts_run_here():
    included = {path for page in PAGES for _, code, _ in _blocks(page)
                for path in (_includes(code) or [])}
    assert included <= SCRIPTS, f"included but not run by a test: {sorted(included - SCRIPTS)}"
    assert all((REPO / path).is_file() for path in SCRIPTS)


@pytest.mark.distributed
def test_sequence_parallel_example_runs_on_torchrun():
    """The command the Modes page gives, as given (2 processes, gloo): the script itself exits
    non-zero if a sharded output or gradient differs from one process by more than 1e-10."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "docs/examples/sequence_parallel.py"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("largest difference from one process") == 2, done.stdout
