"""The lab through its command line: the smoke suite end to end (run, rerun, report, export,
list), resume after SIGKILL, and user errors (exit 2, one line, no traceback)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from causalmix.cli import main
from causalmix.lab.experiments import mixer_available
from causalmix.lab.findings import FINDINGS, SUITES
from causalmix.lab.runner import suite_jobs


def _rows(out: Path, suite_name: str = "smoke") -> list[tuple]:
    con = sqlite3.connect(out / "runs.sqlite")
    try:
        return con.execute("SELECT key, status, seed, experiment, attempts, finished_at, "
                           "metrics, git_rev, config, wall_time_s FROM runs WHERE suite = ? "
                           "ORDER BY key", (suite_name,)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "out"
    assert main(["lab", "run", "--suite", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_smoke_suite_runs_every_arm_once(smoke, capsys):
    jobs = suite_jobs("smoke")
    rows = _rows(smoke)
    assert len(rows) == len(jobs) * SUITES["smoke"].seeds
    assert {r[1] for r in rows} == {"done"}
    assert {r[3] for r in rows} == {job.name for job in jobs}
    assert all(r[7] and r[9] > 0 and '"score"' in r[6] and '"finding"' in r[8] for r in rows)
    meta = json.loads((smoke / "suite_smoke.json").read_text())
    assert meta["ran"] == len(rows) and meta["wall_time_s"] > 0
    # a second run trains nothing and changes nothing
    assert main(["lab", "run", "--suite", "smoke", "--out", str(smoke), "--no-progress"]) == 0
    assert f"0 runs trained, {len(rows)} already done" in capsys.readouterr().out
    assert _rows(smoke) == rows


def test_smoke_report(smoke, capsys):
    assert main(["lab", "report", "--out", str(smoke)]) == 0
    page = (smoke / "report.html").read_text()
    md = (smoke / "report.md").read_text()
    assert page.count("src='data:image/png;base64,") == len(FINDINGS)  # plots inlined
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    # the findings table opens the report, one section and plot per finding
    assert md.index("## Findings") < md.index("## F1")
    assert "| finding | paper | arms | measured | verdict |" in md
    appendix = md.index("## Appendix: how the knobs were chosen")
    for key, f in FINDINGS.items():
        assert f"## {key} {f.title}" in md and f.rule in md and f.title in page
        png = (smoke / "figures" / f"{key}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{key}.png" in md
        # each section reads claim -> rule -> measured -> verdict -> plot, then table, knobs
        start = md.index(f"## {key} {f.title}")
        end = md.find("\n## ", start + 1)
        sec = md[start:end]
        marks = ["**Claim.**", "**Rule.**", "**Measured.**", "**Verdict.**",
                 f"![{key}](figures/{key}.png)", "| arm |" if key != "F5" else "| point |",
                 "**Knobs.**"]
        at = [sec.find(m) for m in marks]
        assert -1 not in at and at == sorted(at), (key, list(zip(marks, at, strict=True)))
        assert f.knobs in sec and (not f.history or f.history not in sec)
        # the pilots' history sits in the appendix
        assert f"- **{key}.** {f.history or 'No pilots recorded.'}" in md[appendix:]
        for tag in ("Claim.", "Rule.", "Measured.", "Verdict.", "Knobs."):
            assert page.count(f"<b>{tag}</b>") == len(FINDINGS)
    assert md.index("## F1") < appendix < md.index("## Closing note")
    if mixer_available("gated"):  # the gated arms ran
        assert "not run: gated mixer not available" not in md and "F6/causal gated" in md
    else:
        assert "not run: gated mixer not available" in md or "gated" not in md
    assert "took" in md and "load average" in md  # the closing note's wall time
    # one seed: said so, no standard error of 0 printed, no "1 seeds"
    assert "Suite `smoke`: 1 seed per arm." in md and "standard error is undefined" in md
    assert "(1 seed: no s.e.)" in md and "± 0.000" not in md and "1 seeds" not in md


def test_smoke_plots_name_axes_with_units_and_draw_error_bars(smoke):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from causalmix.lab.db import RunDB, run_key

    db = RunDB(smoke, create=False)
    try:
        done = {r["key"]: r["metrics"] for r in db.runs(status="done")}
    finally:
        db.close()
    for key, f in FINDINGS.items():
        results = {a.name: [done[run_key(a.job, 0)]] for a in f.arms("smoke")
                   if a.job is not None and run_key(a.job, 0) in done}
        fig, ax = plt.subplots()
        try:
            f.plot(results, ax)
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert label and "(" in label, (key, label)  # a name and its unit / scale
            assert any(isinstance(c, ErrorbarContainer) for c in ax.containers), key
        finally:
            plt.close(fig)


def test_smoke_export_csv_and_jsonl(smoke, tmp_path, capsys):
    n = len(_rows(smoke))
    assert main(["lab", "export", "--out", str(smoke), "--to", str(tmp_path / "r.jsonl")]) == 0
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == n
    runs = [json.loads(x) for x in lines]
    assert {r["key"] for r in runs} == {r[0] for r in _rows(smoke)}
    assert all({"config", "seed", "metrics", "curve"} <= set(r) for r in runs)
    assert all(isinstance(r["curve"], list) and "score" in r["metrics"] for r in runs)
    assert main(["lab", "export", "--out", str(smoke), "--format", "csv", "--to",
                 str(tmp_path / "r.csv")]) == 0
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n and "metric.score" in table[0]
    ran = {job.finding for job in suite_jobs("smoke")}
    assert {json.loads(r["config"])["finding"] for r in table} == ran
    mq = [r for r in table if r["experiment"] == "F1/softmax"]
    assert mq and "metric.accuracy_by_pairs.16" in mq[0]
    capsys.readouterr()
    assert main(["lab", "export", "--out", str(smoke), "--to", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == n
    # specs are written with their type and arguments (Causal() was {}, like Full())
    f1 = next(r for r in runs if r["experiment"] == "F1/softmax")
    assert f1["config"]["model"]["visibility"] == [{"type": "Causal"}, {"type": "Causal"}]


def _leaves(x, path: str = "") -> list[tuple[str, object]]:
    """Brute force: every scalar of nested metrics with its dotted path."""
    if isinstance(x, (dict, list)):
        items = x.items() if isinstance(x, dict) else enumerate(x)
        return [leaf for k, v in items for leaf in _leaves(v, f"{path}{k}.")]
    return [(path[:-1], x)]


def test_smoke_export_long_has_one_row_per_metric_value(smoke, tmp_path):
    from causalmix.lab.export import LONG_COLUMNS

    dest = tmp_path / "long.csv"
    assert main(["lab", "export", "--out", str(smoke), "--format", "long", "--to",
                 str(dest)]) == 0
    with open(dest, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert tuple(header) == LONG_COLUMNS
    want = {(key, p): v for key, m in ((r[0], json.loads(r[6])) for r in _rows(smoke))
            for p, v in _leaves(m)}
    assert len(rows) == len(want)  # one row per (run, metric value), no sparse columns
    by = {(r[0], r[8]): r for r in rows}
    assert set(by) == set(want)
    for (key, path), v in want.items():
        cell = by[key, path][9]
        assert cell == ("" if v is None else str(int(v) if isinstance(v, bool) else v))
    exp = {r[0]: r[3] for r in _rows(smoke)}
    assert all(r[3] == exp[r[0]] and r[3] == f"{r[2]}/{r[4]}" for r in rows)
    # --finding keeps that finding's runs only
    assert main(["lab", "export", "--out", str(smoke), "--format", "long", "--finding",
                 "F1,F4", "--to", str(dest)]) == 0
    with open(dest, newline="") as f:
        assert {r["finding"] for r in csv.DictReader(f)} == {"F1", "F4"}


def test_export_of_a_suite_without_runs_is_refused_and_keeps_the_file(smoke, tmp_path, cli_error):
    dest = tmp_path / "runs.jsonl"
    assert main(["lab", "export", "--out", str(smoke), "--to", str(dest)]) == 0
    before = dest.read_bytes()
    assert before
    for fmt in ("jsonl", "csv"):
        err = cli_error(["lab", "export", "--out", str(smoke), "--suite", "default",
                         "--format", fmt, "--to", str(dest)])
        assert "no runs of suite 'default'" in err and "nothing to export" in err
        assert dest.read_bytes() == before  # the file is kept as it was
    assert "no runs of suite 'full'" in cli_error(["lab", "export", "--out", str(smoke), "--suite",
                                              "full", "--to", "-"])


def test_smoke_list(smoke, capsys):
    assert main(["lab", "list", "--out", str(smoke)]) == 0
    listing = capsys.readouterr().out
    assert "suite smoke" in listing and "suite default" in listing and "done" in listing


def test_user_errors_exit_2_with_one_line(tmp_path, cli_error):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "threads" in cli_error(["lab", "run", "--threads", "0", "--out", str(tmp_path)])
    assert "threads" in cli_error(["lab", "run", "--threads", "two"])
    assert "seeds" in cli_error(["lab", "run", "--seeds", "-1"])
    assert "suite" in cli_error(["lab", "run", "--suite", "enormous"])
    assert "is a file" in cli_error(["lab", "run", "--suite", "smoke", "--out", str(a_file)])
    assert "is a file" in cli_error(["lab", "report", "--out", str(a_file)])
    assert "no lab runs" in cli_error(["lab", "report", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()  # nothing created
    assert "no lab runs" in cli_error(["lab", "export", "--out", str(tmp_path / "none")])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "runs.sqlite").write_bytes(b"garbage" * 1000)
    for cmd in ("run", "report", "list", "export"):
        argv = ["lab", cmd, "--out", str(corrupt)] + (["--suite", "smoke"] if cmd == "run"
                                                      else [])
        assert "not a lab run database" in cli_error(argv)
    cli_error([])
    cli_error(["lab"])
    cli_error(["bogus"])


def test_python_m_causalmix_and_a_closed_pipe(smoke):
    """``python -m causalmix`` is the command line; output into a pipe whose reader has gone
    (``causalmix lab list | head -1``) ends quietly with status 0, no traceback, no message."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, "-m", "causalmix", "lab", "list", "--out",
                               str(smoke)], env=env, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc
    # and through a real shell pipe, as a user types it
    shell = subprocess.run(f"{sys.executable} -m causalmix lab list --out {smoke} | head -1",
                           shell=True, env=env, capture_output=True, text=True, timeout=120)
    n = len(suite_jobs("smoke"))
    assert shell.stdout == f"suite smoke ({n} arms x 1 seed)\n" and shell.stderr == "", shell


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_every_command_quietly(smoke, monkeypatch, capsys):
    for argv in (["lab", "list", "--out", str(smoke)],
                 ["lab", "export", "--out", str(smoke), "--to", "-"],
                 ["lab", "report", "--out", str(smoke)]):
        monkeypatch.setattr("sys.stdout", _ClosedPipe())
        assert main(argv) == 0, argv
        monkeypatch.undo()
        assert capsys.readouterr().err == ""


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("causalmix ")


def test_export_errors(smoke, tmp_path, cli_error):
    assert "folder" in cli_error(["lab", "export", "--out", str(smoke), "--to", str(tmp_path)])
    assert "does not exist" in cli_error(["lab", "export", "--out", str(smoke), "--to",
                                     str(tmp_path / "no" / "x.csv")])
    assert "format" in cli_error(["lab", "export", "--format", "xml"])


def test_resume_after_sigkill(tmp_path):
    """Kill the lab (SIGKILL) after its first run is recorded, rerun: the finished runs are not
    repeated (same rows, same finish time), the interrupted one is rerun, none is lost or
    duplicated."""
    out = tmp_path / "lab"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "killed-run.log", "wb")  # noqa: SIM115 (closed in finally)
    argv = ["lab", "run", "--suite", "smoke", "--out", str(out), "--no-progress", "--seeds", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "causalmix.cli", *argv], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "runs.sqlite").exists():
                try:
                    if any(r[1] == "done" for r in _rows(out)):
                        break
                except sqlite3.OperationalError:  # table not created yet / locked
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the smoke suite finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    before = _rows(out)
    done_before = {r[0]: r for r in before if r[1] == "done"}
    total = len(suite_jobs("smoke")) * 2
    assert done_before and len(done_before) < total
    assert main(argv) == 0
    after = _rows(out)
    assert len(after) == total == len({r[0] for r in after})
    assert all(r[1] == "done" for r in after)
    for key, row in done_before.items():  # not repeated: identical rows
        assert next(r for r in after if r[0] == key) == row
    interrupted = {r[0] for r in before if r[1] == "running"}
    for r in after:
        if r[0] in interrupted:
            assert r[4] == 2  # a second attempt of the killed run
    # the report's header counts the seeds found (2), not the suite's own (1)
    assert main(["lab", "report", "--out", str(out)]) == 0
    assert "Suite `smoke`: 2 seeds per arm." in (out / "report.md").read_text()
