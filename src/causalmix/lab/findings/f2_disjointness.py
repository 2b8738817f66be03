"""F2: set disjointness by order (JRT)."""

from __future__ import annotations

import causalmix.lab.findings.base as fb
from causalmix.lab.experiments import Experiment
from causalmix.lab.tasks import SetDisjointness

F2_ARMS = ["causal linear", "prefix linear (JRT-RNN)", "softmax"]
F2_ORDERS = {0: "small set first", 1: "large set first"}
F2_METRIC = "balanced_accuracy_by_order"
F2_STEPS = 1200
F2_WIDTH = 32


def _f2_arms(suite: str) -> list[fb.Arm]:
    size = fb.SUITES[suite]
    task = SetDisjointness(num_elements=32, small=4, large=16, shared=2,
                           num_train=size.num_train, num_test=size.num_test)
    tr = size.train(F2_STEPS, batch_size=32, lr=3e-3, target=0.995, patience=size.evals + 1)
    lin = fb.linear_model(task, 2, F2_WIDTH)

    def exp(arm, model, scheme):
        return Experiment(finding="F2", arm=arm, task=task, model=model, scheme=scheme,
                          train=tr)

    return [fb.Arm(F2_ARMS[0], exp(F2_ARMS[0], lin, "causal")),
            fb.Arm(F2_ARMS[1], exp(F2_ARMS[1], lin, "prefix")),
            fb.Arm(F2_ARMS[2], exp(F2_ARMS[2], fb.softmax_model(task, F2_WIDTH), "causal"))]


def _order_gap(runs: list[dict]) -> list[float]:
    """Per seed: accuracy small-first minus large-first (the same seed's test sets)."""
    return [r[F2_METRIC]["0"] - r[F2_METRIC]["1"] for r in runs]


def _f2_judge(results) -> fb.Judgement:
    header = ["arm", *F2_ORDERS.values(), "difference (small - large first)"]
    rows = [[arm, *[fb.fmt(fb.by_group(results.get(arm) or [], F2_METRIC, o))
                    for o in F2_ORDERS], fb.fmt(_order_gap(results.get(arm) or []))]
            for arm in F2_ARMS]
    missing = fb.not_run(results, F2_ARMS[:2])
    if missing:
        return fb.Judgement(None, missing, (header, rows), [])
    cau, pre = _order_gap(results[F2_ARMS[0]]), _order_gap(results[F2_ARMS[1]])
    (dc, sc), (dp, sp) = fb.mean_se(cau), fb.mean_se(pre)
    checks = {"causal linear's difference >= 0.15": dc >= 0.15,
              "causal linear's difference > 3 standard errors above 0": dc > 3 * sc,
              "prefix linear's difference within 2 standard errors of 0": abs(dp) <= 2 * sp,
              "prefix linear's difference below 0.03 in size": abs(dp) < 0.03}
    numbers = (f"small-first minus large-first: causal linear {fb.fmt(cau)}, prefix linear "
               f"{fb.fmt(pre)}")
    notes = [fb.conditions(checks),
             f"Margins: causal linear {dc:.3f} against 0.15 ({dc - 0.15:+.3f}) and against 3 "
             f"standard errors {3 * sc:.3f} ({dc - 3 * sc:+.3f}); prefix linear |{dp:.3f}| "
             f"against 2 standard errors {2 * sp:.3f} and against 0.03 "
             f"({0.03 - abs(dp):+.3f} to spare)."]
    return fb.Judgement(all(checks.values()), numbers, (header, rows), notes)


def _f2_plot(results, ax):
    groups = [(name, lambda r, o=o: r[F2_METRIC][str(o)]) for o, name in F2_ORDERS.items()]
    fb.bars(ax, results, groups, F2_ARMS, "balanced accuracy on the questions, test "
                                          "(fraction; chance 0.5)")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_ylim(0.4, 1.05)


F2 = fb.Finding(
    key="F2", title="Set disjointness by order (JRT)",
    paper="JRT (Arora et al. 2024, Just read twice)",
    claim="The memory a recurrent model needs for set disjointness depends on the order of "
          "the sets: with the small set first it stores 4 elements and marks, while reading "
          "the large set, which of them come again; with the large set first it must store "
          "16. A model that reads the sets non-causally (JRT-RNN's prefix linear attention) "
          "does not depend on the order.",
    rule="Causal linear's mean per-seed balanced-accuracy difference (small-first minus "
         "large-first) is >= 0.15 and more than 3 standard errors above 0; prefix linear's "
         "is within 2 standard errors of 0 and below 0.03 in size. Softmax is a control "
         "(not in the rule).",
    knobs=f"Sets of 4 and 16 elements out of 32 sharing 2, then the 4 elements of the small "
          f"set again as questions (is it in the large set?), the same questions whatever "
          f"the order; training also labels every element of the second set (a dense "
          f"signal), the test scores the questions only (balanced accuracy, chance 0.5). "
          f"Which set an element belongs to is in its token, so the order is the only thing "
          f"that changes; the prefix arm reads both sets bidirectionally and the questions "
          f"causally, and without positional encodings it sees the same tokens in both "
          f"orders. Linear arms: Taylor feature map of 2 dims (7 features), no decay, "
          f"d_model {F2_WIDTH} (4 heads of {F2_WIDTH // 4}: a state of 7 x {F2_WIDTH // 4} per "
          f"head). One model per arm trained on both orders, tested on each. {F2_STEPS} "
          f"steps, batch 32, lr 3e-3, stop at 0.995.",
    history="Small-first / large-first balanced accuracy, 1 seed unless said. With the "
            "elements of the second set as the questions (the previous design), the "
            "bidirectional arm answers a different question in each order (is a large "
            "element in the 4-element set, or a small one in the 16-element set), so it "
            "had an order effect of its own: answering with the shared element at the end, "
            "600 steps: softmax 0.70 overall, causal linear 0.75 / 0.74; per-element labels "
            "with decays (0.5, 0.9, 0.98, 1), 500 steps: causal 0.93 / 0.56, prefix "
            "0.94 / 0.54; no decay, 800 steps: causal 0.999 / 0.771, prefix 0.999 / 0.868; "
            "in the 3-seed default suite the differences were causal 0.051 ± 0.020, prefix "
            "0.040 ± 0.014 (the previous rule, >= 0.05 and < 0.05, called it holding). "
            "Pilots of that design (d_model 16 / 32, 32 or 64 elements): causal differences "
            "0.22 / 0.34, prefix 0.18 / 0.30; labelling the first set too in training "
            "(d_model 32, 32 elements): causal 0.974 / 0.637, prefix 0.999 / 0.930 (0.07).",
    arms=_f2_arms, judge=_f2_judge, plot=_f2_plot)
