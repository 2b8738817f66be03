"""F5: lookahead and adaptive lookahead (streaming ASR; ANCAT)."""

from __future__ import annotations

from causalmix.lab.adaptive import AdaptiveStudy, StudyPoint, adaptive_summary, draw_pareto
from causalmix.lab.findings.base import (
    SUITES,
    Arm,
    Finding,
    Judgement,
    disjoint,
    fmt,
    mean_se,
    not_run,
)
from causalmix.lab.tasks import Lookahead

F5_LOOKAHEADS = (0, 1, 2, 4)


def _f5_study(suite: str) -> AdaptiveStudy:
    size = SUITES[suite]
    task = Lookahead(num_symbols=8, max_delay=4, seq_len=48, num_train=size.num_train,
                     num_test=size.num_test)
    tr = size.train(200, batch_size=32, lr=3e-3, patience=3, target=0.99)
    return AdaptiveStudy(task=task, max_lookahead=4, latency_weights=(0.05, 0.2), train=tr)


def _f5_arms(suite: str) -> list[Arm]:
    study = _f5_study(suite)
    keep = {"causal", *(f"lookahead-{a}" for a in F5_LOOKAHEADS[1:]), "full"}
    return [Arm(point, StudyPoint(study, point, what)) for point, what in study.points()
            if point in keep or point.startswith("adaptive")]


def _f5_judge(results) -> Judgement:
    summary = adaptive_summary(results, 4)
    header = ["point", "accuracy", "mean latency (frames)"]
    rows = [[p, fmt([r["accuracy"] for r in results[p]]),
             fmt([r["latency_mean"] for r in results[p]], 2)] for p in results if results[p]]
    missing = not_run(results, ["causal", "lookahead-4"])
    if missing:
        return Judgement(None, missing, (header, rows), [])
    lo = [r["accuracy"] for r in results["causal"]]
    hi = [r["accuracy"] for r in results["lookahead-4"]]
    rises = mean_se(hi)[0] - mean_se(lo)[0] >= 0.1 and disjoint(hi, lo)
    chk = summary["check"]
    holds = rises and chk["holds"]
    near = [(v["latency_mean"][0], p) for p, v in summary["points"].items()
            if p.startswith("adaptive") and v["accuracy"][0] >= chk["reference_accuracy"] - 0.01]
    notes = [f"Accuracy rises with lookahead: {'yes' if rises else 'no'}. "
             + (f"The adaptive point closest to the latency bound, {min(near)[1]}, waits "
                f"{min(near)[0]:.3f} frames on average: "
                f"{100 * min(near)[0] / chk['reference_latency_mean']:.1f}% of lookahead-4's "
                f"{chk['reference_latency_mean']:.3f} (the bound is 50%)." if near else
                "No adaptive point is within 1 point of lookahead-4's accuracy.")]
    if chk["oracle_latency"] is not None:
        notes.append(f"The oracle gate (each frame waits exactly for its label) waits "
                     f"{chk['oracle_latency']:.3f} frames on average, "
                     f"{100 * chk['oracle_ratio']:.1f}% of lookahead-4's: the least latency at "
                     f"which every frame can be right.")
    numbers = (f"causal {fmt(lo)}, lookahead-4 {fmt(hi)}; adaptive within 1 point of "
               f"lookahead-4 at <= 50% of its latency: "
               + (", ".join(chk["passing_points"]) if chk["holds"] else "none"))
    return Judgement(holds, numbers, (header, rows), notes)


def _f5_plot(results, ax):
    if any(results.values()):
        draw_pareto(adaptive_summary(results, 4), ax)
    ax.set_title("F5 lookahead task: accuracy vs latency, fixed and adaptive", fontsize=9)


F5 = Finding(
    key="F5", title="Lookahead and adaptive lookahead",
    paper="Streaming with lookahead (Emformer-style chunked ASR); ANCAT (adaptive lookahead)",
    claim="A few frames of future context buy accuracy on labels that depend on what comes "
          "next, at a latency of exactly those frames; an adaptive lookahead waits only where "
          "a frame needs it, for nearly the same accuracy at a fraction of the latency.",
    rule="Lookahead-4 beats causal by >= 0.1 mean accuracy with disjoint mean ± standard "
         "error intervals, and an adaptive point reaches lookahead-4's mean accuracy within 1 "
         "point at <= 50% of its mean latency.",
    knobs="Lookahead task: 8 symbols, delays 0..4, 48 frames; fixed lookahead 0, 1, 2, 4 and "
          "full, adaptive (last layer, lookahead 0..4) with latency weights 0.05 and 0.2; "
          "softmax, d_model 64, 2 layers; 200 steps, batch 32, lr 3e-3, stop at 0.99.",
    arms=_f5_arms, judge=_f5_judge, plot=_f5_plot)
