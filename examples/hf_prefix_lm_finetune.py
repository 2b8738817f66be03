"""Prefix-LM fine-tuning step (Bitune-style) on a transformers decoder.

Each example is ``prompt + answer``; the prompt is read bidirectionally (``Prefix(n)`` with the
per-example prompt end, padding included), the answer causally, and the loss covers answer tokens
only. The batch is left-padded; causalmix composes the spec with the padding mask in O(T)::

    python examples/hf_prefix_lm_finetune.py                 # tiny random Llama, seconds
    python examples/hf_prefix_lm_finetune.py --model PATH    # a local checkpoint
"""

from __future__ import annotations

import torch
from _hf_common import encode, left_pad, load, parser

import causalmix.hf
from causalmix import Prefix

PROMPTS = ["Translate to French: the cat sleeps.", "What is 12 times 12?", "Name a prime: "]
ANSWERS = [" le chat dort.", " 144.", " 7."]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tok = load(args.model, seed=args.seed)
    vocab = model.config.vocab_size
    prompts = encode(tok, PROMPTS, vocab, [9, 5, 7])
    answers = encode(tok, ANSWERS, vocab, [4, 3, 2])
    ids, mask = left_pad([torch.cat([p, a]) for p, a in zip(prompts, answers, strict=True)])
    pads = (mask == 0).sum(1)
    prompt_end = pads + torch.tensor([len(p) for p in prompts])  # [B]: absolute positions
    labels = ids.clone()
    labels[torch.arange(ids.shape[1])[None, :] < prompt_end[:, None]] = -100  # answer only
    visibility = Prefix(prompt_end)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out = model(ids, attention_mask=mask, labels=labels, visibility=visibility)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    print(f"prefix-LM loss over answer tokens, 3 steps: {' -> '.join(f'{x:.4f}' for x in losses)}")
    assert losses[-1] < losses[0], "the fine-tuning steps did not lower the loss"

    model.eval()
    causalmix.hf.attach(model)  # lets generate() take visibility=
    prompt_ids, prompt_mask = left_pad(prompts)
    gen = model.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=8,
                         do_sample=False, pad_token_id=0,
                         visibility=Prefix(torch.full((len(prompts),), prompt_ids.shape[1])))
    print("generated (prompt read bidirectionally):", gen[:, prompt_ids.shape[1]:].tolist())


if __name__ == "__main__":
    main()
