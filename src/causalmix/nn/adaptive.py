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
    the keys ``j <= t + c``;
  - linear: the mixer is linear in its visible set, so ``sum_c g_c out_c = G_0 causal +
    sum_{d >= 1} G_d * decay^d (q_t . k_{t+d}) v_{t+d}`` with ``G_d = sum_{choice_c >= d} g_c``
    (the numerator and the normaliser column are mixed before the layer divides them).

  Both are exact for any weights ``g``, values and gradients (tested against the sum of
  dense reference calls).

Latency
-------
``r^0_t = t``, ``r^l_t = max over the frames j that t sees at layer l of r^{l-1}_j``,
``latency_t = r^L_t - t`` (:func:`compounded_latency`, for any stack of specs, from their
dense masks). The differentiable regulariser is the *mean-field* expected latency
(:func:`expected_latency`): with gate probabilities ``p^l_{t,c}``,
``R^l_t = sum_c p^l_{t,c} max_{j <= t + choice_c} R^{l-1}_j`` -- the expectation over layer
``l``'s own choice, with the layers below replaced by their expectations. It is exact when the
gates are hard (one-hot ``p``) and its gradient reaches every layer's gate.

Streaming
---------
:class:`AdaptiveModelStream` runs a trained model frame by frame with hard gates. Each layer's
output at ``t`` is computed as soon as its inputs up to ``t + a_t`` exist, possibly out of
order (a frame that chose no lookahead does not wait behind one that did); an output leaves
the model once frame ``r^L_t`` has arrived. Its outputs equal the parallel run and the latency
it reports per output is ``r^L_t - t``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.nn.config import ModelConfig
from causalmix.nn.layers import Block, check_inputs, mix
from causalmix.ops.softmax import softmax_attention
from causalmix.stream import LatencyStats
from causalmix.visibility import AdaptiveLookahead, Causal, Visibility

__all__ = [
    "AdaptiveBlock",
    "AdaptiveConfig",
    "AdaptiveLookahead",
    "AdaptiveModel",
    "AdaptiveModelStream",
    "AdaptiveOutput",
    "Emitted",
    "LatencyStats",
    "compounded_latency",
    "expected_latency",
    "latency_stats",
]


# ==================================================================================== latency


def compounded_latency(visibilities, seq_len: int) -> torch.Tensor:
    """Latency of each output of a stack of layers over a sequence of ``seq_len`` frames.

    ``r^0_t = t``; ``r^l_t = max_{j visible from t at layer l} r^{l-1}_j``; returns
    ``r^L_t - t`` as int64 ``[B', seq_len]`` (frames beyond the end do not exist, so ``Full()``
    gives ``seq_len - 1 - t``). Uses each spec's dense mask: O(L * seq_len^2), the oracle.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    visibilities = tuple(visibilities)
    if not visibilities or not all(isinstance(v, Visibility) for v in visibilities):
        raise ValueError("visibilities must be a non-empty sequence of visibility specs")
    t = torch.arange(seq_len)
    r = t[None, :]
    for vis in visibilities:
        m = vis.mask(seq_len, seq_len)  # [B', T, T]
        r = torch.where(m, r[:, None, :], torch.full_like(r[:, None, :], -1)).amax(-1)
    return r - t


def _cummax_at(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``r: [B, T]`` float -> ``[B, T, C]``: ``max_{j <= min(t + offsets[c], T - 1)} r_j``."""
    t = r.shape[1]
    pm = torch.cummax(r, dim=1).values  # differentiable (gradient to the argmax)
    idx = (torch.arange(t, device=r.device)[:, None] + offsets[None, :]).clamp(max=t - 1)
    return pm[:, idx]  # [B, T, C]


def expected_latency(probs, choices, seq_len: int, batch: int = 1) -> torch.Tensor:
    """Mean-field expected latency per output, differentiable in the gate probabilities.

    ``probs``: one entry per layer, ``[B, T, C_l]`` gate probabilities or ``None`` for a causal
    layer; ``choices``: per layer, the ``[C_l]`` int64 lookaheads (``None`` for causal layers).
    ``R^0_t = t``, ``R^l_t = sum_c p^l_{t,c} max_{j <= t + choice_c} R^{l-1}_j`` (clipped to
    the sequence). Returns ``R^L_t - t``: ``[B, T]`` float. Equals :func:`compounded_latency` of
    the ``AdaptiveLookahead`` specs when every ``p`` is one-hot.
    """
    probs, choices = list(probs), list(choices)
    dev = next((p.device for p in probs if p is not None), torch.device("cpu"))
    b = next((p.shape[0] for p in probs if p is not None), batch)
    t = torch.arange(seq_len, device=dev, dtype=torch.float32)
    r = t[None, :].expand(b, seq_len)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    for p, ch in zip(probs, choices, strict=True):
        if p is None:
            r = _cummax_at(r, zero)[..., 0]
        else:
            r = (p * _cummax_at(r, ch.to(dev))).sum(-1)
    return r - t


def latency_stats(latency: torch.Tensor) -> dict:
    """``{"mean", "p90", "max"}`` of per-output latencies (any shape, frames)."""
    s = LatencyStats.of(latency.reshape(-1).to(torch.int64))
    return {"mean": s.mean, "p90": s.p90, "max": s.max}


# ==================================================================================== config


CHOICE_SETS = ("all", "binary")


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """A sequence model whose layers choose their lookahead per frame.

    The fields shared with :class:`~causalmix.nn.ModelConfig` mean the same (``base`` is that
    config, with every layer ``Causal()``). ``max_lookahead[l]`` is layer ``l``'s ``W`` (0: a
    plain causal layer); ``choices``: ``"all"`` -> ``{0, 1, ..., W}``, ``"binary"`` ->
    ``{0, W}``; ``tau``: Gumbel-softmax temperature in training.
    """

    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    mixer: str = "softmax"
    max_lookahead: tuple[int, ...] = (0, 4)
    choices: str = "all"
    tau: float = 1.0
    vocab_size: int | None = None
    input_dim: int | None = None
    output_dim: int | None = None
    mlp_ratio: int = 2
    feature_dim: int = 16
    feature_map: str = "taylor"
    decay: tuple[float, ...] | None = None
    base: ModelConfig = dataclasses.field(init=False)

    def __post_init__(self):
        w = self.max_lookahead
        if isinstance(w, int) or not isinstance(w, (tuple, list)) or not w:
            raise TypeError("max_lookahead must be a non-empty tuple with one int per layer, "
                            f"e.g. (0, 4); got {w!r}")
        w = tuple(w)
        for x in w:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"max_lookahead entries must be ints >= 0, got {w!r}")
        object.__setattr__(self, "max_lookahead", w)
        if self.choices not in CHOICE_SETS:
            raise ValueError(f"choices must be one of {list(CHOICE_SETS)}, got {self.choices!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) \
                or not self.tau > 0:
            raise ValueError(f"tau must be a float > 0, got {self.tau!r}")
        base = ModelConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            mixer=self.mixer, visibility=(Causal(),) * len(w), vocab_size=self.vocab_size,
            input_dim=self.input_dim, output_dim=self.output_dim, mlp_ratio=self.mlp_ratio,
            feature_dim=self.feature_dim, feature_map=self.feature_map, decay=self.decay,
        )
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "output_dim", base.output_dim)

    def layer_choices(self, layer: int) -> tuple[int, ...]:
        w = self.max_lookahead[layer]
        if w == 0:
            return (0,)
        return tuple(range(w + 1)) if self.choices == "all" else (0, w)

    @classmethod
    def from_name(cls, name: str, **overrides) -> AdaptiveConfig:
        """Start from a :data:`~causalmix.nn.PRESETS` model preset (its ``visibility`` is
        dropped: ``max_lookahead`` sets the layers)."""
        from causalmix.nn.config import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
        kw = {k: v for k, v in PRESETS[name].items() if k != "visibility"}
        return cls(**{**kw, **overrides})


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
    ``len(choices)``. ``choices == (0,)`` is a plain causal block (no gate).
    """

    def __init__(self, cfg: AdaptiveConfig, layer: int):
        super().__init__()
        self.block = Block(cfg.base.blocks[layer])
        self.mixer = cfg.mixer
        self.tau = float(cfg.tau)
        self.register_buffer("choices", torch.tensor(cfg.layer_choices(layer)), persistent=False)
        self.gate = nn.Linear(cfg.d_model, len(self.choices)) if len(self.choices) > 1 else None

    @property
    def max_lookahead(self) -> int:
        return int(self.choices.max())

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x: [B, n, C]`` (layer input) -> ``[B, n, K]``, pointwise in time."""
        return None if self.gate is None else self.gate(self.block.norm1(x))

    def forward(self, x: torch.Tensor, *, hard: bool,
                generator: torch.Generator | None = None,
                lookahead: torch.Tensor | None = None):
        """``x: [B, T, C]`` at positions ``[0, T)``; ``hard``: argmax gates (else straight-through
        Gumbel samples drawn with ``generator``). ``lookahead``: ``[B, T]`` int in
        ``[0, max_lookahead]`` overriding the gate (an oracle or a fixed schedule; hard)."""
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device)
        q, k, v = self.block.stream_qkv(x, positions)
        kw = self.block.mixer_kwargs()
        logits = self.gate_logits(x)
        if logits is None:
            if lookahead is not None and bool((lookahead != 0).any()):
                raise ValueError("lookahead must be 0 for a causal layer (max_lookahead 0)")
            mixed = mix(self.mixer, q, k, v, Causal(), **kw)
            a = torch.zeros(b, t, dtype=torch.int64, device=x.device)
            return self.block.stream_out(x, mixed, positions), None, a
        probs = logits.float().softmax(-1)
        w = int(self.choices.max())
        if lookahead is not None:
            _check_lookahead(lookahead, b, t, w)
            a, g = lookahead.to(device=x.device, dtype=torch.int64), None
        elif hard:
            a, g = self.choices[logits.argmax(-1)], None
        else:
            u = torch.rand(logits.shape, generator=generator, device=x.device)
            u = u.clamp(1e-10, 1.0 - 1e-7)
            y = ((logits.float() - torch.log(-torch.log(u))) / self.tau).softmax(-1)
            idx = y.argmax(-1)
            g = F.one_hot(idx, len(self.choices)).to(y.dtype) - y.detach() + y
            a = self.choices[idx]
        if g is None and self.mixer == "softmax":
            # one call under the per-frame spec: the block map skips what no frame waits for
            mixed = softmax_attention(q, k, v, AdaptiveLookahead(a), **kw)
        elif self.mixer == "softmax":
            mixed = self._softmax_mixture(q, k, v, g, kw["scale"])
        else:
            steps = torch.arange(0, w + 1, device=x.device)
            if g is None:  # G_d = [a_t >= d]
                gd = (a[..., None] >= steps).to(torch.float32)
            else:  # G_d = sum_{choice_c >= d} g_c  (G_0 = sum_c g_c, 1 in value)
                gd = g @ (self.choices[:, None] >= steps).to(g.dtype)
            mixed = self._linear_mixture(q, k, v, gd, kw.get("decay"))
        return self.block.stream_out(x, mixed, positions), probs, a

    def _softmax_mixture(self, q, k, v, g, scale):
        """``sum_c g_c * softmax_attention(q, k, v, AdaptiveLookahead(choice_c))``."""
        b, t, h, _ = q.shape
        group = h // k.shape[2]
        kr = k.repeat_interleave(group, dim=2) if group > 1 else k
        vr = v.repeat_interleave(group, dim=2) if group > 1 else v
        o0, lse0 = softmax_attention(q, k, v, Causal(), scale=scale, return_lse=True)
        w = int(self.choices.max())
        pos = torch.arange(t, device=q.device)
        scores = [lse0]
        for d in range(1, w + 1):
            s = _band(q, kr, d) * scale
            valid = (pos + d < t)[None, :, None]
            scores.append(torch.where(valid, s, torch.full_like(s, -math.inf)))
        m = torch.stack(scores, 0).amax(0)  # [B, T, H], finite (lse0 is)
        den = torch.exp(lse0 - m)
        num = den[..., None] * o0.float()
        outs = {0: num / den[..., None]}
        for d in range(1, w + 1):
            e = torch.exp(scores[d] - m)
            den = den + e
            num = num + e[..., None] * _shift(vr, d).float()
            outs[d] = num / den[..., None]
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


class AdaptiveModel(nn.Module):
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
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size is not None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        self.blocks = nn.ModuleList(AdaptiveBlock(cfg, i) for i in range(len(cfg.max_lookahead)))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim)

    def _check_inputs(self, inputs, where: str) -> None:
        check_inputs(self.cfg, inputs, where)
        if inputs.shape[1] < 1:
            raise ValueError(f"{where}: inputs must hold at least one frame")

    def forward(self, inputs: torch.Tensor, *, hard: bool | None = None,
                generator: torch.Generator | None = None,
                lookahead=None) -> AdaptiveOutput:
        """``inputs: [B, T]`` tokens or ``[B, T, input_dim]``; ``hard`` (default
        ``not self.training``); ``generator`` for the Gumbel noise; ``lookahead``: one ``[B, T]``
        int tensor (or ``None``) per layer overriding the gates."""
        self._check_inputs(inputs, "AdaptiveModel")
        hard = (not self.training) if hard is None else bool(hard)
        if lookahead is None:
            lookahead = (None,) * len(self.blocks)
        elif len(lookahead) != len(self.blocks):
            raise ValueError(f"lookahead must give one entry per layer ({len(self.blocks)}), "
                             f"got {len(lookahead)}")
        x = self.embed(inputs)
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
        return AdaptiveOutput(self.head(self.norm(x)), tuple(lookahead), exp_lat,
                              hard_lat.round().to(torch.int64), pen)

    def visibilities(self, lookahead) -> tuple[Visibility, ...]:
        """The per-layer specs of chosen lookaheads (``AdaptiveOutput.lookahead``)."""
        return tuple(Causal() if blk.gate is None else AdaptiveLookahead(a)
                     for blk, a in zip(self.blocks, lookahead, strict=True))


# ==================================================================================== streaming


class Emitted(NamedTuple):
    positions: torch.Tensor  # [m] int64 absolute positions of the outputs (any order)
    output: torch.Tensor  # [m, output_dim]
    latency: torch.Tensor  # [m] int64: frames waited beyond the output's own (r^L_t - t)


class _Layer:
    """One layer of one sequence's stream: inputs, q/k/v, gates and which outputs are done."""

    def __init__(self, block: AdaptiveBlock):
        self.block = block
        self.x: dict[int, torch.Tensor] = {}  # position -> layer input [C]
        self.ready: dict[int, int] = {}  # position -> input frame its layer input waited for
        self.a: dict[int, int] = {}
        self.k: list[torch.Tensor] = []  # contiguous prefix [0, contig): [Hkv, D]
        self.v: list[torch.Tensor] = []
        self.q: dict[int, torch.Tensor] = {}
        self.kv_new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prefix_ready: list[int] = []  # running max of `ready` over [0, contig)
        self.contig = 0
        self.pending: set[int] = set()  # present, output not computed yet

    def add(self, positions: list[int], x: torch.Tensor, ready: list[int]) -> None:
        """Layer inputs ``x: [m, C]`` arrived at ``positions`` (any order)."""
        blk = self.block
        pos = torch.tensor(positions, dtype=torch.int64, device=x.device)
        q, k, v = blk.block.stream_qkv(x[None], pos)
        logits = blk.gate_logits(x[None])
        a = [0] * len(positions) if logits is None else \
            blk.choices[logits[0].argmax(-1)].tolist()
        for i, p in enumerate(positions):
            self.x[p], self.ready[p], self.a[p] = x[i], ready[i], a[i]
            self.q[p] = q[0, i]
            self.kv_new[p] = (k[0, i], v[0, i])
            self.pending.add(p)
        while self.contig in self.kv_new:
            kk, vv = self.kv_new.pop(self.contig)
            self.k.append(kk)
            self.v.append(vv)
            prev = self.prefix_ready[-1] if self.prefix_ready else -1
            self.prefix_ready.append(max(prev, self.ready[self.contig]))
            self.contig += 1

    def take_ready(self, end: int | None) -> tuple[list[int], torch.Tensor, list[int]] | None:
        """Compute the outputs whose keys ``[0, t + a_t]`` are all present (clipped to the
        sequence ``end`` at flush). Returns ``(positions, y [m, C], ready)``."""
        def hi(p):
            h = p + self.a[p]
            return min(h, end - 1) if end is not None else h

        done = sorted(p for p in self.pending if hi(p) < self.contig)
        if not done:
            return None
        his = [hi(p) for p in done]
        blk = self.block.block
        kend = max(his) + 1
        k = torch.stack(self.k[:kend])  # [Tk, Hkv, D]
        v = torch.stack(self.v[:kend])
        q = torch.stack([self.q[p] for p in done])  # [m, H, D]
        j = torch.arange(kend)
        vis = j[None, :] <= torch.tensor(his)[:, None]  # [m, Tk]
        mixed = _direct_mix(self.block.mixer, q, k, v, vis, torch.tensor(done),
                            blk.mixer_kwargs())
        pos = torch.tensor(done, dtype=torch.int64)
        x = torch.stack([self.x[p] for p in done])
        y = blk.stream_out(x[None], mixed[None], pos)[0]
        ready = [self.prefix_ready[h] for h in his]
        for p in done:
            self.pending.discard(p)
            del self.q[p]
        return done, y, ready


def _direct_mix(mixer: str, q, k, v, vis, qpos, kwargs) -> torch.Tensor:
    """Dense mixer for a set of queries: ``q: [m, H, D]`` at ``qpos: [m]``, keys ``k: [Tk, Hkv,
    D]`` at ``[0, Tk)``, ``vis: [m, Tk]`` bool -> ``[m, H, Dv]`` (fp32 math)."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("mhd,jhd->hmj", q.float(), k.float())
    if mixer == "softmax":
        s = (s * kwargs["scale"]).masked_fill(~vis[None], -math.inf)
        w = s.softmax(-1)
    else:
        w = s * vis[None]
        decay = kwargs.get("decay")
        if decay is not None:
            dist = (qpos[:, None] - torch.arange(k.shape[0])[None, :]).abs().float()
            w = w * decay.float()[:, None, None] ** dist[None]
    return torch.einsum("hmj,jhe->mhe", w, v.float()).to(q.dtype)


class _Row:
    def __init__(self, model: AdaptiveModel):
        self.model = model
        self.layers = [_Layer(b) for b in model.blocks]
        self.frames_in = 0
        self.latency: list[int] = []

    def step(self, x: torch.Tensor, end: int | None) -> Emitted:
        """``x: [n, C]`` embedded frames (n may be 0 at flush)."""
        n = x.shape[0]
        new = list(range(self.frames_in, self.frames_in + n))
        self.frames_in += n
        batch = (new, x, new) if n else None
        for layer in self.layers:
            if batch is not None:
                layer.add(*batch)
            batch = layer.take_ready(end)
        if batch is None:
            c = self.model.cfg.output_dim
            return Emitted(torch.empty(0, dtype=torch.int64), x.new_empty(0, c),
                           torch.empty(0, dtype=torch.int64))
        pos, y, ready = batch
        lat = [r - p for r, p in zip(ready, pos, strict=True)]
        self.latency.extend(lat)
        out = self.model.head(self.model.norm(y))
        return Emitted(torch.tensor(pos, dtype=torch.int64), out, torch.tensor(lat))


class AdaptiveModelStream:
    """Stream an :class:`AdaptiveModel` with hard gates: ``push(frames)`` returns, per sequence
    of the batch, the outputs that became final (in any order, with their positions).

    ``push(inputs)``: ``[B, n]`` int64 tokens or ``[B, n, input_dim]`` floats (``n >= 1``) ->
    list of ``B`` :class:`Emitted`; ``flush()`` ends the stream and returns the rest.

    Each sequence is scheduled on its own (its gates differ). At layer ``l`` the output at
    ``t`` is computed once that layer's inputs ``[0, t + a_t]`` exist; it then exists as layer
    ``l + 1``'s input. An output is final once frame ``r^L_t`` arrived, and
    :attr:`Emitted.latency` reports ``r^L_t - t`` (tracked through the layers as the max over
    the frames it waited for). Pushed one frame at a time, every output leaves in the push of
    frame ``r^L_t`` exactly. Memory grows with the stream (keys are kept; inference only,
    under ``torch.no_grad()``).
    """

    def __init__(self, model: AdaptiveModel):
        if not isinstance(model, AdaptiveModel):
            raise TypeError(f"AdaptiveModelStream: model must be an AdaptiveModel, got "
                            f"{type(model).__name__}")
        self.model = model
        self.rows: list[_Row] | None = None
        self.closed = False

    def push(self, inputs: torch.Tensor) -> list[Emitted]:
        if self.closed:
            raise ValueError("AdaptiveModelStream.push: the stream was flushed (closed)")
        self.model._check_inputs(inputs, "AdaptiveModelStream.push")
        if self.rows is None:
            self.rows = [_Row(self.model) for _ in range(inputs.shape[0])]
        elif inputs.shape[0] != len(self.rows):
            raise ValueError(f"AdaptiveModelStream.push: batch size {inputs.shape[0]} differs "
                             f"from the first push's {len(self.rows)}")
        with torch.no_grad():
            x = self.model.embed(inputs)
            return [row.step(x[i], None) for i, row in enumerate(self.rows)]

    def flush(self) -> list[Emitted]:
        if self.closed:
            raise ValueError("AdaptiveModelStream.flush: the stream was already flushed")
        if self.rows is None:
            raise ValueError("AdaptiveModelStream.flush: nothing was pushed")
        self.closed = True
        with torch.no_grad():
            c = self.model.cfg.d_model
            p = next(self.model.parameters())
            return [row.step(p.new_empty(0, c), row.frames_in) for row in self.rows]

    @property
    def latency(self) -> list[torch.Tensor]:
        """Per sequence, ``[outputs emitted]`` int64 latencies in emission order."""
        return [torch.tensor(r.latency, dtype=torch.int64) for r in (self.rows or [])]
