"""F4: positional information without positional encodings (Haviv et al. 2022)."""

from __future__ import annotations

from causalmix.lab.experiments import Experiment
from causalmix.lab.findings.base import (
    SUITES,
    Arm,
    Finding,
    Judgement,
    bars,
    fmt,
    mean_se,
    not_run,
    softmax_model,
)
from causalmix.lab.tasks import FirstToken

F4_ARMS = ["causal, no positions", "bidirectional, no positions"]


def _f4_arms(suite: str) -> list[Arm]:
    size = SUITES[suite]
    task = FirstToken(vocab_size=34, length=16, num_train=size.num_train,
                      num_test=size.num_test)
    tr = size.train(400, batch_size=32, lr=3e-3, target=0.995, patience=size.evals + 1)
    return [Arm(arm, Experiment(finding="F4", arm=arm, task=task, model=softmax_model(task),
                                scheme=scheme, positions="none", train=tr))
            for arm, scheme in zip(F4_ARMS, ("causal", "full"), strict=True)]


def _f4_judge(results) -> Judgement:
    header = ["arm", "accuracy at ASK", "chance (most frequent token)"]
    rows = [[arm, fmt([r["accuracy"] for r in results.get(arm) or []]),
             fmt([r["chance"] for r in results.get(arm) or []])] for arm in F4_ARMS]
    missing = not_run(results, F4_ARMS)
    if missing:
        return Judgement(None, missing, (header, rows), [])
    cau = [r["accuracy"] for r in results[F4_ARMS[0]]]
    bid = [r["accuracy"] for r in results[F4_ARMS[1]]]
    chance = mean_se([r["chance"] for r in results[F4_ARMS[1]]])[0]
    (mc, sc), (mb, sb) = mean_se(cau), mean_se(bid)
    clearly = mc - mb >= 0.25 and mc - 2 * sc > mb + 2 * sb
    holds = clearly and mb <= chance + 0.1
    numbers = f"causal {fmt(cau)}, bidirectional {fmt(bid)}, chance {chance:.3f}"
    return Judgement(holds, numbers, (header, rows), [])


def _f4_plot(results, ax):
    bars(ax, results, [("accuracy", lambda r: r["accuracy"])], F4_ARMS, "accuracy at ASK")
    run = next((rs[0] for rs in results.values() if rs), None)
    if run is not None:
        ax.axhline(run["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.legend(fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("F4 name the first token, softmax without positional encoding", fontsize=9)


F4 = Finding(
    key="F4", title="Positional information without positional encodings",
    paper="Haviv et al. 2022 (Transformer language models without positional encodings "
          "still learn positional information)",
    claim="A causal transformer without positional encodings infers position from its mask "
          "(the number of visible keys); a bidirectional one cannot: without positions it is "
          "permutation-equivariant.",
    rule="Causal clearly beats bidirectional: mean accuracy at least 0.25 higher and the mean "
         "± 2 standard errors intervals disjoint; bidirectional stays near chance: its mean "
         "accuracy <= chance + 0.1, where chance is the accuracy of naming the most frequent "
         "token (the best a permutation-invariant answer can do).",
    knobs="BOS, 16 tokens out of 32, ASK; answer: the first token. Softmax attention with "
          "rotary angle 0 for every token (no positional encoding), d_model 64, 2 layers; "
          "trained with every position labelled, tested at ASK. 400 steps, batch 32, "
          "lr 3e-3.",
    arms=_f4_arms, judge=_f4_judge, plot=_f4_plot)
