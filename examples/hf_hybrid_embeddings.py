"""Bidirectional mean-pooled embeddings (LLM2Vec-style) from a hybrid model.

``causalmix.hf.attach(model, Full())`` makes every token see every other token of its sentence
in the attention layers *and* in the Gated DeltaNet layers (their recurrence also runs
backwards from the end of the sentence; the short convolution stays causal), and no padding:
a padded batch gives each sentence the embedding it gets alone. The script checks both::

    python examples/hf_hybrid_embeddings.py                 # tiny random Qwen3-Next-style model
    python examples/hf_hybrid_embeddings.py --model PATH    # a local hybrid checkpoint
"""

from __future__ import annotations

import torch
from _hf_common import encode, left_pad, load_hybrid, parser

import causalmix.hf
from causalmix import Causal, Full

SENTENCES = ["A cat sleeps on the mat.", "The kitten naps on a rug.", "Stock prices fell today."]


@torch.no_grad()
def embed(model, ids: torch.Tensor, mask: torch.Tensor, visibility=None) -> torch.Tensor:
    """Mean of the last hidden states over tokens: ``[B, T]`` -> ``[B, hidden]``."""
    hidden = model(ids, attention_mask=mask, visibility=visibility).last_hidden_state
    w = mask[..., None].to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tok = load_hybrid(args.model, causal_lm=False, seed=args.seed)
    causalmix.hf.attach(model, Full()).eval()
    rows = encode(tok, SENTENCES, model.config.vocab_size, [8, 6, 5])
    ids, mask = left_pad(rows)
    emb = embed(model, ids, mask)
    ones = torch.ones(1, len(rows[-1]), dtype=torch.long)
    # The shortest sentence alone gives the same embedding as in the padded batch ...
    alone = embed(model, rows[-1][None], ones)
    torch.testing.assert_close(alone[0], emb[-1], rtol=1e-4, atol=1e-5)
    # ... and it is bidirectional: not what the causal model gives.
    causal = embed(model, rows[-1][None], ones, visibility=Causal())
    assert not torch.allclose(alone, causal, atol=1e-5), "the embedding ignored Full()"
    e = torch.nn.functional.normalize(emb, dim=-1)
    print("cosine similarities (bidirectional through every layer, mean-pooled):")
    for s, row in zip(SENTENCES, (e @ e.T).tolist(), strict=True):
        print(f"  {s[:28]:<28} " + " ".join(f"{x:+.3f}" for x in row))


if __name__ == "__main__":
    main()
