"""F6: Bidirectional gated mixer (Hydra-style) vs causal gated.

Paper: Hydra (Hwang et al. 2024); Mamba-2 (Dao & Gu 2024)

Claim: A gated linear mixer run in both directions (the reverse scan of the same gated
recurrence) uses right context that a causal one cannot.

Rule: On the lookahead task (labels from up to 4 frames ahead), bidirectional beats causal by
>= 0.1 mean accuracy with fb.disjoint mean ± standard error intervals.

Knobs: Lookahead task: 8 symbols, delays 0..4, 48 frames; the gated mixer with Full() vs
Causal(), d_model 64, 2 layers; 300 steps, batch 32, lr 3e-3.
"""

from __future__ import annotations

import causalmix.lab.findings.base as fb
from causalmix.lab.experiments import Experiment, mixer_available
from causalmix.lab.tasks import Lookahead

F6_ARMS = ["bidirectional gated (Hydra-style)", "causal gated"]


def _f6_arms(suite: str) -> list[fb.Arm]:
    size = fb.SUITES[suite]
    task = Lookahead(num_symbols=8, max_delay=4, seq_len=48, num_train=size.num_train,
                     num_test=size.num_test)
    tr = size.train(300, batch_size=32, lr=3e-3, patience=3, target=0.99)
    return [fb.gated_arm("F6", arm, lambda arm=arm, scheme=scheme: Experiment(
        finding="F6", arm=arm, task=task, model=fb.gated_model(task), scheme=scheme, train=tr))
        for arm, scheme in zip(F6_ARMS, ("full", "causal"), strict=True)]


def _f6_judge(results) -> fb.Judgement:
    header = ["arm", "accuracy", "ceiling"]
    rows = [[arm, fb.fmt(fb.values(results, arm, "accuracy")),
             fb.fmt(fb.values(results, arm, "best_possible_accuracy"))] for arm in F6_ARMS]
    if not mixer_available(fb.GATED_MIXER):
        return fb.Judgement(None, fb.GATED_MISSING, (header, rows), [])
    missing = fb.not_run(results, F6_ARMS)
    if missing:
        return fb.Judgement(None, missing, (header, rows), [])
    bi, ca = (fb.values(results, arm, "accuracy") for arm in F6_ARMS)
    (mb, sb), (mc, sc) = fb.mean_se(bi), fb.mean_se(ca)
    checks = {"bidirectional >= causal + 0.1": mb - mc >= 0.1,
              "intervals disjoint": fb.disjoint(bi, ca)}
    margins = {"difference over 0.1": mb - mc - 0.1, "interval gap": (mb - sb) - (mc + sc)}
    numbers = f"bidirectional {fb.fmt(bi)}, causal {fb.fmt(ca)}"
    return fb.judged(checks, numbers, (header, rows), margins)


def _f6_plot(results, ax):
    fb.bars(ax, results, [("accuracy", lambda r: r["accuracy"])], F6_ARMS,
            "frame accuracy, test (fraction correct)")
    ax.set_ylim(0, 1.05)


F6 = fb.Finding.from_doc(__doc__, arms=_f6_arms, judge=_f6_judge,
                         plot=_f6_plot)
