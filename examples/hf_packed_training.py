"""A packed-document training batch on a transformers decoder.

Documents are concatenated into one row with ``position_ids`` restarting at 0 for each (the
convention of transformers' ``DataCollatorWithFlattening``); causalmix turns the restarts into
``Segments`` so no token attends across documents, in O(T) memory and skipping the empty
cross-document tiles. The script checks that each document's logits equal a separate run::

    python examples/hf_packed_training.py                 # tiny random Llama
    python examples/hf_packed_training.py --model PATH    # a local checkpoint
"""

from __future__ import annotations

import torch
from _hf_common import encode, load, parser

DOCS = ["The first document is short.", "A second one, a little longer than the first.",
        "Third.", "And a fourth document closes the batch."]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tok = load(args.model, seed=args.seed)
    docs = encode(tok, DOCS, model.config.vocab_size, [37, 61, 9, 21])
    ids = torch.cat(docs)[None]  # [1, T]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(d) for d in docs[:-1]]), 0)
    labels[0, starts] = -100  # no document predicts the first token of the next one

    model.train()
    out = model(ids, position_ids=position_ids, labels=labels)
    out.loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    print(f"packed batch: {len(docs)} documents, {ids.shape[1]} tokens, "
          f"loss {out.loss.item():.4f}, grad norm {grad_norm.item():.4f}")

    model.eval()
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids).logits[0]
        for d, s in zip(docs, starts.tolist(), strict=True):
            alone = model(d[None]).logits[0]
            torch.testing.assert_close(packed[s:s + len(d)], alone, rtol=1e-4, atol=1e-5)
    print("each document's logits in the packed row == the document run alone")


if __name__ == "__main__":
    main()
