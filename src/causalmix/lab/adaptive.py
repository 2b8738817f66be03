"""Accuracy vs latency on the ``lookahead`` task (finding F5): causal, fixed lookahead 1..W,
full, and adaptive lookahead (:mod:`causalmix.nn.adaptive`, ANCAT-inspired) over a sweep of
``latency_weight``.

An :class:`AdaptiveStudy` names the points; each point is a lab job (:class:`StudyPoint`) that
the lab's one runner (:func:`~causalmix.lab.runner.run_jobs`) trains and records under the one
run key, like every other experiment. Every point is trained on the same task data
(``Lookahead.build(seed)``, or :meth:`AdaptiveStudy.build` with a skewed delay distribution)
with the study's :class:`~causalmix.lab.trainer.TrainConfig`:

* the fixed baselines are ordinary lab experiments trained by
  :meth:`~causalmix.lab.experiments.Experiment.run` (scheme ``lookahead-L``:
  ``Causal() | Window(0, L)`` in the first layer, causal above; ``causal`` is ``L = 0``,
  ``full`` is ``L = T - 1``, which is ``Full()`` on ``T`` frames): checkpoint of the best
  validation accuracy, early stop at the ``target`` accuracy or after ``patience``
  evaluations without progress;
* the adaptive points as :class:`AdaptivePoint` objectives of the same trainer
  (:func:`~causalmix.lab.trainer.fit`): the preset with its last layer adaptive, the
  same optimiser and schedule, loss ``CE + latency_weight * ramp * expected latency + gate
  penalty``, checkpoint of the best validation ``accuracy - latency_weight * mean latency``
  (no target stop: reaching the accuracy early is not the end, the latency still falls).

The latency of every point is measured the same way, per output frame of the test sequences:
:func:`~causalmix.stream.compounded_latency` of the layers' specs (``r^L_t - t``; a finite
sequence clips it at the last frame, so ``Full()`` costs ``T - 1 - t`` and fixed lookahead ``L``
averages slightly under ``L``). Every point also records the latency of the oracle gate
(:func:`oracle_latency`) on its test set; :func:`adaptive_summary` and :func:`draw_pareto` give
the report's table and plot.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from causalmix.checks import check_int
from causalmix.lab.experiments import Experiment, plain, scheme_visibility
from causalmix.lab.tasks import IGNORE, Lookahead, TaskData
from causalmix.lab.trainer import FitResult, TrainConfig, fit
from causalmix.nn import ModelConfig
from causalmix.nn.adaptive import AdaptiveConfig, AdaptiveModel
from causalmix.stream import compounded_latency

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "AdaptiveObjective",
    "AdaptivePoint",
    "AdaptiveStudy",
    "StudyPoint",
    "adaptive_summary",
    "draw_pareto",
    "oracle_latency",
]


@dataclasses.dataclass(frozen=True)
class AdaptiveStudy:
    """One accuracy-vs-latency study.

    ``max_lookahead`` (``W``): the fixed baselines run lookahead ``0..W`` (and full); the
    adaptive model is ``preset`` with its last layer adaptive (lookahead in ``{0..W}``, or
    ``{0, W}`` with ``choices="binary"``) and the other layers causal: the last layer is where a
    frame's own lookahead is its whole latency (``r^L_t = t + a_t``); an adaptive *first* layer
    would pass every frame's wait on to all later frames through the causal layers above.
    ``latency_weights``: the sweep of the regulariser's weight (per frame of mean latency).
    ``delay_probs``: ``None`` uses the lab task as it is (delays uniform in
    ``[0, max_delay]``); ``(p_0, ..., p_max_delay)`` draws the delays with these probabilities
    instead (same tokens and labels; :meth:`build`), e.g. mostly 0: the setting adaptive
    lookahead is made for, where few frames need the future.
    ``gate_penalty``: weight of :attr:`AdaptiveOutput.gate_penalty` in the loss.
    ``latency_ramp = (a, b)``: the weight is 0 for the first ``a`` of the steps and rises
    linearly to its value at ``b`` (so the attention first learns what the lookahead is good
    for while the gates still explore; with the full weight from step 0 the gates collapse to
    lookahead 0 before any future frame has become useful, and never recover).
    """

    task: Lookahead = Lookahead(num_symbols=8, max_delay=4, seq_len=48)
    max_lookahead: int = 4
    latency_weights: tuple[float, ...] = (0.05, 0.2, 0.6)
    choices: str = "all"
    gate_penalty: float = 0.05
    mixer: str = "softmax"
    preset: str = "tiny-softmax"
    train: TrainConfig = TrainConfig()
    adaptive_lr: float | None = None  # default: train.lr
    latency_ramp: tuple[float, float] = (0.25, 0.5)
    delay_probs: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.task, Lookahead):
            raise TypeError(f"AdaptiveStudy.task must be a Lookahead task, got "
                            f"{type(self.task).__name__}")
        w = self.max_lookahead
        check_int("AdaptiveStudy.max_lookahead", w, 1)
        ws = tuple(float(x) for x in self.latency_weights)
        if not ws or any(not x >= 0 for x in ws):
            raise ValueError(f"AdaptiveStudy.latency_weights must be floats >= 0, got "
                             f"{self.latency_weights!r}")
        object.__setattr__(self, "latency_weights", ws)
        a, b = (float(x) for x in self.latency_ramp)
        if not 0 <= a <= b <= 1:
            raise ValueError(f"AdaptiveStudy.latency_ramp must be (a, b) with 0 <= a <= b <= 1, "
                             f"got {self.latency_ramp!r}")
        object.__setattr__(self, "latency_ramp", (a, b))
        if self.delay_probs is not None:
            probs = tuple(float(x) for x in self.delay_probs)
            if len(probs) != self.task.max_delay + 1 or any(not x >= 0 for x in probs) \
                    or not abs(sum(probs) - 1.0) < 1e-6:
                raise ValueError(f"AdaptiveStudy.delay_probs must be {self.task.max_delay + 1} "
                                 f"probabilities (delays 0..max_delay) summing to 1, got "
                                 f"{self.delay_probs!r}")
            object.__setattr__(self, "delay_probs", probs)

    def build(self, seed: int) -> TaskData:
        """The task data of ``seed``: ``task.build(seed)``, or with :attr:`delay_probs` the
        same construction (token ``s * (max_delay + 1) + d``, label ``s_{t + d}``, delays
        clipped to the sequence) with delays drawn from ``delay_probs``."""
        if self.delay_probs is None:
            return self.task.build(seed)
        g = torch.Generator().manual_seed(seed)
        probs = torch.tensor(self.delay_probs, dtype=torch.float64)
        task = self.task

        def make(n: int) -> dict[str, torch.Tensor]:
            t = task.seq_len
            sym = torch.randint(0, task.num_symbols, (n, t), generator=g)
            d = torch.multinomial(probs, n * t, replacement=True, generator=g).view(n, t)
            d = torch.minimum(d, t - 1 - torch.arange(t))
            return {"inputs": sym * (task.max_delay + 1) + d,
                    "targets": sym.gather(1, torch.arange(t) + d),
                    "prefix_len": torch.zeros(n, dtype=torch.int64), "delay": d}

        return TaskData(make(task.num_train), make(task.num_test))

    def best_accuracy(self, lookahead: int) -> float:
        """Accuracy ceiling of a model seeing ``lookahead`` frames ahead (clipping ignored)."""
        if self.delay_probs is None:
            return self.task.best_accuracy(lookahead)
        p = sum(self.delay_probs[: lookahead + 1])
        return p + (1 - p) / self.task.num_symbols

    def baselines(self) -> list[tuple[str, Experiment]]:
        """The fixed-lookahead lab experiments as ``(point, experiment)``: ``causal``
        (scheme ``lookahead-0``), ``lookahead-1`` .. ``lookahead-W`` and ``full`` (scheme
        ``lookahead-{T-1}``: on sequences of ``T`` frames the first layer's
        ``Causal() | Window(0, T - 1)`` is ``Full()``; the scheme names keep the lab trainer's
        lookahead metrics valid)."""
        out = []
        last = self.task.seq_len - 1
        for point, ahead in [("causal", 0),
                             *((f"lookahead-{a}", a) for a in range(1, self.max_lookahead + 1)),
                             ("full", last)]:
            out.append((point, Experiment(
                finding="adaptive-study" + ("" if self.delay_probs is None else "-skewed"),
                arm=f"{self.mixer}/{point}", task=self.task, model=self.base_config(),
                scheme=f"lookahead-{ahead}", train=self.train)))
        return out

    def base_config(self) -> ModelConfig:
        """The :class:`~causalmix.nn.ModelConfig` of the fixed baselines."""
        return ModelConfig.from_name(self.preset, mixer=self.mixer, **self.task.io())

    def points(self) -> list[tuple[str, Experiment | AdaptivePoint]]:
        """Every point of the study: the fixed baselines, then one adaptive point per
        latency weight."""
        return list(self.baselines()) + [(f"adaptive-w={w:g}", AdaptivePoint(self, w))
                                         for w in self.latency_weights]

    def model_config(self, n_layers: int) -> AdaptiveConfig:
        w = (0,) * (n_layers - 1) + (self.max_lookahead,)
        return AdaptiveConfig.from_name(self.preset, mixer=self.mixer, max_lookahead=w,
                                        choices=self.choices, **self.task.io())

    def to_json(self) -> dict:
        return plain(self)


# ============================================================================ training


class AdaptiveObjective:
    """The :class:`~causalmix.lab.trainer.Objective` of one adaptive point.

    Loss: cross-entropy + ``latency_weight * ramp(step) * expected_latency.mean()`` (frames;
    ``ramp``: :attr:`AdaptiveStudy.latency_ramp`) + ``gate_penalty * gate_penalty``, the
    gates sampled with ``noise`` (a generator); score (checkpoint, patience): the validation
    ``accuracy - latency_weight * mean latency`` with hard gates."""

    def __init__(self, study: AdaptiveStudy, latency_weight: float, noise: torch.Generator):
        self.study, self.latency_weight, self.noise = study, latency_weight, noise

    def loss(self, model: AdaptiveModel, batch: dict[str, torch.Tensor], step: int,
             steps: int) -> torch.Tensor:
        a, b = (x * steps for x in self.study.latency_ramp)
        ramp = 1.0 if step >= b else (0.0 if step <= a else (step - a) / (b - a))
        out = model(batch["inputs"], hard=False, generator=self.noise)
        ce = F.cross_entropy(out.output.flatten(0, 1), batch["targets"].flatten(),
                             ignore_index=IGNORE)
        return ce + self.latency_weight * ramp * out.expected_latency.mean() \
            + self.study.gate_penalty * out.gate_penalty

    def evaluate(self, model: AdaptiveModel, data: dict[str, torch.Tensor],
                 batch_size: int = 256) -> dict:
        hits, labelled, lats = 0, 0, []
        for s in range(0, data["inputs"].shape[0], batch_size):
            x, y = data["inputs"][s:s + batch_size], data["targets"][s:s + batch_size]
            out = model(x, hard=True)
            lab = y != IGNORE
            hits += int(((out.output.argmax(-1) == y) & lab).sum())
            labelled += int(lab.sum())
            lats.append(out.latency.reshape(-1))
        lat = torch.cat(lats).double()
        acc = hits / max(labelled, 1)
        return {"accuracy": acc, "latency_mean": float(lat.mean()),
                "latency_p90": float(torch.quantile(lat, 0.9)), "latency_max": int(lat.max()),
                "score": acc - self.latency_weight * float(lat.mean())}


@dataclasses.dataclass(frozen=True)
class AdaptivePoint:
    """One adaptive point of a study (its ``latency_weight``), trained by the lab's trainer
    (:func:`~causalmix.lab.trainer.fit`) with an :class:`AdaptiveObjective`."""

    study: AdaptiveStudy
    latency_weight: float

    def model_config(self) -> AdaptiveConfig:
        return self.study.model_config(len(self.study.base_config().blocks))

    def run(self, seed: int, *, data: TaskData | None = None, progress: bool = False,
            desc: str = "") -> FitResult:
        data = self.study.build(seed) if data is None else data
        torch.manual_seed(seed)
        model = AdaptiveModel(self.model_config())
        objective = AdaptiveObjective(self.study, self.latency_weight,
                                      torch.Generator().manual_seed(seed + 2))
        train = self.study.train
        if self.study.adaptive_lr is not None:
            train = dataclasses.replace(train, lr=self.study.adaptive_lr)
        # no target stop: reaching the accuracy early is not the end, the latency still falls
        train = dataclasses.replace(train, target=None)
        res = fit(model, objective, data.train, data.test, train, seed=seed,
                  name=desc or f"adaptive w={self.latency_weight:g}", progress=progress)
        res.metrics["accuracy_score"] = res.metrics["score"]
        res.metrics["score"] = res.metrics["accuracy"]
        res.metrics["latency_weight"] = self.latency_weight
        return res


@dataclasses.dataclass(frozen=True)
class StudyPoint:
    """One point of a study as a lab job (:class:`~causalmix.lab.runner.Job`): ``point`` names
    it (``"causal"``, ``"lookahead-L"``, ``"full"``, ``"adaptive-w=<weight>"``), ``what`` is its
    baseline :class:`~causalmix.lab.experiments.Experiment` or :class:`AdaptivePoint`.

    Its config (:meth:`to_json`, what the run key hashes) is the study without its sweep of
    weights and the point: extending the sweep reuses the runs already done. A fixed
    baseline's metrics get the study's accuracy ceiling and its measured latency; every
    point's, the oracle gate's latency on the same test set."""

    study: AdaptiveStudy
    point: str
    what: Experiment | AdaptivePoint
    finding: str = "F5"

    task_name = "lookahead"

    @property
    def arm(self) -> str:
        return self.point

    @property
    def name(self) -> str:
        return f"{self.finding}/{self.point}"

    def to_json(self) -> dict:
        study = {k: v for k, v in self.study.to_json().items() if k != "latency_weights"}
        return {"finding": self.finding, "arm": self.point, "study": study,
                "point": self.point}

    def run(self, seed: int, *, progress: bool = False, desc: str = "") -> FitResult:
        data = self.study.build(seed)
        res = self.what.run(seed, data=data, progress=progress, desc=desc)
        if isinstance(self.what, Experiment):
            ahead = int(self.what.scheme.split("-")[1])
            res.metrics["best_possible_accuracy"] = self.study.best_accuracy(ahead)
            res.metrics.update(_fixed_latency(self.what, self.study.task.seq_len))
        res.metrics["oracle_latency"] = oracle_latency(data)
        return res


def _fixed_latency(exp: Experiment, seq_len: int) -> dict:
    lat = compounded_latency(scheme_visibility(exp.scheme, len(exp.model.blocks)),
                             seq_len).double()
    return {"latency_mean": float(lat.mean()), "latency_p90": float(torch.quantile(lat, 0.9)),
            "latency_max": int(lat.max())}


def _mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (0 for one seed)."""
    if not xs:
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), se


def oracle_latency(data: TaskData) -> float:
    """Mean latency of the oracle gate ``a_t = d_t`` (each frame waits exactly for its label;
    the task clips delays at the sequence end) on ``data``'s test set: the least mean latency
    at which a model with the last layer adaptive can label every frame."""
    return float(data.test["delay"].double().mean())


def adaptive_summary(results: dict[str, list[dict]], max_lookahead: int, *,
                     slack: float = 0.01, latency_ratio: float = 0.5,
                     oracle_ratio: float = 1.2) -> dict:
    """From the finished runs' metrics per point (``results``: point -> one metrics dict per
    seed; points ``causal``, ``lookahead-L``, ``full``, ``adaptive-w=...``): mean and
    standard error over seeds of accuracy and mean / p90 / max latency (``"points"``), and the
    check (``"check"``, ``None`` without fixed points): the best fixed lookahead (causal,
    ``lookahead-1`` .. ``lookahead-W``) by mean accuracy; the *reference*, the fixed lookahead
    of least latency within ``slack`` of that accuracy (the fixed lookahead that reaches the
    same accuracy); the mean :func:`oracle_latency` the runs recorded; and the adaptive points
    that reach the best fixed accuracy within ``slack`` at ``<= latency_ratio`` times the
    reference's mean latency and ``<= oracle_ratio`` times the oracle's."""
    points = {point: {"n": len(ms), **{k: _mean_se([m[k] for m in ms]) for k in
                                       ("accuracy", "latency_mean", "latency_p90",
                                        "latency_max")}}
              for point, ms in results.items() if ms}
    recorded = [m["oracle_latency"] for ms in results.values() for m in ms
                if "oracle_latency" in m]
    oracle = statistics.fmean(recorded) if recorded else None
    fixed = [p for p in ("causal", *(f"lookahead-{a}" for a in range(1, max_lookahead + 1)))
             if p in points]
    if not fixed:
        return {"points": points, "check": None}
    best = max(fixed, key=lambda p: points[p]["accuracy"][0])
    acc = points[best]["accuracy"][0]
    ref = min((p for p in fixed if points[p]["accuracy"][0] >= acc - slack),
              key=lambda p: points[p]["latency_mean"][0])
    lat = points[ref]["latency_mean"][0]
    bound = min(latency_ratio * lat, math.inf if oracle is None else oracle_ratio * oracle)
    ok = [p for p, v in points.items() if p.startswith("adaptive")
          and v["accuracy"][0] >= acc - slack and v["latency_mean"][0] <= bound]
    check = {"best_fixed": best, "reference": ref, "reference_accuracy": acc,
             "reference_latency_mean": lat, "latency_bound": bound, "slack": slack,
             "latency_ratio": latency_ratio, "oracle_ratio_bound": oracle_ratio,
             "passing_points": ok, "holds": bool(ok), "oracle_latency": oracle,
             "oracle_ratio": None if oracle is None or lat == 0 else oracle / lat}
    return {"points": points, "check": check}


def _order(point: str) -> tuple:
    if point == "causal":
        return (0, 0.0)
    if point.startswith("lookahead-"):
        return (1, float(point.split("-")[1]))
    if point == "full":
        return (2, 0.0)
    return (3, float(point.split("=")[1]))


def draw_pareto(summary: dict, ax: Axes) -> None:
    """Accuracy vs mean latency of every point of :func:`adaptive_summary` on ``ax``."""
    pts = summary["points"]
    fixed = [p for p in sorted(pts, key=_order) if not p.startswith("adaptive")]
    adapt = [p for p in sorted(pts, key=_order) if p.startswith("adaptive")]
    # "full" waits for the whole sequence: drawn at the right edge, its latency written out
    near = [pts[p]["latency_mean"][0] for p in pts if p != "full"]
    edge = 1.15 * max(near) if near else 1.0
    for group, style, label in ((fixed, "o-", "fixed lookahead (causal, L = 1..W, full)"),
                                (adapt, "s", "adaptive (one point per latency_weight)")):
        if not group:
            continue
        xs = [min(pts[p]["latency_mean"][0], edge) for p in group]
        ys = [pts[p]["accuracy"][0] for p in group]
        ax.errorbar(xs, ys, xerr=[pts[p]["latency_mean"][1] for p in group],
                    yerr=[pts[p]["accuracy"][1] for p in group], fmt=style, capsize=3,
                    label=label)
        for i, (p, x, y) in enumerate(zip(group, xs, ys, strict=True)):
            text = p.replace("lookahead-", "L=").replace("adaptive-", "")
            if p == "full":
                text = f"full ({pts[p]['latency_mean'][0]:.1f} →)"
            off = (6, -12) if group is fixed else ((-40, 6) if i % 2 else (6, -14))
            ax.annotate(text, (x, y), textcoords="offset points", xytext=off, fontsize=7)
    chk = summary.get("check")
    if chk:
        ax.axvline(chk["latency_bound"], color="tab:red", ls=":", lw=1.2,
                   label=f"latency bound (min of {chk['latency_ratio']:g} x {chk['reference']}, "
                         f"{chk['oracle_ratio_bound']:g} x oracle)")
        ax.axhline(chk["reference_accuracy"] - chk["slack"], color="gray", ls="--", lw=1,
                   label=f"best fixed accuracy ({chk['best_fixed']}) - 1 point")
        if chk.get("oracle_latency") is not None:
            ax.plot([chk["oracle_latency"]], [1.0], "*", color="tab:green", ms=11,
                    label="oracle gate a_t = d_t (waits exactly for each label; ideal "
                          "accuracy 1)")
    ax.set_xlim(-0.2, edge * 1.25)
    ax.set_ylim(top=1.06)
    ax.set_xlabel("mean latency per output (frames, r^L_t - t; bars: ± standard error)")
    ax.set_ylabel("frame accuracy, test (fraction correct)")
    ax.legend(fontsize=7, loc="lower right")
