"""F7: Delta-rule recall at a fixed state size (MQAR with re-written keys).

Paper: DeltaNet (Yang et al. 2024, Parallelizing linear transformers with the delta rule);
Gated DeltaNet (Yang et al. 2025); the fast-weight view of both (Schlag et al. 2021, Linear
transformers are secretly fast weight programmers)

Claim: With the same recurrent state, the delta rule recalls more than a gated linear
recurrence when keys are written again with new values: it writes beta (v - S^T k) along k,
replacing what the state held for that key, while additive linear attention puts k v^T on top
of what it stored, so the stale value stays in the state beside the new one and a scalar
per-head decay can only forget every key at once. Softmax attention, whose state grows with
the context, is the control.

Rule: At the largest number of pairs (writes), the mean test accuracy of each delta-rule arm
(the delta rule, the gated delta rule, and causalmix.nn's Gated DeltaNet) at least 0.2 above
the gated linear arm's, and softmax mean accuracy >= 0.9. Means over seeds. A question asks
the latest value written for its key.

Knobs: MQARReassign (causalmix.lab.tasks; one input vector per write, as F1's MQAR): 8 keys,
32 values, 4/8/16/32 writes per example (one model per arm trained on all four, tested per
size), 4 questions. An example with p writes writes min(p, 8) distinct keys once each and
re-writes keys drawn uniformly from them for the other p - 8 writes, every write a fresh
value, in random order: up to 8 writes no key is written twice (8 keys can sit apart in the 8
key dimensions of a head: the state has room for every answer), at 32 writes 24 are
re-writes. The three recurrent arms share one layer (the nn gated layer: L2-normalised q and k
of 8 dims per head, v of 16, per-head RMS norm and silu output gate) and differ only in the
update: S = exp(g) S + k v^T (gated linear, scalar gate per head and token), S += k beta (v -
S^T k)^T (delta rule, beta = sigmoid of a projection, no gate), both (gated delta). State 8 x
16 per head, 2 heads (256 numbers per layer), 2 layers, d_model 32; softmax the same width
and heads. causalmix.nn's Gated DeltaNet arm: its own layer at the same heads, width and
state, with qk_activation='identity' and conv_init='identity' (with its defaults, SiLU keys
and a random short convolution, it barely learned MQAR with 8-wide keys: see the history).
600 steps, batch 32, lr 5e-3, stop at validation accuracy 0.995 (a seed that learns
stops within 200-300 steps; 600 and 5e-3 leave room for the slow seeds, see the history).

History: Until session 3 F7 ran plain MQAR (32 distinct keys, 4-32 pairs, the same layers and
state) and did not hold in the 3-seed default suite at 400 steps: the delta arms beat gated
linear by only +0.10..+0.13 at 32 pairs, and a gated linear seed (0) stayed near chance. Its
pilots (accuracy at the largest size, delta / gated delta / gated linear; seed 0 unless said):
64 keys, 64 values, 8-48 pairs, feature dim 16, 600 steps: 0.19 / 0.16 / 0.02; 32 keys, 4-32
pairs, feature dim 16, 1000 steps: 0.76 / 0.82 / 0.66 (2 heads x 16 dims hold all 32 keys
nearly apart: no gap); the same at lr 1e-2: delta 0.09, gated linear 0.95; feature dim 8,
seeds 0/1/2: delta 0.78/0.40/0.52, gated delta 0.42/0.60/0.41, gated linear 0.44/0.42/0.09;
beta bias +2 (seeds 1, 2): delta 0.49/0.56, gated delta 0.44/0.34; 1000 steps, 3 seeds (mean
+- s.e.): gated linear 0.438+-0.121, delta 0.574+-0.109, gated delta 0.431+-0.062, softmax
1.0, nn Gated DeltaNet with its defaults 0.115+-0.027 (0.45 even at 4 pairs), with
qk_activation='identity' and conv_init='identity' 0.529+-0.111. With distinct keys beyond the
key dimensions every fixed state fails and the arms differ by seed noise (0.1-0.3), not by
update rule. Re-written keys (this task), seed 0, 400 steps: 8 keys: delta 1.000, gated delta
1.000, nn Gated DeltaNet 1.000 (each stops at the target within 250 steps), gated linear
0.658 (0.988 at 4 writes, 0.950 at 8: it trains and stores distinct keys), softmax 0.964;
16 keys (more keys than key dimensions, 16 distinct + 16 re-writes at 32): delta 0.474,
gated linear 0.178 (0.527 even at 4 writes: not trained within 400 steps), softmax 0.951.
8 keys kept: there the gated linear arm demonstrably trains, so its loss at 32 writes is the
re-writes the claim is about. First 3-seed run (8 keys, 400 steps, lr 3e-3; stopped after 7 of
15 runs): delta 1.000 / 0.994 / 0.669 at 32 writes (seed 2 still rising at step 400), gated
delta 1.000 / 0.997 / 0.228 (seed 2 stuck near 0.3 validation accuracy); seed 2 at 600 steps:
delta 0.904, gated delta 0.343; at lr 5e-3: gated delta 1.000 after 300 steps (kept, with 600
steps, for every arm). The 3-seed default suite from a clean clone (2026-12-02, e25238a),
accuracy at 32 writes: delta 0.985, gated delta 1.000, nn Gated DeltaNet 0.999, gated linear
0.769 (margins over the 0.2 asked: +0.016, +0.031, +0.030), softmax 0.986.
"""

from __future__ import annotations

import causalmix.lab.findings.base as fb
from causalmix.lab.deltamix import DeltaExperiment
from causalmix.lab.experiments import Experiment, mixer_available
from causalmix.lab.tasks import MQARReassign
from causalmix.nn import ModelConfig

F7_ARMS = ["delta rule (DeltaNet)", "gated delta rule (Gated DeltaNet)",
           "gated linear (Mamba-2-style)", "softmax", "Gated DeltaNet (causalmix.nn)"]
#: The arms the rule asks to beat gated linear: every delta-rule arm.
F7_DELTA = (F7_ARMS[0], F7_ARMS[1], F7_ARMS[4])
NN_DELTA = "delta"  # the name causalmix.nn gives its Gated DeltaNet mixer
F7_KEYS = 8
F7_PAIRS = (4, 8, 16, 32)
F7_WIDTH = 32
F7_HEADS = 2
F7_FEATURE_DIM = 8
F7_STEPS = 600
F7_LR = 5e-3


def _f7_arms(suite: str) -> list[fb.Arm]:
    size = fb.SUITES[suite]
    task = MQARReassign(num_keys=F7_KEYS, num_values=32, num_kv_pairs=F7_PAIRS,
                        num_queries=4, query_len=4, num_train=size.num_train,
                        num_test=size.num_test)
    tr = size.train(F7_STEPS, batch_size=32, lr=F7_LR, target=0.995, patience=size.evals + 1)
    # every recurrent arm: the gated layer's projections, state feature_dim x head_dim per head
    rec = ModelConfig.from_name("tiny-gated", **task.io(), d_model=F7_WIDTH, n_heads=F7_HEADS,
                                feature_dim=F7_FEATURE_DIM, impl="reference")
    soft = ModelConfig.from_name("tiny-softmax", **task.io(), d_model=F7_WIDTH,
                                 n_heads=F7_HEADS)

    def delta(arm, rule):
        return lambda: DeltaExperiment(finding="F7", arm=arm, task=task, model=rec, train=tr,
                                       rule=rule)

    return [
        fb.gated_arm("F7", F7_ARMS[0], delta(F7_ARMS[0], "delta")),
        fb.gated_arm("F7", F7_ARMS[1], delta(F7_ARMS[1], "gated-delta")),
        fb.gated_arm("F7", F7_ARMS[2], lambda: Experiment(finding="F7", arm=F7_ARMS[2],
                                                          task=task, model=rec, train=tr)),
        fb.Arm(F7_ARMS[3], Experiment(finding="F7", arm=F7_ARMS[3], task=task, model=soft,
                                      train=tr)),
        _nn_delta_arm(task, tr, rec),
    ]


def _nn_delta_arm(task: MQARReassign, tr, rec: ModelConfig) -> fb.Arm:
    """causalmix.nn's Gated DeltaNet layer (short convolution, SiLU values, its own
    projections) at the same state: feature_dim x head_dim per head, the same heads and width;
    keys without SiLU and the convolution starting as the identity (see the knobs)."""
    if not mixer_available(NN_DELTA):
        return fb.Arm(F7_ARMS[4], None, "not run: causalmix.nn has no delta mixer")
    return fb.Arm(F7_ARMS[4], DeltaExperiment(finding="F7", arm=F7_ARMS[4], task=task,
                                              model=rec, train=tr, rule="nn-gated-delta"))


def _f7_judge(results) -> fb.Judgement:
    metric = "accuracy_by_pairs"
    sizes = sorted({int(k) for rs in results.values() for r in rs for k in r.get(metric, {})})
    header = ["arm", *[f"{p} pairs" for p in sizes]]
    rows = [[arm, *[fb.fmt(fb.by_group(results.get(arm) or [], metric, p)) for p in sizes]]
            for arm in F7_ARMS]
    missing = fb.not_run(results, F7_ARMS)
    if missing:
        return fb.Judgement(None, missing, (header, rows), [])
    big, small = sizes[-1], sizes[0]
    acc = {a: fb.mean_se(fb.by_group(results[a], metric, big))[0] for a in F7_ARMS}
    gated, soft = acc[F7_ARMS[2]], acc[F7_ARMS[3]]
    margins = {a: acc[a] - gated for a in F7_DELTA}
    checks = {**{f"{a} - gated linear >= 0.2": m >= 0.2 for a, m in margins.items()},
              "softmax >= 0.9": soft >= 0.9}
    numbers = (f"at {big} pairs: gated linear {gated:.3f}; "
               + ", ".join(f"{a} {acc[a]:.3f} ({m:+.3f})" for a, m in margins.items())
               + f" (rule: each >= +0.2); softmax {soft:.3f}")
    past = {**{f"{a} over gated linear + 0.2": m - 0.2 for a, m in margins.items()},
            "softmax over 0.9": soft - 0.9}
    fresh = max([p for p in sizes if p <= F7_KEYS] or [small])  # no key written twice
    at = {a: fb.mean_se(fb.by_group(results[a], metric, fresh))[0] for a in F7_ARMS[:3]}
    return fb.judged(checks, numbers, (header, rows), past,
                     f"Without re-writes ({fresh} writes, {fresh} distinct keys): gated linear "
                     f"{at[F7_ARMS[2]]:.3f}, delta rule {at[F7_ARMS[0]]:.3f}, gated delta "
                     f"{at[F7_ARMS[1]]:.3f}; at {big} writes ({big - F7_KEYS} re-writes) "
                     f"gated linear {gated:.3f}, delta rule {acc[F7_ARMS[0]]:.3f}.",
                     "The first two delta arms run a lab-local layer (causalmix.lab.deltamix."
                     "DeltaRuleMixer: the nn gated layer with the delta op and a per-head "
                     "write strength); the third is causalmix.nn's own Gated DeltaNet layer "
                     "(short convolution, SiLU values) at the same state size, with its "
                     "options qk_activation='identity' and conv_init='identity'.")


def _f7_plot(results, ax):
    fb.line_plot(ax, results, F7_ARMS, "accuracy_by_pairs",
                 "key-value writes in the context (count, log scale; 8 distinct keys)",
                 "query accuracy, latest value, test (fraction correct)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"F7 MQAR with re-written keys: one state size ({F7_FEATURE_DIM} x "
                 f"{F7_WIDTH // F7_HEADS} per head, {F7_HEADS} heads)", fontsize=9)


F7 = fb.Finding.from_doc(__doc__, arms=_f7_arms, judge=_f7_judge, plot=_f7_plot)
