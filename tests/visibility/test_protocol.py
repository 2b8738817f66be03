"""The public spec protocol: a spec written outside causalmix, against the documented members
only, runs on every mixer and mode; no module outside ``visibility`` reads a spec's private
members."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import causalmix.visibility as vis_mod
from causalmix import linear_attention, softmax_attention
from causalmix.stream import SoftmaxStream
from causalmix.testing import assert_close
from causalmix.visibility import (
    MAX_POSITION,
    Causal,
    Chunked,
    Full,
    KeyRange,
    Prefix,
    Segments,
    UnboundedHorizonError,
    Visibility,
    Window,
)

SRC = pathlib.Path(vis_mod.__file__).resolve().parent.parent  # src/causalmix


# ------------------------------------------------------------------ "write your own spec"
@dataclasses.dataclass(frozen=True)
class Dilated(Visibility):  # the module docstring's example
    """Causal, every ``step``-th key only."""

    step: int

    def visible(self, b, i, j):
        return (j <= i) & ((i - j) % self.step == 0)

    @property
    def lookahead_frames(self):
        return 0


@dataclasses.dataclass(frozen=True)
class Band(Visibility):
    """A user spec with a key range: ``i - 3 <= j <= i + 2``."""

    def visible(self, b, i, j):
        return (j >= i - 3) & (j <= i + 2)

    def key_range(self, i):
        return KeyRange(i - 3, i + 2)

    @property
    def lookahead_frames(self):
        return 2

    @property
    def lookback_frames(self):
        return 3


def test_docstring_example_is_this_test():
    doc = vis_mod.__doc__
    assert "class Dilated(Visibility)" in doc and "def visible(self, b, i, j)" in doc
    assert "(j <= i) & ((i - j) % self.step == 0)" in doc


@pytest.mark.parametrize("spec", [Dilated(2), Dilated(3) & Window(9), Band(), Band() | Causal()])
@pytest.mark.parametrize("t", [1, 7, 63])
def test_user_spec_runs_on_every_softmax_impl_and_stream(spec, t):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, t, 2, 8, generator=g) for _ in range(3))
    ref = softmax_attention(q, k, v, spec, impl="reference", q_offset=5, k_offset=5)
    out = softmax_attention(q, k, v, spec, impl="blocks", q_offset=5, k_offset=5)
    assert_close(out, ref, baseline=ref)
    m = spec.mask(t, t, q_offset=5, k_offset=5)
    cnt = spec.tile_counts(t, t, 4, q_offset=5, k_offset=5)
    dense = torch.nn.functional.pad(m.long(), (0, -t % 4, 0, -t % 4))
    dense = dense.view(-1, -(-t // 4), 4, -(-t // 4), 4).sum((2, 4))
    assert torch.equal(cnt, dense)
    # streaming uses the horizon: exact for key ranges, i + lookahead_frames otherwise
    s = SoftmaxStream(spec)
    full = softmax_attention(q, k, v, spec, impl="reference")
    outs = [s.push(q[:, a:a + 3], k[:, a:a + 3], v[:, a:a + 3]) for a in range(0, t, 3)]
    outs.append(s.flush())
    assert_close(torch.cat(outs, 1), full, baseline=full)


def test_user_spec_on_linear_attention_is_refused_by_name():
    q = torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match="Dilated"):
        linear_attention(q, q, q, Dilated(2))


def test_horizon_contract():
    pos = torch.arange(10)
    assert torch.equal(Band().horizon(pos), pos + 2)
    assert torch.equal(Dilated(2).horizon(pos), pos)  # i + lookahead_frames: an upper bound
    assert torch.equal((Dilated(2) & Chunked(4, 1)).horizon(pos), pos)
    assert torch.equal((Dilated(2) | Window(0, 5)).horizon(pos), pos + 5)
    with pytest.raises(UnboundedHorizonError, match="unbounded"):
        Full().horizon(pos)
    with pytest.raises(UnboundedHorizonError):
        (Full() | Causal()).horizon(pos)
    for bad in ([0, 1, 2], torch.tensor([0.0, 1.0]), torch.tensor([-1, 2]), torch.zeros(2, 2),
                torch.tensor([MAX_POSITION])):
        with pytest.raises(ValueError, match="positions"):
            Causal().horizon(bad)


def test_key_range_uses_none_for_unbounded_ends():
    i = torch.arange(6)
    assert Causal().key_range(i).lo is None and torch.equal(Causal().key_range(i).hi, i)
    assert Full().key_range(i) == KeyRange(None, None)
    kr = (Window(2, 1) & Causal()).key_range(i)
    assert torch.equal(kr.lo, i - 2) and torch.equal(kr.hi, i)
    assert Segments(torch.tensor([0, 1, 0, 1, 2, 2])).key_range(i) is None  # not a range


# ------------------------------------------------------------------ no private reads outside
VIS = SRC / "visibility"


def _private_spec_names() -> set[str]:
    names = set()
    for node in (n for p in sorted(VIS.glob("*.py")) for n in ast.walk(ast.parse(p.read_text()))):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_") \
                and not node.name.startswith("__"):
            names.add(node.name)
        if isinstance(node, ast.Assign):
            for tgt in node.targets:
                if isinstance(tgt, ast.Name) and tgt.id.startswith("_") \
                        and not tgt.id.startswith("__"):
                    names.add(tgt.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("_cached"):
            names.add(node.value)
    return names


def test_no_module_outside_visibility_reads_private_spec_members():
    private = _private_spec_names()
    assert {"_counts", "_horizon", "_check_unmodified", "_Combined", "_cached_key"} <= private
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if VIS in path.parents:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "causalmix.visibility"):
                offenders += [f"{path.relative_to(SRC)}:{node.lineno} import {a.name}"
                              for a in node.names if a.name.startswith("_")]
        text = path.read_text()
        if "2**60" in text or "2 ** 60" in text:  # the sentinels of visibility/tiling.py
            offenders.append(f"{path.relative_to(SRC)}: re-declares the unbounded sentinel")
    assert not offenders, "\n".join(offenders)


def test_every_spec_class_lives_in_visibility():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if VIS in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")) in {"Visibility", "TensorSpec"}
                    for b in node.bases):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} class {node.name}")
    assert not offenders, "\n".join(offenders)


def test_prefix_tensor_snapshot_is_used_everywhere():
    n = torch.tensor([3, 5])
    spec = Prefix(n)
    n.fill_(0)
    assert spec.n.tolist() == [3, 5] and spec == Prefix(torch.tensor([3, 5]))
