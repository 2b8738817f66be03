"""Decoding a token model: :meth:`SequenceModel.generate <causalmix.nn.SequenceModel.generate>`.

::

    new = model.generate(ids, max_new_tokens=8)                       # greedy, [B, 8]
    new = model.generate(ids, max_new_tokens=8, prompt_lengths=lens,  # per-row prompts
                         visibility=(Prefix(lens),) * n_layers)       # a prefix-LM's spec
    out = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=5, generator=g,
                         return_logits=True)                          # Generation(tokens, ...)

How it runs
-----------
The prompt and every chosen token go through one :class:`causalmix.stream.ModelStream`, the
models' decode path (softmax layers keep a KV cache, linear and gated layers their state); the
logits at position ``t - 1`` choose the token at ``t``. Positions are the model's absolute
positions, as in training: rows with their own prompt lengths are **padded on the right**
(row ``b``'s prompt is ``ids[b, :prompt_lengths[b]]``; the padding is never read), so a
prefix-LM trained under ``Prefix(lengths)`` decodes under that same spec. The rows advance
together: at position ``t`` a row whose prompt is longer than ``t`` takes its next prompt
token, the others the token they chose.

Which specs can be generated with a cache
-----------------------------------------
A cached position is never recomputed, so a cache is exact only when no position may see a
later one once it has been computed: the stream's output at ``t - 1`` must be final when frame
``t - 1`` has arrived, in every layer and every row. Under ``Causal()``, ``Window(left, 0)``,
``Prefix(n)`` with ``n`` <= the row's prompt length, ``Chunked(1)`` and ``Segments(...) &`` any
of those, it is at every generated position. Under ``Full()``, ``Window(left, right > 0)``,
``Chunked(size > 1)`` or ``Prefix(n)`` reaching past a prompt, an earlier position may see a
later one, so its cached keys / state would be stale: ``generate`` raises ``ValueError`` before
generating (``use_cache=False`` recomputes the whole sequence at every step instead, which
is exact under any spec). This is judged from each layer's spec through its horizon (the last
key each position may see, :meth:`causalmix.visibility.Visibility.horizon`; exact for specs
with a key range, an upper bound otherwise, so a spec of your own may be refused where a cache
would have been exact, never the reverse) -- the same rule the stream's ``step`` applies.
Rows with different prompt lengths: while a longer row is still reading its prompt (positions
``min(prompt_lengths) .. max(prompt_lengths) - 1``), a spec such as ``Prefix(lengths)`` lets
that row's earlier positions see its later prompt tokens; those steps recompute the logits
from the whole sequence (exact), then the stream takes over.

Sampling
--------
``do_sample=False``: the argmax (greedy). ``do_sample=True``: logits / ``temperature``, only
the ``top_k`` largest kept, softmax, then one ``torch.multinomial(probs [B, V], 1,
generator=generator)`` draw per position from ``min(prompt_lengths)`` on, for every row (a row
that does not generate at that position ignores its draw): a loop over full recomputes that
samples the same way with the same generator gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from causalmix.checks import ArgumentTypeError, UnboundedHorizonError, check_bool, check_int
from causalmix.nn.layers import check_inputs
from causalmix.stream import ModelStream
from causalmix.visibility import Visibility, check_layer_specs

if TYPE_CHECKING:  # pragma: no cover
    from causalmix.nn.layers import SequenceModel

__all__ = ["CACHE_RULE", "Generation", "generate"]

#: Why only some specs can be generated with a cache (said by every refusal).
CACHE_RULE = (
    "A cache is exact only when no position may see a later one once it has been computed: "
    "Causal(), Window(left, 0), Prefix(n) with n <= every row's prompt length, Chunked(1), "
    "Segments(...) & one of those (judged from each layer's spec, through its horizon, at every "
    "generated position). Pass use_cache=False to recompute the whole sequence at every step "
    "instead (exact under any spec)"
)


class Generation(NamedTuple):
    """What :func:`generate` returns with ``return_logits=True``.

    ``tokens: [B, max_new_tokens]`` int64, the tokens each row generated (after a row's
    ``eos_token_id``, the eos again); ``logits: [B, max_new_tokens, V]``, the logits each token
    was chosen from (zeros after a row's eos); ``lengths: [B]`` int64, how many tokens each row
    generated (its eos included)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    lengths: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Choice:
    """How the next token is chosen from the logits ``[B, V]``."""

    do_sample: bool
    temperature: float
    top_k: int | None
    generator: torch.Generator | None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The checked request: per-row prompt lengths ``lengths [B]`` (int64, on the ids' device),
    ``n_new`` tokens per row, the spec of every layer, and the positions ``[0, end)`` of the
    longest row once generated."""

    lengths: torch.Tensor
    n_new: int
    specs: tuple[Visibility, ...]
    end: int

    @property
    def first(self) -> int:
        return int(self.lengths.min())

    @property
    def last_prompt(self) -> int:
        return int(self.lengths.max())


def _check_choice(do_sample, temperature, top_k, generator) -> _Choice:
    check_bool("generate", "do_sample", do_sample)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"generate: temperature must be a finite number > 0, got "
                         f"{temperature!r}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generate: generator must be a torch.Generator or None, got "
                                f"{type(generator).__name__}")
    if not do_sample and (temperature != 1.0 or top_k is not None or generator is not None):
        raise ValueError("generate: temperature, top_k and generator apply only with "
                         "do_sample=True (greedy decoding takes the argmax)")
    return _Choice(do_sample, float(temperature), top_k, generator)


def _check_lengths(prompt_lengths: Any, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    if prompt_lengths is None:
        return torch.full((b,), t, dtype=torch.int64, device=ids.device)
    if isinstance(prompt_lengths, numbers.Integral) and not isinstance(prompt_lengths, bool):
        prompt_lengths = [check_int("prompt_lengths", prompt_lengths, 1, t)] * b
    if isinstance(prompt_lengths, torch.Tensor):
        if prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype == torch.bool:
            raise ValueError(f"generate: prompt_lengths must hold ints, got dtype "
                             f"{prompt_lengths.dtype}")
        lengths = prompt_lengths.detach().to(device="cpu", dtype=torch.int64)
    elif isinstance(prompt_lengths, (list, tuple)):
        lengths = torch.tensor([check_int("prompt_lengths[i]", n) for n in prompt_lengths],
                               dtype=torch.int64)
    else:
        raise ArgumentTypeError(f"generate: prompt_lengths must be an int, a list of ints or an "
                                f"int [B] tensor, got {type(prompt_lengths).__name__}")
    if lengths.shape != (b,):
        raise ValueError(f"generate: prompt_lengths must give one length per row ([{b}]), got "
                         f"shape {list(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"generate: prompt_lengths must lie in [1, {t}] (ids holds {t} "
                         f"tokens per row, right-padded), got {lengths.tolist()}")
    return lengths.to(ids.device)


def _check_specs(model: SequenceModel, visibility: Any, batch: int) -> tuple[Visibility, ...]:
    if visibility is None:
        return tuple(block.visibility for block in model.blocks)
    return check_layer_specs("generate", visibility, len(model.blocks), batch=batch)


def _plan(model: SequenceModel, ids: Any, max_new_tokens: Any, prompt_lengths: Any,
          visibility: Any) -> _Plan:
    if model.cfg.vocab_size is None:
        raise ValueError("generate: the model takes features (input_dim), not tokens; only a "
                         "token model (vocab_size set) generates")
    check_inputs(model.cfg, ids, "generate: ids")  # int64 [B >= 1, T >= 1] in the vocabulary
    n_new = check_int("max_new_tokens", max_new_tokens, 0)
    lengths = _check_lengths(prompt_lengths, ids)
    specs = _check_specs(model, visibility, ids.shape[0])
    end = int(lengths.max()) + n_new
    for i, spec in enumerate(specs):
        try:  # positions [0, end - 1) go through the model (the last token is not fed back)
            spec.check_positions(end - 1, end - 1)
        except ValueError as err:
            raise ValueError(f"generate: visibility[{i}] (layer {i}) cannot run the "
                             f"{end - 1} positions that prompts of up to {end - n_new} tokens "
                             f"and max_new_tokens={n_new} need: {err}") from None
    return _Plan(lengths, n_new, specs, end)


def _final_at(spec: Visibility, end: int) -> torch.Tensor:
    """``[end + 1]`` bool over the positions ``[0, end)``: entry ``t`` says whether, once the
    positions ``[0, t)`` have arrived, no position below ``t`` may see one at or after ``t`` (in
    any row) -- so the stream's output at ``t - 1`` is final and nothing it cached can go
    stale."""
    out = torch.zeros(end + 1, dtype=torch.bool)
    positions = torch.arange(end)
    try:
        h = spec.horizon(positions)
    except UnboundedHorizonError:
        return out
    if h.dim() == 2:
        h = h.amax(dim=0)
    reach = torch.maximum(h.cpu(), positions).cummax(dim=0).values  # last position seen so far
    out[1:] = reach < torch.arange(1, end + 1)
    return out


def _cache_plan(plan: _Plan) -> torch.Tensor:
    """``[end]`` bool: where the stream's output at ``t - 1`` is final, in every layer;
    raises ``ValueError`` if it is not at a position where every row generates."""
    final = torch.ones(plan.end, dtype=torch.bool)
    for layer, spec in enumerate(plan.specs):
        ok = _final_at(spec, plan.end - 1)  # positions [0, end - 1) go through the model
        final &= ok
        bad = (~ok[plan.last_prompt:]).nonzero()
        if bad.numel():
            t = plan.last_prompt + int(bad[0])
            raise ValueError(
                f"generate: visibility[{layer}] (layer {layer}) {spec!r} lets a position before "
                f"{t} see position {t} or later, so the stream's cached keys / state of those "
                f"positions would be stale when the token at {t} is chosen (or its logits are "
                f"not final yet). {CACHE_RULE}.")
    return final


class _Decoder:
    """Logits at ``t - 1`` given the tokens ``seq[:, :t]``: from the model stream where its
    output is final (``final[t]`` of :func:`_cache_plan`: the stream then has released it),
    else from a forward over the whole sequence (``use_cache=False``: always)."""

    def __init__(self, model: SequenceModel, plan: _Plan, use_cache: bool):
        self.model, self.plan = model, plan
        self.stream = ModelStream(model, visibility=plan.specs) if use_cache else None
        self.pushed = 0
        self.last: torch.Tensor | None = None

    def logits(self, seq: torch.Tensor, t: int) -> torch.Tensor:
        if self.stream is not None:
            out = self.stream.push(seq[:, self.pushed:t])  # frames are pushed once, in order
            self.pushed = t
            if out.shape[1]:
                self.last = out[:, -1]
            if self.stream.frames_out == t:
                return self.last
        return self.model(seq[:, :t], visibility=self.plan.specs)[:, -1]


class _Rows:
    """The batch being generated: the token buffer ``seq [B, end]`` (prompts, then chosen
    tokens), and per row the tokens and logits generated so far."""

    def __init__(self, ids: torch.Tensor, plan: _Plan, eos: int | None):
        b, t = ids.shape
        self.ids, self.plan, self.eos = ids, plan, eos
        self.seq = ids.new_zeros(b, plan.end)
        self.seq[:, :t] = ids
        self.tokens = ids.new_full((b, plan.n_new), 0 if eos is None else eos)
        self.logits: torch.Tensor | None = None
        self.count = torch.zeros(b, dtype=torch.int64, device=ids.device)
        self.done = torch.zeros(b, dtype=torch.bool, device=ids.device)

    def all_done(self) -> bool:
        return bool((self.done | (self.count >= self.plan.n_new)).all())

    def take(self, t: int, tok: torch.Tensor, logits: torch.Tensor) -> None:
        """Position ``t``: rows still in their prompt read it, the others take ``tok``."""
        lengths = self.plan.lengths
        gen = (lengths <= t) & ~self.done & (self.count < self.plan.n_new)
        prompt = self.ids[:, t] if t < self.ids.shape[1] else torch.zeros_like(tok)
        self.seq[:, t] = torch.where(t < lengths, prompt, tok)
        if self.logits is None:
            self.logits = logits.new_zeros(*self.tokens.shape, logits.shape[-1])
        idx = gen.nonzero().flatten()
        self.tokens[idx, self.count[idx]] = tok[idx]
        self.logits[idx, self.count[idx]] = logits[idx]
        self.count[idx] += 1
        if self.eos is not None:
            self.done |= gen & (tok == self.eos)

    def result(self) -> Generation:
        logits = self.logits
        if logits is None:  # nothing generated
            logits = torch.zeros(*self.tokens.shape, 0, device=self.tokens.device)
        return Generation(self.tokens, logits, self.count)


def generate(model: SequenceModel, ids: torch.Tensor, *, max_new_tokens: int,
             prompt_lengths: Any = None, visibility: Any = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | None = None,
             use_cache: bool = True,
             return_logits: bool = False) -> torch.Tensor | Generation:
    """Generate ``max_new_tokens`` tokens after each row's prompt (see the module docstring).

    Args:
        ids: ``[B, T]`` int64 prompts, padded on the right.
        prompt_lengths: ``None`` (every row's prompt is all ``T`` tokens), an int, or ``[B]``
            ints in ``[1, T]``.
        visibility: ``None`` (the model's specs) or one spec per layer, as in ``forward``.
        eos_token_id: a row stops after generating it (the rest of its row repeats it); the
            call ends when every row has stopped.
        use_cache: decode on the model stream (refusing specs it cannot serve exactly);
            ``False``: recompute the whole sequence at every step.

    Returns:
        ``[B, max_new_tokens]`` int64 tokens, or a :class:`Generation` (``return_logits``).
    """
    choose = _check_choice(do_sample, temperature, top_k, generator)
    check_bool("generate", "use_cache", use_cache)
    check_bool("generate", "return_logits", return_logits)
    plan = _plan(model, ids, max_new_tokens, prompt_lengths, visibility)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, 0, model.cfg.vocab_size - 1)
    use_cache = use_cache and plan.n_new > 0
    if use_cache:
        _cache_plan(plan)  # refuses before generating
    with torch.no_grad():
        rows = _Rows(ids, plan, eos_token_id)
        decoder = _Decoder(model, plan, use_cache)
        for t in range(plan.first, plan.end):
            if rows.all_done():
                break
            logits = decoder.logits(rows.seq, t)
            rows.take(t, choose(logits), logits)
    return rows.result() if return_logits else rows.tokens
