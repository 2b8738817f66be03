"""Train a small prefix-LM with plain causalmix, save it, reload it, generate, stream it.

The toy task is reversal: the prompt is ``x_1 .. x_L SEP`` (``L`` from 2 to 6, a different
length in every row), the answer ``x_L .. x_1 EOS``. A prefix-LM reads each row's prompt
bidirectionally and the answer causally: ``Prefix(prompt_lengths)`` per row, in every layer.
Rows are padded on the right (positions are absolute; the padding is never read)::

    python examples/train_prefix_lm.py              # 250 steps, under a minute on a laptop CPU
    python examples/train_prefix_lm.py --steps 20   # a quick run (what CI does)

Steps: a model from the ``tiny-softmax`` preset; a training loop with the loss on answer
tokens; ``save_pretrained`` / ``SequenceModel.from_pretrained``; ``generate`` with per-row
prompt lengths (greedy, stopping at EOS) on the model stream's KV cache; and a
``ModelStream`` pushing a batch of prompts and answers frame by frame, equal to the parallel
model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from causalmix import Causal, Prefix
from causalmix.nn import ModelConfig, SequenceModel
from causalmix.stream import ModelStream

DIGITS = 8  # tokens 0..7 are the symbols, then:
SEP, EOS, PAD = DIGITS, DIGITS + 1, DIGITS + 2
VOCAB = DIGITS + 3
MIN_LEN, MAX_LEN = 2, 6


def batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows ``x SEP reversed(x) EOS PAD...`` ``[n, 2 * MAX_LEN + 2]`` and the prompt
    lengths ``[n]`` (``len(x) + 1``: the symbols and SEP)."""
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=generator)
    rows = torch.full((n, 2 * MAX_LEN + 2), PAD)
    for r, m in enumerate(lengths.tolist()):
        x = torch.randint(0, DIGITS, (m,), generator=generator)
        rows[r, : 2 * m + 2] = torch.cat([x, torch.tensor([SEP]), x.flip(0), torch.tensor([EOS])])
    return rows, lengths + 1


def answer_loss(model: SequenceModel, rows: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens (after SEP, EOS included) under the prefix-LM spec."""
    vis = (Prefix(prompt),) * len(model.blocks)
    logits = model(rows[:, :-1], visibility=vis)  # position t predicts token t + 1
    target = rows[:, 1:]
    t = torch.arange(target.shape[1])[None, :]
    answer = (t >= prompt[:, None] - 1) & (t < 2 * prompt[:, None] - 1)
    return torch.nn.functional.cross_entropy(logits[answer], target[answer])


def train(steps: int, seed: int) -> SequenceModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-softmax", vocab_size=VOCAB,
                                visibility=(Causal(),) * 2)  # the prefix is given per call
    model = SequenceModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1),
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        rows, prompt = batch(64, g)
        loss = answer_loss(model, rows, prompt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(steps // 5, 1) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f}s)")
    return model.eval()


def evaluate(model: SequenceModel, seed: int) -> float:
    """Greedy generation with per-row prompt lengths: the fraction of rows reversed exactly."""
    rows, prompt = batch(32, torch.Generator().manual_seed(seed + 1))
    vis = (Prefix(prompt),) * len(model.blocks)
    out = model.generate(rows[:, : int(prompt.max())], max_new_tokens=MAX_LEN + 1,
                         prompt_lengths=prompt, visibility=vis, eos_token_id=EOS,
                         return_logits=True)
    # the same tokens as recomputing the whole sequence at every step (no cache)
    again = model.generate(rows[:, : int(prompt.max())], max_new_tokens=MAX_LEN + 1,
                           prompt_lengths=prompt, visibility=vis, eos_token_id=EOS,
                           use_cache=False)
    assert torch.equal(out.tokens, again)
    right = 0
    for r, n in enumerate(prompt.tolist()):
        want = rows[r, n: 2 * n]  # reversed symbols and EOS
        right += int(torch.equal(out.tokens[r, : n], want))
    print(f"e.g. prompt {rows[0, :prompt[0]].tolist()} -> {out.tokens[0].tolist()}")
    return right / len(prompt)


def stream(model: SequenceModel, seed: int) -> None:
    """Push prompts and answers in pieces of 3 frames through a ModelStream with the batch's
    own spec: the logits equal the parallel model's."""
    rows, prompt = batch(4, torch.Generator().manual_seed(seed + 2))
    vis = (Prefix(prompt),) * len(model.blocks)
    s = ModelStream(model, visibility=vis)
    pieces = [s.push(rows[:, i: i + 3]) for i in range(0, rows.shape[1], 3)]
    logits = torch.cat([*pieces, s.flush()], dim=1)
    with torch.no_grad():
        parallel = model(rows, visibility=vis)
    err = float((logits - parallel).abs().max())
    assert err < 1e-4, err
    lat = s.latency_stats()
    print(f"stream: {rows.shape[1]} frames in pieces of 3, max |stream - parallel| = {err:.1e}, "
          f"latency frames p50 {lat.p50:.0f}, max {lat.max:.0f} (waiting for each prompt)")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint folder (default: a temporary one)")
    args = p.parse_args(argv)
    model = train(args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save_pretrained(args.out or Path(tmp) / "prefix-lm")
        reloaded = SequenceModel.from_pretrained(folder).eval()
        rows, prompt = batch(8, torch.Generator().manual_seed(args.seed + 3))
        vis = (Prefix(prompt),) * len(model.blocks)
        with torch.no_grad():
            assert torch.equal(reloaded(rows, visibility=vis), model(rows, visibility=vis))
        print(f"saved and reloaded {folder.name}/: identical logits")
    acc = evaluate(reloaded, args.seed)
    print(f"exact reversals (greedy, per-row prompt lengths, cached decode): {acc:.0%}")
    stream(reloaded, args.seed)
    return acc


if __name__ == "__main__":
    main()
