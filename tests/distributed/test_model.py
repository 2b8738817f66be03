"""Whole-model sequence parallel on real gloo groups: a few Adam steps of a tiny fp64 model,
sequence-parallel (with and without FSDP2) == one process -- loss, every parameter gradient and
the parameters after the steps, to 1e-10 -- for softmax, linear, gated, delta, KDA and hybrid stacks
under the specs and layouts each mixer shards; what cannot shard raises on every rank."""

from __future__ import annotations

import re

import pytest
import torch

from causalmix import Causal, Chunked, Full, Prefix, Segments
from causalmix.testing import run_process_group, sequence_parallel_check

pytestmark = pytest.mark.distributed

TOL = 1e-10
T = 16
DOCS = Segments(torch.tensor([0] * 5 + [1] * 7 + [2] * 4)) & Causal()
ROW_DOCS = Segments(torch.tensor([[0] * 3 + [1] * 10 + [2] * 3, [0] * 9 + [1] * 7])) & Causal()

CASES = {
    # name: (mixers, specs, layouts)
    "softmax": (("softmax", "softmax"), (Causal(), Prefix(torch.tensor([5, 11]))),
                ("contiguous", "zigzag", "striped")),
    "softmax_chunked_docs": (("softmax", "softmax"), (Chunked(3, 1), DOCS),
                             ("zigzag", "striped")),
    "linear": (("linear", "linear"), (Causal(), Prefix(6)), ("contiguous", "zigzag")),
    "linear_docs": (("linear", "gated"), (DOCS, ROW_DOCS), ("contiguous", "zigzag")),
    "gated": (("gated", "gated"), (Full(), Causal()), ("zigzag",)),
    "hybrid": (("softmax", "linear", "gated"), (Chunked(4, 1), DOCS, Prefix(7)),
               ("zigzag",)),
    # Gated DeltaNet layers: the conv halo crosses ranks (and runs of 2 at world 4, zigzag)
    "delta": (("delta", "delta", "delta"), (Causal(), Chunked(3, 1), Prefix(torch.tensor([5, 11]))),
              ("contiguous", "zigzag")),
    "delta_docs": (("delta", "delta", "softmax"), (DOCS, ROW_DOCS & Full(), Prefix(6)),
                   ("contiguous", "zigzag")),
    # KDA layers (per-key-dimension gates) next to a Gated DeltaNet one
    "kda": (("kda", "delta", "kda"), (DOCS, Chunked(3, 1), ROW_DOCS & Full()),
            ("contiguous", "zigzag")),
}


def _job(rank, world, cases, fsdp):
    out = {}
    for name, (mixers, specs, layouts) in cases.items():
        for layout in layouts:
            out[f"{name}/{layout}"] = sequence_parallel_check(
                rank, world, mixers=mixers, visibility=specs, layout=layout, fsdp=fsdp,
                seq_len=T)
    return out


def _assert_all_within(results):
    for rank, per_case in results.items():
        for case, worst in per_case.items():
            assert max(worst.values()) <= TOL, (rank, case, worst)


@pytest.mark.parametrize("world", [2, 4])
def test_training_steps_equal_one_process(tmp_path, world):
    cases = CASES if world == 2 else {k: CASES[k] for k in ("softmax", "hybrid", "delta_docs")}
    _assert_all_within(run_process_group(_job, world, str(tmp_path), cases=cases, fsdp=False))


def test_training_steps_with_fsdp2_equal_one_process(tmp_path):
    cases = {k: CASES[k] for k in ("softmax", "hybrid")}
    _assert_all_within(run_process_group(_job, 2, str(tmp_path), cases=cases, fsdp=True))


def _refusal_job(rank, world, which):
    from causalmix.distributed import SequenceParallel
    from causalmix.testing import build_hybrid_model

    if which == "spec":  # rank 1 builds its model with another spec
        spec = Prefix(4) if rank == 1 else Causal()
        model, layout = build_hybrid_model(("softmax",), (spec,)), "zigzag"
    elif which == "layout":
        model, layout = build_hybrid_model(("softmax",), (Causal(),)), \
            ("zigzag" if rank == 0 else "contiguous")
    elif which == "delta_striped":  # the delta layer's state chain needs contiguous runs
        model, layout = build_hybrid_model(("delta",), (Causal(),)), "striped"
    else:  # a linear layer under a spec its sharded op does not serve
        model, layout = build_hybrid_model(("softmax", "linear"), (Causal(), Chunked(4))), \
            "zigzag"
    try:
        SequenceParallel(model, layout=layout)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("which,match", [("spec", "visibility"), ("layout", "layout"),
                                         ("unsharded", "layer 1"),
                                         ("delta_striped", "layer 0 .delta.*striped")])
def test_a_rank_that_differs_or_cannot_shard_makes_every_rank_raise(tmp_path, which, match):
    results = run_process_group(_refusal_job, 2, str(tmp_path), which=which)
    messages = set(results.values())
    assert len(messages) == 1 and None not in messages, results
    assert re.search(match, messages.pop())


@pytest.mark.parametrize("extra", [[], ["--fsdp", "--layout", "contiguous"]])
def test_the_torchrun_example_checks_itself(extra):
    """``examples/train_sequence_parallel.py`` under torchrun: exit status 0 (it exits non-zero
    if sequence parallel differs from one process by more than 1e-10 in fp64)."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo / "src"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(repo / "examples" / "train_sequence_parallel.py"), "--steps", "2", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest difference vs one process" in done.stdout
