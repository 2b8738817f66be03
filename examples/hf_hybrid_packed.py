"""A packed-document training step on a hybrid model (Gated DeltaNet + attention).

Documents are concatenated into one row with ``position_ids`` restarting at 0 for each (as
transformers' ``DataCollatorWithFlattening`` makes them). transformers' own CPU path of the
Gated DeltaNet layers carries the recurrent state and the short convolution from one document
into the next; after ``causalmix.hf.attach(model)`` every layer -- attention and Gated DeltaNet
alike -- keeps the documents apart. The script trains one step and checks both claims::

    python examples/hf_hybrid_packed.py                 # tiny random Qwen3-Next-style model
    python examples/hf_hybrid_packed.py --model PATH    # a local Qwen3-Next / Qwen3.5 / OLMo-Hybrid
"""

from __future__ import annotations

import copy

import torch
from _hf_common import encode, load_hybrid, parser

import causalmix.hf

DOCS = ["The first document is short.", "A second one, a little longer than the first.",
        "Third.", "And a fourth document closes the batch."]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tok = load_hybrid(args.model, seed=args.seed)
    own = copy.deepcopy(model)  # the same weights on transformers' own hybrid layers
    causalmix.hf.attach(model)
    docs = encode(tok, DOCS, model.config.vocab_size, [37, 61, 9, 21])
    ids = torch.cat(docs)[None]  # [1, T]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(d) for d in docs[:-1]]), 0)
    labels[0, starts] = -100  # no document predicts the first token of the next one

    model.train()
    out = model(ids, position_ids=position_ids, labels=labels)
    out.loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()
                               if p.grad is not None))
    print(f"packed batch: {len(docs)} documents, {ids.shape[1]} tokens, "
          f"loss {out.loss.item():.4f}, grad norm {grad_norm.item():.4f}")

    model.eval()
    own.eval()
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids).logits[0]
        worst_own = 0.0
        own.set_attn_implementation("sdpa")  # transformers' own path end to end
        leaked = own(ids, position_ids=position_ids).logits[0]
        for d, s in zip(docs, starts.tolist(), strict=True):
            alone = own(d[None]).logits[0]
            torch.testing.assert_close(packed[s:s + len(d)], alone, rtol=1e-4, atol=1e-4)
            worst_own = max(worst_own, float((leaked[s:s + len(d)] - alone).abs().max()))
    print("each document's logits in the packed row == the document run alone (causalmix)")
    print(f"transformers' own path on the packed row: off by up to {worst_own:.3f} in logits")
    assert worst_own > 1e-3, "expected the model's own path to leak across documents"


if __name__ == "__main__":
    main()
