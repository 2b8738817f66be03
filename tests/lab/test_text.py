"""causalmix.lab.text: the stdlib docstring extractor and its split are deterministic, labels
are right on hand-made sentences and agree with a character-by-character brute force, the
task's tensors and metrics."""

from __future__ import annotations

import ast
import sysconfig
import textwrap

import pytest
import torch

from causalmix.lab.protocol import IGNORE, check_task
from causalmix.lab.text import (
    CAPS,
    PUNCTUATION,
    SKIP_DIRS,
    PunctuationRestoration,
    TextWord,
    extract_modules,
    is_test_module,
    label_words,
    prose_words,
    split_token,
    stdlib_modules,
    text_metrics,
)

NONE, COMMA, PERIOD, COLON = range(4)


def test_labels_of_hand_made_sentences():
    words = label_words("Return the path, or None. See os.path: it's thread-safe; (really)!")
    assert words == [
        TextWord("return", NONE, 1), TextWord("the", NONE, 0), TextWord("path", COMMA, 0),
        TextWord("or", NONE, 0), TextWord("none", PERIOD, 1), TextWord("see", NONE, 1),
        TextWord("os.path", COLON, 0), TextWord("it's", NONE, 0),
        TextWord("thread-safe", COLON, 0), TextWord("really", PERIOD, 0)]
    assert split_token("``None``,") == TextWord("none", COMMA, 1)
    assert split_token("Why?") == TextWord("why", PERIOD, 1)
    assert split_token("3.11") == TextWord("3.11", NONE, 0)
    for not_a_word in ("x=1", "->", ":func:`f`", "f()", "--", "a/b", "*", "'"):
        assert split_token(not_a_word) is None, not_a_word
    assert label_words("Set x=1 here.") is None  # one non-word drops the paragraph


def test_prose_paragraphs_only():
    doc = textwrap.dedent("""\
        Summary line of the function, short.

        This paragraph is plain prose and it is kept, all of it.

            indented code is dropped entirely from the prose
        >>> also_dropped(1)
        Usage: call f(x) with x = 1 when it is needed here.

        Too short.

        Another kept paragraph that runs
        over two lines of text.""")
    got = " ".join(w.word for w in prose_words(doc))
    assert got == ("summary line of the function short this paragraph is plain prose and it "
                   "is kept all of it another kept paragraph that runs over two lines of text")


@pytest.mark.parametrize("text", [
    "Return the path, or None.",
    "If skipkeys is true, then dict keys that are not basic types (str, int) are skipped.",
    "Note: os.path.join is NOT called; it's *always* ``None``... Really?! Yes.",
])
def test_labels_match_brute_force(text):
    task = PunctuationRestoration()
    words = label_words(text)
    assert [w.punct * len(CAPS) + w.cap for w in words] == task.solve(text)


def test_labels_of_the_extracted_text_match_brute_force():
    task = PunctuationRestoration()
    mods = stdlib_modules()
    name = sorted(mods)[len(mods) // 2]
    words = mods[name][:400]
    # rebuild each word as a token of text, with its punctuation and capital, and re-read it
    marks = {NONE: "", COMMA: ",", PERIOD: ".", COLON: ":"}
    text = " ".join((w.word[0].upper() + w.word[1:] if w.cap else w.word) + marks[w.punct]
                    for w in words if w.word[0].isalpha() and not w.word[0].isupper())
    want = [w.punct * len(CAPS) + w.cap for w in words
            if w.word[0].isalpha() and not w.word[0].isupper()]
    assert task.solve(text) == want
    assert all(w.word == w.word.lower() for ws in mods.values() for w in ws)


def test_extractor_is_deterministic_and_reads_a_root(tmp_path):
    lib = tmp_path / "Lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    (lib / "mod.py").write_text('"""A module, with some prose here."""\n\ndef f():\n'
                                '    """Return None, always and for ever."""\n')
    (lib / "pkg" / "__init__.py").write_text('"""The package docstring is prose too."""\n')
    (lib / "test" / "test_mod.py").write_text('"""Tests are left out of the text."""\n')
    (lib / "bad.py").write_text("def (:\n")
    mods = stdlib_modules(str(lib))
    assert list(mods) == ["mod", "pkg"]
    assert [w.word for w in mods["mod"]] == "a module with some prose here return none always " \
                                            "and for ever".split()
    assert extract_modules(lib) == mods and stdlib_modules(str(lib)) is mods  # cached


def _walk_docstrings(source: str) -> list[str]:
    """Every def's docstring by :func:`ast.walk` over every node (the plain reference)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, kinds)),
                   key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


NESTED = '''"""The module docstring, with enough words in it."""
import sys
if sys.platform:
    def a():
        """In an if block, with enough words here."""
else:
    class B:
        """In an else block, with enough words here."""
        async def c(self):
            """An async method, with enough words here."""
try:
    def d():
        """In a try block, with enough words here."""
        def e():
            """Nested in a function, with enough words."""
except ImportError:
    def f():
        """In an except handler, with enough words."""
finally:
    def g():
        """In a finally block, with enough words here."""
for _ in ():
    def h():
        """In a for loop, with enough words here."""
with open(__file__):
    def i():
        """In a with block, with enough words here."""
match sys.platform:
    case "x":
        def j():
            """In a match case, with enough words here."""
x = [lambda: None for _ in ()]
'''


def test_extractor_finds_every_def_that_ast_walk_finds(tmp_path):
    (tmp_path / "nested.py").write_text(NESTED)
    want = [w for d in _walk_docstrings(NESTED) for w in prose_words(d)]
    assert len(_walk_docstrings(NESTED)) == 11
    assert extract_modules(tmp_path) == {"nested": want}
    for skip in SKIP_DIRS:  # no folder named in SKIP_DIRS is read, at any depth
        (tmp_path / "pkg" / skip).mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / skip / "m.py").write_text(NESTED)
    assert extract_modules(tmp_path) == {"nested": want}


def test_stdlib_extraction_is_deterministic():
    real = stdlib_modules()  # this interpreter's Lib/
    assert len(real) > 100 and sum(len(w) for w in real.values()) > 50_000
    assert extract_modules(sysconfig.get_paths()["stdlib"]) == real


def test_split_is_by_module_name_and_stable():
    # a function of the name alone (fixed values: the MD5 digest of the name)
    assert [is_test_module(n, 20) for n in ("json", "os", "asyncio.tasks", "email")] == \
        [is_test_module(n, 20) for n in ("json", "os", "asyncio.tasks", "email")]
    names = [f"module{i}" for i in range(2000)]
    frac = sum(is_test_module(n, 20) for n in names) / len(names)
    assert 0.17 < frac < 0.23
    assert all(is_test_module(n, 30) for n in names if is_test_module(n, 20))
    task = PunctuationRestoration()
    train, test = task.split()
    assert not set(train) & set(test) and set(train) | set(test) == set(stdlib_modules())
    assert all(is_test_module(m, 20) for m in test)


def test_task_tensors_are_deterministic_and_consistent():
    task = PunctuationRestoration(seq_len=32, vocab_size=512, max_train=200, max_test=40)
    check_task(task)
    a, b, c = task.build(0), task.build(0), task.build(1)
    for split in ("train", "test"):
        for k in a.train:
            assert torch.equal(getattr(a, split)[k], getattr(b, split)[k])
    assert torch.equal(a.test["inputs"], c.test["inputs"])  # the test split ignores the seed
    assert not torch.equal(a.train["inputs"], c.train["inputs"])  # the order does not
    assert a.train["inputs"].shape == (200, 32) and a.test["inputs"].shape == (40, 32)
    x, y = a.test["inputs"], a.test["targets"]
    assert x.max() < 512 and y.max() < len(PUNCTUATION) * len(CAPS)
    assert torch.equal(x == 0, y == IGNORE)  # padding is unlabelled, nothing else
    # the test windows are the test modules' words in order
    _, test = task.split()
    first = next(iter(test.values()))[:32]
    assert y[0, :len(first)].tolist() == [w.punct * 2 + w.cap for w in first]
    ex = a.extra
    assert ex["text_modules"]["test"] == len(test) and ex["text_windows"]["test"] == 40
    with pytest.raises(ValueError, match="test_percent"):
        PunctuationRestoration(test_percent=100)
    with pytest.raises(ValueError, match="seq_len"):
        PunctuationRestoration(seq_len=0)


def test_text_metrics():
    # 6 words: gold (punct, cap); predictions with one wrong comma and one wrong capital
    gold = torch.tensor([[0 * 2 + 1, 0, 1 * 2, 0, 2 * 2 + 1, IGNORE]])
    pred = torch.tensor([[0 * 2 + 1, 1 * 2, 1 * 2, 0, 2 * 2, 0]])
    out = torch.nn.functional.one_hot(pred, 8).float()
    m = text_metrics(out, {"targets": gold})
    assert m["accuracy"] == pytest.approx(3 / 5) and m["score"] == m["accuracy"]
    assert m["punct_accuracy"] == pytest.approx(4 / 5)
    assert m["cap_accuracy"] == pytest.approx(4 / 5)
    assert m["f1"]["comma"] == pytest.approx(2 * 1 / (2 + 1))
    assert m["f1"]["period"] == 1.0 and m["f1"]["colon"] == 1.0  # no colon: nothing to miss
    assert m["f1"]["capitalised"] == pytest.approx(2 * 1 / (1 + 2))
    assert m["f1"]["none"] == pytest.approx(2 * 2 / (2 + 3))
