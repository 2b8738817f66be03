"""causalmix.lab.SetDisjointness: labels against a brute-force solver for both questions
(``ask``), the paired test orders, what the metrics score, and the order invariance F2's prefix
arm rests on."""

from __future__ import annotations

import pytest
import torch

from causalmix.lab import SetDisjointness
from causalmix.lab.experiments import Experiment
from causalmix.lab.tasks import IGNORE
from causalmix.nn import ModelConfig, SequenceModel


@pytest.mark.parametrize("ask", ["second", "small"])
@pytest.mark.parametrize("label_first", [False, True])
def test_set_disjointness_labels_match_brute_force(ask, label_first):
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80, num_test=20,
                        ask=ask, label_first=label_first)
    d = t.build(1)
    q = 3 if ask == "small" else 0
    assert t.seq_len == 3 + 6 + 1 + q and t.vocab_size == 2 + (3 if q else 2) * 12
    for part, train in ((d.train, True), (d.test, False)):
        x, y, order = part["inputs"], part["targets"], part["order"]
        assert x.shape == y.shape == (x.shape[0], t.seq_len) and x.max() < t.vocab_size
        for i in range(x.shape[0]):
            assert y[i].tolist() == t.solve(x[i].tolist(), train=train)  # every label
            n_first = 3 if order[i] == 0 else 6
            first = x[i, :n_first]
            assert bool((first >= 2 + 12).all()) == bool(order[i] == 0)  # small-set alphabet
            lab = y[i][y[i] != IGNORE]
            scored = y[i][t.scored(part)[i]]
            if ask == "second":
                assert torch.equal(scored, y[i][n_first + 1:])
            else:  # the questions: the small set again, 1 where shared with the large set
                small = (x[i, :3] if order[i] == 0 else x[i, 7:10]) - 2 - 12
                asked = x[i, 10:] - 2 - 24
                assert sorted(asked.tolist()) == sorted(small.tolist())
                assert int(scored.sum()) == 2 and len(scored) == 3
            # labelled regions (each holds the 2 shared elements): the questions; the second
            # set (ask "second", or training); the first set (training with label_first)
            regions = [q > 0, ask == "second" or train, train and label_first]
            assert len(lab) == (q if regions[0] else 0) + (9 - n_first if regions[1] else 0) + (
                n_first if regions[2] else 0)
            assert int(lab.sum()) == 2 * sum(regions)
    assert d.test["order"].tolist() == [0] * 20 + [1] * 20
    assert 0.3 < float(d.train["order"].float().mean()) < 0.7


@pytest.mark.parametrize("ask", ["second", "small"])
def test_set_disjointness_test_orders_are_paired(ask):
    """The test set writes the same sets in both orders: only which set comes first differs
    (the tokens of an example are the same multiset in both orders)."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=8, num_test=20,
                        ask=ask)
    x = t.build(2).test["inputs"]
    sf, lf = x[:20], x[20:]
    assert torch.equal(sf[:, :3], lf[:, 7:10]) and torch.equal(sf[:, 4:10], lf[:, :6])
    assert torch.equal(sf[:, 10:], lf[:, 10:])  # the questions (none for "second")
    assert torch.equal(sf.sort(1).values, lf.sort(1).values)


def test_set_disjointness_bidirectional_reader_without_positions_is_order_invariant():
    """What F2's prefix arm relies on: a linear model (no positional encoding) reading the
    whole sequence bidirectionally gives every token the same output in both orders (so with
    ask "small" it answers the questions alike; a causal one does not)."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=8, num_test=16,
                        ask="small")
    test = t.build(0).test
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-linear", **t.io(), d_model=16, feature_dim=2, decay=None,
                                impl="reference")
    exp = Experiment(finding="F2", arm="prefix", task=t, model=cfg, scheme="prefix")
    with torch.no_grad():
        out = exp.forward(SequenceModel(cfg), test)
    asked = slice(10, 13)
    same_token = [7, 8, 9, 6, 0, 1, 2, 3, 4, 5, 10, 11, 12]  # large first, in small-first order
    assert torch.equal(test["inputs"][16:, same_token], test["inputs"][:16])
    torch.testing.assert_close(out[16:, same_token], out[:16], atol=1e-5, rtol=0)
    causal = Experiment(finding="F2", arm="causal", task=t, model=cfg, scheme="causal")
    with torch.no_grad():
        c = causal.forward(SequenceModel(cfg), test)
    assert not torch.allclose(c[:16, asked], c[16:, asked], atol=1e-3)


@pytest.mark.parametrize("ask", ["second", "small"])
def test_set_disjointness_same_tokens_write_both_sets_alike(ask):
    """``same_tokens``: both sets from one alphabet ``[2, 2 + N)`` (a shared element is one
    token twice), the questions after it; every label still matches the brute-force solver."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80, num_test=20,
                        ask=ask, label_first=True, same_tokens=True)
    q = 3 if ask == "small" else 0
    assert t.vocab_size == 2 + (2 if q else 1) * 12
    d = t.build(1)
    plain = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80,
                            num_test=20, ask=ask, label_first=True).build(1)
    for part, ref, train in ((d.train, plain.train, True), (d.test, plain.test, False)):
        x, y = part["inputs"], part["targets"]
        assert torch.equal(y, ref["targets"]) and torch.equal(part["order"], ref["order"])
        sets = x[:, :10][x[:, :10] != t.SEP].view(-1, 9)  # both sets, without SEP
        assert bool(((sets >= 2) & (sets < 2 + 12)).all())
        assert bool((x[:, 10:] >= 2 + 12).all()) and x.max() < t.vocab_size  # the questions
        for i in range(x.shape[0]):
            assert y[i].tolist() == t.solve(x[i].tolist(), train=train)
            first, second = (x[i, :3], x[i, 4:10]) if part["order"][i] == 0 else (
                x[i, :6], x[i, 7:10])
            twice = torch.isin(second, first).long()  # label 1 where the token occurs twice
            if train or ask == "second":
                assert torch.equal(y[i, 10 - len(second):10], twice)
            assert int(twice.sum()) == 2


def test_set_disjointness_same_tokens_prefix_reader_answers_shared_elements_alike():
    """What F2's prefix arm rests on with ``same_tokens``: a linear model without positional
    encoding reading the whole sequence gives an element the same output in both orders, so
    its predictions at the shared elements (the label-1 questions, the same elements in both
    orders) are identical; a causal one's are not."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=8, num_test=16,
                        same_tokens=True)
    test = t.build(0).test
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-linear", **t.io(), d_model=16, feature_dim=2, decay=None,
                                impl="reference")

    def at_shared(scheme):
        """``[2, 16, 2, 2]``: per order and example, the outputs at the shared elements of
        the second set, sorted by token."""
        exp = Experiment(finding="F2", arm=scheme, task=t, model=cfg, scheme=scheme)
        torch.manual_seed(0)
        with torch.no_grad():
            out = exp.forward(SequenceModel(cfg), test)
        sel = t.scored(test) & (test["targets"] == 1)
        tok = test["inputs"].masked_fill(~sel, 10 ** 6).sort(1)
        return out.gather(1, tok.indices[:, :2, None].expand(-1, -1, 2)).view(2, 16, 2, 2), \
            tok.values[:, :2].view(2, 16, 2)

    pre, tokens = at_shared("prefix")
    assert torch.equal(tokens[0], tokens[1])  # the same shared elements in both orders
    torch.testing.assert_close(pre[0], pre[1], atol=1e-5, rtol=0)
    cau, _ = at_shared("causal")
    assert not torch.allclose(cau[0], cau[1], atol=1e-3)


def test_set_disjointness_label_first_labels_both_sets_in_training_only():
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80, num_test=20,
                        label_first=True)
    d = t.build(1)
    plain = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80,
                            num_test=20).build(1)
    assert torch.equal(d.train["inputs"], plain.train["inputs"])  # the same examples
    assert torch.equal(d.test["targets"], plain.test["targets"])  # the test is unchanged
    for i in range(d.train["inputs"].shape[0]):
        x, y = d.train["inputs"][i].tolist(), d.train["targets"][i].tolist()
        assert y == t.solve(x, train=True)
        assert y.count(IGNORE) == 1 and sum(v == 1 for v in y) == 4  # SEP; shared in both sets
    # the metrics score the second set only: a model wrong on every first-set label is perfect
    out = torch.nn.functional.one_hot(d.train["targets"].clamp(min=0), 2).float()
    sep = torch.where(d.train["order"] == 0, 3, 6)
    first = torch.arange(t.seq_len)[None, :] < sep[:, None]
    out[first] = out[first].flip(-1)
    m = t.metrics(out, d.train)
    assert m["balanced_accuracy"] == 1.0 and m["balanced_accuracy_by_order"] == {0: 1.0, 1: 1.0}


def test_set_disjointness_small_questions_score_the_questions_only():
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=80, num_test=20,
                        ask="small", label_first=True)
    d = t.build(3)
    out = torch.nn.functional.one_hot(d.train["targets"].clamp(min=0), 2).float()
    out[:, :10] = out[:, :10].flip(-1)  # wrong on every set element: still perfect
    m = t.metrics(out, d.train)
    assert m["balanced_accuracy"] == 1.0 and m["balanced_accuracy_by_order"] == {0: 1.0, 1: 1.0}
    out[:, 10:] = out[:, 10:].flip(-1)
    assert t.metrics(out, d.train)["balanced_accuracy"] == 0.0
    with pytest.raises(ValueError, match="ask"):
        SetDisjointness(ask="first")


def test_set_disjointness_balanced_accuracy():
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=1, num_train=4, num_test=8)
    data = t.build(0).test
    tgt = data["targets"]
    always_no = torch.zeros(*tgt.shape, 2)
    always_no[..., 0] = 1
    m = t.metrics(always_no, data)
    assert m["balanced_accuracy"] == 0.5 and m["accuracy"] > 0.5  # chance, whatever the order
    assert m["balanced_accuracy_by_order"] == {0: 0.5, 1: 0.5}
    perfect = torch.nn.functional.one_hot(tgt.clamp(min=0), 2).float()
    assert t.metrics(perfect, data)["score"] == 1.0


@pytest.mark.parametrize("label_first", [False, True])
def test_set_disjointness_disjoint_question_matches_brute_force(label_first):
    """``ask="disjoint"``: one ``ASK`` token after both sets, 1 when they share an element;
    half the examples share ``shared`` elements, half none; the test scores ``ASK`` only,
    training also labels the second set (and the first with ``label_first``)."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=200,
                        num_test=40, ask="disjoint", label_first=label_first)
    d = t.build(4)
    assert t.seq_len == 3 + 6 + 2 and t.vocab_size == 2 + 2 * 12
    for part, train in ((d.train, True), (d.test, False)):
        x, y, order = part["inputs"], part["targets"], part["order"]
        assert x.shape == y.shape == (x.shape[0], t.seq_len) and x.max() < t.vocab_size
        assert bool((x[:, -1] == t.ASK).all()) and not bool((x[:, :-1] == t.ASK).any())
        assert torch.equal(t.scored(part), (torch.arange(t.seq_len) == t.seq_len - 1)
                           .expand_as(x))
        for i in range(x.shape[0]):
            assert y[i].tolist() == t.solve(x[i].tolist(), train=train)
            n_first = 3 if order[i] == 0 else 6
            a = set(((x[i, :n_first] - 2) % 12).tolist())
            b = set(((x[i, n_first + 1:-1] - 2) % 12).tolist())
            assert len(a) == n_first and len(b) == 9 - n_first
            assert len(a & b) in (0, 2) and int(y[i, -1]) == int(bool(a & b))
            lab = (y[i, :-1] != IGNORE)
            expect = (9 - n_first if train else 0) + (n_first if train and label_first else 0)
            assert int(lab.sum()) == expect
        shares = float(y[:, -1].float().mean())
        assert 0.3 < shares < 0.7
    sf, lf = d.test["inputs"][:40], d.test["inputs"][40:]  # paired: the same sets
    assert torch.equal(sf[:, :3], lf[:, 7:10]) and torch.equal(sf[:, 4:10], lf[:, :6])
    assert torch.equal(d.test["targets"][:40, -1], d.test["targets"][40:, -1])
    with pytest.raises(ValueError, match="num_elements"):
        SetDisjointness(num_elements=8, small=3, large=6, shared=1, ask="disjoint")
    one = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=40,
                          num_test=10, ask="disjoint", label_first=label_first,
                          same_tokens=True)  # one alphabet: every label still brute-forced
    d1 = one.build(5)
    assert one.vocab_size == 2 + 12 and int(d1.train["inputs"].max()) < one.vocab_size
    for part, train in ((d1.train, True), (d1.test, False)):
        for i in range(part["inputs"].shape[0]):
            assert part["targets"][i].tolist() == one.solve(part["inputs"][i].tolist(),
                                                            train=train)


def test_set_disjointness_disjoint_question_prefix_reader_answers_alike():
    """The question is one token, the same in both orders: a bidirectional reader without
    positions gives it the same output in both orders (F2's prefix arm's difference is 0 by
    construction); a causal reader does not; a perfect answer at ASK scores 1 whatever the
    set positions hold."""
    t = SetDisjointness(num_elements=12, small=3, large=6, shared=2, num_train=8, num_test=16,
                        ask="disjoint")
    test = t.build(0).test
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-linear", **t.io(), d_model=16, feature_dim=2, decay=None,
                                impl="reference")
    model = SequenceModel(cfg)
    with torch.no_grad():
        pre = Experiment(finding="F2", arm="p", task=t, model=cfg, scheme="prefix").forward(
            model, test)
        cau = Experiment(finding="F2", arm="c", task=t, model=cfg, scheme="causal").forward(
            model, test)
    torch.testing.assert_close(pre[16:, -1], pre[:16, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(cau[16:, -1], cau[:16, -1], atol=1e-3)
    out = torch.nn.functional.one_hot(test["targets"].clamp(min=0), 2).float()
    out[:, :-1] = out[:, :-1].flip(-1)
    m = t.metrics(out, test)
    assert m["balanced_accuracy"] == 1.0 and m["balanced_accuracy_by_order"] == {0: 1.0, 1: 1.0}
    out[:, -1] = out[:, -1].flip(-1)
    assert t.metrics(out, test)["balanced_accuracy"] == 0.0
