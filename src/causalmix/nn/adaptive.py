"""Adaptive lookahead (ANCAT-inspired): each frame decides how far to wait for the future.

Inspired by "Lookahead When It Matters" (ANCAT, Strimel et al., ICML 2023); the paper's text was
not at hand, so this is our own construction of the mechanism, not a reproduction.

Mechanism
---------
An adaptive layer with ``max_lookahead = W`` has a gate, a pointwise linear map of the layer's
normalised input ``norm1(x_t)``, giving logits over a set of lookaheads ``choices`` (``{0..W}``
or ``{0, W}``). Frame ``t`` then attends to every earlier frame and to the frames up to
``t + a_t``: the visibility spec :class:`AdaptiveLookahead` (``j <= i + a[b, i]``)::

    a = [0, 2, 0, 1, 0]          j 0 1 2 3 4
                             i 0   x . . . .
                               1   x x x x .
                               2   x x x . .
                               3   x x x x x
                               4   x x x x x

The gate at ``t`` reads only the layer input at ``t`` (a pointwise projection), so it never
peeks: whatever the input at ``t`` depends on is already counted in the latency below.

* **Inference** (``hard=True``, the default in ``eval()``): ``a_t = choices[argmax logits_t]``
  and the layer runs one mixer call under ``AdaptiveLookahead(a)`` (softmax: the spec's block
  map skips the empty tiles; linear: the causal scan plus the ``a_t`` band terms, below).
* **Training** (``hard=False``, the default in ``train()``): straight-through Gumbel-softmax.
  ``y = softmax((logits + Gumbel noise) / tau)``, ``g = onehot(argmax y) - y.detach() + y``
  (forward: a hard sample; backward: the gradient of the soft sample), and the mixer output is
  the exact mixture ``sum_c g_c * mixer(AdaptiveLookahead(choice_c))`` row by row. It is
  computed in one causal call plus ``W`` band offsets:

  - softmax: the causal output ``o0`` and its log-sum-exp ``lse0`` are merged with the band
    scores ``s_d = scale * q_t . k_{t+d}`` (``d = 1..W``): ``out_c = (e^{lse0} o0 +
    sum_{d <= c} e^{s_d} v_{t+d}) / (e^{lse0} + sum_{d <= c} e^{s_d})``, exactly the softmax over
    the keys ``j <= t + c``, one key at a time with :func:`causalmix.ops.softmax.merge_softmax`
    (the merge of ring attention's shards);
  - linear: the mixer is linear in its visible set, so ``sum_c g_c out_c = G_0 causal +
    sum_{d >= 1} G_d * decay^d (q_t . k_{t+d}) v_{t+d}`` with ``G_d = sum_{choice_c >= d} g_c``
    (the numerator and the normaliser column are mixed before the layer divides them).

  Both are exact for any weights ``g``, values and gradients (tested against the sum of
  dense reference calls).

Latency
-------
``r^0_t = t``, ``r^l_t = max over the frames j that t sees at layer l of r^{l-1}_j``,
``latency_t = r^L_t - t`` (:func:`compounded_latency`, for any stack of specs, from their
dense masks; the latency maths lives in :mod:`causalmix.stream.latency`). The differentiable
regulariser is the *mean-field* expected latency
(:func:`expected_latency`): with gate probabilities ``p^l_{t,c}``,
``R^l_t = sum_c p^l_{t,c} max_{j <= t + choice_c} R^{l-1}_j`` -- the expectation over layer
``l``'s own choice, with the layers below replaced by their expectations. It is exact when the
gates are hard (one-hot ``p``) and its gradient reaches every layer's gate.

Streaming
---------
:class:`AdaptiveModelStream` (the engine: :class:`causalmix.stream.adaptive.AdaptiveStream`,
on the stream's frame buffers and the public ops) runs a trained model frame by frame with
hard gates. Each layer's
output at ``t`` is computed as soon as its inputs up to ``t + a_t`` exist, possibly out of
order (a frame that chose no lookahead does not wait behind one that did); an output leaves
the model once frame ``r^L_t`` has arrived. Its outputs equal the parallel run and the latency
it reports per output is ``r^L_t - t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.checks import ArgumentTypeError, check_int
from causalmix.nn.config import PRESETS, ModelConfig
from causalmix.nn.layers import Block, ModelBase
from causalmix.nn.mixing import mix
from causalmix.ops.softmax import merge_softmax, softmax_attention
from causalmix.stream import expected_latency
from causalmix.stream.adaptive import AdaptiveStream
from causalmix.visibility import AdaptiveLookahead, Causal, Visibility

# The latency maths (compounded_latency, expected_latency, latency_stats) lives in
# causalmix.stream.latency, the stream engine and its Emitted outputs in causalmix.stream.adaptive,
# the spec in causalmix.visibility: import them from there.
__all__ = [
    "ADAPTIVE_MIXERS",
    "AdaptiveBlock",
    "AdaptiveConfig",
    "AdaptiveModel",
    "AdaptiveModelStream",
    "AdaptiveOutput",
]


# ==================================================================================== config


CHOICE_SETS = ("all", "binary")
#: The mixers an adaptive block runs: its mixture over lookaheads is written for the softmax
#: and the (ungated) linear op; the gated layer's per-frame gates have no place in it.
ADAPTIVE_MIXERS = ("softmax", "linear")


def _check_max_lookahead(w) -> tuple[int, ...]:
    if isinstance(w, int) or not isinstance(w, (tuple, list)) or not w:
        raise ArgumentTypeError("max_lookahead must be a non-empty tuple with one int per "
                                f"layer, e.g. (0, 4); got {w!r}")
    try:
        return tuple(check_int("max_lookahead entry", x, 0) for x in w)
    except ValueError:
        raise ValueError(f"max_lookahead entries must be ints >= 0, got {tuple(w)!r}") from None


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """A sequence model whose layers choose their lookahead per frame.

    ``model``: the :class:`~causalmix.nn.ModelConfig` of the model (width, heads, mixer,
    inputs and outputs, ...), with one ``Causal()`` layer per entry of ``max_lookahead`` (each
    adaptive layer sees the past and chooses its lookahead on top). ``max_lookahead[l]`` is
    layer ``l``'s ``W`` (0: a plain causal layer); ``choices``: ``"all"`` -> ``{0, 1, ..., W}``,
    ``"binary"`` -> ``{0, W}``; ``tau``: Gumbel-softmax temperature in training. Build one from a
    preset with :meth:`from_name`.
    """

    model: ModelConfig
    max_lookahead: tuple[int, ...] = (0, 4)
    choices: str = "all"
    tau: float = 1.0

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise ArgumentTypeError(f"model must be a causalmix.nn.ModelConfig, got "
                                    f"{type(self.model).__name__}")
        if self.model.mixer not in ADAPTIVE_MIXERS:
            raise ValueError(f"AdaptiveConfig: model.mixer must be one of "
                             f"{list(ADAPTIVE_MIXERS)} (the adaptive block mixes over "
                             f"lookaheads with those ops), got {self.model.mixer!r}")
        w = _check_max_lookahead(self.max_lookahead)
        object.__setattr__(self, "max_lookahead", w)
        if self.model.visibility != (Causal(),) * len(w):
            raise ValueError(
                f"model.visibility must be one Causal() per layer of max_lookahead "
                f"({len(w)} layers: ModelConfig(..., visibility=(Causal(),) * {len(w)})), got "
                f"{self.model.visibility!r}")
        if self.choices not in CHOICE_SETS:
            raise ValueError(f"choices must be one of {list(CHOICE_SETS)}, got {self.choices!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) \
                or not self.tau > 0:
            raise ValueError(f"tau must be a float > 0, got {self.tau!r}")

    def layer_choices(self, layer: int) -> tuple[int, ...]:
        w = self.max_lookahead[check_int("layer", layer, 0, len(self.max_lookahead) - 1)]
        if w == 0:
            return (0,)
        return tuple(range(w + 1)) if self.choices == "all" else (0, w)

    @classmethod
    def of(cls, *, max_lookahead: tuple[int, ...] = (0, 4), choices: str = "all", tau: float = 1.0,
           **model_fields) -> AdaptiveConfig:
        """``AdaptiveConfig(ModelConfig(**model_fields, visibility=(Causal(),) * L),
        max_lookahead, choices, tau)`` with ``L = len(max_lookahead)``."""
        w = _check_max_lookahead(max_lookahead)
        if "visibility" in model_fields:
            raise ValueError("visibility is set by max_lookahead (one Causal() layer each)")
        return cls(ModelConfig(**model_fields, visibility=(Causal(),) * len(w)), w, choices, tau)

    @classmethod
    def from_name(cls, name: str, **overrides) -> AdaptiveConfig:
        """Start from a :data:`~causalmix.nn.PRESETS` model preset (its ``visibility`` is
        dropped: ``max_lookahead`` sets the layers); ``overrides``: ``max_lookahead``,
        ``choices``, ``tau`` and :class:`~causalmix.nn.ModelConfig` fields (``vocab_size``,
        ``mixer``, ...), as for :meth:`of`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
        kw = {k: v for k, v in PRESETS[name].items() if k != "visibility"}
        return cls.of(**{**kw, **overrides})


# ==================================================================================== layers


class AdaptiveOutput(NamedTuple):
    output: torch.Tensor  # [B, T, output_dim]
    lookahead: tuple[torch.Tensor, ...]  # per layer [B, T] int64: the chosen (hard) a_t
    expected_latency: torch.Tensor  # [B, T] float, differentiable (mean-field)
    latency: torch.Tensor  # [B, T] int64: r^L_t - t of the hard choices
    gate_penalty: torch.Tensor  # scalar: mean squared centred gate logit (0 without gates)


def _band(q: torch.Tensor, k: torch.Tensor, d: int) -> torch.Tensor:
    """``[B, T, H]``: ``q_t . k_{t+d}`` (0 past the end, where ``valid`` masks it)."""
    b, t, h, _ = q.shape
    if d >= t:
        return q.new_zeros(b, t, h, dtype=torch.float32)
    s = (q[:, : t - d].float() * k[:, d:].float()).sum(-1)
    return F.pad(s, (0, 0, 0, d))


def _shift(v: torch.Tensor, d: int) -> torch.Tensor:
    """``[B, T, H, Dv]``: ``v_{t+d}`` (0 past the end)."""
    if d >= v.shape[1]:
        return torch.zeros_like(v)
    return F.pad(v[:, d:], (0, 0, 0, 0, 0, d))


class AdaptiveBlock(nn.Module):
    """A pre-norm :class:`~causalmix.nn.Block` whose frames choose their lookahead.

    ``x: [B, T, C]`` -> ``(y [B, T, C], probs [B, T, K] or None, a [B, T] int64)``; ``K`` =
    ``len(choices)``. ``choices == (0,)`` is a plain causal block (no gate). Implements
    :class:`causalmix.stream.adaptive.AdaptiveStreamableLayer` (hard gates).
    """

    def __init__(self, cfg: AdaptiveConfig, layer: int):
        super().__init__()
        self.block = Block(cfg.model.blocks[layer])
        self.mixer = self.block.mixer  # the op family ("softmax" | "linear")
        self.tau = float(cfg.tau)
        self.register_buffer("choices", torch.tensor(cfg.layer_choices(layer)), persistent=False)
        self.gate = nn.Linear(cfg.model.d_model, len(self.choices)) \
            if len(self.choices) > 1 else None

    @property
    def max_lookahead(self) -> int:
        return int(self.choices.max())

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x: [B, n, C]`` (layer input) -> ``[B, n, K]``, pointwise in time."""
        return None if self.gate is None else self.gate(self.block.norm1(x))

    # ------------------------------------------------ the stream protocol (hard gates)
    def mixer_kwargs(self) -> dict:
        return self.block.mixer_kwargs()

    def stream_qkv(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.block.stream_qkv(x, positions)

    def stream_out(self, x: torch.Tensor, mixed: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        return self.block.stream_out(x, mixed, positions)

    def stream_lookahead(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x: [B, n, C]`` -> ``[B, n]`` int64: the hard choice ``a_t`` of each frame."""
        logits = self.gate_logits(x)
        if logits is None:
            return torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)
        return self.choices[logits.argmax(-1)]

    # ------------------------------------------------ parallel
    def forward(self, x: torch.Tensor, *, hard: bool,
                generator: torch.Generator | None = None,
                lookahead: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``x: [B, T, C]`` at positions ``[0, T)``; ``hard``: argmax gates (else straight-through
        Gumbel samples drawn with ``generator``). ``lookahead``: ``[B, T]`` int in
        ``[0, max_lookahead]`` overriding the gate (an oracle or a fixed schedule; hard)."""
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device)
        f = self.block.stream_qkv(x, positions)
        q, k, v = f["q"], f["k"], f["v"]  # softmax and linear blocks take no per-frame gates
        kw = self.block.mixer_kwargs()
        logits = self.gate_logits(x)
        if logits is None:
            if lookahead is not None and bool((lookahead != 0).any()):
                raise ValueError("lookahead must be 0 for a causal layer (max_lookahead 0)")
            mixed = mix(self.mixer, q, k, v, Causal(), **kw)
            a = torch.zeros(b, t, dtype=torch.int64, device=x.device)
            return self.block.stream_out(x, mixed, positions), None, a
        a, g = self._choose(logits, hard, generator, lookahead)
        if g is None and self.mixer == "softmax":
            # one call under the per-frame spec: the block map skips what no frame waits for
            mixed = softmax_attention(q, k, v, AdaptiveLookahead(a), **kw)
        elif self.mixer == "softmax":
            mixed = self._softmax_mixture(q, k, v, g, kw["scale"])
        else:
            steps = torch.arange(0, self.max_lookahead + 1, device=x.device)
            if g is None:  # G_d = [a_t >= d]
                gd = (a[..., None] >= steps).to(torch.float32)
            else:  # G_d = sum_{choice_c >= d} g_c  (G_0 = sum_c g_c, 1 in value)
                gd = g @ (self.choices[:, None] >= steps).to(g.dtype)
            mixed = self._linear_mixture(q, k, v, gd, kw.get("decay"))
        return self.block.stream_out(x, mixed, positions), logits.float().softmax(-1), a

    def _choose(self, logits, hard: bool, generator, lookahead):
        """``(a [B, T] int64, g [B, T, K] straight-through weights or None when hard)``."""
        b, t, _ = logits.shape
        if lookahead is not None:
            _check_lookahead(lookahead, b, t, self.max_lookahead)
            return lookahead.to(device=logits.device, dtype=torch.int64), None
        if hard:
            return self.choices[logits.argmax(-1)], None
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        u = u.clamp(1e-10, 1.0 - 1e-7)
        y = ((logits.float() - torch.log(-torch.log(u))) / self.tau).softmax(-1)
        idx = y.argmax(-1)
        g = F.one_hot(idx, len(self.choices)).to(y.dtype) - y.detach() + y
        return self.choices[idx], g

    def _softmax_mixture(self, q, k, v, g, scale):
        """``sum_c g_c * softmax_attention(q, k, v, AdaptiveLookahead(choice_c))``: the causal
        output and its log-sum-exp merged (:func:`~causalmix.ops.softmax.merge_softmax`) with
        one band key ``t + d`` at a time, ``d = 1..W``, each a partial result of one key
        (output ``v_{t+d}``, lse ``s_d = scale * q_t . k_{t+d}``, ``-inf`` past the end)."""
        t, h = q.shape[1], q.shape[2]
        group = h // k.shape[2]
        kr = k.repeat_interleave(group, dim=2) if group > 1 else k
        vr = v.repeat_interleave(group, dim=2) if group > 1 else v
        o0, lse0 = softmax_attention(q, k, v, Causal(), scale=scale, return_lse=True)
        pos = torch.arange(t, device=q.device)
        out, lse = o0.float(), lse0
        outs = {0: out}
        for d in range(1, self.max_lookahead + 1):
            s = _band(q, kr, d) * scale
            s = torch.where((pos + d < t)[None, :, None], s, torch.full_like(s, -float("inf")))
            out, lse = merge_softmax(out, lse, _shift(vr, d).float(), s)
            outs[d] = out
        mixed = sum(g[..., c, None, None] * outs[int(ch)]
                    for c, ch in enumerate(self.choices.tolist()))
        return mixed.to(q.dtype)

    def _linear_mixture(self, q, k, v, gd, decay):
        """``G_0 causal + sum_{d >= 1} G_d decay^d (q_t . k_{t+d}) v_{t+d}``; ``gd: [B, T, W + 1]``
        holds ``G_d`` (the weight of the frames ``d`` ahead; ``G_0 = sum_c g_c``)."""
        kw = {} if decay is None else {"decay": decay}
        causal = mix("linear", q, k, v, Causal(), **kw).float()
        mixed = gd[..., 0, None, None] * causal
        for d in range(1, gd.shape[-1]):
            term = _band(q, k, d)[..., None] * _shift(v, d).float()  # [B, T, H, Dv]
            if decay is not None:
                term = term * (decay.float() ** d)[None, None, :, None]
            mixed = mixed + gd[..., d, None, None] * term
        return mixed.to(q.dtype)


def _check_lookahead(a, b: int, t: int, w: int) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype.is_floating_point or a.dtype == torch.bool \
            or tuple(a.shape) != (b, t):
        raise ValueError(f"lookahead must be an int64 [B, T] = [{b}, {t}] tensor, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} "
                         f"{list(getattr(a, 'shape', []))}")
    if a.numel() and (int(a.min()) < 0 or int(a.max()) > w):
        raise ValueError(f"lookahead values must lie in [0, {w}] (the layer's max_lookahead), "
                         f"got [{int(a.min())}, {int(a.max())}]")


class AdaptiveModel(ModelBase):
    """Embedding, :class:`AdaptiveBlock` s, final norm and head (as
    :class:`~causalmix.nn.SequenceModel`).

    ``inputs``: ``[B, T]`` int64 tokens (``vocab_size`` set) or ``[B, T, input_dim]`` floats.
    ``forward`` returns :class:`AdaptiveOutput`: ``output [B, T, output_dim]``, the chosen
    lookaheads per layer, the mean-field expected latency (differentiable; add
    ``latency_weight * expected_latency.mean()`` to the loss), the hard latency, and
    ``gate_penalty``, the mean squared centred gate logit summed over layers: a small weight
    on it keeps the gate distribution from saturating in training. (A choice whose
    probability fell to ~0 early -- "lookahead 0" is worse than any lookahead for most frames
    before the attention has learned what to read ahead -- gets gradients ~``p_c`` from the
    task and from the latency regulariser alike and never returns, even for the frames that
    need no lookahead; the penalty's restoring gradient does not vanish.)
    ``hard`` defaults to ``not self.training`` (Gumbel straight-through while training).
    """

    def __init__(self, cfg: AdaptiveConfig):
        if not isinstance(cfg, AdaptiveConfig):
            raise ArgumentTypeError(f"cfg must be an AdaptiveConfig, got {type(cfg).__name__}")
        super().__init__(cfg.model, lambda layer: AdaptiveBlock(cfg, layer))
        self.cfg = cfg

    def forward(self, inputs: torch.Tensor, *, hard: bool | None = None,
                generator: torch.Generator | None = None,
                lookahead: Sequence[torch.Tensor | None] | None = None) -> AdaptiveOutput:
        """``inputs: [B, T]`` tokens or ``[B, T, input_dim]``; ``hard`` (default
        ``not self.training``); ``generator`` for the Gumbel noise; ``lookahead``: one ``[B, T]``
        int tensor (or ``None``) per layer overriding the gates."""
        hard = (not self.training) if hard is None else bool(hard)
        if lookahead is None:
            lookahead = (None,) * len(self.blocks)
        elif len(lookahead) != len(self.blocks):
            raise ValueError(f"lookahead must give one entry per layer ({len(self.blocks)}), "
                             f"got {len(lookahead)}")
        x = self.stream_in(inputs)
        forced = lookahead
        probs, lookahead, pen = [], [], x.new_zeros(())
        for block, la in zip(self.blocks, forced, strict=True):
            x, p, a = block(x, hard=hard, generator=generator, lookahead=la)
            probs.append(p)
            lookahead.append(a)
            if p is not None:
                z = torch.log(p.clamp_min(1e-30))  # centred logits up to the log-normaliser
                pen = pen + ((z - z.mean(-1, keepdim=True)) ** 2).mean()
        t = x.shape[1]
        exp_lat = expected_latency(probs, [None if blk.gate is None else blk.choices
                                           for blk in self.blocks], t, x.shape[0])
        with torch.no_grad():
            onehots = [None if p is None else (a[..., None] == blk.choices).float()
                       for p, a, blk in zip(probs, lookahead, self.blocks, strict=True)]
            hard_lat = expected_latency(onehots, [None if blk.gate is None else blk.choices
                                                  for blk in self.blocks], t, x.shape[0])
        return AdaptiveOutput(self.stream_head(x), tuple(lookahead), exp_lat,
                              hard_lat.round().to(torch.int64), pen)

    def visibilities(self, lookahead: Sequence[torch.Tensor]) -> tuple[Visibility, ...]:
        """The per-layer specs of chosen lookaheads (``AdaptiveOutput.lookahead``)."""
        return tuple(Causal() if blk.gate is None else AdaptiveLookahead(a)
                     for blk, a in zip(self.blocks, lookahead, strict=True))


# ==================================================================================== streaming


class AdaptiveModelStream(AdaptiveStream):
    """Stream an :class:`AdaptiveModel` with hard gates: ``push(frames)`` returns, per sequence
    of the batch, the outputs that became final (in any order, with their positions).

    ``push(inputs)``: ``[B, n]`` int64 tokens or ``[B, n, input_dim]`` floats (``n >= 1``) ->
    list of ``B`` :class:`Emitted` (``output: [m, output_dim]``); ``flush()`` ends the stream
    and returns the rest.

    The engine is :class:`causalmix.stream.adaptive.AdaptiveStream`: each sequence is scheduled
    on its own (its gates differ); at layer ``l`` the output at ``t`` is computed once that
    layer's inputs ``[0, t + a_t]`` exist, with the public ops; it then exists as layer
    ``l + 1``'s input. An output is final once frame ``r^L_t`` arrived, and
    :attr:`Emitted.latency` reports ``r^L_t - t``. Pushed one frame at a time, every output
    leaves in the push of frame ``r^L_t`` exactly. Memory grows with the stream (keys are
    kept; inference only, under ``torch.no_grad()``).
    """

    def __init__(self, model: AdaptiveModel):
        if not isinstance(model, AdaptiveModel):
            raise ArgumentTypeError(f"AdaptiveModelStream: model must be an AdaptiveModel, "
                                    f"got {type(model).__name__}")
        super().__init__(model)
