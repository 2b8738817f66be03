"""Experiments (task x model x visibility x training) and the named suites of the lab."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from causalmix.lab.tasks import MQAR, ICLRegression, Lookahead
from causalmix.nn import ModelConfig
from causalmix.visibility import Causal, Full, Prefix, Visibility, Window

__all__ = ["SUITES", "Experiment", "TrainConfig", "layer_visibility", "suite"]

#: Visibility schemes an experiment can name (applied per batch, per layer):
#:   "causal"        every layer Causal()
#:   "prefix"        every layer Prefix(prefix_len) (prefix-LM: the prompt is read bidirectionally)
#:   "full-first"    the first layer Full() (bidirectional), causal above (JRT-RNN-style reading)
#:   "lookahead-L"   the first layer Causal() | Window(0, L) (L frames ahead), causal above
SCHEMES = ("causal", "prefix", "full-first", "lookahead-L")


def layer_visibility(scheme: str, n_layers: int,
                     prefix_len: torch.Tensor | None = None) -> tuple[Visibility, ...]:
    """Per-layer specs for ``scheme`` (see :data:`SCHEMES`); ``prefix_len: [B]`` for "prefix"."""
    causal = (Causal(),) * n_layers
    if scheme == "causal":
        return causal
    if scheme == "prefix":
        if prefix_len is None:
            raise ValueError("scheme 'prefix' needs prefix_len: [B] int64")
        n = int(prefix_len[0]) if bool((prefix_len == prefix_len[0]).all()) else prefix_len
        return (Prefix(n),) * n_layers
    if scheme == "full-first":
        return (Full(),) + causal[1:]
    if scheme.startswith("lookahead-"):
        tail = scheme[len("lookahead-"):]
        if not tail.isdigit():
            raise ValueError(f"scheme lookahead-L needs an integer L, got {scheme!r}")
        ahead = int(tail)
        first = Causal() if ahead == 0 else Causal() | Window(0, ahead)
        return (first,) + causal[1:]
    raise ValueError(f"unknown visibility scheme {scheme!r}; schemes: {list(SCHEMES)}")


def latency_frames(scheme: str, n_layers: int) -> int | None:
    """Frames a stream waits per output (the per-layer lookaheads add up); None if unbounded."""
    if scheme == "prefix":
        return None
    total = 0
    for spec in layer_visibility(scheme, n_layers):
        if spec.lookahead_frames is None:
            return None
        total += spec.lookahead_frames
    return total


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; evaluation on a
    held-out slice of the training set every ``eval_every`` steps; early stop when the
    validation metric reaches ``target`` or has not improved for ``patience`` evaluations.
    The test metrics are those of the best validation checkpoint."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 20
    min_lr_ratio: float = 0.05
    eval_every: int = 50
    num_val: int = 256
    patience: int = 4
    target: float | None = None  # stop once the validation score (higher is better) reaches it
    grad_clip: float = 1.0

    def __post_init__(self):
        for n in ("steps", "batch_size", "eval_every", "num_val", "patience"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{n} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One trainable setting; ``labels`` are what the report groups and plots by."""

    name: str
    task: MQAR | ICLRegression | Lookahead
    mixer: str = "softmax"
    scheme: str = "causal"
    preset: str = "tiny-softmax"
    model: tuple[tuple[str, object], ...] = ()  # ModelConfig overrides, as (field, value) pairs
    train: TrainConfig = TrainConfig()
    labels: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        layer_visibility(self.scheme, 1, torch.zeros(1, dtype=torch.int64))  # validates
        object.__setattr__(self, "model", tuple(self.model))
        object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def task_name(self) -> str:
        return {MQAR: "mqar", ICLRegression: "icl_regression", Lookahead: "lookahead"}[
            type(self.task)]

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset, mixer=self.mixer, **self.task.io(),
                                     **dict(self.model))

    def to_json(self) -> dict:
        return {
            "name": self.name, "task": self.task_name, "task_config":
            _plain(dataclasses.asdict(self.task)), "mixer": self.mixer, "scheme": self.scheme,
            "preset": self.preset, "model": _plain(dict(self.model)),
            "train": _plain(dataclasses.asdict(self.train)), "labels": _plain(dict(self.labels)),
        }

    def run_key(self, seed: int) -> str:
        """Identity of (experiment, seed): a hash of the whole config, so that a changed
        config never reuses a stale result."""
        blob = json.dumps({"experiment": self.to_json(), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


# ---------------------------------------------------------------------------------------------
# Suites. Sizes are chosen so that "default" (3 seeds) trains in well under 15 minutes on a
# 2-core CPU: d_model 64, 2 layers, sequences of 24-80 tokens, a few hundred steps.


@dataclasses.dataclass(frozen=True)
class SuiteSize:
    """How big a suite is: training steps per task, data sizes, evaluations, default seeds."""

    steps: dict[str, int]
    num_train: int
    num_test: int
    num_val: int
    evals: int  # validation evaluations per run (every steps // evals steps)
    seeds: int

    def train(self, task: str, **kw) -> TrainConfig:
        steps = self.steps[task]
        return TrainConfig(steps=steps, num_val=self.num_val,
                           eval_every=max(steps // self.evals, 1), **kw)


def _mqar_suite(size: SuiteSize, name: str) -> list[Experiment]:
    # vocab 32 (15 keys, 16 values): each token is seen often enough that both mixers get past
    # MQAR's learning plateau within a CPU budget (at vocab 64 most 600-step runs did not).
    base = dict(vocab_size=32, num_kv_pairs=8, num_queries=4, query_len=6,
                num_train=size.num_train, num_test=size.num_test)
    if name == "smoke":
        base.update(num_kv_pairs=4, num_queries=2, query_len=4)
    # MQAR learns after a plateau: stop at the target only, never for lack of progress.
    train = size.train("mqar", batch_size=32, lr=3e-3, target=0.99, patience=size.evals + 1)
    out = []
    for mixer, scheme, passes in [("softmax", "causal", 1), ("linear", "causal", 1),
                                  ("linear", "causal", 2), ("linear", "full-first", 1)]:
        if name == "smoke" and (passes, scheme) != (1, "causal"):
            continue
        # The linear runs ask for the dense reference form explicitly: at these lengths
        # (22-44 tokens, 273 Taylor features per head) it trains ~3x faster on CPU than the
        # chunked form, which tests/test_linear.py checks against it.
        model = (("impl", "reference"),) if mixer == "linear" else ()
        out.append(Experiment(
            name=f"mqar/{mixer}/{scheme}/passes={passes}",
            task=MQAR(**base, num_passes=passes), mixer=mixer, scheme=scheme,
            preset=f"tiny-{mixer}", model=model, train=train,
            labels=(("mixer", mixer), ("scheme", scheme), ("passes", passes)),
        ))
    return out


def _icl_suite(size: SuiteSize, name: str) -> list[Experiment]:
    task = ICLRegression(dim=4, max_examples=16, seq_len=24, noise_std=0.1,
                         test_examples=(1, 2, 4, 6, 8, 12, 16), num_train=size.num_train,
                         num_test=size.num_test)
    train = size.train("icl", batch_size=32, lr=2e-3, patience=4)
    return [Experiment(name=f"icl_regression/softmax/{scheme}", task=task, mixer="softmax",
                       scheme=scheme, preset="tiny-softmax", train=train,
                       labels=(("scheme", scheme),))
            for scheme in ("prefix", "causal")]


def _lookahead_suite(size: SuiteSize, name: str) -> list[Experiment]:
    task = Lookahead(num_symbols=8, max_delay=4, seq_len=48, num_train=size.num_train,
                     num_test=size.num_test)
    train = size.train("lookahead", batch_size=32, lr=3e-3, target=0.99, patience=3)
    ahead = (0, 2) if name == "smoke" else (0, 1, 2, 4)
    return [Experiment(name=f"lookahead/softmax/lookahead-{a}", task=task, mixer="softmax",
                       scheme=f"lookahead-{a}", preset="tiny-softmax", train=train,
                       labels=(("lookahead", a),))
            for a in ahead]


def suite(name: str) -> tuple[list[Experiment], int]:
    """The experiments of a named suite and its default number of seeds."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {sorted(SUITES)}")
    size = SUITES[name]
    exps = _mqar_suite(size, name) + _icl_suite(size, name) + _lookahead_suite(size, name)
    return exps, size.seeds


SUITES: dict[str, SuiteSize] = {
    # CI: every code path (both mixers, prefix / causal / lookahead, DB, report) in seconds.
    "smoke": SuiteSize({"mqar": 4, "icl": 4, "lookahead": 4}, num_train=128, num_test=32,
                       num_val=32, evals=2, seeds=1),
    "default": SuiteSize({"mqar": 800, "icl": 500, "lookahead": 200}, num_train=16384,
                         num_test=512, num_val=256, evals=8, seeds=3),
    "full": SuiteSize({"mqar": 2000, "icl": 1200, "lookahead": 600}, num_train=50000,
                      num_test=1000, num_val=512, evals=10, seeds=5),
}
