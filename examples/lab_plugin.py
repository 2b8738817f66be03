"""A lab plugin: a task and a finding of your own, run by the lab's command line.

    causalmix lab run    --suite smoke --plugin examples/lab_plugin.py --finding F9 --out tmp
    causalmix lab report               --plugin examples/lab_plugin.py --finding F9 --out tmp
    causalmix lab export --format long --plugin examples/lab_plugin.py --finding F9 --out tmp

(``--plugin`` also takes a module name on the path, ``--plugin my_package.lab_findings``.)
Importing this file registers the task ``next-same`` and the finding ``F9``; nothing else is
needed. ``tests/lab/test_plugin.py`` runs these commands (with ``--seeds 2``).

The task: a row of symbols, and at every position but the last the question "is the next
symbol the same as this one?". A causal model cannot see the next symbol, so the best it can
do is answer "no" (right with probability ``1 - 1/num_symbols``); one frame of lookahead
answers it exactly. The finding's arms are one softmax model under two per-layer visibility
schemes: ``Causal()`` in both layers, and ``Causal() | Window(0, 1)`` (one frame ahead) in the
first layer only.
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.lab import (
    SUITES,
    Arm,
    Experiment,
    Finding,
    Judgement,
    Results,
    TaskData,
    register_finding,
    register_task,
)
from causalmix.lab.protocol import IGNORE
from causalmix.nn import ModelConfig
from causalmix.visibility import Causal, Window


# ------------------------------------------------------------------------------ the task
@dataclasses.dataclass(frozen=True)
class NextSame:
    """Is ``x[t + 1] == x[t]``? Classification at every position but the last (the task
    protocol, :class:`causalmix.lab.Task`: ``kind``, ``group_key``, ``io()``, ``build(seed)``,
    ``metrics(out, data)``; a frozen dataclass, so its fields are its config)."""

    num_symbols: int = 4
    length: int = 24
    num_train: int = 2048
    num_test: int = 256

    kind = "classification"  # logits [N, T, 2], targets [N, T] with IGNORE where unscored
    group_key = "inputs"  # metrics per symbol (accuracy_by_symbol)

    def io(self) -> dict:
        return {"vocab_size": self.num_symbols, "output_dim": 2}

    def _split(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.randint(0, self.num_symbols, (n, self.length), generator=g)
        targets = torch.full_like(x, IGNORE)
        targets[:, :-1] = (x[:, 1:] == x[:, :-1]).long()
        return {"inputs": x, "targets": targets,
                "prefix_len": torch.full((n,), self.length, dtype=torch.int64)}

    def build(self, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        return TaskData(self._split(self.num_train, g), self._split(self.num_test, g),
                        extra={"causal_best": 1 - 1 / self.num_symbols})

    def metrics(self, out: torch.Tensor, data: dict[str, torch.Tensor]) -> dict:
        scored = data["targets"] != IGNORE
        hit = (out.argmax(-1) == data["targets"]) & scored
        acc = float(hit.sum() / scored.sum())
        by_symbol = {str(s): float(hit[(data["inputs"] == s) & scored].sum()
                                   / ((data["inputs"] == s) & scored).sum().clamp(min=1))
                     for s in range(self.num_symbols)}
        return {"score": acc, "accuracy": acc, "accuracy_by_symbol": by_symbol}


register_task("next-same", NextSame)


# --------------------------------------------------------------------------- the finding
ARMS = ("causal", "lookahead 1 (first layer)")
GAP = 0.2  # the rule's margin, fixed before any run


def arms(suite: str) -> list[Arm]:
    """The two arms, sized by the suite (``SUITES[suite]``: examples, step multiplier)."""
    size = SUITES[suite]
    task = NextSame(num_train=size.num_train, num_test=size.num_test)
    model = ModelConfig.from_name("tiny-softmax", **task.io(), d_model=32)
    n_layers = len(model.blocks)
    schemes = ((Causal(),) * n_layers,
               (Causal() | Window(0, 1),) + (Causal(),) * (n_layers - 1))
    train = size.train(300, batch_size=32, lr=3e-3)
    return [Arm(name, Experiment(finding="F9", arm=name, task=task, model=model, scheme=s,
                                 train=train))
            for name, s in zip(ARMS, schemes, strict=True)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def judge(results: Results) -> Judgement:
    """The rule on the arms' finished runs (``results[arm]``: one metrics dict per seed)."""
    if results.missing(ARMS):
        return Judgement(None, "not run", (["arm", "accuracy"], []),
                         [f"not run: no finished runs of {', '.join(results.missing(ARMS))}"])
    acc = {a: _mean(results.metric(a, "accuracy")) for a in ARMS}
    gap = acc[ARMS[1]] - acc[ARMS[0]]
    rows = [[a, f"{acc[a]:.3f}", " ".join(str(s) for s in results.seeds(a))] for a in ARMS]
    return Judgement(gap >= GAP, f"lookahead - causal accuracy {gap:.3f} (asked >= {GAP})",
                     (["arm", "accuracy (mean over seeds)", "seeds"], rows),
                     [f"Margin (positive: met): {gap - GAP:+.3f}."])


def plot(results: Results, ax) -> None:
    for i, arm in enumerate(ARMS):
        accs = results.metric(arm, "accuracy")
        if accs:
            ax.errorbar([i], [_mean(accs)], yerr=[0.0], marker="o", capsize=3, label=arm)
    ax.set_xticks(range(len(ARMS)), ARMS)
    ax.set_xlabel("arm (visibility of the first layer)")
    ax.set_ylabel("test accuracy (fraction)")


F9 = register_finding(Finding(
    key="F9", title="one frame of lookahead answers next-same", paper="(an example plugin)",
    claim="A causal model cannot tell whether the next symbol repeats this one; one frame of "
          "lookahead in the first layer can.",
    rule=f"The lookahead arm's mean test accuracy exceeds the causal arm's by >= {GAP}.",
    knobs="4 symbols, 24 positions, tiny softmax model (d_model 32), 300 steps x the suite's "
          "step multiplier.",
    arms=arms, judge=judge, plot=plot))
