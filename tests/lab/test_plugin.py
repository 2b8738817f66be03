"""The lab's extension point: ``examples/lab_plugin.py`` (a user task and finding F9 in a module
of its own) through the command line (``--plugin``, ``--finding``), the report's seed count, the
long export, and the typed structure a judge receives (:class:`causalmix.lab.Results`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from causalmix.cli import main
from causalmix.lab import (
    FINDINGS,
    TASKS,
    Finding,
    Results,
    Run,
    RunDB,
    load_plugin,
    register_finding,
    run_jobs,
    suite_jobs,
    write_report,
)
from causalmix.lab.export import LONG_COLUMNS
from causalmix.lab.protocol import plain
from causalmix.visibility import Causal, Window

REPO = Path(__file__).resolve().parents[2]
PLUGIN = str(REPO / "examples" / "lab_plugin.py")
SEL = ["--plugin", PLUGIN, "--finding", "F9"]


def _done(out: Path) -> list[dict]:
    db = RunDB(out, create=False)
    try:
        return db.runs(status="done")
    finally:
        db.close()


@pytest.fixture
def plugin_loaded():
    """The plugin registered in this process for one test, then removed again (F9 must not
    leak into the other tests' FINDINGS)."""
    before = (dict(FINDINGS), dict(TASKS), set(sys.modules))
    yield load_plugin(PLUGIN)
    for key in set(FINDINGS) - set(before[0]):
        del FINDINGS[key]
    for key in set(TASKS) - set(before[1]):
        del TASKS[key]
    for name in set(sys.modules) - before[2]:
        if name.startswith("causalmix_plugin_"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def f9(tmp_path_factory) -> Path:
    """``causalmix lab run --suite smoke --plugin examples/lab_plugin.py --finding F9 --seeds 2``
    in a process of its own, as a user types it."""
    out = tmp_path_factory.mktemp("plugin") / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "causalmix", "lab", "run", "--suite", "smoke", *SEL,
           "--seeds", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "suite smoke: 4 runs trained" in done.stdout, done.stdout
    return out


def test_a_plugin_finding_runs_through_the_cli(f9):
    rows = _done(f9)
    assert len(rows) == 4  # 2 arms x 2 seeds, no other finding's arm
    assert {r["experiment"] for r in rows} == {"F9/causal", "F9/lookahead 1 (first layer)"}
    assert {r["info"]["finding"] for r in rows} == {"F9"}
    assert {r["task"] for r in rows} == {"next-same"}  # the name it registered
    assert sorted(r["seed"] for r in rows) == [0, 0, 1, 1]
    look = next(r for r in rows if r["info"]["arm"].startswith("lookahead"))
    # a per-layer scheme: one frame ahead in the first layer, causal in the second
    assert look["config"]["scheme"] == plain((Causal() | Window(0, 1), Causal()))
    assert look["metrics"]["latency_frames"] == 1


def test_report_of_a_plugin_finding_says_the_real_seed_count(f9, plugin_loaded, capsys):
    assert main(["lab", "report", "--out", str(f9), *SEL]) == 0
    md = (f9 / "report.md").read_text()
    assert "Suite `smoke`: 2 seeds per arm." in md  # the suite's own count is 1
    assert "## F9 one frame of lookahead answers next-same" in md
    assert all(f"## {k} " not in md for k in FINDINGS if k != "F9")  # only the filtered one
    assert (f9 / "figures" / "F9.png").read_bytes()[:4] == b"\x89PNG"
    # the judge saw both arms' two seeds (its table lists them)
    assert "| causal |" in md and md.count("| 0 1 |") == 2


def test_report_without_the_plugin_names_what_to_load(f9, cli_error):
    err = cli_error(["lab", "report", "--out", str(f9)])
    assert "F9" in err and "--plugin" in err


def test_long_export_has_one_row_per_metric_value(f9, plugin_loaded, tmp_path):
    dest = tmp_path / "long.csv"
    assert main(["lab", "export", "--out", str(f9), "--format", "long", *SEL,
                 "--to", str(dest)]) == 0
    with dest.open(newline="") as f:
        reader = csv.reader(f)
        header, *rows = list(reader)
    assert tuple(header) == LONG_COLUMNS

    def leaves(x, path=""):  # brute force: every scalar of a run's metrics, by path
        if isinstance(x, dict):
            return [p for k, v in x.items() for p in leaves(v, f"{path}{k}.")]
        return [(path[:-1], x)]

    runs = _done(f9)
    want = {(r["key"], p): v for r in runs for p, v in leaves(r["metrics"])}
    assert len(rows) == len(want) == sum(len(leaves(r["metrics"])) for r in runs)
    got = {(row[0], row[8]): row for row in rows}
    assert set(got) == set(want)
    for (key, path), v in want.items():
        row = dict(zip(LONG_COLUMNS, got[key, path], strict=True))
        assert row["finding"] == "F9" and row["suite"] == "smoke"
        assert row["experiment"] == f"F9/{row['arm']}" and row["task"] == "next-same"
        assert row["value"] == ("" if v is None else str(v))
    assert any(p == "accuracy_by_symbol.3" for _, p in want)  # nested metrics as paths
    # the default file name, and --finding filters by the database's records (no --plugin)
    assert main(["lab", "export", "--out", str(f9), "--format", "long", "--finding",
                 "F9"]) == 0
    assert (f9 / "runs_long.csv").read_text() == dest.read_text()


def test_finding_filters_list_and_export(f9, plugin_loaded, capsys, tmp_path, cli_error):
    assert main(["lab", "list", "--out", str(f9), *SEL]) == 0
    listing = capsys.readouterr().out
    assert "suite smoke (2 arms x 1 seed)" in listing and "F1/" not in listing
    assert "seeds: done done" not in listing  # the suite's own count of seeds: 1
    dest = tmp_path / "f9.jsonl"
    assert main(["lab", "export", "--out", str(f9), "--finding", "F9,F9", "--to",
                 str(dest)]) == 0
    assert len(dest.read_text().splitlines()) == 4
    err = cli_error(["lab", "export", "--out", str(f9), "--finding", "F1", "--to", str(dest)])
    assert "no runs of F1" in err


def test_unknown_finding_and_broken_plugins_exit_2_with_one_line(tmp_path, cli_error):
    for cmd in ("run", "report", "list", "export"):
        err = cli_error(["lab", cmd, "--out", str(tmp_path), "--finding", "F1,F99"]
                   + (["--suite", "smoke"] if cmd == "run" else []))
        if cmd in ("run", "list"):  # report and export first say there are no runs
            assert "'F99'" in err and "F1, F2" in err and "--plugin" in err, err
    assert not (tmp_path / "runs.sqlite").exists()  # refused before anything was created
    err = cli_error(["lab", "list", "--plugin", "no_such_module_xyz"])
    assert "--plugin no_such_module_xyz failed to import" in err
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('boom\\nsecond line')\n")
    err = cli_error(["lab", "list", "--plugin", str(bad)])
    assert str(bad) in err and "RuntimeError: boom second line" in err
    err = cli_error(["lab", "list", "--plugin", str(tmp_path / "missing.py")])
    assert "no such file" in err
    assert not any(n.startswith("causalmix_plugin_bad_plugin") for n in sys.modules)


def test_register_finding_refuses_a_taken_key_and_non_findings(plugin_loaded):
    f9 = FINDINGS["F9"]
    assert list(FINDINGS)[-1] == "F9"  # after the built-in ones: report order
    assert register_finding(f9) is f9  # the same object again: a no-op
    assert load_plugin(PLUGIN) is plugin_loaded  # a second import is the first
    other = Finding(**{**{k: getattr(f9, k) for k in ("title", "paper", "claim", "rule",
                                                      "knobs", "arms", "judge", "plot")},
                       "key": "F1"})
    with pytest.raises(ValueError, match="'F1' is taken"):
        register_finding(other)
    with pytest.raises(TypeError, match="must be a causalmix.lab.Finding, got dict"):
        register_finding({"key": "F10"})
    with pytest.raises(ValueError, match="key must be"):
        register_finding(Finding(**{**other.__dict__, "key": "F/10"}))
    assert "F10" not in FINDINGS and FINDINGS["F1"] is not other


def test_report_seed_count_is_a_range_when_arms_differ(plugin_loaded, tmp_path):
    causal, ahead = suite_jobs("smoke", ["F9"])
    run_jobs([causal], tmp_path, suite="smoke", seeds=2, progress=False, log=lambda _: None)
    run_jobs([ahead], tmp_path, suite="smoke", seeds=1, progress=False, log=lambda _: None)
    md = write_report(tmp_path, findings=["F9"])["markdown"].read_text()
    assert "Suite `smoke`: 1 to 2 seeds per arm." in md


def test_results_is_the_typed_mapping_a_judge_receives():
    res = Results({"a": [{"score": 0.5, "acc_by": {"16": 1.0, "4": 0.5}},
                         Run({"score": 0.7, "acc_by": {"4": 0.25}}, seed=1, key="k1", steps=3)],
                   "empty": []})
    # a Mapping[str, list[dict]]: what the judges written before it index and walk
    assert list(res) == ["a"] and "empty" not in res and res.get("empty") is None
    assert [r["score"] for r in res["a"]] == [0.5, 0.7] and len(res) == 1
    assert [len(v) for v in res.values()] == [2]
    run = res["a"][1]
    assert isinstance(run, dict) and set(run) == {"score", "acc_by"}  # metrics only as keys
    assert (run.seed, run.key, run.steps, run.stop_reason) == (1, "k1", 3, "steps")
    assert json.loads(json.dumps(res["a"])) == [dict(r) for r in res["a"]]
    assert res.seeds("a") == [0, 1] and res.metric("a", "score") == [0.5, 0.7]
    assert res.grouped("a", "acc_by", 4) == [0.5, 0.25] and res.grouped("a", "acc_by", 16) == [1.0]
    assert res.groups("acc_by") == [4, 16] and res.missing(["a", "b"]) == ["b"]
    assert res.runs("b") == [] and res.metric("b", "score") == []
    # runs are kept in seed order whatever order they come in
    swapped = Results({"a": [Run({"score": 1}, seed=2), Run({"score": 0}, seed=0)]})
    assert swapped.seeds("a") == [0, 2]
