"""Accuracy vs latency on the ``lookahead`` task: causal, fixed lookahead 1..W, full, and
adaptive lookahead (:mod:`causalmix.nn.adaptive`, ANCAT-inspired) over a sweep of
``latency_weight``.

Every point is trained on the same task data (``Lookahead.build(seed)``, or
:meth:`AdaptiveStudy.build` with a skewed delay distribution) with the study's
:class:`~causalmix.lab.experiments.TrainConfig`:

* the fixed baselines are ordinary lab experiments trained by
  :func:`~causalmix.lab.train.train_one` (scheme ``lookahead-L``: ``Causal() | Window(0, L)``
  in the first layer, causal above; ``causal`` is ``L = 0``, ``full`` is ``L = T - 1``, which
  is ``Full()`` on ``T`` frames): checkpoint of the best validation accuracy, early stop at
  the ``target`` accuracy or after ``patience`` evaluations without progress;
* the adaptive points by :func:`train_adaptive`: the preset with its last layer adaptive, the
  same optimiser and schedule, loss ``CE + latency_weight * ramp * expected latency + gate
  penalty``, checkpoint of the best validation ``accuracy - latency_weight * mean latency``
  (no target stop: reaching the accuracy early is not the end, the latency still falls).

The latency of every point is measured the same way, per output frame of the test sequences:
:func:`~causalmix.nn.adaptive.compounded_latency` of the layers' specs (``r^L_t - t``; a
finite sequence clips it at the last frame, so ``Full()`` costs ``T - 1 - t`` and fixed
lookahead ``L`` averages slightly under ``L``).

Runs are recorded in the lab's run database (``out/runs.sqlite``, suite
``adaptive-<study>``) and skipped when already done; :func:`write_adaptive_report` writes the
summary table and the Pareto plot.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from causalmix.lab.db import RunDB, git_revision
from causalmix.lab.experiments import Experiment, TrainConfig, _plain, layer_visibility
from causalmix.lab.tasks import IGNORE, Lookahead, TaskData
from causalmix.lab.train import train_one
from causalmix.nn.adaptive import AdaptiveConfig, AdaptiveModel, compounded_latency

__all__ = [
    "STUDIES",
    "SUITE_STUDY",
    "AdaptiveStudy",
    "adaptive_summary",
    "oracle_latency",
    "plot_pareto",
    "run_adaptive_study",
    "summary_table",
    "train_adaptive",
    "write_adaptive_report",
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
    seeds: int = 3

    def __post_init__(self):
        if not isinstance(self.task, Lookahead):
            raise TypeError(f"AdaptiveStudy.task must be a Lookahead task, got "
                            f"{type(self.task).__name__}")
        w = self.max_lookahead
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"AdaptiveStudy.max_lookahead must be an int >= 1, got {w!r}")
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
            scheme = f"lookahead-{ahead}"
            out.append((point, Experiment(
                name=f"adaptive-study{'' if self.delay_probs is None else '-skewed'}/"
                     f"{self.mixer}/{point}", task=self.task, mixer=self.mixer,
                scheme=scheme, preset=self.preset, train=self.train,
                labels=(("kind", "fixed"), ("point", point)))))
        return out

    def model_config(self, n_layers: int) -> AdaptiveConfig:
        w = (0,) * (n_layers - 1) + (self.max_lookahead,)
        return AdaptiveConfig.from_name(self.preset, mixer=self.mixer, max_lookahead=w,
                                        choices=self.choices, **self.task.io())

    def to_json(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _size(steps: int, num_train: int, num_test: int, num_val: int, evals: int, seeds: int,
          weights: tuple[float, ...]) -> AdaptiveStudy:
    task = Lookahead(num_symbols=8, max_delay=4, seq_len=48, num_train=num_train,
                     num_test=num_test)
    train = TrainConfig(steps=steps, batch_size=32, lr=3e-3, num_val=num_val,
                        eval_every=max(steps // evals, 1), patience=3, target=0.99)
    return AdaptiveStudy(task=task, max_lookahead=4, latency_weights=weights, train=train,
                         seeds=seeds)


#: Named sizes: ``quick`` (for the smoke suite: every code path in seconds), ``default`` (the
#: lookahead task at the lab's default size, 2 seeds), ``full``; ``skewed``: ``default`` with
#: delays mostly 0 (lookahead rarely needed: ANCAT's setting).
STUDIES: dict[str, AdaptiveStudy] = {
    "quick": _size(6, 256, 64, 64, 2, 1, (0.05,)),
    "default": _size(200, 16384, 512, 256, 8, 2, (0.05, 0.2, 0.6)),
    "full": _size(600, 50000, 1000, 512, 10, 5, (0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 1.0)),
    # the default size with delays mostly 0 (P(d = 0) = 0.75, 1..4 equally likely otherwise)
    "skewed": dataclasses.replace(_size(200, 16384, 512, 256, 8, 2, (0.05, 0.2, 0.6)),
                                  delay_probs=(0.75, 0.0625, 0.0625, 0.0625, 0.0625)),
}


#: The study each lab suite runs (``causalmix lab run --suite <name>``).
SUITE_STUDY = {"smoke": "quick", "default": "default", "full": "full"}


# ============================================================================ training


def _adaptive_eval(model: AdaptiveModel, data: dict[str, torch.Tensor],
                   batch_size: int = 256) -> dict:
    model.eval()
    hits, labelled, lats = 0, 0, []
    with torch.no_grad():
        for s in range(0, data["inputs"].shape[0], batch_size):
            x, y = data["inputs"][s:s + batch_size], data["targets"][s:s + batch_size]
            out = model(x, hard=True)
            lab = y != IGNORE
            hits += int(((out.output.argmax(-1) == y) & lab).sum())
            labelled += int(lab.sum())
            lats.append(out.latency.reshape(-1))
    model.train()
    lat = torch.cat(lats).double()
    return {"accuracy": hits / max(labelled, 1), "latency_mean": float(lat.mean()),
            "latency_p90": float(torch.quantile(lat, 0.9)), "latency_max": int(lat.max())}


def train_adaptive(study: AdaptiveStudy, latency_weight: float, seed: int, *,
                   data: TaskData | None = None) -> dict:
    """Train the adaptive model of ``study`` with ``latency_weight`` and ``seed``.

    Loss: cross-entropy + ``latency_weight * ramp(step) * expected_latency.mean()`` (frames;
    ``ramp``: :attr:`AdaptiveStudy.latency_ramp`) + ``gate_penalty * gate_penalty``. AdamW,
    warmup
    + cosine and the parameter groups of :func:`~causalmix.lab.train.train_one`; the checkpoint
    kept is the one with the best validation objective ``accuracy - latency_weight * mean
    latency`` (hard gates), which also drives the patience. Returns ``{"metrics", "curve",
    "steps", "stop_reason", "params", "train_time_s"}``; metrics are on the test set.
    """
    cfg = study.train
    t0 = time.perf_counter()
    data = study.build(seed) if data is None else data
    n_train = data.train["inputs"].shape[0]
    if n_train <= cfg.num_val:
        raise ValueError(f"num_train ({n_train}) must exceed TrainConfig.num_val ({cfg.num_val})")
    val = {k: v[n_train - cfg.num_val:] for k, v in data.train.items()}
    n_fit = n_train - cfg.num_val
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    n_layers = len(study_base_config(study).blocks)
    model = AdaptiveModel(study.model_config(n_layers))
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    lr = study.adaptive_lr or cfg.lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def ramp(step: int) -> float:
        a, b = (x * cfg.steps for x in study.latency_ramp)
        return 1.0 if step >= b else (0.0 if step <= a else (step - a) / (b - a))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, best, best_state, stale, stop = [], -math.inf, None, 0, "steps"
    perm, pos, step = torch.randperm(n_fit, generator=gen), 0, 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n_fit:
            perm, pos = torch.randperm(n_fit, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        out = model(data.train["inputs"][idx], hard=False, generator=noise)
        ce = F.cross_entropy(out.output.flatten(0, 1), data.train["targets"][idx].flatten(),
                             ignore_index=IGNORE)
        loss = ce + latency_weight * ramp(step) * out.expected_latency.mean() \
            + study.gate_penalty * out.gate_penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(f"adaptive w={latency_weight} seed {seed}: loss is "
                                     f"{float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = _adaptive_eval(model, val)
            score = ev["accuracy"] - latency_weight * ev["latency_mean"]
            curve.append({"step": step, "loss": loss.item(), "val_score": score,
                          "val_accuracy": ev["accuracy"], "val_latency": ev["latency_mean"]})
            if score > best:
                best, stale, best_state = score, 0, copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if stale >= cfg.patience:
                stop = "patience"
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = _adaptive_eval(model, data.test)
    metrics["val_score"] = best
    metrics["score"] = metrics["accuracy"]
    metrics["latency_weight"] = latency_weight
    return {"metrics": metrics, "curve": curve, "steps": step, "stop_reason": stop,
            "params": sum(p.numel() for p in model.parameters()),
            "train_time_s": time.perf_counter() - t0}


def study_base_config(study: AdaptiveStudy):
    """The lab's :class:`~causalmix.nn.ModelConfig` of the study's fixed baselines."""
    return Experiment(name="_", task=study.task, mixer=study.mixer,
                      preset=study.preset).model_config()


def _fixed_latency(exp: Experiment, n_layers: int, seq_len: int) -> dict:
    lat = compounded_latency(layer_visibility(exp.scheme, n_layers), seq_len).double()
    return {"latency_mean": float(lat.mean()), "latency_p90": float(torch.quantile(lat, 0.9)),
            "latency_max": int(lat.max())}


# ============================================================================ running


def _points(study: AdaptiveStudy) -> list[tuple[str, Experiment | float]]:
    return list(study.baselines()) + [(f"adaptive-w={w:g}", w) for w in study.latency_weights]


def _key(study: AdaptiveStudy, point: str, what, seed: int) -> str:
    """Identity of one run: the lab's own run key for a fixed baseline (the experiment's whole
    config); for an adaptive point, a hash of what it depends on (the study without its sweep
    and seed count, the weight), so that extending the sweep or the seeds reuses done runs."""
    if isinstance(what, Experiment) and study.delay_probs is None:
        return what.run_key(seed)
    if isinstance(what, Experiment):
        blob = json.dumps({"experiment": what.run_key(seed), "delay_probs": study.delay_probs})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
    sj = {k: v for k, v in study.to_json().items() if k not in ("latency_weights", "seeds")}
    blob = json.dumps({"study": sj, "point": point, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_adaptive_study(study: str | AdaptiveStudy, out: str | Path, *, seeds: int | None = None,
                       log=print) -> list[dict]:
    """Train every point of ``study`` (a name in :data:`STUDIES` or an :class:`AdaptiveStudy`)
    for seeds ``0 .. seeds-1``, record each run in ``out/runs.sqlite`` (suite
    ``adaptive-<name>``, skipped when already done) and return the finished rows (see
    :func:`adaptive_summary`)."""
    name = study if isinstance(study, str) else "custom"
    if isinstance(study, str):
        if study not in STUDIES:
            raise ValueError(f"unknown adaptive study {study!r}; studies: {sorted(STUDIES)}")
        study = STUDIES[study]
    seeds = study.seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    sj = study.to_json()
    n_layers = len(study_base_config(study).blocks)
    points = _points(study)
    db = RunDB(out)
    rev = git_revision()
    keys = []
    t_all = time.perf_counter()
    try:
        for seed in range(seeds):
            data = study.build(seed)
            for point, what in points:
                key = _key(study, point, what, seed)
                keys.append(key)
                if db.status(key) == "done":
                    continue
                db.start(key, experiment=f"adaptive-study/{point}", task="lookahead", seed=seed,
                         suite=f"adaptive-{name}", config={"study": sj, "point": point},
                         git_rev=rev)
                t = time.perf_counter()
                if isinstance(what, Experiment):
                    res = train_one(what, seed, data=data)
                    ahead = int(what.scheme.split("-")[1])
                    res["metrics"]["best_possible_accuracy"] = study.best_accuracy(ahead)
                    res["metrics"].update(_fixed_latency(what, n_layers, study.task.seq_len))
                else:
                    res = train_adaptive(study, what, seed, data=data)
                wall = time.perf_counter() - t
                db.finish(key, metrics=res["metrics"], curve=res["curve"],
                          info={"steps": res["steps"], "stop_reason": res["stop_reason"],
                                "params": res["params"], "point": point},
                          wall_time_s=wall)
                m = res["metrics"]
                log(f"adaptive study {point} seed={seed}: accuracy {m['accuracy']:.4f}, mean "
                    f"latency {m['latency_mean']:.3f} ({res['steps']} steps, {wall:.1f}s)")
        rows = db.runs(status="done", keys=keys)
    finally:
        db.close()
    log(f"adaptive study {name}: {len(rows)} runs, {time.perf_counter() - t_all:.1f}s")
    return rows


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def oracle_latency(study: AdaptiveStudy, seeds: int) -> float:
    """Mean latency of the oracle gate ``a_t = d_t`` (each frame waits exactly for its label;
    the task clips delays at the sequence end) on the test sets of ``seeds``: the least mean
    latency at which a model with the last layer adaptive can label every frame."""
    return statistics.fmean(float(study.build(s).test["delay"].double().mean())
                            for s in range(seeds))


def adaptive_summary(rows: list[dict], max_lookahead: int,
                     oracle: float | None = None) -> dict:
    """Per point (``causal``, ``lookahead-L``, ``full``, ``adaptive-w=...``): mean and std
    over seeds of accuracy and mean / p90 / max latency; and the verdict of the question "does
    some adaptive point reach accuracy within 1 point of lookahead-W at <= 50% of its mean
    latency?" (``"check"``, with the :func:`oracle_latency` ``oracle`` when given)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["info"]["point"], []).append(r["metrics"])
    points = {}
    for point, ms in by.items():
        points[point] = {
            "n": len(ms),
            **{f"{k}": _mean_std([m[k] for m in ms])
               for k in ("accuracy", "latency_mean", "latency_p90", "latency_max")},
        }
    ref = points.get(f"lookahead-{max_lookahead}")
    check = None
    if ref is not None:
        acc_w, lat_w = ref["accuracy"][0], ref["latency_mean"][0]
        cands = [(p, v) for p, v in points.items() if p.startswith("adaptive")]
        ok = [p for p, v in cands
              if v["accuracy"][0] >= acc_w - 0.01 and v["latency_mean"][0] <= 0.5 * lat_w]
        check = {"reference": f"lookahead-{max_lookahead}", "reference_accuracy": acc_w,
                 "reference_latency_mean": lat_w, "passing_points": ok, "holds": bool(ok),
                 "oracle_latency": oracle,
                 "oracle_ratio": None if oracle is None else oracle / lat_w}
    return {"points": points, "check": check}


def _order(point: str) -> tuple:
    if point == "causal":
        return (0, 0.0)
    if point.startswith("lookahead-"):
        return (1, float(point.split("-")[1]))
    if point == "full":
        return (2, 0.0)
    return (3, float(point.split("=")[1]))


def summary_table(summary: dict) -> list[str]:
    """Markdown table lines of :func:`adaptive_summary`."""
    lines = ["| point | seeds | accuracy | mean latency | p90 latency | max latency |",
             "|---|---|---|---|---|---|"]
    for p in sorted(summary["points"], key=_order):
        v = summary["points"][p]
        lines.append(f"| {p} | {v['n']} | {v['accuracy'][0]:.4f} ± {v['accuracy'][1]:.4f} | "
                     f"{v['latency_mean'][0]:.3f} ± {v['latency_mean'][1]:.3f} | "
                     f"{v['latency_p90'][0]:.2f} | {v['latency_max'][0]:.1f} |")
    return lines


def plot_pareto(summary: dict, path: str | Path, *, title: str = "") -> Path:
    """Draw accuracy vs mean latency (mean ± std over seeds) of every point to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
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
        ax.axvline(0.5 * chk["reference_latency_mean"], color="tab:red", ls=":", lw=1.2,
                   label=f"50% of {chk['reference']} latency")
        ax.axhline(chk["reference_accuracy"] - 0.01, color="gray", ls="--", lw=1,
                   label=f"{chk['reference']} accuracy - 1 point")
        if chk.get("oracle_latency") is not None:
            ax.axvline(chk["oracle_latency"], color="tab:green", ls="-.", lw=1,
                       label="oracle gate a_t = d_t (every frame right)")
    ax.set_xlim(-0.2, edge * 1.25)
    ax.set_ylim(top=1.06)
    ax.set_xlabel("mean latency per output (frames, r^L_t - t)")
    ax.set_ylabel("frame accuracy (test)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Lookahead task: adaptive vs fixed lookahead", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_adaptive_report(study: str | AdaptiveStudy, out: str | Path, *,
                          seeds: int | None = None) -> dict:
    """From the finished runs of ``study`` in ``out/runs.sqlite`` (run them first with
    :func:`run_adaptive_study`), write ``out/figures/adaptive_pareto_<name>.png`` and
    ``out/adaptive_<name>.md``; returns ``{"summary", "markdown": [lines], "figure": path}``."""
    name = study if isinstance(study, str) else "custom"
    st = STUDIES[study] if isinstance(study, str) else study
    seeds = st.seeds if seeds is None else seeds
    keys = {_key(st, p, what, s): p for p, what in _points(st) for s in range(seeds)}
    db = RunDB(out)
    try:
        rows = db.runs(status="done", keys=list(keys))
        for r in rows:  # a fixed baseline may have been recorded by another study / the lab
            r["info"]["point"] = keys[r["key"]]
    finally:
        db.close()
    if not rows:
        raise ValueError(f"no finished runs of adaptive study {name!r} in {out}")
    summary = adaptive_summary(rows, st.max_lookahead, oracle_latency(st, seeds))
    fig_name = f"adaptive_pareto_{name}.png"
    fig = plot_pareto(summary, Path(out) / "figures" / fig_name,
                      title=f"Lookahead task (W={st.max_lookahead}"
                      + ("" if st.delay_probs is None else
                         f", P(delay) = {list(st.delay_probs)}") + "): adaptive vs fixed")
    md = ["## Adaptive lookahead (ANCAT-inspired)"
          + ("" if st.delay_probs is None else f", delays drawn with P = {list(st.delay_probs)}"),
          "", f"![adaptive](figures/{fig_name})",
          "", *summary_table(summary), ""]
    chk = summary["check"]
    if chk:
        md.append(f"Does an adaptive point reach accuracy within 1 point of {chk['reference']} "
                  f"({chk['reference_accuracy']:.4f}) at <= 50% of its mean latency "
                  f"({chk['reference_latency_mean']:.3f} frames)? "
                  + ("Yes: " + ", ".join(chk["passing_points"]) + "." if chk["holds"] else "No.")
                  + f" The oracle gate (each frame waits exactly for its label) has mean latency "
                  f"{chk['oracle_latency']:.3f} frames, {100 * chk['oracle_ratio']:.1f}% of "
                  f"{chk['reference']}'s: the least latency at which every frame can be right.")
    (Path(out) / f"adaptive_{name}.md").write_text("\n".join(md) + "\n")
    return {"summary": summary, "markdown": md, "figure": fig}
