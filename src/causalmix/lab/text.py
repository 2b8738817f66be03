"""Real text for the lab: English prose from the docstrings of the running interpreter's own
standard library, and the punctuation-and-capitalisation restoration task on it (finding F8).

No download: :func:`stdlib_modules` walks ``sysconfig.get_paths()["stdlib"]`` (the ``Lib/``
of the interpreter that runs the lab), parses every ``.py`` file with :mod:`ast` (test suites
and ``site-packages`` left out) and takes the module, class and function docstrings
(:func:`ast.get_docstring`, which dedents them). :func:`prose_words` keeps the prose of a
docstring: its blank-line-separated paragraphs of at least :data:`MIN_WORDS` tokens, written
at the left margin (an indented line is code, a list or a table), without doctest prompts, in
which every whitespace token is a word (:func:`split_token`: letters, digits and ``_``,
joined by ``-``, ``'`` or ``.`` as in ``thread-safe``, ``module's``, ``os.path``), possibly
wrapped in brackets, quotes, backticks or ``*`` and followed by punctuation. A paragraph with
any other token (``x = 1``, ``->``, ``:func:``) is dropped whole, so that no label is made up.

Each word gets a label: the punctuation that follows it (:data:`PUNCTUATION`: none, comma,
period for ``.``, ``!``, ``?``, colon for ``:`` and ``;``) and whether its first character is
upper case. The model reads the word lower-cased with its wrapping and punctuation removed.
Worked example (:func:`label_words`)::

    text    Return the path, or None.
    input   return  the   path   or    none
    punct   none    none  comma  none  period
    cap     yes     no    no     no    yes

The split is by module, fixed by the module's name alone (:func:`is_test_module`: the first
8 bytes of the name's MD5 digest mod 100 below ``test_percent``), so the same module is in
the same split on every run and machine. :class:`PunctuationRestoration` turns each split's
words (module by module, in file order) into windows of ``seq_len`` words (a window never
spans two modules; the last one of a module is padded), with the vocabulary of the training
split's most frequent words.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import NamedTuple

import torch

from causalmix.checks import check_int
from causalmix.lab.protocol import IGNORE, TaskData, register_task

__all__ = ["CAPS", "MIN_WORDS", "PUNCTUATION", "PunctuationRestoration", "TextWord",
           "extract_modules", "is_test_module", "label_words", "prose_words", "split_token",
           "stdlib_modules", "text_metrics"]

#: The punctuation classes of a word (what follows it): none, comma, period (``.!?``), colon
#: (``:;``).
PUNCTUATION = ("none", "comma", "period", "colon")
_PUNCT_OF = {",": 1, ".": 2, "!": 2, "?": 2, ":": 3, ";": 3}
#: The capitalisation classes: the word's first character is lower case / upper case.
CAPS = ("lower", "capitalised")
#: The fewest tokens a paragraph of prose has.
MIN_WORDS = 6
#: Folders of ``Lib/`` that are not library modules' prose (test suites, installed packages).
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})

_CORE = re.compile(r"[A-Za-z0-9_]+(?:[-'.][A-Za-z0-9_]+)*")
_OPEN = "([{\"'`*"
_CLOSE = ")]}\"'`*"
_PAD, _UNK = 0, 1


class TextWord(NamedTuple):
    """One word of prose: ``word`` (lower-cased, what the model reads), ``punct`` (an index of
    :data:`PUNCTUATION`), ``cap`` (1 if capitalised)."""

    word: str
    punct: int
    cap: int


def split_token(token: str) -> TextWord | None:
    """A whitespace token as a :class:`TextWord`, or ``None`` if it is not a word.

    >>> split_token("(None).")
    TextWord(word='none', punct=2, cap=1)
    >>> split_token("os.path,")
    TextWord(word='os.path', punct=1, cap=0)
    >>> split_token("x=1") is None
    True
    """
    lead = len(token) - len(token.lstrip(_OPEN))
    m = _CORE.match(token, lead)
    if m is None:
        return None
    tail = token[m.end():]
    if tail.strip(_CLOSE + "".join(_PUNCT_OF)):
        return None
    marks = [_PUNCT_OF[c] for c in tail if c in _PUNCT_OF]
    core = m.group()
    return TextWord(core.lower(), marks[0] if marks else 0, int(core[0].isupper()))


def label_words(paragraph: str) -> list[TextWord] | None:
    """The words of one paragraph of prose with their labels, or ``None`` if some token is
    not a word (see the module docstring).

    >>> [tuple(w) for w in label_words("Return the path, or None.")]
    [('return', 0, 1), ('the', 0, 0), ('path', 1, 0), ('or', 0, 0), ('none', 2, 1)]
    """
    words = []
    for token in paragraph.split():
        w = split_token(token)
        if w is None:
            return None
        words.append(w)
    return words


def prose_words(docstring: str) -> list[TextWord]:
    """The labelled words of the prose paragraphs of one (dedented) docstring, in order."""
    out: list[TextWord] = []
    for para in re.split(r"\n\s*\n", docstring):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln[0].isspace() or ln.lstrip().startswith(">>>") for ln in lines):
            continue
        words = label_words(" ".join(lines))
        if words is not None and len(words) >= MIN_WORDS:
            out.extend(words)
    return out


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


#: The statements that hold statement lists (a def sits in one of these fields, or in an
#: ``except`` handler's or ``case``'s body); expressions never hold a def.
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")
_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _defs(node: ast.AST):
    """``node`` and every def below it, visiting statements only (the same nodes as
    filtering :func:`ast.walk`, without visiting every expression)."""
    if isinstance(node, _DEFS):
        yield node
    for field in _BLOCKS:
        for child in getattr(node, field, ()):
            yield from _defs(child)


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of a grammar test, say
        return []
    nodes = sorted(_defs(tree), key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _py_files(base: Path) -> list[Path]:
    """The ``.py`` files under ``base``, sorted, not descending into :data:`SKIP_DIRS`."""
    found = []
    for top, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found.extend(Path(top, f) for f in files if f.endswith(".py"))
    return sorted(found)


def extract_modules(root: str | Path) -> dict[str, list[TextWord]]:
    """Module name -> its prose words (module, class and function docstrings in source
    order), for every ``.py`` file under ``root`` outside :data:`SKIP_DIRS` (files that do not
    parse or decode are skipped), modules with no prose left out; sorted by name."""
    base, mods = Path(root), {}
    for path in _py_files(base):
        rel = path.relative_to(base)
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        words = [w for d in _docstrings(source) for w in prose_words(d)]
        if words:
            mods.setdefault(_module_name(rel), []).extend(words)
    return dict(sorted(mods.items()))


_MODULES: dict[str, dict[str, list[TextWord]]] = {}


def stdlib_modules(root: str | None = None) -> dict[str, list[TextWord]]:
    """:func:`extract_modules` of ``root`` (default: this interpreter's
    ``sysconfig.get_paths()["stdlib"]``), cached per root for the process (the walk costs a
    few CPU seconds)."""
    root = sysconfig.get_paths()["stdlib"] if root is None else str(root)
    if root not in _MODULES:
        _MODULES[root] = extract_modules(root)
    return _MODULES[root]


def is_test_module(name: str, test_percent: int) -> bool:
    """Whether module ``name`` is in the test split: the first 8 bytes of the MD5 digest of
    its name, as an integer, mod 100 is below ``test_percent`` (a function of the name alone).
    """
    return int.from_bytes(hashlib.md5(name.encode()).digest()[:8], "big") % 100 < test_percent


def _windows(words: list[TextWord], seq_len: int, ids: dict[str, int]) -> list[list]:
    out = []
    for s in range(0, len(words), seq_len):
        chunk = words[s:s + seq_len]
        pad = seq_len - len(chunk)
        x = [ids.get(w.word, _UNK) for w in chunk] + [_PAD] * pad
        y = [w.punct * len(CAPS) + w.cap for w in chunk] + [IGNORE] * pad
        out.append((x, y))
    return out


def _f1(pred: torch.Tensor, gold: torch.Tensor, c: int) -> float:
    tp = int(((pred == c) & (gold == c)).sum())
    p, g = int((pred == c).sum()), int((gold == c).sum())
    return 2 * tp / (p + g) if p + g else 1.0


def text_metrics(out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
    """``out: [N, T, len(PUNCTUATION) * len(CAPS)]`` logits of the joint label ``punct * 2 +
    cap`` -> ``accuracy`` (the joint label, over the words; ``score``), ``punct_accuracy``,
    ``cap_accuracy``, ``f1`` per class (``PUNCTUATION`` of the punctuation, and
    ``capitalised``) and ``punct_macro_f1`` (the mean F1 of comma, period and colon)."""
    gold = data["targets"]
    lab = gold != IGNORE
    pred, gold = out.argmax(-1)[lab], gold[lab]
    nc = len(CAPS)
    pp, gp, pc, gc = pred // nc, gold // nc, pred % nc, gold % nc
    f1 = {name: _f1(pp, gp, i) for i, name in enumerate(PUNCTUATION)}
    f1["capitalised"] = _f1(pc, gc, 1)
    acc = float((pred == gold).double().mean())
    return {"accuracy": acc, "score": acc, "punct_accuracy": float((pp == gp).double().mean()),
            "cap_accuracy": float((pc == gc).double().mean()), "f1": f1,
            "punct_macro_f1": sum(f1[n] for n in PUNCTUATION[1:]) / (len(PUNCTUATION) - 1)}


@dataclasses.dataclass(frozen=True)
class PunctuationRestoration:
    """Punctuation and capitalisation restoration on the standard library's docstrings (see
    the module docstring): inputs ``[N, seq_len]`` int64 word ids (0 padding, 1 a word
    outside the vocabulary, then the training split's ``vocab_size - 2`` most frequent words,
    ties by word), targets ``[N, seq_len]`` the joint label ``punct * 2 + cap``
    (``IGNORE`` on padding). ``test_percent`` of the modules (by name,
    :func:`is_test_module`) are the test split; ``max_train`` / ``max_test`` windows (``None``:
    all) are taken, the training ones in an order drawn from the seed, the test ones the first
    of the split in module order. ``extra`` of :meth:`build` states the sizes."""

    seq_len: int = 64
    vocab_size: int = 4096
    test_percent: int = 20
    max_train: int | None = None
    max_test: int | None = None
    stdlib: str | None = None  # None: this interpreter's Lib/

    kind = "classification"
    group_key = None

    def __post_init__(self):
        check_int("PunctuationRestoration.seq_len", self.seq_len, 1)
        check_int("PunctuationRestoration.vocab_size", self.vocab_size, 3)
        check_int("PunctuationRestoration.test_percent", self.test_percent, 1)
        if self.test_percent >= 100:
            raise ValueError(f"PunctuationRestoration.test_percent must be in [1, 99], got "
                             f"{self.test_percent}")
        for n in ("max_train", "max_test"):
            if getattr(self, n) is not None:
                check_int(f"PunctuationRestoration.{n}", getattr(self, n), 1)

    def io(self) -> dict:
        return {"vocab_size": self.vocab_size, "output_dim": len(PUNCTUATION) * len(CAPS)}

    def split(self) -> tuple[dict[str, list[TextWord]], dict[str, list[TextWord]]]:
        """``(train, test)``: module name -> words, by :func:`is_test_module`."""
        mods = stdlib_modules(self.stdlib)
        test = {m: w for m, w in mods.items() if is_test_module(m, self.test_percent)}
        return {m: w for m, w in mods.items() if m not in test}, test

    def vocabulary(self, train: dict[str, list[TextWord]]) -> dict[str, int]:
        counts = collections.Counter(w.word for ws in train.values() for w in ws)
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.vocab_size - 2]
        return {w: i + 2 for i, (w, _) in enumerate(top)}

    def build(self, seed: int) -> TaskData:
        train, test = self.split()
        ids = self.vocabulary(train)
        tr = [w for ws in train.values() for w in _windows(ws, self.seq_len, ids)]
        te = [w for ws in test.values() for w in _windows(ws, self.seq_len, ids)]
        order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))
        tr = [tr[i] for i in order.tolist()[: self.max_train]]
        te = te[: self.max_test]

        def tensors(rows):
            x = torch.tensor([r[0] for r in rows], dtype=torch.int64)
            return {"inputs": x, "targets": torch.tensor([r[1] for r in rows]),
                    "prefix_len": torch.zeros(len(rows), dtype=torch.int64)}

        n_words = {k: sum(len(w) for w in d.values()) for k, d in (("train", train),
                                                                     ("test", test))}
        test_t = tensors(te)
        extra = {"text_modules": {"train": len(train), "test": len(test)},
                 "text_words": n_words, "text_windows": {"train": len(tr), "test": len(te)},
                 "text_test_words_used": int((test_t["targets"] != IGNORE).sum()),
                 "text_vocab": len(ids) + 2,
                 "text_oov_test": float((test_t["inputs"] == _UNK).sum()
                                        / max(int((test_t["inputs"] != _PAD).sum()), 1))}
        return TaskData(tensors(tr), test_t, extra)

    def solve(self, paragraph: str) -> list[int]:
        """Brute force over one paragraph: the joint labels of its words, by reading each
        token's characters one at a time (checked against :func:`label_words`)."""
        out = []
        for token in paragraph.split():
            letters = [i for i, ch in enumerate(token) if ch.isalnum() or ch == "_"]
            cap = int(token[letters[0]].isupper())
            after = [ch for ch in token[letters[-1] + 1:] if ch in ",.!?:;"]
            punct = 0
            if after:
                punct = {",": 1, ".": 2, "!": 2, "?": 2, ":": 3, ";": 3}[after[0]]
            out.append(punct * len(CAPS) + cap)
        return out

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        return text_metrics(out, data)


register_task("punctuation", PunctuationRestoration)
