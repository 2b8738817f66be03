"""The lab's one trainer: every experiment, the adaptive-lookahead points included, is fitted by
:func:`fit`.

:func:`fit` owns the loop (AdamW with decay / no-decay parameter groups, linear warmup then
cosine decay, seeded batch order, gradient clipping, validation every ``eval_every`` steps,
early stop at a target or for lack of progress, the best validation checkpoint, one progress
bar on a terminal, or in a log a line at every tenth of the steps); an :class:`Objective` owns
what is task- or model-specific: the loss of a batch and the metrics of a data split (with
``"score"``: higher is better, what selects the checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import NamedTuple, Protocol, TextIO

import torch

from causalmix.checks import check_int

__all__ = ["STOP_REASONS", "FitResult", "Objective", "TrainConfig", "fit", "take"]

#: Why a run stopped (:attr:`FitResult.stop_reason`), in words.
STOP_REASONS = {"steps": "ran every step", "target": "reached the target",
                "patience": "stopped: no progress"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; evaluation on a
    held-out slice (the last ``num_val`` examples) of the training set every ``eval_every``
    steps; early stop when the validation score reaches ``target`` or has not improved for
    ``patience`` evaluations. The model kept is the best validation checkpoint."""

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
            check_int(f"TrainConfig.{n}", getattr(self, n), 1)
        check_int("TrainConfig.warmup", self.warmup, 0)
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` after ``step`` optimizer steps (warmup, then cosine)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        frac = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


class Objective(Protocol):
    """What :func:`fit` asks of an experiment."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int,
             steps: int) -> torch.Tensor:
        """Scalar training loss of ``batch`` at ``step`` (1-based) of ``steps``."""

    def evaluate(self, model: torch.nn.Module, data: dict[str, torch.Tensor]) -> dict:
        """Metrics of ``data`` (the model in eval mode, no grad), with ``"score"``."""


class FitResult(NamedTuple):
    metrics: dict  # test metrics of the best validation checkpoint, plus "val_score"
    curve: list[dict]  # {"step", "loss", "val_score"} per evaluation
    steps: int
    stop_reason: str  # "steps" | "target" | "patience" (see STOP_REASONS)
    params: int
    train_time_s: float


def take(data: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The examples ``idx`` (an index tensor or a slice) of every tensor of a split."""
    return {k: v[idx] for k, v in data.items()}


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98))


def _evaluate(objective: Objective, model, data) -> dict:
    model.eval()
    try:
        with torch.no_grad():
            return objective.evaluate(model, data)
    finally:
        model.train()


class _Progress:
    """One run's progress: a tqdm bar on a terminal; written to a file or pipe (a log), one
    plain line at every tenth of the steps (a bar redrawn every step would fill the log)."""

    def __init__(self, name: str, steps: int, enabled: bool, stream: TextIO | None = None):
        self.name, self.steps, self.bar, self.stream = name, steps, None, None
        if not enabled:
            return
        stream = sys.stderr if stream is None else stream
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=name, leave=False, dynamic_ncols=True,
                            file=stream)
        else:
            self.stream, self.every = stream, max(steps // 10, 1)

    def update(self, step: int, loss: torch.Tensor, best: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{best:.3f}")
        elif self.stream is not None and (step % self.every == 0 or step == self.steps):
            self.stream.write(f"{self.name}: step {step}/{self.steps}, loss {loss.item():.3f}, "
                              f"best validation score {best:.3f}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(model: torch.nn.Module, objective: Objective, train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor], cfg: TrainConfig, *, seed: int, name: str = "run",
        progress: bool = False) -> FitResult:
    """Train ``model`` on ``train`` (its last ``cfg.num_val`` examples held out for
    validation) and return the :class:`FitResult` with ``test`` metrics of the best
    validation checkpoint. ``seed`` fixes the batch order (the caller seeds the init)."""
    t0 = time.perf_counter()
    n_train = train["inputs"].shape[0]
    if n_train <= cfg.num_val:
        raise ValueError(f"{name}: num_train ({n_train}) must exceed TrainConfig.num_val "
                         f"({cfg.num_val})")
    val = take(train, slice(n_train - cfg.num_val, n_train))
    n_fit = n_train - cfg.num_val
    gen = torch.Generator().manual_seed(seed + 1)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    bar = _Progress(name, cfg.steps, progress)
    curve, best, best_state, stale, stop_reason = [], -math.inf, None, 0, "steps"
    perm, pos, step = torch.randperm(n_fit, generator=gen), 0, 0
    model.train()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n_fit:
            perm, pos = torch.randperm(n_fit, generator=gen), 0
        batch = take(train, perm[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        loss = objective.loss(model, batch, step, cfg.steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name} seed {seed}: loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        bar.update(step, loss, best)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = _evaluate(objective, model, val)
            curve.append({"step": step, "loss": loss.item(), "val_score": ev["score"]})
            if ev["score"] > best:
                best, stale, best_state = ev["score"], 0, copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if cfg.target is not None and ev["score"] >= cfg.target:
                stop_reason = "target"
                break
            if stale >= cfg.patience:
                stop_reason = "patience"
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = _evaluate(objective, model, test)
    metrics["val_score"] = best
    return FitResult(metrics, curve, step, stop_reason,
                     sum(p.numel() for p in model.parameters()), time.perf_counter() - t0)
