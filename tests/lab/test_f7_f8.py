"""Findings F7 (delta-rule recall) and F8 (stdlib punctuation restoration): the lab-local
delta-rule mixer against a plain-Python recurrence, the arms' jobs, the rules on made-up
results, the frontier, the latency the text arms record."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from causalmix.lab.db import run_key
from causalmix.lab.deltamix import DeltaExperiment, DeltaRuleMixer, delta_model
from causalmix.lab.findings import FINDINGS, SUITES
from causalmix.lab.findings.f7_delta import (
    F7_ARMS,
    F7_KEYS,
    F7_LR,
    F7_PAIRS,
    F7_STEPS,
    F7_WIDTH,
)
from causalmix.lab.findings.f8_text import (
    F8_K,
    F8_POINTS,
    F8_RUNS,
    F8_STEPS,
    F8_WEIGHTS,
    TextAdaptivePoint,
    TextExperiment,
    frontier,
)
from causalmix.lab.protocol import IGNORE
from causalmix.lab.tasks import MQAR, MQARReassign
from causalmix.nn import AttentionConfig, DeltaMixer, ModelConfig
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked


def _brute_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """S_t = exp(g_t) S_{t-1}; S_t += k_t beta_t (v_t - S_t^T k_t)^T; o_t = S_t^T q_t, one
    (batch, head, step) at a time, in float64."""
    q, k, v, beta = (parts[n].double() for n in ("q", "k", "v", "beta"))
    g = parts.get("log_gate")
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            s = torch.zeros(q.shape[-1], v.shape[-1], dtype=torch.float64)
            for ti in range(t):
                if g is not None:
                    s = s * torch.exp(g[bi, ti, hi].double())
                kk, vv = k[bi, ti, hi], v[bi, ti, hi]
                s = s + torch.outer(kk, beta[bi, ti, hi] * (vv - s.T @ kk))
                out[bi, ti, hi] = s.T @ q[bi, ti, hi]
    return out


@pytest.mark.parametrize("rule", ["delta", "gated-delta"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("length", [1, 7, 63])
def test_delta_mixer_is_the_delta_recurrence(rule, impl, length):
    torch.manual_seed(0)
    cfg = AttentionConfig(d_model=16, n_heads=2, mixer="gated", feature_dim=4, impl=impl)
    mixer = DeltaRuleMixer(cfg, rule).double()
    x = torch.randn(2, length, 16, dtype=torch.float64)
    parts = mixer.qkv(x, torch.arange(length))
    assert ("log_gate" in parts) == (rule == "gated-delta")
    assert bool(((parts["beta"] > 0) & (parts["beta"] < 1)).all())
    got = mixer(x, visibility=Causal())
    want = mixer.out(_brute_delta(parts), x)
    # baseline: the same layer in fp32 (its error against the fp64 brute force sets the bound)
    single = copy.deepcopy(mixer).float()(x.float(), visibility=Causal()).double()
    assert_close(got, want, single, name=f"{rule} output")


def test_delta_mixer_refusals():
    cfg = AttentionConfig(d_model=16, n_heads=2, mixer="gated", feature_dim=4)
    with pytest.raises(ValueError, match="rule"):
        DeltaRuleMixer(cfg, "linear")
    with pytest.raises(ValueError, match="sequence-parallel"):
        DeltaRuleMixer(cfg, "delta")(torch.randn(1, 3, 16), visibility=Causal(),
                                     sharding=object())
    task = MQAR(num_kv_pairs=(4,), num_train=300, num_test=8)
    soft = ModelConfig.from_name("tiny-softmax", **task.io())
    with pytest.raises(ValueError, match="gated"):
        DeltaExperiment(finding="F7", arm="x", task=task, model=soft)
    gated = ModelConfig.from_name("tiny-gated", **task.io())
    with pytest.raises(ValueError, match="rule"):
        DeltaExperiment(finding="F7", arm="x", task=task, model=gated, rule="delta-ish")


def test_delta_experiment_runs_its_rule_and_keys_tell_rules_apart():
    task = MQAR(num_keys=8, num_values=8, num_kv_pairs=(2, 4), num_queries=2, num_train=64,
                num_test=8)
    model = ModelConfig.from_name("tiny-gated", **task.io(), d_model=16, feature_dim=4)
    exps = [DeltaExperiment(finding="F7", arm="x", task=task, model=model, rule=r)
            for r in ("delta", "gated-delta")]
    assert len({run_key(e, 0) for e in exps}) == 2
    m = delta_model(exps[0], "delta")
    assert all(isinstance(b.attn, DeltaRuleMixer) and b.attn.rule == "delta" for b in m.blocks)
    tr = dataclasses.replace(exps[0].train, steps=3, num_val=16, eval_every=3)
    res = dataclasses.replace(exps[1], train=tr).run(0)
    again = dataclasses.replace(exps[1], train=tr).run(0)
    assert res.metrics == again.metrics and set(res.metrics["accuracy_by_pairs"]) == {2, 4}


def test_f7_arms_share_one_state_size():
    arms = {a.name: a.job for a in FINDINGS["F7"].arms("default")}
    assert list(arms) == F7_ARMS
    rec = [arms[a].model for a in F7_ARMS[:3]]
    assert rec[0] == rec[1] == rec[2] and rec[0].mixer == "gated"
    assert [getattr(arms[a], "rule", None) for a in F7_ARMS[:3]] == ["delta", "gated-delta",
                                                                     None]
    assert arms[F7_ARMS[3]].model.d_model == rec[0].d_model
    # causalmix.nn's Gated DeltaNet, with plain keys and an identity-initialised convolution
    assert arms[F7_ARMS[4]].model == rec[0] and arms[F7_ARMS[4]].rule == "nn-gated-delta"
    lab = rec[0].blocks[0].attention
    for block in delta_model(arms[F7_ARMS[4]], "nn-gated-delta").blocks:
        nn, w = block.attn, block.attn.conv_weight
        assert isinstance(nn, DeltaMixer) and block.mixer == "delta"
        assert (nn.cfg.n_heads, nn.cfg.feature_dim, nn.cfg.head_dim) == \
            (lab.n_heads, lab.feature_dim, lab.head_dim)  # the same state per layer
        assert nn.qk_activation == "identity" and bool((w[:, -1] == 1).all())
        assert bool((w[:, :-1] == 0).all())


def test_mqar_reassign_asks_the_latest_value():
    task = MQARReassign(num_keys=4, num_values=6, num_kv_pairs=(2, 4, 9), num_queries=2,
                        query_len=3, num_train=80, num_test=20)
    d = task.build(0)
    big, nk, nv = 9, 4, 6
    for part in (d.train, d.test):
        x, y = part["inputs"], part["targets"]
        assert x.shape == (x.shape[0], big + 3, 2 * nk + nv) and task.seq_len == big + 3
        for i in range(x.shape[0]):
            assert y[i].tolist() == task.solve(x[i].tolist())
            p = int(part["pairs"][i])
            ctx = x[i, :big]
            assert ctx[:big - p].abs().sum() == 0  # empty slots first
            keys = ctx[big - p:, :nk].argmax(-1).tolist()
            vals = ctx[big - p:, nk:nk + nv].argmax(-1).tolist()
            assert len(set(keys)) == min(p, nk)  # min(p, num_keys) distinct keys
            asked = [int(q[nk + nv:].argmax()) for q in x[i, big:] if q.sum() > 0]
            assert len(set(asked)) == 2
            for q, key in zip(x[i, big:], y[i, big:].tolist(), strict=True):
                if q.sum() > 0:  # the value of the asked key's last write, scanned backwards
                    k = int(q[nk + nv:].argmax())
                    assert key == next(v for kk, v in zip(keys[::-1], vals[::-1],
                                                          strict=True) if kk == k)
    assert sorted(d.test["pairs"].unique().tolist()) == [2, 4, 9]
    with pytest.raises(ValueError, match="num_queries"):
        MQARReassign(num_keys=2, num_kv_pairs=(4, 8), num_queries=3)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(num_keys=4, num_kv_pairs=(4, 8), num_queries=2)  # plain MQAR: distinct keys


def test_f7_knobs_state_the_constants():
    f7 = FINDINGS["F7"]
    for text in (f"{F7_KEYS} keys", f"{F7_STEPS} steps", f"lr {F7_LR:.0e}".replace("e-0", "e-"),
                 "/".join(map(str, F7_PAIRS)) + " writes", f"d_model {F7_WIDTH}"):
        assert text in f7.knobs, text
    task = f7.arms("default")[0].job.task
    assert isinstance(task, MQARReassign) and task.num_keys == F7_KEYS
    assert task.num_kv_pairs == F7_PAIRS and max(F7_PAIRS) > F7_KEYS  # re-writes at the top


def _mqar_runs(accs: dict[int, float]) -> list[dict]:
    return [{"accuracy_by_pairs": {str(p): a + d for p, a in accs.items()}}
            for d in (-0.01, 0.0, 0.01)]


def test_f7_rule():
    judge = FINDINGS["F7"].judge
    good = {F7_ARMS[0]: _mqar_runs({4: 1.0, 32: 0.7}), F7_ARMS[1]: _mqar_runs({4: 1.0, 32: 0.62}),
            F7_ARMS[2]: _mqar_runs({4: 1.0, 32: 0.4}), F7_ARMS[3]: _mqar_runs({4: 1.0, 32: 0.95}),
            F7_ARMS[4]: _mqar_runs({4: 1.0, 32: 0.65})}
    j = judge(good)
    assert j.holds is True and "32 pairs" in j.numbers
    for arm in (F7_ARMS[0], F7_ARMS[1], F7_ARMS[4]):  # every delta arm must clear 0.2
        assert judge({**good, arm: _mqar_runs({4: 1.0, 32: 0.59})}).holds is False
    assert judge({**good, F7_ARMS[3]: _mqar_runs({4: 1.0, 32: 0.88})}).holds is False
    assert judge({**good, F7_ARMS[0]: []}).holds is None


def test_frontier():
    pts = [(0.0, 0.80), (0.98, 0.82), (1.95, 0.82), (31.5, 0.81)]
    assert frontier(pts, -0.1) == float("-inf")
    assert frontier(pts, 0.0) == 0.80
    assert frontier(pts, 0.49) == pytest.approx(0.81)
    assert frontier(pts, 5.0) == 0.82  # past the best point: the best point
    assert frontier([(0.0, 0.5)], 3.0) == 0.5


def _text_runs(acc: float, lat: float, spread: float = 0.002) -> list[dict]:
    f1 = {"none": 0.9, "comma": 0.1, "period": 0.5, "colon": 0.0, "capitalised": 0.5}
    extra = {"text_modules": {"train": 400, "test": 70}, "text_words": {"train": 1, "test": 1},
             "text_windows": {"train": 2, "test": 3}, "text_vocab": 4096, "text_oov_test": 0.1}
    return [{"accuracy": acc + d, "punct_accuracy": acc, "cap_accuracy": acc, "f1": f1,
             "latency_mean": lat, **extra} for d in (-spread, 0.0, spread)]


def _f8_results(adaptive: float, gated_gain: float = 0.02) -> dict:
    res = {}
    for mixer, gain in (("softmax", 0.02), ("gated", gated_gain)):
        for i, p in enumerate(F8_POINTS):
            lat = 31.0 if p == "full" else float(i)
            res[f"{mixer} {p}"] = _text_runs(0.80 + (0.0 if p == "causal" else gain), lat)
    for w in F8_WEIGHTS:
        res[f"softmax adaptive w={w:g}"] = _text_runs(adaptive if w == F8_WEIGHTS[0] else 0.7,
                                                      0.5)
    return res


def test_f8_rule():
    judge = FINDINGS["F8"].judge
    # the frontier at latency 0.5 is 0.81 (halfway from causal 0.80 to lookahead-1 0.82)
    assert judge(_f8_results(0.812)).holds is True
    assert judge(_f8_results(0.8095)).holds is True  # within one s.e. (0.002 / sqrt 3 * ...)
    assert judge(_f8_results(0.805)).holds is False
    assert judge(_f8_results(0.82, gated_gain=0.005)).holds is False  # gated does not rise
    missing = _f8_results(0.82)
    missing["softmax lookahead-1"] = []
    assert judge(missing).holds is None
    header, rows = judge(_f8_results(0.82)).table
    assert "F1 comma" in header and len(rows) == 2 * len(F8_POINTS) + len(F8_WEIGHTS)


def test_f8_reports_whether_full_keeps_rising():
    """The rule reads lookahead 1..k; a note says whether softmax full is at or above, or below, the
    best of them, with both numbers, and the verdict does not depend on it."""
    judge = FINDINGS["F8"].judge
    res = _f8_results(0.812)  # full at the lookaheads' 0.82
    note = next(n for n in judge(res).notes if n.startswith("Past the rule"))
    assert "does not fall" in note and "+0.000" in note
    res["softmax full"] = _text_runs(0.79, 31.0)
    j = judge(res)
    note = next(n for n in j.notes if n.startswith("Past the rule"))
    assert "the rise stops" in note and "0.790" in note and "lookahead-1 0.820" in note
    assert "(-0.030)" in note
    assert j.holds is True


def test_f8_arms_and_the_latency_they_record():
    arms = FINDINGS["F8"].arms("smoke")
    names = [a.name for a in arms]
    assert names[:len(F8_POINTS)] == [f"softmax {p}" for p in F8_POINTS]
    assert "gated full" not in names and [f"gated {p}" for p in F8_RUNS["gated"]] == \
        [n for n in names if n.startswith("gated")]  # the points the gated rule reads
    assert f"{F8_STEPS} steps" in FINDINGS["F8"].knobs
    assert sum(isinstance(a.job, TextAdaptivePoint) for a in arms) == len(F8_WEIGHTS)
    fixed = {a.name: a.job for a in arms if isinstance(a.job, TextExperiment)}
    job = fixed[f"softmax lookahead-{F8_K}"]
    assert job.scheme == (Causal(), Chunked(1, lookahead=F8_K))
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, steps=2, eval_every=2))
    data = job.task.build(0)
    res = job.run(0, data=data)
    tgt = data.test["targets"]
    t = torch.arange(tgt.shape[1]).expand_as(tgt)
    want = torch.clamp(tgt.shape[1] - 1 - t, max=F8_K)[tgt != IGNORE].double().mean()
    assert res.metrics["latency_mean"] == pytest.approx(float(want))
    assert set(res.metrics["f1"]) == {"none", "comma", "period", "colon", "capitalised"}
    adaptive = next(a.job for a in arms if isinstance(a.job, TextAdaptivePoint))
    adaptive = dataclasses.replace(adaptive, train=dataclasses.replace(adaptive.train, steps=2,
                                                                       eval_every=2))
    res = adaptive.run(0)
    assert 0 <= res.metrics["latency_mean"] <= F8_K and res.metrics["score"] == \
        res.metrics["accuracy"]
    assert SUITES["default"].seeds >= 3
