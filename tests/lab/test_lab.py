"""causalmix.lab: task generators (deterministic, labels checked against brute-force solvers),
visibility schemes and positions, the trainer, the findings' rules, the run database."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from causalmix.lab import (
    MQAR,
    FirstToken,
    ICLRegression,
    Lookahead,
    RunDB,
    SetDisjointness,
    TrainConfig,
    fit,
    run_key,
    scheme_visibility,
)
from causalmix.lab.experiments import Experiment, latency_frames
from causalmix.lab.findings import FINDINGS, GATED_MISSING, SUITES, mean_se
from causalmix.lab.runner import suite_jobs
from causalmix.lab.tasks import IGNORE, classification_metrics
from causalmix.nn import ModelConfig, SequenceModel
from causalmix.visibility import Causal, Full, Prefix, Window

# ------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("passes", [1, 2])
def test_mqar_labels_match_brute_force(passes):
    t = MQAR(num_keys=8, num_values=5, num_kv_pairs=(2, 3, 6), num_queries=2, query_len=3,
             num_passes=passes, num_train=60, num_test=10)
    d = t.build(0)
    one = 6 + 3
    for part, n in ((d.train, 60), (d.test, 30)):
        x, y = part["inputs"], part["targets"]
        assert x.shape == (n, passes * one, 2 * 8 + 5) and y.shape == (n, passes * one)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and t.seq_len == x.shape[1]
        for i in range(n):
            assert y[i].tolist() == t.solve(x[i].tolist())  # every label, brute force
            p = int(part["pairs"][i])
            ctx = x[i, :6]
            assert ctx[:6 - p].abs().sum() == 0  # empty slots first
            keys = ctx[6 - p:, :8].argmax(-1).tolist()
            assert len(set(keys)) == p  # distinct keys
            assert int((y[i] != IGNORE).sum()) == 2  # num_queries labels, last pass only
        for k in range(1, passes):
            assert torch.equal(x[:, k * one:(k + 1) * one], x[:, :one])
    assert sorted(d.test["pairs"].unique().tolist()) == [2, 3, 6]
    assert set(d.train["pairs"].unique().tolist()) <= {2, 3, 6}
    assert d.train["prefix_len"].eq(passes * one).all()


def test_first_token_labels_and_chance():
    t = FirstToken(vocab_size=6, length=5, num_train=30, num_test=200)
    d = t.build(2)
    x, y = d.test["inputs"], d.test["targets"]
    assert (x[:, 0] == 0).all() and (x[:, -1] == 1).all() and (x[:, 1:-1] >= 2).all()
    for i in range(x.shape[0]):
        assert y[i].tolist() == t.solve(x[i].tolist())
    tr = d.train
    assert (tr["targets"][:, 1:] == tr["inputs"][:, 1:2]).all() and (tr["targets"][:, 0] ==
                                                                    IGNORE).all()
    # chance: the best permutation-invariant answer names the most frequent token
    best = [max(row[1:-1].tolist().count(v) for v in range(6)) / 5 for row in x]
    assert d.extra["chance"] == pytest.approx(sum(best) / len(best))


def test_icl_regression_tokens_and_baselines():
    t = ICLRegression(dim=3, max_examples=8, seq_len=12, noise_std=0.0, test_examples=(2, 8),
                      num_train=50, num_test=20)
    d = t.build(1)
    x, y, m, n = (d.train[k] for k in ("inputs", "targets", "mask", "prefix_len"))
    assert x.shape == (50, 12, 5) and y.shape == m.shape == (50, 12)
    ex = torch.arange(12)[None] < n[:, None]
    assert torch.equal(m, ~ex)  # queries are scored, examples are not
    assert torch.equal(x[..., 0][ex], y[ex]) and (x[..., 0][~ex] == 0).all()
    w = torch.linalg.lstsq(x[:, :, 1:4], y[..., None]).solution  # one w per sequence
    torch.testing.assert_close(x[:, :, 1:4] @ w, y[..., None], atol=1e-4, rtol=0)
    assert d.extra["least_squares_mse"][8] < 1e-8 and d.extra["least_squares_mse"][2] > 0.05
    out = torch.zeros(40, 12, 1)
    met = t.metrics(out, d.test)
    assert set(met["mse_by_examples"]) == {2, 8} and met["score"] == -met["mse"]


def test_lookahead_labels_and_ceiling():
    t = Lookahead(num_symbols=5, max_delay=3, seq_len=20, num_train=30, num_test=10)
    d = t.build(2)
    x, y, dl = d.train["inputs"], d.train["targets"], d.train["delay"]
    assert torch.equal(x % 4, dl) and torch.equal(y, (x // 4).gather(1, torch.arange(20) + dl))
    ceil = [t.best_accuracy(a) for a in range(5)]
    assert ceil[0] == pytest.approx((19 * (0.25 + 0.75 / 5) + 1) / 20)
    assert ceil[3] == ceil[4] == 1.0


@pytest.mark.parametrize("task", [
    MQAR(num_train=20, num_test=5), SetDisjointness(num_train=20, num_test=5),
    FirstToken(num_train=20, num_test=5), ICLRegression(num_train=20, num_test=5),
    Lookahead(num_train=20, num_test=5)], ids=lambda t: type(t).__name__)
def test_tasks_are_deterministic_per_seed(task):
    a, b, c = task.build(3), task.build(3), task.build(4)
    for k in a.train:
        assert torch.equal(a.train[k], b.train[k]) and torch.equal(a.test[k], b.test[k])
    assert not torch.equal(a.train["inputs"], c.train["inputs"])


def test_task_config_errors():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(num_keys=8, num_kv_pairs=(4, 9))
    with pytest.raises(ValueError, match="num_queries"):
        MQAR(num_kv_pairs=(2, 8), num_queries=3)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(num_kv_pairs=(0,))
    with pytest.raises(ValueError, match="small"):
        SetDisjointness(small=8, large=4)
    with pytest.raises(ValueError, match="num_elements"):
        SetDisjointness(num_elements=10, small=4, large=8, shared=1)
    with pytest.raises(ValueError, match="vocab_size"):
        FirstToken(vocab_size=3)
    with pytest.raises(ValueError, match="max_examples"):
        ICLRegression(max_examples=24, seq_len=24)
    with pytest.raises(ValueError, match="max_delay"):
        Lookahead(max_delay=-1)


def test_classification_metrics_by_group():
    tgt = torch.tensor([[IGNORE, 1], [0, IGNORE]])
    out = torch.tensor([[[0., 0.], [0., 1.]], [[0., 1.], [0., 0.]]])
    m = classification_metrics(out, {"targets": tgt, "g": torch.tensor([5, 7])}, "g")
    assert m["accuracy"] == 0.5 and m["accuracy_by_g"] == {5: 1.0, 7: 0.0}


# ------------------------------------------------------------------------------- schemes


def test_visibility_schemes():
    n = torch.tensor([3, 5])
    assert scheme_visibility("causal", 2) == (Causal(), Causal())
    assert scheme_visibility("prefix", 2, n) == (Prefix(n),) * 2
    assert scheme_visibility("prefix", 2, torch.tensor([4, 4])) == (Prefix(4),) * 2
    assert scheme_visibility("full", 2) == (Full(), Full())
    assert scheme_visibility("lookahead-2", 2) == (Causal() | Window(0, 2), Causal())
    assert latency_frames("lookahead-3", 2) == 3 and latency_frames("causal", 2) == 0
    assert latency_frames("full", 2) is None and latency_frames("prefix", 2) is None
    with pytest.raises(ValueError, match="unknown visibility scheme"):
        scheme_visibility("sideways", 2)
    with pytest.raises(ValueError, match="prefix_len"):
        scheme_visibility("prefix", 2)


def _first_token_exp(scheme: str, positions: str, steps: int = 4) -> Experiment:
    task = FirstToken(vocab_size=10, length=6, num_train=64, num_test=8)
    return Experiment(finding="t", arm=scheme, task=task, scheme=scheme, positions=positions,
                      model=ModelConfig.from_name("tiny-softmax", **task.io()),
                      train=TrainConfig(steps=steps, batch_size=8, eval_every=2, num_val=16))


def test_no_positions_bidirectional_is_permutation_equivariant():
    """positions='none' removes every positional signal: with Full() a permutation of the
    tokens permutes the outputs; with rotary positions, or causally, it does not."""
    torch.manual_seed(0)
    x = torch.randint(2, 10, (3, 8))
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    batch = {"inputs": x, "prefix_len": torch.full((3,), 8)}
    batch_p = {"inputs": x[:, perm], "prefix_len": batch["prefix_len"]}

    def outs(scheme, positions):
        exp = _first_token_exp(scheme, positions)
        torch.manual_seed(1)
        from causalmix.nn import SequenceModel
        model = SequenceModel(exp.model).eval()
        with torch.no_grad():
            return exp.forward(model, batch), exp.forward(model, batch_p)

    a, b = outs("full", "none")
    torch.testing.assert_close(a[:, perm], b, rtol=1e-5, atol=1e-5)
    for scheme, positions in (("full", "rope"), ("causal", "none")):
        a, b = outs(scheme, positions)
        assert (a[:, perm] - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="positions"):
        _first_token_exp("full", "alibi")


# ------------------------------------------------------------------------------- trainer


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_factor(0) == pytest.approx(0.1) and cfg.lr_factor(9) == pytest.approx(1.0)
    assert cfg.lr_factor(10) == pytest.approx(1.0) and cfg.lr_factor(100) == pytest.approx(0.1)
    assert cfg.lr_factor(55) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-1)


def test_experiment_run_is_deterministic():
    exp = _first_token_exp("causal", "none", steps=6)
    a, b, c = exp.run(0), exp.run(0), exp.run(1)
    assert a.metrics == b.metrics and a.curve == b.curve and a.steps == 6
    assert c.metrics != a.metrics
    assert a.metrics["latency_frames"] == 0 and "chance" in a.metrics
    assert [p["step"] for p in a.curve] == [2, 4, 6]


class _Scripted:
    """An objective whose validation scores follow a script (to test stops and the best
    checkpoint): the model's one parameter records the step of each evaluation."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0

    def loss(self, model, batch, step, steps):
        return model.w.sum() ** 2

    def evaluate(self, model, data):
        if data["inputs"].shape[0] == 4:  # the test split
            return {"score": float(model.tag), "tag": float(model.tag)}
        s = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        model.tag.fill_(self.calls)
        return {"score": s}


def _scripted_fit(scores, **cfg):
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(1))
    model.register_buffer("tag", torch.zeros(()))
    train = {"inputs": torch.zeros(40, 1), "prefix_len": torch.zeros(40)}
    test = {"inputs": torch.zeros(4, 1)}
    cfg = TrainConfig(**{"steps": 20, "batch_size": 4, "eval_every": 2, "num_val": 8, **cfg})
    return fit(model, _Scripted(scores), train, test, cfg, seed=0)


def test_fit_stops_and_keeps_the_best_checkpoint():
    r = _scripted_fit([0.1, 0.5, 0.3, 0.2, 0.1], patience=3)
    assert r.stop_reason == "patience" and r.steps == 10  # 3 evaluations without progress
    assert r.metrics["val_score"] == 0.5 and r.metrics["tag"] == 2.0  # best one restored
    r = _scripted_fit([0.1, 0.95, 0.2], target=0.9)
    assert r.stop_reason == "target" and r.steps == 4
    r = _scripted_fit([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], patience=2)
    assert r.stop_reason == "steps" and r.steps == 20 and len(r.curve) == 10
    with pytest.raises(ValueError, match="num_val"):
        _scripted_fit([0.1], num_val=40)


# ------------------------------------------------------------------------------- findings


def test_every_suite_builds_and_keys_are_unique():
    assert SUITES["default"].seeds >= 3 and set(SUITES) == {"smoke", "default", "full"}
    for name, size in SUITES.items():
        jobs = suite_jobs(name)
        keys = {run_key(job, s) for job in jobs for s in range(size.seeds)}
        assert len(keys) == len(jobs) * size.seeds
        for fk, f in FINDINGS.items():
            assert f.arms(name), fk
            for arm in f.arms(name):
                assert (arm.job is None) != (arm.missing is None)
    with pytest.raises(ValueError, match="unknown suite"):
        suite_jobs("huge")


def test_gated_arms_run_by_mixer_name_or_report_not_run():
    import causalmix.lab.findings as fnd
    from causalmix.lab.experiments import mixer_available

    gated = [a for a in FINDINGS["F1"].arms("smoke") if a.name == "gated causal linear"]
    gated += FINDINGS["F6"].arms("smoke")
    assert len(gated) == 3
    if mixer_available(fnd.GATED_MIXER):  # the arms plug in by the mixer's name
        assert all(a.job.model.mixer == fnd.GATED_MIXER and a.missing is None for a in gated)
    else:
        assert all(a.job is None and a.missing == GATED_MISSING for a in gated)
        j = FINDINGS["F6"].judge({})
        assert j.holds is None and j.numbers == GATED_MISSING


def _pairs(acc: dict[int, float]) -> dict:
    return {"accuracy_by_pairs": {str(k): v for k, v in acc.items()}}


def test_f1_rule():
    judge = FINDINGS["F1"].judge

    def res(soft, lin, pre, two):
        mk = {"softmax": soft, "causal linear": lin, "prefix linear (JRT-RNN)": pre,
              "linear, read twice (JRT-Prompt)": two}
        return {arm: [_pairs({4: 1.0, 32: v + d}) for d in (-0.01, 0.0, 0.01)]
                for arm, v in mk.items()}

    assert judge(res(0.98, 0.5, 0.7, 0.7)).holds is True
    assert judge(res(0.98, 0.5, 0.6, 0.7)).holds is False  # prefix recovers < 1/3
    assert judge(res(0.98, 0.8, 0.95, 0.95)).holds is False  # gap < 0.25
    assert judge(res(0.85, 0.3, 0.8, 0.8)).holds is False  # softmax < 0.9
    j = judge({"softmax": [_pairs({32: 1.0})]})
    assert j.holds is None and "not run" in j.numbers


def test_f2_to_f4_rules():
    def sd(gaps, base=0.8):
        return [{"balanced_accuracy_by_order": {"0": base + g / 2, "1": base - g / 2}}
                for g in gaps]

    f2 = FINDINGS["F2"].judge
    cau, pre = "causal linear", "prefix linear (JRT-RNN)"
    assert f2({cau: sd([0.2, 0.22, 0.18]), pre: sd([0.01, -0.02, 0.0])}).holds is True
    assert f2({cau: sd([0.2, 0.22, 0.18]), pre: sd([0.1, 0.05, 0.08])}).holds is False
    assert f2({cau: sd([0.3, -0.3, 0.1]),  # not 3 standard errors above 0
               pre: sd([0.0, 0.0, 0.0])}).holds is False
    assert f2({cau: sd([0.12, 0.13, 0.14]),  # beyond its errors, but below 0.15
               pre: sd([0.01, -0.02, 0.0])}).holds is False
    assert f2({cau: sd([0.2, 0.22, 0.18]),  # prefix below 0.03, but clearly not 0
               pre: sd([0.02, 0.021, 0.019])}).holds is False
    assert f2({cau: sd([0.2, 0.22, 0.18]),  # within 2 standard errors of 0, but too large
               pre: sd([0.12, -0.02, 0.0])}).holds is False
    j = f2({cau: sd([0.2, 0.22, 0.18]), pre: sd([0.01, -0.02, 0.0])})
    assert j.notes[0].startswith("Conditions:") and ": no" not in j.notes[0]
    assert j.notes[1] == ("Margins (positive: met): causal over 0.15 +0.0500; causal over 3 "
                          "standard errors +0.1654; prefix within 2 standard errors +0.0143; "
                          "prefix under 0.03 +0.0267.")
    # the ASK question: the prefix arm answers alike in both orders, a difference of exactly 0
    assert f2({cau: sd([0.33, 0.285, 0.204]), pre: sd([0.0, 0.0, 0.0])}).holds is True
    assert f2({cau: sd([0.2])}).holds is None

    def icl(curve_by_seed):
        return [{"mse_by_examples": {str(k): v for k, v in curve.items()},
                 "least_squares_mse": {str(k): 0.01 for k in curve},
                 "bayes_mse": {str(k): 0.01 for k in curve}} for curve in curve_by_seed]

    def curve(at8, at16, jitter=(0.0, 0.002, -0.002)):
        return [{1: 1.0, 2: 0.8, 4: 0.5, 8: at8 + d, 12: (at8 + at16) / 2 + d, 16: at16 + d}
                for d in jitter]

    f3 = FINDINGS["F3"].judge
    # prefix keeps improving (0.2 -> 0.05), causal plateaus (0.12 -> 0.1): holds
    assert f3({"prefix-LM": icl(curve(0.2, 0.05)),
               "causal-LM": icl(curve(0.12, 0.1))}).holds is True
    # lower at 16, but causal improves at prefix's rate over the last doubling (both fall by
    # a factor of 4, causal from higher up, so more in absolute MSE): no plateau
    assert f3({"prefix-LM": icl(curve(0.2, 0.05)),
               "causal-LM": icl(curve(0.3, 0.075))}).holds is False
    # the improvement is the fall in log MSE: causal 0.25 -> 0.09 falls more MSE than prefix
    # 0.2 -> 0.05 but by a factor of 2.8 against 4, a slower rate: holds
    j = f3({"prefix-LM": icl(curve(0.2, 0.05)), "causal-LM": icl(curve(0.25, 0.09))})
    assert j.holds is True and "fall in log MSE" in j.numbers and "MSE falls" in j.numbers
    # plateau, but the intervals at 16 overlap
    assert f3({"prefix-LM": icl(curve(0.2, 0.05, (0.0, 0.05, -0.05))),
               "causal-LM": icl(curve(0.08, 0.07, (0.0, 0.05, -0.05)))}).holds is False
    # fewer than 5 counts of examples
    def two(at8, at16):
        return [{"mse_by_examples": {"8": at8 + d, "16": at16 + d},
                 "least_squares_mse": {"8": 0.01, "16": 0.01},
                 "bayes_mse": {"8": 0.01, "16": 0.01}} for d in (0.0, 0.002, -0.002)]

    assert f3({"prefix-LM": two(0.2, 0.05), "causal-LM": two(0.12, 0.1)}).holds is False

    def acc(vals, chance=0.15):
        return [{"accuracy": v, "chance": chance} for v in vals]

    f4 = FINDINGS["F4"].judge
    c, b = "causal, no positions", "bidirectional, no positions"
    assert f4({c: acc([0.99, 1.0, 0.98]), b: acc([0.14, 0.15, 0.16])}).holds is True
    assert f4({c: acc([0.99, 1.0, 0.98]), b: acc([0.5, 0.55, 0.6])}).holds is False
    assert f4({c: acc([0.3, 0.35, 0.3]), b: acc([0.14, 0.15, 0.16])}).holds is False


def test_mean_se():
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)
    assert mean_se([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_se([]))


# ------------------------------------------------------------------------------- database


def test_db_refuses_to_restart_a_done_run_and_bad_files(tmp_path):
    db = RunDB(tmp_path)
    db.start("k", experiment="e", task="t", seed=0, suite="s", config={}, git_rev="r")
    db.finish("k", metrics={"score": 1.0}, curve=[], info={}, wall_time_s=1.0)
    with pytest.raises(ValueError, match="already done"):
        db.start("k", experiment="e", task="t", seed=0, suite="s", config={}, git_rev="r")
    with pytest.raises(RuntimeError, match="not marked running"):
        db.finish("k2", metrics={}, curve=[], info={}, wall_time_s=0.0)
    db.close()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "runs.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a lab run database"):
        RunDB(bad)
    with pytest.raises(ValueError, match="is a file"):
        RunDB(bad / "runs.sqlite")
    with pytest.raises(ValueError, match="no lab runs"):
        RunDB(tmp_path / "none", create=False)
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------- runner


def test_run_keys_tell_specs_apart_and_are_stable():
    """The run key hashes the whole config with specs in their tagged form: Causal() and
    Full() model layers get different keys (their configs were both {} before), and the same
    config always gets the same key."""
    task = FirstToken(vocab_size=10, length=6, num_train=64, num_test=8)

    def exp(vis):
        return Experiment(finding="t", arm="a", task=task,
                          model=ModelConfig.from_name("tiny-softmax", **task.io(),
                                                      visibility=vis))

    causal, full = exp((Causal(), Causal())), exp((Full(), Full()))
    assert causal.to_json()["model"]["visibility"] == [{"type": "Causal"}] * 2
    assert full.to_json()["model"]["visibility"] == [{"type": "Full"}] * 2
    assert run_key(causal, 0) != run_key(full, 0) != run_key(full, 1)
    assert run_key(causal, 0) == run_key(exp((Causal(), Causal())), 0)
    assert run_key(exp((Prefix(torch.tensor([2, 3])), Causal())), 0) == \
        run_key(exp((Prefix(torch.tensor([2, 3])), Causal())), 0)


def test_experiment_refuses_a_scheme_its_mixer_cannot_serve():
    task = Lookahead(num_train=20, num_test=5)
    lin = ModelConfig.from_name("tiny-linear", **task.io())
    with pytest.raises(ValueError, match=r"Experiment t/a: scheme 'lookahead-2', layer 0: "
                                         r"mixer='linear' does not support"):
        Experiment(finding="t", arm="a", task=task, model=lin, scheme="lookahead-2")
    for scheme in ("causal", "prefix", "full"):  # those it serves are accepted
        assert Experiment(finding="t", arm="a", task=task, model=lin, scheme=scheme)


def test_run_jobs_logs_in_words_and_keeps_process_settings(tmp_path):
    from causalmix.lab import run_jobs

    exp = _first_token_exp("causal", "rope", steps=4)
    threads = torch.get_num_threads()
    logs = []
    res = run_jobs([exp], tmp_path, suite="t", seeds=1, progress=False, log=logs.append)
    assert torch.get_num_threads() == threads  # no process-wide setting changed
    assert res["ran"] == 1 and len(logs) == 1
    assert re.fullmatch(r"\[1/1\] t/causal seed=0: score \d\.\d{4} after 4 steps "
                        r"\(ran every step\), \d+\.\ds", logs[0]), logs[0]
    db = RunDB(tmp_path, create=False)
    try:
        (row,) = db.runs(keys=res["keys"])
    finally:
        db.close()
    assert row["info"]["threads"] == threads and row["info"]["arm"] == "causal"
    assert row["config"] == exp.to_json()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_few_lines_in_a_log(monkeypatch, capsys):
    """In a log (stderr not a terminal) fit writes a line at every tenth of the steps, not a
    bar redrawn every step; on a terminal it draws the bar."""
    exp = _first_token_exp("causal", "rope", steps=40)
    data = exp.task.build(0)
    cfg = TrainConfig(steps=40, batch_size=8, eval_every=20, num_val=16)
    fit(SequenceModel(exp.model), exp, data.train, data.test, cfg, seed=0, name="run",
        progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"run: step {s}/40" for s in range(4, 41, 4)]
    assert all("\r" not in ln and "loss" in ln for ln in lines)
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    fit(SequenceModel(exp.model), exp, data.train, data.test, cfg, seed=0, name="run",
        progress=True)
    assert "\r" in term.getvalue() and "40/40" in term.getvalue()


def test_a_database_from_before_the_tagged_specs_is_resumed_by_retraining(tmp_path):
    """Run configs used to write every spec without its type (Causal() and Full() both {}), so
    their keys differ from today's: in such a database a run is not found under its new key and
    is trained again; the old row stays as it was (export still lists it, the report does not
    match it), nothing is overwritten."""
    import hashlib
    import json

    from causalmix.lab import run_jobs

    exp = _first_token_exp("causal", "rope", steps=4)
    old_config = exp.to_json()
    old_config["model"]["visibility"] = [{}, {}]  # how plain() wrote Causal() before
    old_key = hashlib.sha256(json.dumps({"experiment": old_config, "seed": 0},
                                        sort_keys=True).encode()).hexdigest()[:16]
    assert old_key != run_key(exp, 0)
    db = RunDB(tmp_path)
    db.start(old_key, experiment=exp.name, task=exp.task_name, seed=0, suite="t",
             config=old_config, git_rev="old")
    db.finish(old_key, metrics={"score": 0.5}, curve=[], info={}, wall_time_s=1.0)
    db.close()
    res = run_jobs([exp], tmp_path, suite="t", seeds=1, progress=False, log=lambda _: None)
    assert res["ran"] == 1 and res["keys"] == [run_key(exp, 0)]
    again = run_jobs([exp], tmp_path, suite="t", seeds=1, progress=False, log=lambda _: None)
    assert again["ran"] == 0 and again["skipped"] == 1  # and resumes from then on
    db = RunDB(tmp_path, create=False)
    try:
        rows = {r["key"]: r for r in db.runs(status=None)}
    finally:
        db.close()
    assert set(rows) == {old_key, run_key(exp, 0)}
    assert rows[old_key]["metrics"] == {"score": 0.5} and rows[old_key]["git_rev"] == "old"


def test_finding_from_its_docstring():
    from causalmix.lab.findings import Finding

    doc = """F9: A title.

    Paper: Someone 2024

    Claim: One thing
    holds.

    Rule: Check it.

    Knobs: Small.
    """
    f = Finding.from_doc(doc, arms=list, judge=dict, plot=print)
    assert (f.key, f.title, f.paper, f.claim, f.rule, f.knobs, f.history) == \
        ("F9", "A title", "Someone 2024", "One thing holds.", "Check it.", "Small.", "")
    with pytest.raises(ValueError, match=r"finding F9: its docstring lacks \['rule'\]"):
        Finding.from_doc(doc.replace("Rule:", "Knobs:"), arms=list, judge=dict, plot=print)
    with pytest.raises(ValueError, match="must start with one of"):
        Finding.from_doc(doc + "\n\nNotes: more", arms=list, judge=dict, plot=print)
    for finding in FINDINGS.values():  # every finding's words come whole from its docstring
        assert finding.title and finding.paper and finding.claim and finding.rule
        assert finding.knobs and "History" not in finding.knobs
