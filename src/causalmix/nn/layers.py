"""Attention layer, pre-norm block and a small sequence model, each under a visibility spec.

Layout is ``[B, T, C]`` for activations and ``[B, T, H, D]`` inside the mixers. Positions are
absolute token indices (``offset + [0, T)``): rotary angles and the visibility spec both use them,
so a chunk of a stream computes exactly what the same rows of a whole-sequence run compute.

A :class:`Block` implements the streaming protocol of :mod:`causalmix.stream`::

    forward(x) == stream_out(x, mix(mixer, **stream_qkv(x, pos), visibility=visibility,
                                    **mixer_kwargs()), pos)

where ``stream_qkv`` and ``stream_out`` are pointwise in time and ``mix`` is
:func:`~causalmix.ops.softmax.softmax_attention` or
:func:`~causalmix.ops.linear.linear_attention` (see :func:`mix`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.checks import ArgumentTypeError, check_int, compute_dtype, values_checked
from causalmix.nn import checkpoint
from causalmix.nn.config import AttentionConfig, BlockConfig, ModelConfig
from causalmix.nn.delta import DeltaMixer
from causalmix.nn.gated import GatedMixer
from causalmix.nn.gla import GLAMixer
from causalmix.nn.kda import KDAMixer
from causalmix.nn.mixing import MixingLayer, mix
from causalmix.visibility import Visibility

__all__ = ["Attention", "Block", "MixingLayer", "ModelBase", "SequenceModel", "feature_map", "mix",
           "rotary"]


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x: [B, n, H, D]`` (D even) by angles ``positions[t] * base ** (-2i / D)``;
    ``positions: [n]`` int64 absolute indices. Computed in fp32 (fp64 for fp64 inputs),
    returned in x's dtype."""
    d = x.shape[-1]
    wide = compute_dtype(x)
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=wide) / d)
    ang = positions.to(device=x.device, dtype=wide)[:, None] * inv  # [n, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.to(wide).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Positive feature map for linear attention, ``x: [..., f]``.

    ``"taylor"`` -> ``[..., 1 + f + f*f]``: ``[1, x', x' (x) x' / sqrt 2]`` with
    ``x' = x / f ** 0.25``, so ``phi(q).phi(k) = 1 + s + s^2 / 2`` with ``s = q.k / sqrt f``:
    the 2nd-order Taylor expansion of the softmax kernel ``exp(s)``, which is >= 1/2 for every
    ``s`` (a safe normaliser) and, unlike ``elu + 1``, sharpens with ``|s|`` (the quadratic term)
    so that a query can single out its matching key -- what associative recall needs (Based,
    Arora et al. 2024). ``"elu"`` -> ``elu(x) + 1`` (Katharopoulos et al. 2020), same width.
    """
    if kind == "taylor":
        f = x.shape[-1]
        x = x / f ** 0.25
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)
    if kind == "elu":
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be 'taylor' or 'elu', got {kind!r}")


class Attention(MixingLayer):
    """One softmax or linear attention layer: projections, the mixer (:func:`mix`), output
    projection. ``forward(x: [B, T, C], *, visibility, offset=0) -> [B, T, C]``.

    Its parts, as the streams use them: ``qkv`` gives ``{"q": .., "k": .., "v": ..}``: for
    softmax, ``q: [B, n, H, hd]`` and ``k, v: [B, n, Hkv, hd]`` with rotary positions on q and
    k; for linear,
    ``phi(q), phi(k): [B, n, H, F]`` and ``v: [B, n, H, hd + 1]`` (a ones column last: the mixer
    then returns numerator and normaliser in one call; k/v heads are repeated for GQA).
    ``out(mixed, x)`` divides by the normaliser (linear) and projects back to ``[B, n, C]``.
    """

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        if cfg.mixer not in ("softmax", "linear"):
            raise ValueError(f"Attention: mixer must be 'softmax' or 'linear', got "
                             f"{cfg.mixer!r} (the gated layer is causalmix.nn.gated.GatedMixer)")
        self.cfg = cfg
        self.op = cfg.mixer
        h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qk_dim = hd if cfg.mixer == "softmax" else cfg.feature_dim
        self.q_proj = nn.Linear(cfg.d_model, h * qk_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, hkv * qk_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        if cfg.decay is not None:
            self.register_buffer("decay", torch.tensor(cfg.decay, dtype=torch.float32))
        else:
            self.decay = None

    def mixer_kwargs(self) -> dict:
        if self.cfg.mixer == "softmax":
            return {"scale": 1.0 / math.sqrt(self.cfg.head_dim)}
        return {} if self.decay is None else {"decay": self.decay}

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, cfg.n_heads, -1)
        k = self.k_proj(x).view(b, n, cfg.n_kv_heads, -1)
        v = self.v_proj(x).view(b, n, cfg.n_kv_heads, cfg.head_dim)
        if cfg.mixer == "softmax":
            return {"q": rotary(q, positions, cfg.rope_base),
                    "k": rotary(k, positions, cfg.rope_base), "v": v}
        group = cfg.n_heads // cfg.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        q, k = feature_map(q, cfg.feature_map), feature_map(k, cfg.feature_map)
        return {"q": q, "k": k, "v": torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)}

    def out(self, mixed: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``mixed: [B, n, H, hd]`` (softmax) or ``[B, n, H, hd + 1]`` (linear) -> ``[B, n, C]``
        (``x``, the layer input, is not needed here; :class:`GatedMixer` gates with it)."""
        if self.cfg.mixer == "linear":
            num, den = mixed[..., :-1], mixed[..., -1:]
            # den >= 1/2 * (decay-weighted count of visible keys) for the Taylor map; a row that
            # sees no key has num = den = 0 and gets 0.
            mixed = num / (den + 1e-6)
        b, n = mixed.shape[:2]
        return self.o_proj(mixed.reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm block ``y = h + mlp(norm2(h))``, ``h = x + attn(norm1(x))`` under ``visibility``.

    ``x: [B, T, C]`` -> ``[B, T, C]``; ``attn`` is an :class:`Attention`, for
    ``mixer="gated"`` a :class:`~causalmix.nn.gated.GatedMixer`, for ``mixer="delta"`` a
    :class:`~causalmix.nn.delta.DeltaMixer` (``mixer == "delta"``), for ``mixer="gla"`` a
    :class:`~causalmix.nn.gla.GLAMixer`, for ``mixer="kda"`` a
    :class:`~causalmix.nn.kda.KDAMixer` (``mixer == "delta"``). Implements the
    :class:`causalmix.stream.StreamableLayer` protocol (``mixer``, ``visibility``,
    ``mixer_kwargs``, ``stream_qkv``, ``stream_out``), where ``mixer`` is the op family that
    streams the layer, ``"softmax"`` or ``"linear"`` (a gated layer: ``"linear"``, with its
    gates as per-frame inputs); the layer's kind is ``cfg.attention.mixer``.
    """

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.visibility: Visibility = cfg.visibility
        c = cfg.attention.d_model
        self.norm1 = nn.LayerNorm(c)
        kind = {"gated": GatedMixer, "delta": DeltaMixer, "gla": GLAMixer,
                "kda": KDAMixer}.get(
            cfg.attention.mixer, Attention)
        self.attn: MixingLayer = kind(cfg.attention)
        self.mixer: str = self.attn.op
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(
            nn.Linear(c, cfg.mlp_ratio * c), nn.GELU(), nn.Linear(cfg.mlp_ratio * c, c)
        )

    def mixer_kwargs(self) -> dict:
        """Keyword arguments for the mixer: ``{"scale": s}`` or ``{"decay": [H] tensor}``."""
        return self.attn.mixer_kwargs()

    def stream_qkv(self, x: torch.Tensor, positions: torch.Tensor,
                   context: Any = None) -> Any:
        """``x: [B, n, C]`` at absolute ``positions: [n]`` -> the mixer's per-frame inputs by
        name: ``{"q", "k", "v"}`` (gated: also ``"log_gate"``, ``"reverse_log_gate"``). A layer
        with a stream context (:meth:`stream_context`, the delta layer's convolution carry)
        takes it as ``context`` and returns ``(inputs, next context)``."""
        if context is None:
            return self.attn.qkv(self.norm1(x), positions)
        return self.attn.stream_qkv(self.norm1(x), positions, context)

    def stream_context(self, visibility: Visibility) -> Any:
        """The carry a model stream keeps for this layer under ``visibility`` between pushes
        (the delta layer: its convolution's last inputs), or None (the layer is pointwise in
        time around its mixer)."""
        make = getattr(self.attn, "stream_context", None)
        return None if make is None else make(visibility)

    def stream_out(self, x: torch.Tensor, mixed: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """``x: [B, n, C]``, ``mixed: [B, n, H, Dv]`` (the mixer's output) -> ``[B, n, C]``."""
        h = x + self.attn.out(mixed, self.norm1(x))
        return h + self.mlp(self.norm2(h))

    def forward(self, x: torch.Tensor, *, offset: int = 0,
                visibility: Visibility | None = None, sharding: Any = None) -> torch.Tensor:
        """``x: [B, T, C]`` at positions ``offset + [0, T)``; ``visibility`` overrides the
        block's spec for this call (e.g. ``Prefix(n)`` with per-example lengths); ``sharding``
        (a :class:`causalmix.distributed.Sharding`): ``x`` is this rank's shard of a
        sequence-parallel call."""
        check_hidden(x, self.cfg.attention.d_model, "Block")
        check_int("offset", offset, 0)
        _check_override(visibility, "Block")
        vis = self.visibility if visibility is None else visibility
        kw = {} if sharding is None else {"sharding": sharding}
        h = x + self.attn(self.norm1(x), visibility=vis, offset=offset, **kw)
        return h + self.mlp(self.norm2(h))


def check_inputs(cfg: ModelConfig, inputs: Any, where: str = "") -> None:
    """``inputs``: int64 tokens ``[B, T]`` in ``[0, cfg.vocab_size)`` when ``cfg.vocab_size`` is
    set, else float features ``[B, T, cfg.input_dim]``, with ``T >= 1``; raises ``ValueError``
    otherwise (``where`` prefixes the message)."""
    pre = f"{where}: " if where else ""
    got = f"{getattr(inputs, 'dtype', type(inputs))} {list(getattr(inputs, 'shape', []))}"
    if cfg.vocab_size is not None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 \
                or inputs.dtype != torch.int64:
            raise ValueError(f"{pre}inputs must be int64 tokens [B, T], got {got}")
        if inputs.numel() and values_checked(inputs) and (
                int(inputs.min()) < 0 or int(inputs.max()) >= cfg.vocab_size):
            raise ValueError(
                f"{pre}inputs must be token ids in [0, vocab_size={cfg.vocab_size}), got min "
                f"{int(inputs.min())}, max {int(inputs.max())}")
    elif not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 \
            or inputs.shape[-1] != cfg.input_dim or not inputs.dtype.is_floating_point:
        raise ValueError(f"{pre}inputs must be float features [B, T, {cfg.input_dim}], got {got}")
    if inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"{pre}inputs must have batch >= 1 and length T >= 1, got shape "
                         f"{list(inputs.shape)}")


def check_hidden(x: Any, d_model: int, where: str) -> None:
    """``x``: float activations ``[B, T, d_model]`` with ``B, T >= 1``."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{where}: x must be a float [B, T, {d_model}] tensor, got "
                                f"{type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model or not x.dtype.is_floating_point:
        raise ValueError(f"{where}: x must be a float [B, T, {d_model}] tensor, got "
                         f"{x.dtype} {list(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{where}: x must have batch >= 1 and length T >= 1, got shape "
                         f"{list(x.shape)}")


def _check_override(visibility, where: str) -> None:
    if visibility is not None and not isinstance(visibility, Visibility):
        raise ArgumentTypeError(f"{where}: visibility must be a causalmix.visibility spec or "
                                f"None, got {type(visibility).__name__}")


class ModelBase(nn.Module):
    """The one model builder: input map (token embedding when ``cfg.vocab_size`` is set, else
    a linear map from ``cfg.input_dim`` features), ``n_layers`` blocks made by
    ``make_block(layer)``, a final norm and a linear head to ``cfg.output_dim``, created in that
    order (so a seeded init is the same for every model built on it). Subclasses
    (:class:`SequenceModel`, :class:`~causalmix.nn.adaptive.AdaptiveModel`) define
    ``forward``; :meth:`stream_in` / :meth:`stream_head` are the
    :class:`causalmix.stream.StreamableModel` maps."""

    def __init__(self, cfg: ModelConfig, make_block: Callable[[int], nn.Module]):
        super().__init__()
        self.model_cfg = cfg
        if cfg.vocab_size is not None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        self.blocks = nn.ModuleList(make_block(i) for i in range(len(cfg.blocks)))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim)

    def stream_in(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input map, pointwise in time: ``inputs [B, n]`` or ``[B, n, input_dim]`` ->
        ``[B, n, d_model]`` (with :meth:`stream_head` and ``blocks``, what
        :class:`causalmix.stream.ModelStream` streams)."""
        check_inputs(self.model_cfg, inputs, type(self).__name__)
        return self.embed(inputs)

    def stream_head(self, h: torch.Tensor) -> torch.Tensor:
        """The output map, pointwise in time: ``h [B, n, d_model]`` (the last block's output)
        -> ``[B, n, output_dim]``."""
        return self.head(self.norm(h))


class SequenceModel(ModelBase):
    """Embedding (or feature projection), blocks with per-layer visibility, norm, head.

    ``inputs``: ``[B, T]`` int64 tokens (``vocab_size`` set) or ``[B, T, input_dim]`` floats ->
    ``[B, T, output_dim]``.
    """

    def __init__(self, cfg: ModelConfig):
        if not isinstance(cfg, ModelConfig):
            raise ArgumentTypeError(f"cfg must be a causalmix.nn.ModelConfig, got "
                                    f"{type(cfg).__name__}")
        super().__init__(cfg, lambda layer: Block(cfg.blocks[layer]))
        self.cfg = cfg

    def forward(self, inputs: torch.Tensor, *, offset: int = 0,
                visibility: tuple[Visibility, ...] | None = None,
                return_hidden: bool = False, sharding: Any = None
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``visibility``: one spec per layer overriding the config's for this call.
        ``return_hidden``: also return each block's output ``[B, T, C]`` (a list).
        ``sharding``: ``inputs`` are this rank's shard of a sequence-parallel call (see
        :class:`causalmix.distributed.SequenceParallel`, which passes it)."""
        check_int("offset", offset, 0)
        if isinstance(visibility, Visibility):
            raise ArgumentTypeError("SequenceModel: visibility must give one spec per layer (a "
                                    "tuple), got a single spec")
        if visibility is not None and len(visibility) != len(self.blocks):
            raise ValueError(f"visibility must give one spec per layer ({len(self.blocks)}), "
                             f"got {len(visibility)}")
        x = self.stream_in(inputs)
        hidden = []
        for i, block in enumerate(self.blocks):
            x = block(x, offset=offset, visibility=None if visibility is None else visibility[i],
                      sharding=sharding)
            hidden.append(x)
        out = self.stream_head(x)
        return (out, hidden) if return_hidden else out

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model to the folder ``path``: ``config.json`` (:meth:`ModelConfig.to_dict`)
        and ``weights.pt`` (a plain ``state_dict``, read with ``weights_only=True``); see
        :mod:`causalmix.nn.checkpoint`. Returns the folder."""
        return checkpoint.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, map_location: Any = "cpu",
                        types: Mapping[str, type[Visibility]] | None = None) -> SequenceModel:
        """The model :meth:`save_pretrained` wrote to ``path``, weights on ``map_location``
        in their saved dtype (``types``: spec classes of your own, by name)."""
        return checkpoint.load_pretrained(cls, path, map_location=map_location, types=types)

    def generate(self, ids: torch.Tensor, *, max_new_tokens: int, prompt_lengths: Any = None,
                 visibility: tuple[Visibility, ...] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True, return_logits: bool = False) -> Any:
        """Generate ``max_new_tokens`` tokens after each row's prompt, on the model stream
        (KV cache / state): ``ids [B, T]`` (right-padded where ``prompt_lengths [B]`` differ)
        -> ``[B, max_new_tokens]`` tokens (a :class:`~causalmix.nn.generate.Generation` with
        ``return_logits``). Greedy, or sampled (``do_sample``, ``temperature``, ``top_k``,
        ``generator``); the specs a cache serves exactly, and the rest: see
        :mod:`causalmix.nn.generate`.

        >>> from causalmix import Prefix
        >>> cfg = ModelConfig.from_name("tiny-linear", vocab_size=16, visibility=(Prefix(4),) * 2)
        >>> model = SequenceModel(cfg)
        >>> lens = torch.tensor([4, 6])
        >>> new = model.generate(torch.randint(0, 16, (2, 6)), max_new_tokens=3,
        ...                      prompt_lengths=lens, visibility=(Prefix(lens),) * 2)
        >>> new.shape
        torch.Size([2, 3])
        """
        from causalmix.nn.generate import generate

        return generate(self, ids, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths,
                        visibility=visibility, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, generator=generator, eos_token_id=eos_token_id,
                        use_cache=use_cache, return_logits=return_logits)
