"""A small CPU trainer: AdamW, warmup + cosine schedule, seeded, early stop, progress bar."""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from causalmix.lab.experiments import Experiment, latency_frames, layer_visibility
from causalmix.lab.tasks import IGNORE, TaskData
from causalmix.nn import SequenceModel

__all__ = ["evaluate", "train_one"]


def _batch(data: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


def _forward(model: SequenceModel, exp: Experiment, batch: dict[str, torch.Tensor]):
    vis = layer_visibility(exp.scheme, len(model.blocks), batch["prefix_len"])
    return model(batch["inputs"], visibility=vis)


def _loss(exp: Experiment, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if exp.task.kind == "classification":
        return F.cross_entropy(out.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
    mask = batch["mask"]
    return ((out[..., 0] - batch["targets"]) ** 2)[mask].mean()


@torch.no_grad()
def evaluate(model: SequenceModel, exp: Experiment, data: dict[str, torch.Tensor],
             batch_size: int = 256) -> dict:
    """Test metrics. Classification: ``accuracy`` over labelled positions (lookahead also
    ``accuracy_by_delay``). Regression: ``mse`` over queries and ``mse_by_examples``."""
    model.eval()
    n = data["inputs"].shape[0]
    outs = []
    for s in range(0, n, batch_size):
        outs.append(_forward(model, exp, _batch(data, slice(s, s + batch_size))))
    out = torch.cat(outs)
    model.train()
    if exp.task.kind == "classification":
        tgt = data["targets"]
        lab = tgt != IGNORE
        hit = (out.argmax(-1) == tgt) & lab
        res = {"accuracy": float(hit.sum() / lab.sum()), "score": float(hit.sum() / lab.sum())}
        if "delay" in data:
            res["accuracy_by_delay"] = {
                int(d): float(hit[data["delay"] == d].float().mean())
                for d in data["delay"].unique()}
        return res
    err = (out[..., 0] - data["targets"]) ** 2
    mask = data["mask"]
    by = {}
    for k in data["prefix_len"].unique().tolist():
        sel = data["prefix_len"] == k
        by[int(k)] = float(err[sel][mask[sel]].mean())
    mse = float(err[mask].mean())
    return {"mse": mse, "mse_by_examples": by, "score": -mse}


def train_one(exp: Experiment, seed: int, *, data: TaskData | None = None,
              progress: bool = False, desc: str = "") -> dict:
    """Train ``exp`` with ``seed`` and return ``{"metrics", "curve", "steps", ...}``.

    The seed fixes the task data (``exp.task.build(seed)``), the initialisation and the batch
    order. The test metrics are those of the checkpoint with the best validation score.
    """
    cfg = exp.train
    t0 = time.perf_counter()
    data = exp.task.build(seed) if data is None else data
    n_train = data.train["inputs"].shape[0]
    if n_train <= cfg.num_val:
        raise ValueError(f"{exp.name}: num_train ({n_train}) must exceed TrainConfig.num_val "
                         f"({cfg.num_val})")
    val = _batch(data.train, slice(n_train - cfg.num_val, n_train))
    n_fit = n_train - cfg.num_val
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SequenceModel(exp.model_config())
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=desc or exp.name, leave=False, dynamic_ncols=True)
    curve, best, best_state, stale, stop_reason = [], -math.inf, None, 0, "steps"
    perm = torch.randperm(n_fit, generator=gen)
    pos = 0
    step = 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n_fit:
            perm, pos = torch.randperm(n_fit, generator=gen), 0
        batch = _batch(data.train, perm[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        loss = _loss(exp, _forward(model, exp, batch), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{exp.name} seed {seed}: loss is {float(loss)} at step "
                                     f"{step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{best:.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            score = evaluate(model, exp, val)["score"]
            curve.append({"step": step, "loss": loss.item(), "val_score": score})
            if score > best:
                best, stale = score, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if cfg.target is not None and score >= cfg.target:
                stop_reason = "target"
                break
            if stale >= cfg.patience:
                stop_reason = "patience"
                break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = evaluate(model, exp, data.test)
    metrics["val_score"] = best
    if exp.task_name == "icl_regression":
        metrics["least_squares_mse"] = data.extra["least_squares_mse"]
        metrics["bayes_mse"] = data.extra["bayes_mse"]
    latency = latency_frames(exp.scheme, len(model.blocks))
    if exp.task_name == "lookahead":
        # the frames a model can see ahead: its compounded lookahead, all of them if unbounded
        ahead = exp.task.seq_len - 1 if latency is None else latency
        metrics["best_possible_accuracy"] = exp.task.best_accuracy(ahead)
    metrics["latency_frames"] = latency
    return {"metrics": metrics, "curve": curve, "steps": step, "stop_reason": stop_reason,
            "params": sum(p.numel() for p in model.parameters()),
            "train_time_s": time.perf_counter() - t0}
