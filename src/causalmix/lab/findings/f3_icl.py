"""F3: prefix-LM vs causal-LM in-context learning (Ding et al. 2024)."""

from __future__ import annotations

from causalmix.lab.experiments import Experiment
from causalmix.lab.findings.base import (
    SUITES,
    Arm,
    Finding,
    Judgement,
    SuiteSize,
    by_group,
    disjoint,
    fmt,
    line_plot,
    mean_se,
    not_run,
    softmax_model,
)
from causalmix.lab.tasks import ICLRegression

F3_ARMS = ["prefix-LM", "causal-LM"]


def _f3_task(size: SuiteSize) -> ICLRegression:
    return ICLRegression(dim=4, max_examples=16, seq_len=24, noise_std=0.1,
                         test_examples=(1, 2, 4, 8, 12, 16), num_train=size.num_train,
                         num_test=size.num_test)


def _f3_arms(suite: str) -> list[Arm]:
    size = SUITES[suite]
    task = _f3_task(size)
    tr = size.train(600, batch_size=32, lr=2e-3, patience=4)
    return [Arm(arm, Experiment(finding="F3", arm=arm, task=task, model=softmax_model(task),
                                scheme=scheme, train=tr))
            for arm, scheme in zip(F3_ARMS, ("prefix", "causal"), strict=True)]


def _f3_judge(results) -> Judgement:
    m = "mse_by_examples"
    ks = sorted({int(k) for rs in results.values() for r in rs for k in r.get(m, {})})
    header = ["arm", *[f"{k} examples" for k in ks]]
    rows = [[arm, *[fmt(by_group(results.get(arm) or [], m, k)) for k in ks]] for arm in F3_ARMS]
    any_run = next((rs[0] for rs in results.values() if rs), None)
    if any_run is not None:
        for name, key in (("least squares", "least_squares_mse"), ("Bayes (ridge)", "bayes_mse")):
            rows.append([name, *[f"{any_run[key][str(k)]:.3f}" for k in ks]])
    missing = not_run(results, F3_ARMS)
    if missing:
        return Judgement(None, missing, (header, rows), [])
    k = ks[-1]
    pre, cau = by_group(results[F3_ARMS[0]], m, k), by_group(results[F3_ARMS[1]], m, k)
    holds = mean_se(pre)[0] < mean_se(cau)[0] and disjoint(pre, cau)
    numbers = f"query MSE at {k} examples: prefix {fmt(pre)}, causal {fmt(cau)}"
    return Judgement(holds, numbers, (header, rows), [])


def _f3_plot(results, ax):
    line_plot(ax, results, F3_ARMS, "mse_by_examples", "in-context examples",
               "query MSE (test)", log=True)
    run = next((rs[0] for rs in results.values() if rs), None)
    if run is not None:
        ks = sorted(int(k) for k in run["bayes_mse"])
        ax.plot(ks, [run["bayes_mse"][str(k)] for k in ks], "k--", lw=1,
                label="Bayes-optimal (ridge)")
        ax.legend(fontsize=7)
    ax.set_title("F3 in-context linear regression: prefix-LM vs causal-LM", fontsize=9)


F3 = Finding(
    key="F3", title="Prefix-LM vs causal-LM in-context learning",
    paper="Ding et al. 2024 (CausalLM is not optimal for in-context learning)",
    claim="On in-context linear regression a prefix-LM, whose examples attend to each other, "
          "reaches a lower error than a causal LM and keeps improving with more examples, "
          "while the causal LM plateaus.",
    rule="At the largest number of examples, prefix-LM's mean test MSE is lower than "
         "causal-LM's and the mean ± standard error intervals do not overlap.",
    knobs="x in R^4, w ~ N(0, I/4), noise 0.1; up to 16 examples then queries to 24 tokens; "
          "softmax attention, d_model 64, 2 layers; one model per arm trained on 1..16 "
          "examples, tested at 1, 2, 4, 8, 12, 16. 600 steps, batch 32, lr 2e-3.",
    arms=_f3_arms, judge=_f3_judge, plot=_f3_plot)
