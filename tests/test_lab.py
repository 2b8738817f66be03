"""causalmix.lab: task generators, visibility schemes, trainer determinism, the smoke suite end
to end through the CLI, resume after a killed run, and the report."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from causalmix.cli import main
from causalmix.lab import (
    MQAR,
    ICLRegression,
    Lookahead,
    RunDB,
    TrainConfig,
    layer_visibility,
    suite,
    train_one,
)
from causalmix.lab.adaptive import SUITE_STUDY
from causalmix.lab.experiments import Experiment, latency_frames
from causalmix.lab.report import write_report
from causalmix.lab.tasks import IGNORE
from causalmix.visibility import Causal, Full, Prefix, Window

# ------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_mqar_shapes_labels_and_passes(passes):
    t = MQAR(vocab_size=32, num_kv_pairs=6, num_queries=3, query_len=5, num_passes=passes,
             num_train=40, num_test=10)
    d = t.build(0)
    x, y = d.train["inputs"], d.train["targets"]
    one = 2 * 6 + 5
    assert x.shape == y.shape == (40, passes * one) and t.seq_len == passes * one
    assert x.dtype == y.dtype == torch.int64 and d.test["inputs"].shape == (10, passes * one)
    for p in range(1, passes):  # every pass repeats the first
        assert torch.equal(x[:, p * one:(p + 1) * one], x[:, :one])
    lab = y != IGNORE
    assert not lab[:, :-5].any()  # labels only on the question slots of the last pass
    assert (lab.sum(1) == 3).all()
    half = 16
    for i in range(40):
        keys, vals = x[i, 0:12:2], x[i, 1:12:2]
        assert ((keys >= 1) & (keys < half)).all() and ((vals >= half) & (vals < 32)).all()
        assert len(set(keys.tolist())) == 6  # keys are distinct
        q = x[i, -5:]
        for s in range(5):
            if lab[i, -5 + s]:
                j = keys.tolist().index(int(q[s]))  # an asked key from the context ...
                assert int(y[i, -5 + s]) == int(vals[j])  # ... labelled with its value
            else:
                assert int(q[s]) == 0  # filler
    assert d.train["prefix_len"].eq(x.shape[1]).all()


def test_icl_regression_tokens_and_baselines():
    t = ICLRegression(dim=3, max_examples=8, seq_len=12, noise_std=0.0, test_examples=(2, 8),
                      num_train=50, num_test=20)
    d = t.build(1)
    x, y, m, n = (d.train[k] for k in ("inputs", "targets", "mask", "prefix_len"))
    assert x.shape == (50, 12, 5) and y.shape == m.shape == (50, 12)
    assert ((n >= 1) & (n <= 8)).all()
    pos = torch.arange(12)[None]
    ex = pos < n[:, None]
    assert torch.equal(m, ~ex)  # queries are scored, examples are not
    assert torch.equal(x[..., 0][ex], y[ex]) and (x[..., 0][~ex] == 0).all()  # [y, x] / [0, x]
    assert torch.equal(x[..., -1], ex.float())  # the example flag
    # one w per sequence: noise-free y is exactly linear in x
    w = torch.linalg.lstsq(x[:, :, 1:4], y[..., None]).solution
    torch.testing.assert_close(x[:, :, 1:4] @ w, y[..., None], atol=1e-4, rtol=0)
    assert d.test["inputs"].shape == (40, 12, 5)
    assert sorted(d.test["prefix_len"].unique().tolist()) == [2, 8]
    # with no noise and more examples than dimensions least squares is exact
    assert d.extra["least_squares_mse"][8] < 1e-8
    assert d.extra["least_squares_mse"][2] > 0.05  # under-determined: it cannot be
    assert d.extra["bayes_mse"][8] < 1e-6


def test_lookahead_labels_and_ceiling():
    t = Lookahead(num_symbols=5, max_delay=3, seq_len=20, num_train=30, num_test=10)
    d = t.build(2)
    x, y, dl = d.train["inputs"], d.train["targets"], d.train["delay"]
    s, dd = x // 4, x % 4
    assert torch.equal(dd, dl) and x.max() < t.vocab_size
    assert torch.equal(y, s.gather(1, torch.arange(20) + dl))  # label = symbol d frames later
    assert (dl + torch.arange(20) < 20).all()
    assert (dl > 0).any()  # sometimes the label needs the future
    ceil = [t.best_accuracy(a) for a in range(5)]
    # lookahead 0: the last frame is always solvable, the other 19 with P(d = 0) = 1/4
    assert ceil[0] == pytest.approx((19 * (0.25 + 0.75 / 5) + 1) / 20)
    assert ceil[3] == ceil[4] == 1.0
    assert all(a < b for a, b in zip(ceil[:3], ceil[1:4], strict=True))
    # the ceiling is exact: an oracle that sees L frames ahead and guesses the rest reaches it
    big = Lookahead(num_symbols=5, max_delay=3, seq_len=20, num_train=20000, num_test=1)
    d = big.build(0).train
    ok = d["delay"] <= 1
    acc = (ok.float() + (~ok).float() / 5).mean()
    assert float(acc) == pytest.approx(big.best_accuracy(1), abs=0.01)


@pytest.mark.parametrize("task", [
    MQAR(num_train=20, num_test=5), ICLRegression(num_train=20, num_test=5),
    Lookahead(num_train=20, num_test=5)])
def test_tasks_are_deterministic_per_seed(task):
    a, b, c = task.build(3), task.build(3), task.build(4)
    for k in a.train:
        assert torch.equal(a.train[k], b.train[k]) and torch.equal(a.test[k], b.test[k])
    assert not torch.equal(a.train["inputs"], c.train["inputs"])


def test_task_config_errors():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(vocab_size=16, num_kv_pairs=9)
    with pytest.raises(ValueError, match="num_queries"):
        MQAR(num_kv_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="num_passes"):
        MQAR(num_passes=0)
    with pytest.raises(ValueError, match="max_examples"):
        ICLRegression(max_examples=24, seq_len=24)
    with pytest.raises(ValueError, match="test_examples"):
        ICLRegression(test_examples=(0,))
    with pytest.raises(ValueError, match="max_delay"):
        Lookahead(max_delay=-1)


def test_visibility_schemes():
    n = torch.tensor([3, 5])
    assert layer_visibility("causal", 2) == (Causal(), Causal())
    assert layer_visibility("prefix", 2, n) == (Prefix(n),) * 2
    assert layer_visibility("prefix", 2, torch.tensor([4, 4])) == (Prefix(4),) * 2
    assert layer_visibility("full-first", 3) == (Full(), Causal(), Causal())
    assert layer_visibility("lookahead-2", 2) == (Causal() | Window(0, 2), Causal())
    assert layer_visibility("lookahead-0", 2) == (Causal(), Causal())
    assert latency_frames("lookahead-3", 2) == 3 and latency_frames("causal", 2) == 0
    assert latency_frames("full-first", 2) is None
    with pytest.raises(ValueError, match="unknown visibility scheme"):
        layer_visibility("sideways", 2)
    with pytest.raises(ValueError, match="prefix_len"):
        layer_visibility("prefix", 2)
    with pytest.raises(ValueError, match="unknown suite"):
        suite("huge")


# ------------------------------------------------------------------------------- trainer


def _tiny(task, **kw) -> Experiment:
    return Experiment(name="t", task=task, train=TrainConfig(steps=6, batch_size=8,
                                                             eval_every=3, num_val=16), **kw)


def test_train_one_is_deterministic_and_learns_nothing_stale():
    exp = _tiny(Lookahead(num_symbols=4, max_delay=2, seq_len=16, num_train=64, num_test=16),
                scheme="lookahead-1")
    a, b = train_one(exp, 0), train_one(exp, 0)
    assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert a["metrics"]["latency_frames"] == 1 and 0 <= a["metrics"]["accuracy"] <= 1
    assert set(a["metrics"]["accuracy_by_delay"]) == {0, 1, 2}
    c = train_one(exp, 1)
    assert c["metrics"] != a["metrics"]
    reg = _tiny(ICLRegression(dim=2, max_examples=4, seq_len=6, test_examples=(1, 4),
                              num_train=64, num_test=8), scheme="prefix", mixer="linear",
                preset="tiny-linear")
    r = train_one(reg, 0)
    assert set(r["metrics"]["mse_by_examples"]) == {1, 4} and r["metrics"]["mse"] > 0
    assert r["metrics"]["score"] == -r["metrics"]["mse"]


def test_run_key_changes_with_config():
    assert suite("default")[1] == 3
    for name in ("smoke", "default", "full"):
        exps, seeds = suite(name)
        keys = {e.run_key(s) for e in exps for s in range(seeds)}
        assert len(keys) == len(exps) * seeds
        for e in exps:
            e.model_config()  # every experiment's model config is valid
    exps, _ = suite("default")
    e = exps[0]
    assert e.run_key(0) != dataclasses.replace(e, train=dataclasses.replace(e.train, lr=1.0)
                                               ).run_key(0)


# ------------------------------------------------------------------------------- suite, CLI


def _rows(out: Path, suite_name: str = "smoke") -> list[tuple]:
    con = sqlite3.connect(out / "runs.sqlite")
    try:
        return con.execute("SELECT key, status, seed, experiment, attempts, finished_at, "
                           "metrics, git_rev, config, wall_time_s FROM runs WHERE suite = ? "
                           "ORDER BY key", (suite_name,)).fetchall()
    finally:
        con.close()


def test_smoke_suite_end_to_end_and_report(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "run", "--suite", "smoke", "--out", str(out), "--no-progress"]) == 0
    exps, seeds = suite("smoke")
    rows = _rows(out)
    assert len(rows) == len(exps) * seeds
    assert {r[1] for r in rows} == {"done"}
    assert {r[3] for r in rows} == {e.name for e in exps}
    assert all(r[7] and r[9] > 0 and '"score"' in r[6] and '"task_config"' in r[8]
               for r in rows)
    # the suite carries its adaptive-lookahead study (issue 7) at the quick size
    study = SUITE_STUDY["smoke"]
    adaptive = _rows(out, f"adaptive-{study}")
    assert adaptive and {r[1] for r in adaptive} == {"done"}
    first = rows, adaptive
    # a second run trains nothing and changes nothing
    assert main(["lab", "run", "--suite", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert "0 runs trained, 6 already done" in capsys.readouterr().out
    assert (_rows(out), _rows(out, f"adaptive-{study}")) == first
    assert main(["lab", "report", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert page.count("src='data:image/png;base64,") == 4  # self-contained: plots inlined
    assert "ANCAT" in page and f"figures/adaptive_pareto_{study}.png" in md
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    for claim in ("Zoology", "Ding et al.", "lookahead"):
        assert claim in page and claim in md
    assert "Seed paper's claim" in page and "This run measured" in page
    assert "prefix MSE &lt; causal MSE" in page and "| direction |" in md
    for name in ("mqar", "icl_regression", "lookahead"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}.png" in md
    assert main(["lab", "list", "--out", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "suite smoke" in listing and "suite default" in listing and "done" in listing


def test_report_without_runs_is_an_error(tmp_path, capsys):
    # the CLI says what is missing in one line and exits 2 (no traceback, no file written)
    assert main(["lab", "report", "--out", str(tmp_path / "nothing")]) == 2
    assert "no lab runs" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ValueError, match="no finished runs"):
        write_report(tmp_path)
    with pytest.raises(SystemExit):
        main(["lab", "run", "--suite", "enormous"])


def test_db_refuses_to_restart_a_done_run(tmp_path):
    db = RunDB(tmp_path)
    db.start("k", experiment="e", task="t", seed=0, suite="s", config={}, git_rev="r")
    db.finish("k", metrics={"score": 1.0}, curve=[], info={}, wall_time_s=1.0)
    with pytest.raises(ValueError, match="already done"):
        db.start("k", experiment="e", task="t", seed=0, suite="s", config={}, git_rev="r")
    with pytest.raises(RuntimeError, match="not marked running"):
        db.finish("k2", metrics={}, curve=[], info={}, wall_time_s=0.0)
    db.close()


def test_resume_after_kill(tmp_path):
    """Kill the lab (SIGKILL) after its first run is recorded, rerun: the finished runs are not
    repeated (same rows, same finish time), the interrupted one is rerun, none is lost or
    duplicated."""
    out = tmp_path / "lab"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "killed-run.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "causalmix.cli", "lab", "run", "--suite", "smoke", "--out",
         str(out), "--no-progress", "--seeds", "3"], env=env, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        done = []
        while time.monotonic() < deadline:
            if (out / "runs.sqlite").exists():
                try:
                    done = [r for r in _rows(out) if r[1] == "done"]
                except sqlite3.OperationalError:  # table not created yet / locked
                    done = []
                if done:
                    break
            if proc.poll() is not None:
                break
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
    assert done_before
    exps, seeds = suite("smoke")[0], 3
    assert len(done_before) < len(exps) * seeds
    assert main(["lab", "run", "--suite", "smoke", "--out", str(out), "--no-progress",
                 "--seeds", "3"]) == 0
    after = _rows(out)
    assert len(after) == len(exps) * seeds == len({r[0] for r in after})
    assert all(r[1] == "done" for r in after)
    for key, row in done_before.items():  # not repeated: identical rows
        assert next(r for r in after if r[0] == key) == row
    interrupted = {r[0] for r in before if r[1] == "running"}
    for r in after:
        if r[0] in interrupted:
            assert r[4] == 2  # a second attempt of the killed run
