"""F4: Positional information without positional encodings.

Paper: Haviv et al. 2022 (Transformer language models without positional encodings still learn
positional information)

Claim: A causal transformer without positional encodings infers position from its mask (the
number of visible keys); a bidirectional one cannot: without positions it is
permutation-equivariant.

Rule: Causal clearly beats bidirectional: mean accuracy at least 0.25 higher and the mean ± 2
standard errors intervals disjoint; bidirectional stays near chance: its mean accuracy <=
chance + 0.1, where chance is the accuracy of naming the most frequent token (the best a
permutation-invariant answer can do).

Knobs: BOS, 16 tokens out of 32, ASK; answer: the first token. Softmax attention with rotary
angle 0 for every token (no positional encoding), d_model 64, 2 layers; trained with every
position labelled, tested at ASK. 400 steps, batch 32, lr 3e-3.
"""

from __future__ import annotations

import causalmix.lab.findings.base as fb
from causalmix.lab.experiments import Experiment
from causalmix.lab.tasks import FirstToken

F4_ARMS = ["causal, no positions", "bidirectional, no positions"]


def _f4_arms(suite: str) -> list[fb.Arm]:
    size = fb.SUITES[suite]
    task = FirstToken(vocab_size=34, length=16, num_train=size.num_train,
                      num_test=size.num_test)
    tr = size.train(400, batch_size=32, lr=3e-3, target=0.995, patience=size.evals + 1)
    return [fb.Arm(arm, Experiment(finding="F4", arm=arm, task=task, model=fb.softmax_model(task),
                                scheme=scheme, positions="none", train=tr))
            for arm, scheme in zip(F4_ARMS, ("causal", "full"), strict=True)]


def _f4_judge(results) -> fb.Judgement:
    header = ["arm", "accuracy at ASK", "chance (most frequent token)"]
    rows = [[arm, fb.fmt(fb.values(results, arm, "accuracy")),
             fb.fmt(fb.values(results, arm, "chance"))] for arm in F4_ARMS]
    missing = fb.not_run(results, F4_ARMS)
    if missing:
        return fb.Judgement(None, missing, (header, rows), [])
    cau, bid = (fb.values(results, arm, "accuracy") for arm in F4_ARMS)
    chance = fb.mean_se(fb.values(results, F4_ARMS[1], "chance"))[0]
    (mc, sc), (mb, sb) = fb.mean_se(cau), fb.mean_se(bid)
    checks = {"causal >= bidirectional + 0.25": mc - mb >= 0.25,
              "mean ± 2 standard errors disjoint": mc - 2 * sc > mb + 2 * sb,
              "bidirectional <= chance + 0.1": mb <= chance + 0.1}
    numbers = f"causal {fb.fmt(cau)}, bidirectional {fb.fmt(bid)}, chance {chance:.3f}"
    margins = {"difference over 0.25": mc - mb - 0.25,
               "2-standard-error interval gap": (mc - 2 * sc) - (mb + 2 * sb),
               "bidirectional under chance + 0.1": chance + 0.1 - mb}
    return fb.judged(checks, numbers, (header, rows), margins)


def _f4_plot(results, ax):
    fb.bars(ax, results, [("accuracy", lambda r: r["accuracy"])], F4_ARMS,
            "accuracy at ASK, test (fraction correct)")
    run = next((rs[0] for rs in results.values() if rs), None)
    if run is not None:
        ax.axhline(run["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.legend(fontsize=7)
    ax.set_ylim(0, 1.05)


F4 = fb.Finding.from_doc(__doc__, arms=_f4_arms, judge=_f4_judge,
                         plot=_f4_plot)
