"""MkDocs hooks of the causalmix site (``mkdocs.yml``: ``hooks:``).

At every build, nothing of it checked in:

- one API reference page per public module (``public_api.MODULES``), an entry for every name of
  its ``__all__`` (so a new public name appears by itself, and a name without a docstring fails
  the strict build with a warning saying which name, which page and where to write it);
- the figures of ``figures.FIGURES`` (mask and weight pictures drawn from the code with
  matplotlib), written as SVG under ``figures/`` of the site;
- the benchmarks page's table of measured figures, from the README's (said in one place);
- the lab page's findings (title, paper, claim, rule: ``causalmix.lab.findings.FINDINGS``), each
  with its latest figure when a lab report exists (``$CAUSALMIX_LAB_OUT``, default ``lab_out/``:
  what ``make lab`` writes), else the command that makes it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
import time

from mkdocs.structure.files import File

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))  # the tree being documented, installed or not

import figures  # noqa: E402
import public_api  # noqa: E402

log = logging.getLogger("mkdocs.plugins.causalmix")

LAB_MARK = "<!-- findings: written by docs/hooks/site.py -->"


def _lab_out(config) -> pathlib.Path:
    root = pathlib.Path(config.config_file_path).parent
    return root / os.environ.get("CAUSALMIX_LAB_OUT", "lab_out")


def findings_markdown(lab_out: pathlib.Path) -> str:
    """One section per finding of the lab, from the findings' own data."""
    from causalmix.lab.findings import FINDINGS

    report = lab_out / "report.md"
    head = report.read_text().splitlines()[0] if report.is_file() else ""
    suite = re.search(r"suite `(\w+)`", head)
    suite = f"suite `{suite.group(1)}`" if suite else "suite unknown"
    lines = []
    for key, f in FINDINGS.items():
        lines += [f"### {key}: {f.title}", "", f"*{f.paper}*", "", f"**Claim.** {f.claim}", "",
                  f"**Rule.** {f.rule}", ""]
        if (lab_out / "figures" / f"{key}.png").is_file():
            lines += [f"![{key}, from the latest report](lab/{key}.png)", "",
                      f"*The latest figure ({suite}): `{report.parent.name}/figures/{key}.png`, "
                      f"written by `causalmix lab report` (the numbers and the verdict are in "
                      f"`{report.parent.name}/report.html`).*", ""]
        else:
            lines += [f"No lab report was found when this site was built: `make lab` writes "
                      f"this finding's figure to `lab_out/figures/{key}.png` and its numbers and "
                      f"verdict to `lab_out/report.html` (then `make docs` shows the figure "
                      f"here).", ""]
    return "\n".join(lines)


MEASURED_MARK = "<!-- measured: the README's table, inserted by docs/hooks/site.py -->"
MEASURED_HEADING = "### Measured on the 2-core CPU"


def measured_table(readme: pathlib.Path) -> str | None:
    """The table under the README's ``Measured on the 2-core CPU`` heading (one place for the
    measured figures while the README still carries them), or None if it has none."""
    text = readme.read_text()
    if MEASURED_HEADING not in text:
        return None
    rows = text[text.index(MEASURED_HEADING):].splitlines()[1:]
    rows = rows[next(k for k, r in enumerate(rows) if r.startswith("|")):]
    return "\n".join(r for r in rows[:next((k for k, r in enumerate(rows)
                                             if not r.startswith("|")), len(rows))])


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "benchmarks.md":
        table = measured_table(pathlib.Path(config.config_file_path).parent / "README.md")
        if table is None or MEASURED_MARK not in markdown:
            log.warning("benchmarks.md: the README's %r table or the page's mark is gone: move "
                        "the table into docs/benchmarks.md", MEASURED_HEADING)
            return markdown
        return markdown.replace(MEASURED_MARK, table)
    if page.file.src_uri == "lab.md":
        if LAB_MARK not in markdown:
            log.warning("lab.md has lost its findings mark %r", LAB_MARK)
        return markdown.replace(LAB_MARK, findings_markdown(_lab_out(config)))
    return markdown


def on_files(files, config):
    """Add the generated reference pages and figures to the build."""
    start = time.perf_counter()
    for problem in public_api.problems():
        log.warning("public name: %s", problem)
    by_module: dict[str, list[public_api.Entry]] = {}
    for e in public_api.entries():
        by_module.setdefault(e.module, []).append(e)
    for module, page in public_api.MODULES.items():
        content = public_api.reference_page(module, by_module.get(module, []))
        files.append(File.generated(config, page, content=content))
    for name, draw in figures.FIGURES.items():
        files.append(File.generated(config, f"figures/{name}.svg", content=draw()))
    lab_figures = _lab_out(config) / "figures"
    for png in sorted(lab_figures.glob("F*.png")) if lab_figures.is_dir() else []:
        files.append(File.generated(config, f"lab/{png.name}", content=png.read_bytes()))
    log.info("causalmix: %d reference pages, %d figures in %.1f s", len(public_api.MODULES),
             len(figures.FIGURES), time.perf_counter() - start)
    return files


def on_config(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
    return config
