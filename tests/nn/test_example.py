"""``examples/train_prefix_lm.py`` runs end to end (a short run): train, save, reload with
identical logits, generate with per-row prompt lengths (cached == recomputed), stream ==
parallel -- the script asserts each."""

from __future__ import annotations

import importlib
import pathlib
import sys


def test_train_prefix_lm_example_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
    monkeypatch.setattr(sys, "argv", ["train_prefix_lm"])
    example = importlib.import_module("train_prefix_lm")
    acc = example.main(["--steps", "12", "--out", str(tmp_path / "ckpt")])
    assert 0.0 <= acc <= 1.0
    out = capsys.readouterr().out
    assert "identical logits" in out and "stream:" in out
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "weights.pt").is_file()
