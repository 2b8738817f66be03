"""The adaptive-lookahead study of the lab (F5): its points through the lab runner, the skewed-delay
task, the adaptive arm learning to wait only where a frame needs it."""

from __future__ import annotations

import pytest
import torch

from causalmix.stream import compounded_latency
from causalmix.visibility import Causal, Window


def test_quick_study_runs_and_plots(tmp_path):
    from causalmix.lab.adaptive import run_adaptive_study, write_adaptive_report

    logs = []
    rows = run_adaptive_study("quick", tmp_path, log=logs.append)
    points = {r["info"]["point"] for r in rows}
    assert points == {"causal", "lookahead-1", "lookahead-2", "lookahead-3", "lookahead-4",
                      "full", "adaptive-w=0.05"}
    for r in rows:
        m = r["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0
        assert 0.0 <= m["latency_mean"] <= m["latency_max"]
    lat = {r["info"]["point"]: r["metrics"]["latency_mean"] for r in rows}
    t = 48
    assert lat["causal"] == 0.0
    assert lat["lookahead-4"] == pytest.approx((4 * (t - 4) + 3 + 2 + 1) / t)
    assert lat["full"] == pytest.approx((t - 1) / 2)
    # a second run reuses the recorded runs
    again = run_adaptive_study("quick", tmp_path, log=logs.append)
    assert len(again) == len(rows)
    rep = write_adaptive_report("quick", tmp_path)
    assert rep["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "adaptive_quick.md").exists()
    assert set(rep["summary"]["points"]) == points
    assert isinstance(rep["summary"]["check"]["holds"], bool)


def test_study_skewed_delays_and_bad_configs():
    from causalmix.lab.adaptive import STUDIES, AdaptiveStudy, oracle_latency
    from causalmix.lab.tasks import Lookahead

    task = Lookahead(num_symbols=4, max_delay=2, seq_len=30, num_train=400, num_test=50)
    st = AdaptiveStudy(task=task, max_lookahead=2, delay_probs=(0.8, 0.0, 0.2), seeds=1)
    data = st.build(3)
    for part in (data.train, data.test):
        x, y, d = part["inputs"], part["targets"], part["delay"]
        sym, dd = x // 3, x % 3
        assert torch.equal(dd, d)
        assert torch.equal(y, sym.gather(1, torch.arange(30) + d))
        assert not bool((d[:, :28] == 1).any())  # (clipping makes 1s at the end only)
        assert bool((d <= 29 - torch.arange(30)).all())
    frac0 = float((data.train["delay"][:, :28] == 0).double().mean())
    assert 0.77 < frac0 < 0.83
    assert st.best_accuracy(0) == pytest.approx(0.8 + 0.2 / 4)
    assert st.best_accuracy(1) == pytest.approx(0.8 + 0.2 / 4)
    assert oracle_latency(st, 1) == pytest.approx(float(st.build(0).test["delay"].double().mean()))
    assert torch.equal(AdaptiveStudy(task=task, max_lookahead=2).build(3).test["inputs"],
                       task.build(3).test["inputs"])
    assert STUDIES["skewed"].delay_probs is not None
    with pytest.raises(ValueError, match="delay_probs"):
        AdaptiveStudy(task=task, max_lookahead=2, delay_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="max_lookahead"):
        AdaptiveStudy(task=task, max_lookahead=0)
    with pytest.raises(ValueError, match="latency_weights"):
        AdaptiveStudy(task=task, latency_weights=(-1.0,))
    with pytest.raises(ValueError, match="latency_ramp"):
        AdaptiveStudy(task=task, latency_ramp=(0.6, 0.5))
    with pytest.raises(TypeError, match="Lookahead task"):
        AdaptiveStudy(task="lookahead")


@pytest.mark.slow
def test_adaptive_learns_to_wait_only_when_needed():
    """Trained on a small lookahead task, the gates wait about as long as each frame needs:
    near-full accuracy at well under the fixed lookahead-W latency."""
    from causalmix.lab.adaptive import AdaptiveStudy, train_adaptive
    from causalmix.lab.experiments import TrainConfig
    from causalmix.lab.tasks import Lookahead

    task = Lookahead(num_symbols=4, max_delay=3, seq_len=24, num_train=4096, num_test=256)
    study = AdaptiveStudy(task=task, max_lookahead=3, latency_weights=(0.2,), seeds=1,
                          train=TrainConfig(steps=200, batch_size=32, lr=3e-3, num_val=128,
                                            eval_every=25, patience=4))
    res = train_adaptive(study, 0.2, 0)
    fixed = compounded_latency([Causal() | Window(0, 3), Causal()], 24).double().mean()
    assert res["metrics"]["accuracy"] >= 0.95, res["metrics"]
    assert res["metrics"]["latency_mean"] <= 0.7 * float(fixed), res["metrics"]


