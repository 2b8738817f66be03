"""The recall tasks of the lab (re-exported by :mod:`causalmix.lab.tasks`): multi-query
associative recall (:class:`MQAR`, zoology) and its variant with keys written again
(:class:`MQARReassign`, DeltaNet's case for the delta rule)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from causalmix.lab.protocol import IGNORE, TaskData
from causalmix.lab.task_base import Split, _check_pos, _sizes, classification_metrics

__all__ = ["MQAR", "MQARReassign"]


@dataclasses.dataclass(frozen=True)
class MQAR(Split):
    """Multi-query associative recall (zoology's MQAR) over several numbers of key-value pairs,
    with an optional repeated prompt (JRT-Prompt); one input vector per key-value pair.

    An example with ``p`` pairs (``p`` drawn uniformly from ``num_kv_pairs`` for training; one
    test set of ``num_test`` examples per ``p``) is ``P - p`` empty slots (``P =
    max(num_kv_pairs)``, so that every example has the same length and the questions sit at
    the same place), ``p`` context slots, then ``query_len`` question slots in which
    ``num_queries`` of the context keys are asked (slots drawn uniformly, the others empty).
    Keys are distinct within an example, drawn from ``num_keys`` symbols; values from
    ``num_values``. A context slot is the feature vector ``[one_hot(key), one_hot(value), 0]``
    and a question ``[0, 0, one_hot(key)]`` (questions name keys in their own block of
    ``num_keys`` features, so that a context slot reading the questions does not match
    itself); an empty slot is all zeros. One input vector per pair lets one attention layer
    recall (zoology writes key and value as two tokens, which makes a model first learn to pair
    them: more steps than a CPU budget allows; the question asked here, how many pairs a
    fixed-size state holds, is the same). The prompt is repeated ``num_passes`` times
    (JRT-Prompt: read the documents *and the questions* twice, so that a fixed-state mixer knows
    on its second read which pairs it must store); labels (the asked key's value) sit only on
    the question slots of the last pass. ``prefix_len`` is the whole sequence (answers are
    never inputs, so a bidirectional reader cannot peek at one).
    The test examples carry their ``pairs``; the metric is accuracy per number of pairs.

    Worked example (num_kv_pairs (2, 3), this example has 2 pairs (key 5 -> value 2, key 1
    -> value 0); 1 query, query_len 2, one pass)::

        slot          0    1    2    3    4
        key           -    5    1    -    -
        value         -    2    0    -    -
        question key  -    -    -    1    -
        targets       .    .    .    0    .
    """

    num_keys: int = 32
    num_values: int = 32
    num_kv_pairs: tuple[int, ...] = (4, 8, 16, 32)
    num_queries: int = 4
    query_len: int = 4
    num_passes: int = 1

    group_key = "pairs"
    kind = "classification"
    rewrites = False  # keys distinct within an example (MQARReassign: written again)

    def __post_init__(self):
        _check_pos(self, "num_keys", "num_values", "num_queries", "query_len", "num_passes",
                   "num_train", "num_test")
        sizes = _sizes(self, "num_kv_pairs")
        if max(sizes) > self.num_keys and not self.rewrites:
            raise ValueError(f"num_kv_pairs ({max(sizes)}) must be <= num_keys "
                             f"({self.num_keys}): keys are distinct within an example")
        if self.num_queries > min(min(sizes), self.query_len, self.num_keys):
            raise ValueError(f"num_queries ({self.num_queries}) must be <= every num_kv_pairs "
                             f"({min(sizes)}), query_len ({self.query_len}) and num_keys "
                             f"({self.num_keys})")

    @property
    def seq_len(self) -> int:
        return self.num_passes * (max(self.num_kv_pairs) + self.query_len)

    @property
    def num_features(self) -> int:
        return 2 * self.num_keys + self.num_values

    def _draw(self, pairs: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Keys, values, used slots (left-aligned empties) ``[n, P]``; asked slots ``[n, q]``."""
        n, big = pairs.shape[0], max(self.num_kv_pairs)
        keys = torch.argsort(torch.rand(n, self.num_keys, generator=g), dim=1)[:, :big]
        vals = torch.randint(0, self.num_values, (n, big), generator=g)
        used = torch.arange(big)[None, :] >= (big - pairs)[:, None]
        score = torch.rand(n, big, generator=g).masked_fill(~used, 2.0)
        return keys, vals, used, torch.argsort(score, dim=1)[:, :self.num_queries]

    def _make(self, pairs: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        n, big, q, ql = pairs.shape[0], max(self.num_kv_pairs), self.num_queries, self.query_len
        nk, nv = self.num_keys, self.num_values
        keys, vals, used, asked = self._draw(pairs, g)
        slots = torch.argsort(torch.rand(n, ql, generator=g), dim=1)[:, :q]
        ctx = torch.cat([F.one_hot(keys, nk), F.one_hot(vals, nv),
                         torch.zeros(n, big, nk, dtype=torch.int64)], dim=2) * used[..., None]
        question = torch.zeros(n, ql, self.num_features, dtype=torch.int64)
        question[torch.arange(n)[:, None], slots, nk + nv + keys.gather(1, asked)] = 1
        answer = torch.full((n, ql), IGNORE, dtype=torch.int64)
        answer.scatter_(1, slots, vals.gather(1, asked))
        inputs = torch.cat([ctx, question], dim=1).repeat(1, self.num_passes, 1).float()
        targets = torch.full(inputs.shape[:2], IGNORE, dtype=torch.int64)
        targets[:, -ql:] = answer
        prefix = torch.full((n,), inputs.shape[1], dtype=torch.int64)
        return {"inputs": inputs, "targets": targets, "prefix_len": prefix, "pairs": pairs.clone()}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        sizes = torch.tensor(self.num_kv_pairs)
        train = sizes[torch.randint(0, len(sizes), (self.num_train,), generator=g)]
        test = sizes.repeat_interleave(self.num_test)
        return TaskData(self._make(train, g), self._make(test, g))

    def solve(self, inputs: list[list[float]]) -> list[int]:
        """Brute force: the labels of one example (``inputs``: its ``[T][features]`` lists):
        ``IGNORE`` except on the asked question slots of the last pass, where the value that
        the context paired with the asked key (its latest, for :class:`MQARReassign`)."""
        nk, nv = self.num_keys, self.num_values
        table, labels = {}, []
        one = len(inputs) // self.num_passes
        for t, slot in enumerate(inputs):
            hot = [i for i, x in enumerate(slot) if x == 1]
            if not hot:
                labels.append(IGNORE)
            elif hot[0] >= nk + nv:  # a question: its key in the last block
                labels.append(table[hot[0] - nk - nv] if t >= len(inputs) - one else IGNORE)
            else:
                table[hot[0]] = hot[1] - nk
                labels.append(IGNORE)
        return labels

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        return classification_metrics(out, data, self.group_key)

    def io(self) -> dict:
        return {"input_dim": self.num_features, "output_dim": self.num_values}


@dataclasses.dataclass(frozen=True)
class MQARReassign(MQAR):
    """MQAR with keys written again (DeltaNet's case for the delta rule): a question asks
    its key's *latest* value (:meth:`MQAR.solve` lets later writes replace earlier ones). As
    :class:`MQAR`, except that an example with ``p`` pairs writes ``min(p, num_keys)`` distinct
    keys once each and, for the other pairs, re-writes keys drawn uniformly from those, each
    write with a value drawn afresh, in random order (``num_kv_pairs`` may exceed
    ``num_keys``). E.g. num_keys 2, 3 pairs, key 1 re-written (1 -> 2, 0 -> 0, 1 -> 3)::

        slot          0    1    2    3
        key           1    0    1    -
        value         2    0    3    -
        question key  -    -    -    1
        targets       .    .    .    3
    """

    rewrites = True

    def _draw(self, pairs: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        n, big, nk = pairs.shape[0], max(self.num_kv_pairs), self.num_keys
        rank = torch.arange(big)[None, :] - (big - pairs)[:, None]  # 0.. on the used slots
        used, m = rank >= 0, pairs.clamp(max=nk)[:, None]  # m: the distinct keys written
        distinct = torch.argsort(torch.rand(n, nk, generator=g), dim=1)
        again = (torch.rand(n, big, generator=g) * m).long()
        which = torch.where(rank < m, rank, again).clamp(min=0)
        order = torch.argsort(torch.rand(n, big, generator=g).masked_fill(~used, -1.0), dim=1)
        keys = distinct.gather(1, which.gather(1, order))
        vals = torch.randint(0, self.num_values, (n, big), generator=g)
        score = torch.rand(n, nk, generator=g).masked_fill(torch.arange(nk)[None, :] >= m, 2.0)
        want = distinct.gather(1, torch.argsort(score, dim=1)[:, :self.num_queries])
        hit = (keys[:, None, :] == want[:, :, None]) & used[:, None, :]
        last = torch.where(hit, torch.arange(big), -1).amax(-1)  # the latest write
        return keys, vals, used, last
