"""Lab tasks as typed configs; ``build(seed)`` returns train and test tensors, ``metrics``
scores a model's outputs.

Every task follows the lab's task protocol (:class:`causalmix.lab.Task`, in
:mod:`causalmix.lab.protocol`) and registers its name in :data:`TASKS`. Every task produces a
:class:`TaskData` whose tensors are indexed by example along dim 0:
``inputs`` (int64 tokens ``[N, T]`` or float features ``[N, T, F]``), ``targets`` (``[N, T]``
class ids with -100 where there is no label, or ``[N, T]`` floats with ``mask`` marking the
scored positions), and per-example ``prefix_len: [N]`` (the length of the part a prefix model
may read bidirectionally). A task whose test set is split into groups (numbers of key-value
pairs, set orders, numbers of examples) stores the group of each example under
``group_key`` and reports its metric per group.

Classification tasks also have a brute-force ``solve(inputs)`` (plain Python over one
example's token list) that the tests check every label against.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from causalmix.checks import check_int
from causalmix.lab.protocol import IGNORE, TASKS, TaskData, register_task
from causalmix.lab.recall_tasks import MQAR, MQARReassign
from causalmix.lab.task_base import Split, _check_pos, classification_metrics

__all__ = ["IGNORE", "FirstToken", "ICLRegression", "Lookahead", "MQAR", "MQARReassign",
           "SetDisjointness", "Split", "TaskData", "TASKS", "classification_metrics"]


@dataclasses.dataclass(frozen=True)
class SetDisjointness(Split):
    """Set disjointness by order (JRT, Arora et al. 2024): two sets; which elements do they
    share? (The sets are disjoint when none.)

    Elements are ``[0, num_elements)``; an example draws ``small + large - shared`` distinct
    elements and makes a set of ``small`` and one of ``large`` that have ``shared`` of them in
    common, written ``set_1 SEP set_2`` in a random order within each set. Order ``0`` (small
    first) puts the small set first, order ``1`` (large first) the large one; training mixes
    both orders half and half. The test set is ``num_test`` examples written in both orders
    (the same sets, the same order within each set: only which set comes first changes), so
    that the two orders are a paired comparison. Elements of the large set are written as
    tokens ``2 + e``, those of the small set ``2 + num_elements + e`` (which set a token
    belongs to is in the token; *where* the set sits is the order). With ``same_tokens=True``
    both sets are written ``2 + e`` (as in JRT's own task: two sets from one vocabulary
    separated by ``SEP``): a shared element is then the same token twice, and a reader
    without positions that sees the whole sequence gives an element the same output in both
    orders. Token 0 is ``SEP``, 1 ``ASK`` (``ask="disjoint"`` only). ``prefix_len`` is the
    whole sequence.

    What is asked (``ask``): ``"second"``: every element of the second set, labelled 1 (also
    in the first set) or 0; a causal recurrent reader must hold the whole first set in its
    state to answer (JRT's argument), and the questions differ by order. ``"small"``: after
    both sets, ``small`` question tokens ``2 + 2 num_elements + e`` (the small set's elements
    again, in a fresh random order; ``2 + num_elements + e`` with ``same_tokens``), each
    labelled with its membership in the large set; only
    they are scored (the training split also labels the second set). The questions, and the
    tokens as a multiset, are the same in both orders, so a reader without positions that
    sees the whole sequence answers both alike; a causal one has seen both sets when it
    answers, and the order changes only what it must store on the way (small first: the small
    set, then a mark on each shared element of the large set as it passes; large first: the
    large set).

    ``"disjoint"`` (JRT's own question): after both sets, one ``ASK`` token (token 1) labelled
    1 if the sets share an element, 0 if they are disjoint; half the examples share
    ``shared`` elements, the other half none (needs ``small + large <= num_elements``). Only
    ``ASK`` is scored (the training split also labels the second set, as for ``"small"``). The
    question is one token, the same in both orders: a reader without positions that sees the
    whole sequence gives it the same answer in both; a causal one must have decided, while the
    second set passed, whether any of its elements was in the first, and so must have held the
    first set (4 elements small first, 16 large first).

    With ``same_tokens`` and ``ask="second"`` the order changes the questions but not their
    kind: a label is 1 exactly where the element's token occurs twice. The label-1 positions
    (the shared elements) are the same elements in both orders, and the label-0 ones (the
    second set's once-only elements: 16 or 4 of them) are exchangeable given the tokens, so a
    position-free bidirectional reader's expected order effect is 0 (only sampling noise
    remains), while a causal one still stores the first set (4 or 16 elements).

    ``label_first=True`` also labels, in the training split only, every element of the first
    set with its membership in the second (a causal reader cannot know it, a bidirectional
    one can). The metric is the balanced accuracy on the scored positions (the mean of the
    accuracies on 1-labels and on 0-labels, chance 0.5 whatever the order) overall and per
    order (``balanced_accuracy_by_order``), in every split.

    Worked example (num_elements 8: large-set tokens 2..9, small-set tokens 10..17, questions
    18..25; small 2, large 3, shared 1, order 0, sets {1, 4} and {4, 6, 0})::

        ask "second"   inputs   11 14  0  6 8 2
                       targets   .  .  .  1 0 0
        ask "small"    inputs   11 14  0  6 8 2  22 19
                       test      .  .  .  . . .   1  0     (training: also 1 0 0 at 6 8 2)
        ask "disjoint" inputs   11 14  0  6 8 2  1
                       test      .  .  .  . . .  1         (training: also 1 0 0 at 6 8 2)

    With ``same_tokens`` (set tokens 2..9, questions 10..17) the same example reads::

        ask "second"   inputs    3  6  0  6 8 2
                       targets   .  .  .  1 0 0
        ask "small"    inputs    3  6  0  6 8 2  14 11
    """

    num_elements: int = 32
    small: int = 4
    large: int = 16
    shared: int = 2
    label_first: bool = False
    ask: str = "second"  # "second", "small" or "disjoint" (see above)
    same_tokens: bool = False  # both sets written 2 + e (see above)

    group_key = "order"
    kind = "classification"
    SEP, ASK = 0, 1
    ASKS = ("second", "small", "disjoint")

    def __post_init__(self):
        _check_pos(self, "num_elements", "small", "large", "shared", "num_train", "num_test")
        if not self.shared < self.small < self.large:
            raise ValueError(f"need shared ({self.shared}) < small ({self.small}) < large "
                             f"({self.large})")
        if self.small + self.large - self.shared > self.num_elements:
            raise ValueError(f"small + large - shared ({self.small + self.large - self.shared})"
                             f" distinct elements must fit in num_elements "
                             f"({self.num_elements})")
        if self.ask not in self.ASKS:
            raise ValueError(f"SetDisjointness.ask must be one of {list(self.ASKS)}, got "
                             f"{self.ask!r}")
        if self.ask == "disjoint" and self.small + self.large > self.num_elements:
            raise ValueError(f"ask='disjoint' draws disjoint sets: small + large "
                             f"({self.small + self.large}) must fit in num_elements "
                             f"({self.num_elements})")

    @property
    def seq_len(self) -> int:
        asked = {"second": 0, "small": self.small, "disjoint": 1}[self.ask]
        return self.small + self.large + 1 + asked

    @property
    def vocab_size(self) -> int:
        alphabets = (1 if self.same_tokens else 2) + (self.ask == "small")
        return 2 + alphabets * self.num_elements

    def _sets(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        s, big, c, e = self.small, self.large, self.shared, self.num_elements
        if self.ask == "disjoint":  # half the examples share c elements, half none
            pick = torch.argsort(torch.rand(n, e, generator=g), dim=1)[:, :s + big]
            shares = torch.randint(0, 2, (n, 1), generator=g).bool()
            small = pick[:, :s]
            large = torch.where(shares, torch.cat([pick[:, :c], pick[:, s:s + big - c]], 1),
                                pick[:, s:])
        else:
            pick = torch.argsort(torch.rand(n, e, generator=g), dim=1)[:, :s + big - c]
            small, large = pick[:, :s], torch.cat([pick[:, :c], pick[:, s:]], dim=1)
        # shuffle within each set so that the shared elements sit anywhere
        small = small.gather(1, torch.argsort(torch.rand(n, s, generator=g), dim=1))
        large = large.gather(1, torch.argsort(torch.rand(n, big, generator=g), dim=1))
        asked = small.gather(1, torch.argsort(torch.rand(n, s, generator=g), dim=1))
        return {"small": small, "large": large, "asked": asked}

    def _write(self, sets: dict[str, torch.Tensor], order: torch.Tensor,
               train: bool) -> dict[str, torch.Tensor]:
        """Tokens and labels of ``sets`` in ``order: [n]`` (``train``: the training labels)."""
        small, large, asked, e = sets["small"], sets["large"], sets["asked"], self.num_elements
        n, s, big = small.shape[0], self.small, self.large

        member = lambda a, b: (a[:, :, None] == b[:, None, :]).any(-1).long()  # noqa: E731
        ignore = lambda k: torch.full((n, k), IGNORE, dtype=torch.int64)  # noqa: E731
        in_small, in_large = member(large, small), member(small, large)
        second = train or self.ask == "second"  # the second set is labelled
        sep = torch.full((n, 1), self.SEP, dtype=torch.int64)
        at = 2 if self.same_tokens else 2 + e  # the small set's first token
        sf = torch.cat([small + at, sep, large + 2], dim=1)
        lf = torch.cat([large + 2, sep, small + at], dim=1)
        sf_y = torch.cat([in_large if train and self.label_first else ignore(s), ignore(1),
                          in_small if second else ignore(big)], dim=1)
        lf_y = torch.cat([in_small if train and self.label_first else ignore(big), ignore(1),
                          in_large if second else ignore(s)], dim=1)
        first = order[:, None] == 0
        inputs, targets = torch.where(first, sf, lf), torch.where(first, sf_y, lf_y)
        if self.ask == "small":
            inputs = torch.cat([inputs, asked + self.vocab_size - e], dim=1)
            targets = torch.cat([targets, member(asked, large)], dim=1)
        elif self.ask == "disjoint":
            inputs = torch.cat([inputs, torch.full((n, 1), self.ASK, dtype=torch.int64)], 1)
            targets = torch.cat([targets, in_large.amax(1, keepdim=True)], dim=1)
        return {"inputs": inputs, "targets": targets,
                "prefix_len": torch.full((n,), self.seq_len, dtype=torch.int64),
                "order": order.clone()}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        order = torch.randint(0, 2, (self.num_train,), generator=g)
        train = self._write(self._sets(self.num_train, g), order, True)
        sets = self._sets(self.num_test, g)
        both = [self._write(sets, torch.full((self.num_test,), o), False) for o in (0, 1)]
        return TaskData(train, {k: torch.cat([p[k] for p in both]) for k in both[0]})

    def solve(self, inputs: list[int], *, train: bool = False) -> list[int]:
        """Brute force: decode both sets (and the questions) of one example and label what
        the split asks: each element of the second set with its membership in the first
        (``ask="second"``, or ``train``), each element of the first with its membership in
        the second (``train`` with ``label_first``), each question with its membership in
        the large set (``ask="small"``), ``ASK`` with whether the sets share an element
        (``ask="disjoint"``)."""
        sep, e, n_sets = inputs.index(self.SEP), self.num_elements, self.small + self.large + 1
        decode = lambda tok: (tok - 2) % e  # noqa: E731  (the element of any token)
        first = [decode(t) for t in inputs[:sep]]
        second = [decode(t) for t in inputs[sep + 1:n_sets]]
        large = set(first if sep == self.large else second)  # by its length
        head = ([int(x in second) for x in first] if train and self.label_first
                else [IGNORE] * sep)
        tail = ([int(x in first) for x in second] if train or self.ask == "second"
                else [IGNORE] * len(second))
        if self.ask == "disjoint":
            asked = [int(bool(set(first) & set(second)))]
        else:
            asked = [int(decode(t) in large) for t in inputs[n_sets:]]
        return head + [IGNORE] + tail + asked

    def scored(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, T]`` bool: the positions the metrics score (second set, or questions, or
        ``ASK``)."""
        t = torch.arange(self.seq_len)[None, :]
        if self.ask in ("small", "disjoint"):
            return (t >= self.small + self.large + 1).expand(data["order"].shape[0], -1)
        sep = torch.where(data["order"] == 0, self.small, self.large)
        return t > sep[:, None]

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        """Balanced accuracy (mean over the labels 0 and 1 of the accuracy on that label) on
        the scored positions (:meth:`scored`), overall (also ``score``) and per order."""
        tgt = data["targets"].masked_fill(~self.scored(data), IGNORE)
        hit = out.argmax(-1) == tgt
        grp = data["order"][:, None].expand_as(tgt)

        def balanced(sel: torch.Tensor) -> float:
            return statistics.fmean(float(hit[sel & (tgt == c)].float().mean()) for c in (0, 1))

        every = torch.ones_like(hit)
        res = {"balanced_accuracy": balanced(every), "accuracy":
               float(hit[tgt != IGNORE].float().mean())}
        res["score"] = res["balanced_accuracy"]
        res["balanced_accuracy_by_order"] = {
            int(o): balanced(grp == o) for o in data["order"].unique().tolist()}
        return res

    def io(self) -> dict:
        return {"vocab_size": self.vocab_size, "output_dim": 2}


@dataclasses.dataclass(frozen=True)
class FirstToken(Split):
    """Positional information: name the first content token (Haviv et al. 2022, "Transformer
    language models without positional encodings still learn positional information").

    ``BOS x_1 .. x_n ASK`` with ``x_t`` uniform in ``[2, vocab_size)`` (0 is ``BOS``, 1
    ``ASK``); every position from ``x_1`` on is labelled ``x_1`` for training (a dense signal);
    the metric is the accuracy at ``ASK`` (``targets`` of the test set are labelled there
    only). Nothing but order tells ``x_1`` apart: a model without positional encodings and
    with bidirectional attention is permutation-equivariant, so its answer at ``ASK`` can only
    depend on the multiset of tokens; the best such answer is the most frequent token, whose
    accuracy (``extra["chance"]``: the mean of ``max count / n`` on the test set) is the
    chance level. A causal model can count its visible keys (the mask gives position).

    Worked example (vocab 6, n 4)::

        inputs   0  3 5 3 2  1
        train    .  3 3 3 3  3
        test     .  . . . .  3      chance for this example: 2 / 4 (token 3 occurs twice)
    """

    vocab_size: int = 34
    length: int = 16

    kind = "classification"
    group_key = None
    BOS, ASK = 0, 1

    def __post_init__(self):
        _check_pos(self, "vocab_size", "length", "num_train", "num_test")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4 (BOS, ASK and 2 symbols), got "
                             f"{self.vocab_size}")

    @property
    def seq_len(self) -> int:
        return self.length + 2

    def _make(self, n: int, g: torch.Generator, dense: bool) -> dict[str, torch.Tensor]:
        x = torch.randint(2, self.vocab_size, (n, self.length), generator=g)
        inputs = torch.cat([torch.full((n, 1), self.BOS), x, torch.full((n, 1), self.ASK)], 1)
        targets = torch.full_like(inputs, IGNORE)
        if dense:
            targets[:, 1:] = x[:, :1]
        else:
            targets[:, -1] = x[:, 0]
        return {"inputs": inputs, "targets": targets,
                "prefix_len": torch.full((n,), self.seq_len, dtype=torch.int64)}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        train, test = self._make(self.num_train, g, True), self._make(self.num_test, g, False)
        counts = torch.zeros(self.num_test, self.vocab_size).scatter_add_(
            1, test["inputs"][:, 1:-1], torch.ones(self.num_test, self.length))
        chance = float((counts.max(1).values / self.length).mean())
        return TaskData(train, test, {"chance": chance})

    def solve(self, inputs: list[int]) -> list[int]:
        """Brute force: the test labels of one example (only ``ASK``, labelled ``x_1``)."""
        return [IGNORE] * (len(inputs) - 1) + [inputs[1]]

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        return classification_metrics(out, data)

    def io(self) -> dict:
        return {"vocab_size": self.vocab_size}


@dataclasses.dataclass(frozen=True)
class ICLRegression(Split):
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

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        """``out: [N, T, 1]`` -> query ``mse`` (``score = -mse``) and ``mse_by_examples``."""
        err = (out[..., 0] - data["targets"]) ** 2
        mask = data["mask"]
        by = {}
        for k in data["prefix_len"].unique().tolist():
            sel = data["prefix_len"] == k
            by[int(k)] = float(err[sel][mask[sel]].mean())
        mse = float(err[mask].mean())
        return {"mse": mse, "mse_by_examples": by, "score": -mse}

    def io(self) -> dict:
        return {"input_dim": self.dim + 2, "output_dim": 1}

    kind = "regression"
    group_key = "prefix_len"


@dataclasses.dataclass(frozen=True)
class Lookahead(Split):
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

    def __post_init__(self):
        _check_pos(self, "num_symbols", "seq_len", "num_train", "num_test")
        check_int("Lookahead.max_delay", self.max_delay, 0)

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

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        return classification_metrics(out, data, self.group_key)

    def io(self) -> dict:
        return {"vocab_size": self.vocab_size, "output_dim": self.num_symbols}

    kind = "classification"
    group_key = "delay"


for _name, _cls in (("mqar", MQAR), ("mqar_reassign", MQARReassign),
                   ("set_disjointness", SetDisjointness), ("icl_regression", ICLRegression),
                   ("first_token", FirstToken), ("lookahead", Lookahead)):
    register_task(_name, _cls)
