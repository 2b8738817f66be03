"""F2: set disjointness by order (JRT)."""

from __future__ import annotations

from causalmix.lab.experiments import Experiment
from causalmix.lab.findings.base import (
    SUITES,
    Arm,
    Finding,
    Judgement,
    bars,
    by_group,
    fmt,
    linear_model,
    mean_se,
    not_run,
    softmax_model,
)
from causalmix.lab.tasks import SetDisjointness

F2_ARMS = ["causal linear", "prefix linear (JRT-RNN)", "softmax"]
F2_ORDERS = {0: "small set first", 1: "large set first"}


def _f2_arms(suite: str) -> list[Arm]:
    size = SUITES[suite]
    task = SetDisjointness(num_elements=32, small=4, large=16, shared=2,
                           num_train=size.num_train, num_test=size.num_test)
    tr = size.train(1200, batch_size=32, lr=3e-3, target=0.995, patience=size.evals + 1)
    lin = linear_model(task, 2)

    def exp(arm, model, scheme):
        return Experiment(finding="F2", arm=arm, task=task, model=model, scheme=scheme,
                          train=tr)

    return [Arm(F2_ARMS[0], exp(F2_ARMS[0], lin, "causal")),
            Arm(F2_ARMS[1], exp(F2_ARMS[1], lin, "prefix")),
            Arm(F2_ARMS[2], exp(F2_ARMS[2], softmax_model(task), "causal"))]


def _order_gap(runs: list[dict]) -> list[float]:
    """Per seed: accuracy small-first minus large-first (the same seed's test sets)."""
    m = "balanced_accuracy_by_order"
    return [r[m]["0"] - r[m]["1"] for r in runs]


def _f2_judge(results) -> Judgement:
    m = "balanced_accuracy_by_order"
    header = ["arm", *F2_ORDERS.values(), "difference (small - large first)"]
    rows = [[arm, *[fmt(by_group(results.get(arm) or [], m, o)) for o in F2_ORDERS],
             fmt(_order_gap(results.get(arm) or []))] for arm in F2_ARMS]
    missing = not_run(results, F2_ARMS[:2])
    if missing:
        return Judgement(None, missing, (header, rows), [])
    (dc, sc), (dp, _) = mean_se(_order_gap(results[F2_ARMS[0]])), \
        mean_se(_order_gap(results[F2_ARMS[1]]))
    causal_differs = abs(dc) >= 0.05 and abs(dc) > 2 * sc
    prefix_same = abs(dp) < 0.05
    numbers = (f"small-first minus large-first: causal linear "
               f"{fmt(_order_gap(results[F2_ARMS[0]]))}, prefix linear "
               f"{fmt(_order_gap(results[F2_ARMS[1]]))}")
    notes = [f"Margins: causal linear's mean difference {dc:.3f} against the thresholds 0.05 "
             f"and 2 standard errors ({2 * sc:.3f}); prefix linear's {dp:.3f} against 0.05."]
    return Judgement(causal_differs and prefix_same, numbers, (header, rows), notes)


def _f2_plot(results, ax):
    groups = [(name, lambda r, o=o: r["balanced_accuracy_by_order"][str(o)])
              for o, name in F2_ORDERS.items()]
    bars(ax, results, groups, F2_ARMS, "balanced accuracy (test)")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_ylim(0.4, 1.05)
    ax.set_title("F2 set disjointness: accuracy by the order of the sets", fontsize=9)


F2 = Finding(
    key="F2", title="Set disjointness by order (JRT)",
    paper="JRT (Arora et al. 2024, Just read twice)",
    claim="The memory a recurrent model needs for set disjointness depends on the order of "
          "the sets: small set first is easy (store 4 elements, check the 16 that follow), "
          "large set first is hard (store 16). Processing the prompt non-causally removes the "
          "dependence on order (the small set can be stored wherever it is).",
    rule="Causal linear's balanced accuracy differs by order: the mean per-seed difference "
         "(small-first minus large-first) is >= 0.05 in size and more than twice its standard "
         "error. Prefix linear's does not: the size of its mean difference is < 0.05.",
    knobs="Sets of 4 and 16 elements out of 32 sharing 2; every element of the second set "
          "labelled with its membership in the first (a dense signal; balanced accuracy so "
          "that chance is 0.5 in both orders); which set an element belongs to is in its "
          "token (the order is the only thing that changes). Linear arms: Taylor feature map "
          "of 2 dims (7 features), no decay (a state of 7 x 16 per head, d_model 64). One "
          "model per arm trained on both orders, tested on each. 1200 steps, batch 32, lr "
          "3e-3, stop at 0.995. Pilots (1 seed; small-first / large-first): answering with "
          "the shared element at the end, 600 steps: softmax 0.70 overall, causal linear "
          "0.75 / 0.74 (no order effect yet: too few steps for a two-hop task); per-element "
          "labels with decays (0.5, 0.9, 0.98, 1), 500 steps: causal 0.93 / 0.56, prefix "
          "0.94 / 0.54; no decay, 800 steps: causal 0.999 / 0.771, prefix 0.999 / 0.868; "
          "prefix, 1600 steps: 1.000 / 0.979 (stopped at its target after 1064 steps).",
    arms=_f2_arms, judge=_f2_judge, plot=_f2_plot)
