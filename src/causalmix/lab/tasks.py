"""Lab tasks as typed configs; ``build(seed)`` returns train and test tensors.

Every task produces a :class:`TaskData` whose tensors are indexed by example along dim 0:
``inputs`` (int64 tokens ``[N, T]`` or float features ``[N, T, F]``), ``targets`` (``[N, T]``
class ids with -100 where there is no label, or ``[N, T]`` floats with ``mask`` marking the
scored positions), and per-example ``prefix_len: [N]`` (the length of the part a prefix model
may read bidirectionally).
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["IGNORE", "ICLRegression", "Lookahead", "MQAR", "TaskData", "TASKS"]

IGNORE = -100  # target of an unscored position (torch cross_entropy's ignore_index)


@dataclasses.dataclass
class TaskData:
    """``train`` / ``test`` dicts of tensors with equal dim 0: ``inputs``, ``targets``,
    ``prefix_len`` and, for regression, ``mask``; ``extra`` holds per-task test metadata."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    extra: dict = dataclasses.field(default_factory=dict)


def _check_pos(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(obj).__name__}.{n} must be an int >= 1, got {v!r}")


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (zoology's MQAR) with a repeated prompt (JRT-Prompt).

    One pass of the prompt is ``2 * num_kv_pairs`` context tokens (key, value alternating; keys
    drawn without replacement from ``[1, vocab_size // 2)``, values from
    ``[vocab_size // 2, vocab_size)``) followed by ``query_len`` question slots, in which
    ``num_queries`` context keys are asked at slots placed with a power-law gap
    (``P(gap = g) ~ g ** -(power_a)``, zoology's placement, gaps between consecutive queries),
    the other slots holding the filler token 0. The prompt is repeated ``num_passes`` times
    (JRT-Prompt: read the documents *and the questions* twice, so that a fixed-state mixer knows
    on its second read which pairs it must store); labels (the asked key's value) sit only on
    the question slots of the last pass; accuracy is measured there only.

    Worked example (vocab 16: keys 1..7, values 8..15; 3 pairs, 2 queries, query_len 4,
    num_passes 2)::

        inputs   3 9  5 12  1 8 | 0 5 0 3 | 3 9  5 12  1 8 | 0  5 0 3
        targets  . .  . .   . . | . . . . | . .  . .   . . | . 12 . 9
        prefix_len = 20: the whole sequence is prompt (the answers are never inputs, so a
        bidirectional reader cannot peek at one)
    """

    vocab_size: int = 64
    num_kv_pairs: int = 16
    num_queries: int = 4
    query_len: int = 16
    num_passes: int = 1
    power_a: float = 0.01
    num_train: int = 20000
    num_test: int = 1000

    def __post_init__(self):
        _check_pos(self, "vocab_size", "num_kv_pairs", "num_queries", "query_len",
                   "num_passes", "num_train", "num_test")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs ({self.num_kv_pairs}) must be < vocab_size // 2 "
                             f"({self.vocab_size // 2}): keys are distinct within a sequence")
        if self.num_queries > min(self.num_kv_pairs, self.query_len):
            raise ValueError(f"num_queries ({self.num_queries}) must be <= num_kv_pairs "
                             f"({self.num_kv_pairs}) and <= query_len ({self.query_len})")

    @property
    def seq_len(self) -> int:
        return self.num_passes * (2 * self.num_kv_pairs + self.query_len)

    def _make(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        p, q, ql, half = self.num_kv_pairs, self.num_queries, self.query_len, self.vocab_size // 2
        keys = torch.argsort(torch.rand(n, half - 1, generator=g), dim=1)[:, :p] + 1
        vals = torch.randint(half, self.vocab_size, (n, p), generator=g)
        ctx = torch.stack([keys, vals], dim=2).reshape(n, 2 * p)
        asked = torch.argsort(torch.rand(n, p, generator=g), dim=1)[:, :q]  # which pairs
        # Power-law gaps between consecutive query slots: sample q slots among ql, weighting
        # slot s by (s + 1) ** -a so that queries crowd the start of the question block.
        w = (torch.arange(ql, dtype=torch.float64) + 1) ** -self.power_a
        slots = torch.multinomial(w.expand(n, ql), q, replacement=False, generator=g)
        slots, _ = slots.sort(dim=1)
        question = torch.zeros(n, ql, dtype=torch.int64)
        answer = torch.full((n, ql), IGNORE, dtype=torch.int64)
        question.scatter_(1, slots, keys.gather(1, asked))
        answer.scatter_(1, slots, vals.gather(1, asked))
        one = torch.cat([ctx, question], dim=1)
        inputs = one.repeat(1, self.num_passes)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -ql:] = answer
        prefix = torch.full((n,), inputs.shape[1], dtype=torch.int64)
        return {"inputs": inputs, "targets": targets, "prefix_len": prefix}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        return TaskData(self._make(self.num_train, g), self._make(self.num_test, g))

    # model I/O
    def io(self) -> dict:
        return {"vocab_size": self.vocab_size}

    kind = "classification"


@dataclasses.dataclass(frozen=True)
class ICLRegression:
    """In-context linear regression (Garg et al. 2022; prefix vs causal as in Ding et al.).

    Each sequence draws ``w ~ N(0, I / dim)`` and ``n`` examples (``n`` uniform in
    ``[1, max_examples]`` for training; fixed per test set), ``x ~ N(0, I)``,
    ``y = w.x + noise_std * eps``. Tokens are ``[y, x..., 1]`` for examples and ``[0, x..., 0]``
    for queries (the last feature flags an example); the ``seq_len - n`` tokens after the
    examples are all queries and every query is scored (MSE on y). ``prefix_len = n``: a prefix
    model lets the examples see each other; a causal model does not.

    Worked example (dim 2, seq_len 4, n 2; ``w = [1, -1]``, no noise)::

        token 0  [ 1.0,  2.0, 1.0, 1]   example: y = 2 - 1
        token 1  [-0.5,  0.5, 1.0, 1]   example: y = 0.5 - 1
        token 2  [ 0.0,  1.0, 3.0, 0]   query, target -2.0
        token 3  [ 0.0,  0.0, 1.0, 0]   query, target -1.0
        prefix_len = 2

    ``test_examples``: the numbers of examples of the test sets (one set each, ``num_test``
    sequences); the metric is MSE per number of examples, next to two baselines fitted on the
    same examples: min-norm least squares and the Bayes-optimal ridge fit (the posterior mean of
    ``w`` under its prior, the lowest MSE any predictor can reach).
    """

    dim: int = 4
    max_examples: int = 16
    seq_len: int = 24
    noise_std: float = 0.1
    test_examples: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)
    num_train: int = 20000
    num_test: int = 500

    def __post_init__(self):
        _check_pos(self, "dim", "max_examples", "seq_len", "num_train", "num_test")
        if self.max_examples >= self.seq_len:
            raise ValueError(f"max_examples ({self.max_examples}) must be < seq_len "
                             f"({self.seq_len}): at least one query per sequence")
        object.__setattr__(self, "test_examples", tuple(self.test_examples))
        if not self.test_examples or not all(
                isinstance(k, int) and 1 <= k <= self.max_examples for k in self.test_examples):
            raise ValueError(f"test_examples must be ints in [1, max_examples="
                             f"{self.max_examples}], got {self.test_examples!r}")

    def _make(self, n_ex: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        n, t, d = n_ex.shape[0], self.seq_len, self.dim
        w = torch.randn(n, d, generator=g) / math.sqrt(d)
        x = torch.randn(n, t, d, generator=g)
        y = (x @ w[:, :, None])[..., 0] + self.noise_std * torch.randn(n, t, generator=g)
        is_ex = torch.arange(t)[None, :] < n_ex[:, None]
        feats = torch.cat([(y * is_ex)[..., None], x, is_ex[..., None].float()], dim=-1)
        return {"inputs": feats, "targets": y, "mask": ~is_ex, "prefix_len": n_ex.clone()}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        train = self._make(torch.randint(1, self.max_examples + 1, (self.num_train,),
                                         generator=g), g)
        parts = [self._make(torch.full((self.num_test,), k, dtype=torch.int64), g)
                 for k in self.test_examples]
        test = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        return TaskData(train, test, {"least_squares_mse": self.baseline_mse(test, 0.0),
                                      "bayes_mse": self.baseline_mse(test, None)})

    def baseline_mse(self, data: dict[str, torch.Tensor], ridge: float | None) -> dict[int, float]:
        """MSE on the queries of a linear fit on each sequence's examples, per n: min-norm
        least squares (``ridge=0``) or, with ``ridge=None``, the posterior mean of ``w``
        (ridge ``noise_std**2 * dim``, the Bayes-optimal predictor for this prior)."""
        lam = self.noise_std ** 2 * self.dim if ridge is None else ridge
        out = {}
        for k in self.test_examples:
            sel = data["prefix_len"] == k
            feats, tgt = data["inputs"][sel].double(), data["targets"][sel].double()
            xe, ye = feats[:, :k, 1:1 + self.dim], feats[:, :k, 0:1]
            if lam == 0:
                w = torch.linalg.pinv(xe) @ ye  # [n, d, 1]
            else:
                gram = xe.transpose(1, 2) @ xe + lam * torch.eye(self.dim, dtype=xe.dtype)
                w = torch.linalg.solve(gram, xe.transpose(1, 2) @ ye)
            pred = (feats[:, k:, 1:1 + self.dim] @ w)[..., 0]
            out[k] = float(((pred - tgt[:, k:]) ** 2).mean())
        return out

    def io(self) -> dict:
        return {"input_dim": self.dim + 2, "output_dim": 1}

    kind = "regression"


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """A streaming labelling task whose label at frame t sometimes needs frames after t.

    Frame t carries a symbol ``s_t`` in ``[0, num_symbols)`` and a delay ``d_t`` in
    ``[0, max_delay]`` (the marker "the answer comes d frames later"), as the single token
    ``s_t * (max_delay + 1) + d_t``. The label is ``s_{t + d_t}`` (delays are clipped so that
    ``t + d_t < seq_len``). A model that sees ``L`` frames ahead can label every frame with
    ``d_t <= L``; the rest it can only guess (``1 / num_symbols``), so the best accuracy is
    ``p + (1 - p) / num_symbols`` with ``p = P(d_t <= L)``, rising from ``L = 0`` to
    ``L = max_delay`` (:meth:`best_accuracy` also counts the clipped delays at the end).

    Worked example (num_symbols 4, max_delay 2: token = 3 s + d)::

        s        2  0  3  1  1
        d        0  2  1  0  0      (the last two delays clipped to stay in the sequence)
        inputs   6  2 10  3  3
        targets  2  3  1  1  1
    """

    num_symbols: int = 8
    max_delay: int = 4
    seq_len: int = 64
    num_train: int = 20000
    num_test: int = 1000

    def __post_init__(self):
        _check_pos(self, "num_symbols", "seq_len", "num_train", "num_test")
        if isinstance(self.max_delay, bool) or not isinstance(self.max_delay, int) \
                or self.max_delay < 0:
            raise ValueError(f"Lookahead.max_delay must be an int >= 0, got {self.max_delay!r}")

    @property
    def vocab_size(self) -> int:
        return self.num_symbols * (self.max_delay + 1)

    def _make(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        t = self.seq_len
        s = torch.randint(0, self.num_symbols, (n, t), generator=g)
        d = torch.randint(0, self.max_delay + 1, (n, t), generator=g)
        d = torch.minimum(d, t - 1 - torch.arange(t))
        targets = s.gather(1, torch.arange(t) + d)
        inputs = s * (self.max_delay + 1) + d
        return {"inputs": inputs, "targets": targets,
                "prefix_len": torch.zeros(n, dtype=torch.int64), "delay": d}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        return TaskData(self._make(self.num_train, g), self._make(self.num_test, g))

    def best_accuracy(self, lookahead: int) -> float:
        """The accuracy ceiling of a model that sees ``lookahead`` frames ahead: frame t is
        solvable when its (clipped) delay ``min(d_t, seq_len - 1 - t) <= lookahead``, else a
        guess; averaged over the frames of a sequence."""
        k1, total = self.max_delay + 1, 0.0
        for t in range(self.seq_len):
            room = self.seq_len - 1 - t  # delays are clipped to this
            p = 1.0 if room <= lookahead else min(lookahead + 1, k1) / k1
            total += p + (1 - p) / self.num_symbols
        return total / self.seq_len

    def io(self) -> dict:
        return {"vocab_size": self.vocab_size, "output_dim": self.num_symbols}

    kind = "classification"


TASKS = {"mqar": MQAR, "icl_regression": ICLRegression, "lookahead": Lookahead}
