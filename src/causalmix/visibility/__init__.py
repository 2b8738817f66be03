"""Visibility: who may see whom.

A visibility spec answers one question, ``visible(b, i, j)``: may the query at **absolute**
position ``i`` (batch row ``b``) see the key at absolute position ``j``? Operations are told where
their queries and keys sit (``q_offset``, ``k_offset``), so prefill, decode, streaming chunks and
shards all ask the same question and there is no top-left / bottom-right ambiguity::

    Causal()                  j <= i
    Full()                    always
    Prefix(n)                 j <= i  or  j < n          (n: int, or a [B] tensor of lengths)
    Chunked(size, lookahead)  j // size <= i // size + lookahead     (lookahead counts chunks)
    Window(left, right)       i - left <= j <= i + right
    Segments(ids)             ids[i] == ids[j]           (ids: [T] or [B, T] integer tensor)
    AdaptiveLookahead(a)      j <= i + a[i]              (a: [T] or [B, T], per-query frames)
    ValidKeys(valid)          valid[b, j]                (valid: [B, T] bool, 0 = padding)
    a & b,  a | b             both / either

Example, two packed documents, block-causal over chunks of 2 within each:
``Segments(tensor([0, 0, 0, 0, 0, 1, 1, 1])) & Chunked(2)`` (row = query i, column = key j;
chunk boundaries count from position 0, so document 1 starts mid-chunk)::

        j 0 1 2 3 4 5 6 7
    i 0   x x . . . . . .
      1   x x . . . . . .
      2   x x x x . . . .
      3   x x x x . . . .
      4   x x x x x . . .
      5   . . . . . x . .
      6   . . . . . x x x
      7   . . . . . x x x

The spec protocol
-----------------
Every mixer and execution mode talks to a spec through these public members only:

* :meth:`Visibility.visible` ``(b, i, j) -> bool tensor``: the elementwise predicate, shaped like
  FlexAttention's ``mask_mod`` (without the head index): broadcastable int64 tensors in, their
  broadcast bool tensor out, only elementwise ops and gathers (so it vmaps and compiles).
* :meth:`Visibility.key_range` ``(i) -> KeyRange(lo, hi) | None``: if every query sees one
  contiguous range of keys, its inclusive ends (each broadcastable to ``[B', N]`` for
  ``i: [N]``; ``None`` for an unbounded end); ``None`` if the keys seen are not a range. Optional:
  specs without it are served by dense masks per tile.
* :attr:`Visibility.lookahead_frames` / :attr:`Visibility.lookback_frames`: the largest
  ``j - i`` / ``i - j`` over visible pairs, in frames (``None``: unbounded or unknown, the safe
  answer). The lookahead fixes streaming latency, the lookback bounds a streaming KV cache.
* :attr:`Visibility.batch_size` (``None`` = any batch) and :attr:`Visibility.covered_length`
  (number of positions a tensor-holding spec defines, ``None`` = unlimited).

From these the base class derives the rest, the same for every spec: the dense boolean
:meth:`~Visibility.mask` (the oracle every test compares against), exact per-tile counts and the
empty / partial / full :meth:`~Visibility.block_map`, :meth:`~Visibility.horizon` (the last key
each query may see, which decides when a streamed output is final) and
:meth:`~Visibility.check_positions`. Writing your own spec (this example is a test)::

    @dataclasses.dataclass(frozen=True)
    class Dilated(Visibility):            # causal, every `step`-th key only
        step: int

        def visible(self, b, i, j):
            return (j <= i) & ((i - j) % self.step == 0)

        @property
        def lookahead_frames(self):
            return 0

    Dilated(2).mask(4, 4)                  # works with every mixer: block maps, streams, ...

Specs are frozen, hashable values. ``Prefix`` with a tensor, ``Segments``, ``ValidKeys`` and
``AdaptiveLookahead`` copy their tensor at construction (refilling the caller's buffer later
changes nothing), compare and hash by its content, and refuse to be used once their own copy has
been modified in place (``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load`` make
new valid specs). Positions are ints in ``[0, MAX_POSITION)``; every spec argument is exact for
any value (widths and lookaheads beyond every position are clamped inside the arithmetic).

Examples
--------
>>> import torch
>>> from causalmix.visibility import Causal, Chunked, Prefix, Segments
>>> Chunked(4, lookahead=1).lookahead_frames     # a stream waits this many frames
7
>>> Prefix(2).horizon(torch.arange(4))            # last key each query may see
tensor([1, 1, 2, 3])
>>> (Segments.from_lengths([2, 3]) & Causal()).mask(5, 5)[0].int()
tensor([[1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1]], dtype=torch.int32)

Where things live
-----------------
One spec family per file, this package's ``__init__`` the face: ``base.py`` (the protocol and
what the base class derives), ``tiling.py`` (exact tile counts), ``combine.py`` (``&``, ``|``),
``causal.py`` (``Causal``, ``Full``), ``prefix.py``, ``chunked.py``, ``window.py``,
``segments.py``, ``valid_keys.py``, ``adaptive.py`` (``AdaptiveLookahead``), ``strided.py``
(the striped shard view used by :mod:`causalmix.distributed`), and ``tensor_spec.py`` (value
semantics of the tensor-holding specs). Argument checks and error types are in
:mod:`causalmix.checks`.
"""

from causalmix.checks import MAX_POSITION, ArgumentTypeError, UnboundedHorizonError, check_int
from causalmix.visibility.adaptive import AdaptiveLookahead
from causalmix.visibility.base import (
    EMPTY,
    FULL,
    PARTIAL,
    KeyRange,
    Visibility,
    check_layer_specs,
    check_spec,
    check_visibility,
)
from causalmix.visibility.causal import Causal, Full
from causalmix.visibility.chunked import Chunked
from causalmix.visibility.combine import And, Or
from causalmix.visibility.prefix import Prefix
from causalmix.visibility.segments import Segments
from causalmix.visibility.strided import Strided
from causalmix.visibility.tensor_spec import TensorSpec
from causalmix.visibility.valid_keys import ValidKeys
from causalmix.visibility.window import Window

__all__ = [
    "EMPTY",
    "FULL",
    "MAX_POSITION",
    "PARTIAL",
    "AdaptiveLookahead",
    "And",
    "ArgumentTypeError",
    "Causal",
    "Chunked",
    "Full",
    "KeyRange",
    "Or",
    "Prefix",
    "Segments",
    "Strided",
    "TensorSpec",
    "UnboundedHorizonError",
    "ValidKeys",
    "Visibility",
    "Window",
    "check_int",
    "check_layer_specs",
    "check_spec",
    "check_visibility",
]
