"""Bidirectional mean-pooled sentence embeddings (LLM2Vec-style) from a transformers decoder.

``visibility=Full()`` makes every token see every other token of its sentence (and no padding),
at batch size 1 as at batch size 8: there is no ``None`` mask that silently falls back to causal
(llm2vec #74) and no ``is_causal=True`` (#79). The script checks both::

    python examples/hf_bidirectional_embeddings.py                 # tiny random Llama
    python examples/hf_bidirectional_embeddings.py --model PATH    # a local checkpoint
"""

from __future__ import annotations

import torch
from _hf_common import encode, left_pad, load, parser

from causalmix import Full

BIDIRECTIONAL = Full()
SENTENCES = ["A cat sleeps on the mat.", "The kitten naps on a rug.", "Stock prices fell today."]


@torch.no_grad()
def embed(model, ids: torch.Tensor, mask: torch.Tensor, visibility=BIDIRECTIONAL) -> torch.Tensor:
    """Mean of the last hidden states over tokens: ``[B, T]`` -> ``[B, hidden]``."""
    hidden = model(ids, attention_mask=mask, visibility=visibility).last_hidden_state
    w = mask[..., None].to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tok = load(args.model, causal_lm=False, seed=args.seed)
    model.eval()
    rows = encode(tok, SENTENCES, model.config.vocab_size, [8, 6, 5])
    ids, mask = left_pad(rows)
    emb = embed(model, ids, mask)
    # Batch size 1 without padding gives the same embedding as the padded batch ...
    alone = embed(model, rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long))
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-4, atol=1e-5)
    # ... and it is bidirectional: not what the causal model gives.
    causal = embed(model, rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long),
                   visibility=None)
    assert not torch.allclose(alone, causal), "the embedding ignored visibility=Full()"
    e = torch.nn.functional.normalize(emb, dim=-1)
    print("cosine similarities (bidirectional, mean-pooled):")
    for s, row in zip(SENTENCES, (e @ e.T).tolist(), strict=True):
        print(f"  {s[:28]:<28} " + " ".join(f"{x:+.3f}" for x in row))


if __name__ == "__main__":
    main()
