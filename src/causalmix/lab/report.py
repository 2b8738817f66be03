"""The lab report: built once as data (:class:`Report` of :class:`Section`), rendered twice,
to a self-contained HTML page (plots inlined as base64 PNG) and to Markdown (plots in
``figures/``).

It opens with the findings table (finding, paper, arms, measured numbers, verdict), then one
section per finding in the order a reader checks it: the paper's claim, the rule the verdict
applies (fixed before the suite ran), the measured numbers with each condition's margin, the
verdict, the plot (mean ± standard error over seeds, axes named with their units), the table
of mean ± standard error over seeds, and the knobs chosen. An appendix gives each finding's
pilot history (how the knobs were chosen); a closing note the suite's wall time and the
machine's load.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path

from causalmix.lab.db import RunDB, run_finding, run_key
from causalmix.lab.findings import FINDINGS, SUITES, Finding, Judgement, select_findings
from causalmix.lab.findings.base import ONE_SEED
from causalmix.lab.results import Results, Run
from causalmix.lab.runner import suite_jobs

__all__ = ["Report", "Section", "build_report", "render_html", "render_markdown",
           "results_by_finding", "write_report"]

VERDICT = {True: "holds", False: "does not hold", None: "not run"}


@dataclasses.dataclass(frozen=True)
class Section:
    """One finding's part of the report: the :class:`Finding` (its words) and what its
    runs gave (arms, verdict, measured numbers, table, plot, notes)."""

    finding: Finding
    arms: list[str]
    verdict: str
    numbers: str
    table: tuple[list[str], list[list[str]]]
    figure: bytes  # PNG
    notes: list[str]

    @property
    def key(self) -> str:
        return self.finding.key

    @property
    def heading(self) -> str:
        return f"{self.finding.key} {self.finding.title}"


@dataclasses.dataclass(frozen=True)
class Report:
    suite: str
    intro: str
    sections: list[Section]
    closing: list[str]
    runs: tuple[list[str], list[list[str]]]


def _png(finding: Finding, results: Results) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    try:
        finding.plot(results, ax)
        ax.set_title(f"{finding.key} {finding.title}", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _section(finding: Finding, suite: str, results: Results,
             missing: dict[str, str]) -> Section:
    j: Judgement = finding.judge(results)
    notes = list(j.notes) + [f"{arm}: {why}." for arm, why in missing.items()
                             if not any(why in n for n in j.notes)]
    return Section(finding, finding.arm_names(suite), VERDICT[j.holds], j.numbers, j.table,
                   _png(finding, results), notes)


def _of(findings: dict[str, Finding]) -> str:
    return "" if set(findings) == set(FINDINGS) else f" of {', '.join(findings)}"


def _unloaded(rows: list[dict]) -> list[str]:
    """The findings of ``rows`` that are not registered (a plugin's, not loaded)."""
    return sorted({run_finding(r) for r in rows} - set(FINDINGS))


def _hint(rows: list[dict]) -> str:
    unloaded = _unloaded(rows)
    return "" if not unloaded else (f" (it holds runs of {', '.join(unloaded)}, findings not "
                                    f"loaded: pass the plugin that registers them with "
                                    f"--plugin)")


def _latest_suite(done: list[dict], findings: dict[str, Finding], path: Path) -> str:
    mine = [r for r in done if r["suite"] in SUITES and run_finding(r) in findings]
    if not mine:
        raise ValueError(f"no finished runs{_of(findings) or ' of the loaded findings'} in "
                         f"{path}{_hint(done)}; run `causalmix lab run` first")
    return mine[-1]["suite"]


def _runs(out: Path, suite: str | None, findings: dict[str, Finding]):
    """The suite, the finished rows of its jobs (of ``findings``), the (finding, arm) of each
    run key, and the finished runs of that suite that belong to no loaded finding."""
    db = RunDB(out)
    try:
        done = db.runs(status="done")
        path = db.path
    finally:
        db.close()
    suite = _latest_suite(done, findings, path) if suite is None else suite
    jobs = suite_jobs(suite, list(findings))
    keys = {run_key(job, s): (job.finding, job.arm) for job in jobs
            for s in range(max(SUITES[suite].seeds, 64))}
    rows = [r for r in done if r["key"] in keys]
    in_suite = [r for r in done if r["suite"] == suite]
    if not rows:
        raise ValueError(f"no finished runs of suite {suite!r}{_of(findings)} in "
                         f"{out}{_hint(in_suite)}")
    return suite, rows, keys, _unloaded(in_suite)


def results_by_finding(rows: list[dict], keys: dict[str, tuple[str, str]]
                       ) -> dict[str, Results]:
    """The :class:`~causalmix.lab.Results` of each finding from finished ``rows`` of the run
    database (``keys``: run key -> (finding, arm))."""
    by: dict[str, dict[str, list[Run]]] = {}
    for r in rows:
        fk, arm = keys[r["key"]]
        by.setdefault(fk, {}).setdefault(arm, []).append(Run.from_row(r))
    return {fk: Results(arms) for fk, arms in by.items()}


def build_report(out: str | Path, suite: str | None = None,
                 findings: list[str] | None = None) -> Report:
    """The report of ``suite`` (default: the suite of the latest finished run) from the runs
    in ``out/runs.sqlite``: a section for each registered finding, or for those whose keys
    ``findings`` lists."""
    out = Path(out)
    selected = select_findings(findings)
    suite, rows, keys, unloaded = _runs(out, suite, selected)
    results = results_by_finding(rows, keys)
    sections = []
    for fk, finding in selected.items():
        missing = {a.name: a.missing for a in finding.arms(suite) if a.missing}
        sections.append(_section(finding, suite, results.get(fk, Results()), missing))
    closing = _closing(out, suite, rows, unloaded)
    run_rows = [[r["experiment"], str(r["seed"]), f"{r['metrics']['score']:.4f}",
                 str(r["info"]["steps"]), r["info"]["stop_reason"], f"{r['wall_time_s']:.1f}"]
                for r in rows]
    intro = _intro(suite, rows, keys)
    return Report(suite, intro, sections, closing,
                  (["run", "seed", "score", "steps", "stop", "wall s"], run_rows))


def _closing(out: Path, suite: str, rows: list[dict], unloaded: list[str]) -> list[str]:
    meta_path = out / f"suite_{suite}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    closing = []
    if meta:
        hist = meta.get("history", [])
        trained = [h for h in hist if h["ran"]]
        total = sum(h["wall_time_s"] for h in trained)
        closing.append(
            f"`causalmix lab run --suite {suite}` took {total:.0f} s wall "
            f"({total / 60:.1f} min; {sum(h['ran'] for h in hist)} runs trained"
            + (f" over {len(trained)} invocations" if len(trained) > 1 else "")
            + f") on {meta['cpus']} CPUs with torch threads {meta['threads']}"
            + f" in {meta.get('workers', 1)} worker process"
            + ("es" if meta.get("workers", 1) > 1 else "") + "; load average "
            f"(1 min) {meta['load_start']:.2f} at the start of the last invocation, "
            f"{meta['load_end']:.2f} at its end (other work on the machine slows the runs "
            f"down).")
    train_s = sum(r["wall_time_s"] for r in rows)
    revs = sorted({r["git_rev"] for r in rows})
    closing.append(f"{len(rows)} runs, {train_s:.0f} s of training in total; git "
                   f"{', '.join(revs)}.")
    if unloaded:
        closing.append(f"The database also holds finished runs of {', '.join(unloaded)}, "
                       f"findings this report did not load (a plugin's findings need "
                       f"`--plugin` on `lab report` too).")
    closing.append("Verdicts apply the rules stated in each section. Where a rule or its "
                   "knobs were changed after runs it judges had been seen, the finding's rule "
                   "or its history in the appendix says so; a finding that does not hold is "
                   "reported as such.")
    return closing


def _intro(suite: str, rows: list[dict], keys: dict[str, tuple[str, str]]) -> str:
    """The report's first line: the seeds per arm actually found, and what the numbers are."""
    per_arm: dict[tuple[str, str], int] = {}
    for r in rows:
        per_arm[keys[r["key"]]] = per_arm.get(keys[r["key"]], 0) + 1
    lo, hi = min(per_arm.values()), max(per_arm.values())
    count = f"{lo} seed" if lo == hi == 1 else (f"{lo} seeds" if lo == hi else
                                                 f"{lo} to {hi} seeds")
    text = (f"Suite `{suite}`: {count} per arm. Numbers are mean ± standard error of the mean "
            f"over seeds.")
    if lo == 1:
        text += (f" With one seed the standard error is undefined: such a number is one run, "
                 f"marked {ONE_SEED}, and a rule comparing intervals compares the values.")
    return text


def _findings_rows(rep: Report) -> list[list[str]]:
    return [[s.heading, s.finding.paper, "; ".join(s.arms), s.numbers, s.verdict]
            for s in rep.sections]


FINDINGS_HEADER = ["finding", "paper", "arms", "measured", "verdict"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]]


def render_markdown(rep: Report, figures: Path) -> str:
    """Markdown of ``rep``; writes each section's plot to ``figures/<key>.png``."""
    figures.mkdir(parents=True, exist_ok=True)
    md = [f"# causalmix lab report: suite `{rep.suite}`", "", rep.intro, "", "## Findings", "",
          *_md_table(FINDINGS_HEADER, _findings_rows(rep))]
    for s in rep.sections:
        (figures / f"{s.key}.png").write_bytes(s.figure)
        f = s.finding
        md += ["", f"## {s.heading}: {s.verdict}", "", f"**Claim.** {f.claim} ({f.paper})", "",
               f"**Rule.** {f.rule}", "", f"**Measured.** {s.numbers}", ""]
        md += [f"- {n}" for n in s.notes] + [""] if s.notes else []
        md += [f"**Verdict.** {s.verdict}.", "", f"![{s.key}]({figures.name}/{s.key}.png)", "",
               *_md_table(*s.table), "", f"**Knobs.** {f.knobs}"]
    md += ["", "## Appendix: how the knobs were chosen", ""]
    md += [f"- **{s.key}.** {s.finding.history or 'No pilots recorded.'}" for s in rep.sections]
    md += ["", "## Closing note", "", *[f"- {c}" for c in rep.closing], "", "## Runs", "",
           *_md_table(*rep.runs)]
    return "\n".join(md) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def render_html(rep: Report) -> str:
    """A self-contained HTML page of ``rep`` (plots inlined, nothing fetched)."""
    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'>",
         f"<title>causalmix lab: {e(rep.suite)}</title><style>",
         "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}",
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}",
         ".v-holds{color:#080}.v-does-not-hold{color:#b00}.v-not-run{color:#888}",
         "</style></head><body>",
         f"<h1>causalmix lab report: suite <code>{e(rep.suite)}</code></h1>",
         f"<p>{e(rep.intro)}</p><h2>Findings</h2>",
         _html_table(FINDINGS_HEADER, _findings_rows(rep))]
    for s in rep.sections:
        b64 = base64.b64encode(s.figure).decode()
        cls = "v-" + s.verdict.replace(" ", "-")
        f = s.finding
        h += [f"<h2>{e(s.heading)}: <span class='{cls}'>{e(s.verdict)}</span></h2>",
              f"<p><b>Claim.</b> {e(f.claim)} ({e(f.paper)})</p>",
              f"<p><b>Rule.</b> {e(f.rule)}</p><p><b>Measured.</b> {e(s.numbers)}</p>"]
        if s.notes:
            h.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
        h += [f"<p><b>Verdict.</b> <span class='{cls}'>{e(s.verdict)}</span>.</p>",
              f"<p><img alt='{e(s.key)}' src='data:image/png;base64,{b64}'></p>",
              _html_table(*s.table), f"<p><b>Knobs.</b> {e(f.knobs)}</p>"]
    h.append("<h2>Appendix: how the knobs were chosen</h2><ul>" + "".join(
        f"<li><b>{e(s.key)}.</b> {e(s.finding.history or 'No pilots recorded.')}</li>"
        for s in rep.sections) + "</ul>")
    h += ["<h2>Closing note</h2><ul>" + "".join(f"<li>{e(c)}</li>" for c in rep.closing)
          + "</ul>", "<h2>Runs</h2>", _html_table(*rep.runs), "</body></html>"]
    return "\n".join(h)


def write_report(out: str | Path, suite: str | None = None,
                 findings: list[str] | None = None) -> dict[str, Path]:
    """Write ``out/report.html`` (self-contained) and ``out/report.md`` (+ ``out/figures``)
    from the finished runs of ``suite`` (default: the suite of the latest run), with a
    section for each registered finding or for those ``findings`` lists."""
    out = Path(out)
    rep = build_report(out, suite, findings)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(render_markdown(rep, out / "figures"))
    html_path.write_text(render_html(rep))
    return {"html": html_path, "markdown": md_path, "figures": out / "figures"}
