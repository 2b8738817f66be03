"""The site's figures, drawn from the code at build time (``site.py`` writes each as
``figures/<name>.svg``): every mask picture is ``spec.mask(...)``, every block map is
``spec.block_map(...)``, every weight picture is the output of the op itself.

Weight pictures read an op's weights from its output: with one-hot keys ``k_j = e_j`` (so
``D == T``), queries of ones and one-hot values ``v_j = e_j``, linear attention's output row ``i``
is the row of weights ``w_ij`` of query ``i``; softmax attention with ``v_j = e_j`` returns its
attention probabilities.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "causalmix"  # the same SVG at every build
matplotlib.rcParams["font.size"] = 9
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

import causalmix as cm  # noqa: E402
from causalmix import visibility as vis  # noqa: E402

INK, LIGHT, PAPER = "#3f51b5", "#c5cae9", "#ffffff"
_MASK = ListedColormap([PAPER, INK])


#: The format figures are written in ("png" to look at them outside the site).
FORMAT = "svg"


def _svg(fig) -> bytes:
    buf = io.BytesIO()
    meta = {"Date": None} if FORMAT == "svg" else {}
    fig.savefig(buf, format=FORMAT, bbox_inches="tight", metadata=meta, dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _grid(ax, values: np.ndarray, cmap, *, vmin=0.0, vmax=1.0, q_offset=0, k_offset=0):
    """One cell per (query, key), queries down, keys across, labelled by absolute position."""
    tq, tk = values.shape
    ax.pcolormesh(np.arange(tk + 1) - 0.5, np.arange(tq + 1) - 0.5, values, cmap=cmap,
                  vmin=vmin, vmax=vmax, edgecolors="#9e9e9e", linewidth=0.4)
    ax.set_xlim(-0.5, tk - 0.5)
    ax.set_ylim(tq - 0.5, -0.5)
    ax.set_aspect("equal")
    step = 1 if max(tq, tk) <= 16 else 4
    ax.set_xticks(range(0, tk, step), [str(k_offset + j) for j in range(0, tk, step)])
    ax.set_yticks(range(0, tq, step), [str(q_offset + i) for i in range(0, tq, step)])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xlabel("key j")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("query i")


def mask_figure(spec: vis.Visibility, n: int = 12, title: str | None = None) -> bytes:
    """``spec.mask(n, n)`` of batch row 0: a filled cell is a visible pair."""
    fig, ax = plt.subplots(figsize=(2.6, 2.8))
    _grid(ax, spec.mask(n, n)[0].numpy().astype(float), _MASK)
    ax.set_title(title or repr(spec), pad=28, fontsize=9)
    return _svg(fig)


def offsets_figure() -> bytes:
    """One ``Causal()`` asked at absolute positions by three calls: a prefill of 7 queries and
    keys, a chunk of 4 queries at ``q_offset=7`` over 11 keys, one decode query at
    ``q_offset=11`` over 12 keys; each call's rows are ``spec.mask(tq, tk, q_offset=...)``."""
    spec, n = cm.Causal(), 12
    calls = [(0, 7, "#3f51b5"), (7, 4, "#00897b"), (11, 1, "#e65100")]
    fig, ax = plt.subplots(figsize=(3.4, 3.6))
    for q_offset, tq, colour in calls:
        tk = q_offset + tq
        m = spec.mask(tq, tk, q_offset=q_offset)[0].numpy()
        for r in range(tq):
            for j in range(n):
                face = colour if j < tk and m[r, j] else (PAPER if j < tk else "#eeeeee")
                ax.add_patch(Rectangle((j - 0.5, q_offset + r - 0.5), 1, 1, facecolor=face,
                                       edgecolor="#9e9e9e", linewidth=0.4))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xlabel("key j")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("query i")
    ax.legend(handles=[Patch(facecolor=c, label=f"q_offset={o}, {t} quer{'y' if t == 1 else 'ies'}")
                       for o, t, c in calls] + [Patch(facecolor="#eeeeee", edgecolor="#9e9e9e",
                                                      label="not a key of the call")],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, fontsize=7)
    ax.set_title("Causal() at absolute positions:\nprefill, chunk, decode", pad=28, fontsize=9)
    return _svg(fig)


def horizon_figure() -> bytes:
    """``Chunked(3, lookahead=1)``: each query's key range (``key_range``) and horizon (its last
    visible key), which is when a streamed output becomes final."""
    spec, n = cm.Chunked(3, lookahead=1), 12
    pos = torch.arange(n)
    hi = spec.horizon(pos).numpy()
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    _grid(ax, spec.mask(n, n)[0].numpy().astype(float), ListedColormap([PAPER, LIGHT]))
    ax.plot(hi, pos.numpy(), "o", color=INK, markersize=4, label="horizon(i)")
    ax.plot(pos.numpy(), pos.numpy(), "x", color="#424242", markersize=4, label="i = j")
    ax.legend(loc="lower left", fontsize=7, frameon=True)
    ax.set_title(f"{spec!r}\nlookahead_frames = {spec.lookahead_frames}", pad=28, fontsize=9)
    return _svg(fig)


def block_map_figure() -> bytes:
    """``spec.block_map(32, 32, 4)`` of two packed documents, causal: the tiles the ``blocks``
    implementation skips (empty), computes without a mask (full) or with one (partial)."""
    spec, n, block = cm.Segments.from_lengths([14, 18]) & cm.Causal(), 32, 4
    tiles = spec.block_map(n, n, block)[0].numpy()
    colour = {int(vis.EMPTY): PAPER, int(vis.PARTIAL): LIGHT, int(vis.FULL): INK}
    fig, ax = plt.subplots(figsize=(3.4, 3.7))
    for bi in range(tiles.shape[0]):
        for bj in range(tiles.shape[1]):
            ax.add_patch(Rectangle((bj * block - 0.5, bi * block - 0.5), block, block,
                                   facecolor=colour[int(tiles[bi, bj])], edgecolor="#424242",
                                   linewidth=1.2))
    m = spec.mask(n, n)[0].numpy()
    ii, jj = np.nonzero(m)
    ax.plot(jj, ii, "s", color="#212121", markersize=1.4)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(0, n, 2 * block))
    ax.set_yticks(range(0, n, 2 * block))
    ax.xaxis.tick_top()
    ax.set_xlabel("key j")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("query i")
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#424242", label=lbl) for lbl, c in
                       [("empty", PAPER), ("partial", LIGHT), ("full", INK)]],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7)
    ax.set_title("Segments.from_lengths([14, 18]) & Causal()\nblock_map(32, 32, 4); dots: "
                 "visible pairs", pad=28, fontsize=8)
    return _svg(fig)


def _linear_weights(spec, n, **kw) -> np.ndarray:
    """Linear attention's weights ``w_ij`` read from its output (module docstring)."""
    eye = torch.eye(n, dtype=torch.float64)
    k = eye[None, :, None, :]                     # k_j = e_j  -> q_i . k_j = q_i[j]
    q = torch.ones(1, n, 1, n, dtype=torch.float64)
    out = cm.linear_attention(q, k, k.clone(), spec, impl="reference", **kw)
    return out[0, :, 0, :].numpy()


def _softmax_weights(spec, n, seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, n, 1, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.eye(n, dtype=torch.float64)[None, :, None, :]
    return cm.softmax_attention(q, k, v, spec, impl="reference")[0, :, 0, :].numpy()


def _weights_figure(panels: list[tuple[str, np.ndarray]], cmap="Blues") -> bytes:
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.1))
    axes = np.atleast_1d(axes)
    for ax, (title, w) in zip(axes, panels, strict=True):
        _grid(ax, w, cmap, vmin=0.0, vmax=max(float(w.max()), 1e-12))
        ax.set_title(title, pad=28, fontsize=8)
    return _svg(fig)


def softmax_weights_figure() -> bytes:
    """Attention probabilities of ``softmax_attention`` (random q, k) under three specs."""
    n = 12
    specs = [cm.Causal(), cm.Prefix(4), cm.Chunked(4, lookahead=1)]
    return _weights_figure([(repr(s), _softmax_weights(s, n)) for s in specs])


def linear_weights_figure() -> bytes:
    """``decay ** |i - j|`` where visible: linear attention with a constant decay 0.75."""
    n, decay = 12, torch.tensor([0.75], dtype=torch.float64)
    specs = [cm.Causal(), cm.Full(), cm.Chunked(4, lookahead=0)]
    return _weights_figure([(f"{s!r}, decay 0.75", _linear_weights(s, n, decay=decay))
                            for s in specs])


def gated_weights_figure() -> bytes:
    """Per-token gates: products of ``exp(g_s)`` (forward) and ``exp(r_s)`` (reverse)."""
    n = 12
    g = torch.Generator().manual_seed(1)
    log_gate = -torch.rand(1, n, 1, generator=g, dtype=torch.float64) * 0.8
    log_gate[0, 6] = -4.0                          # one strong forget gate at position 6
    panels = []
    for s in [cm.Causal(), cm.Full(), cm.Segments.from_lengths([5, 7]) & cm.Full()]:
        panels.append((f"{s!r}\nforget at position 6",
                       _linear_weights(s, n, log_gate=log_gate)))
    return _weights_figure(panels)


def delta_parts_figure() -> bytes:
    """The two parts of a delta-rule query, from ``spec.mask`` and ``spec.horizon``: the forward
    recurrence runs over the visible keys up to the query's own, the reverse one down from the
    horizon ``hi(i)`` to the key after the query."""
    n = 8
    specs = [(cm.Chunked(2, lookahead=1), None), (cm.Prefix(3), None),
             (cm.Segments.from_lengths([3, 5]) & cm.Full(),
              "Segments.from_lengths([3, 5])\n& Full()")]
    colours = ListedColormap([PAPER, INK, "#212121", "#ff8f00"])
    fig, axes = plt.subplots(1, len(specs), figsize=(2.9 * len(specs), 3.3))
    for ax, (spec, title) in zip(axes, specs, strict=True):
        m = spec.mask(n, n)[0].numpy()
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        parts = np.where(m & (j < i), 1, 0) + np.where(i == j, 2, 0) + np.where(m & (j > i), 3, 0)
        _grid(ax, parts.astype(float), colours, vmin=0, vmax=3)
        hi = spec.horizon(torch.arange(n)).numpy()
        ax.plot(hi, np.arange(n), "o", color="#424242", markersize=3, fillstyle="none")
        ax.set_title(title or repr(spec), pad=28, fontsize=8)
    fig.legend(handles=[Patch(facecolor=c, edgecolor="#9e9e9e", label=lbl) for lbl, c in
                        [("forward part", INK), ("the query's own key", "#212121"),
                         ("reverse part", "#ff8f00")]]
               + [plt.Line2D([], [], marker="o", color="#424242", fillstyle="none", ls="",
                             label="horizon hi(i)")],
               loc="lower center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, 0.02))
    return _svg(fig)


def _delta_weights(spec, n, d=4, seed=0, **kw) -> np.ndarray:
    """``W`` with ``o = W v``: the delta rule is linear in v, so with one-hot values ``v_j =
    e_j`` (``Dv == T``) output row ``i`` is the row of weights of query ``i``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, 1, d, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(1, n, 1, d, generator=g, dtype=torch.float64),
                                      dim=-1)
    v = torch.eye(n, dtype=torch.float64)[None, :, None, :]
    beta = torch.full((1, n, 1), 0.9, dtype=torch.float64)
    out = cm.delta_attention(q, k, v, spec, beta=beta, impl="reference", **kw)
    return out[0, :, 0, :].numpy()


def delta_weights_figure() -> bytes:
    """The delta rule's weights (random q, unit keys of dimension 4, beta 0.9) under three
    specs, drawn on a diverging scale: they can be negative."""
    n = 12
    panels = [(f"{s!r}", _delta_weights(s, n))
              for s in [cm.Causal(), cm.Full(), cm.Chunked(4, lookahead=1)]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3))
    top = max(float(np.abs(w).max()) for _, w in panels)
    for ax, (title, w) in zip(axes, panels, strict=True):
        _grid(ax, w, "RdBu_r", vmin=-top, vmax=top)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("query i", labelpad=1)
        ax.set_title(title, pad=28, fontsize=8)
    fig.subplots_adjust(wspace=0.3)
    fig.colorbar(axes[0].collections[0], ax=list(axes), shrink=0.7, label="weight of v_j")
    return _svg(fig)


def _specs() -> dict[str, tuple[vis.Visibility, str | None]]:
    pad = torch.tensor([[True] * 9 + [False] * 3])
    adaptive = torch.tensor([0, 0, 2, 0, 0, 0, 3, 0, 0, 1, 0, 0])
    return {
        "causal": (cm.Causal(), None),
        "full": (cm.Full(), None),
        "prefix": (cm.Prefix(4), None),
        "chunked": (cm.Chunked(4), None),
        "chunked-lookahead": (cm.Chunked(4, lookahead=1), None),
        "window": (cm.Window(3), None),
        "window-right": (cm.Window(2, 1), None),
        "segments": (cm.Segments.from_lengths([5, 4, 3]), "Segments.from_lengths([5, 4, 3])"),
        "segments-causal": (cm.Segments.from_lengths([5, 4, 3]) & cm.Causal(),
                            "Segments.from_lengths([5, 4, 3])\n& Causal()"),
        "adaptive": (cm.AdaptiveLookahead(adaptive),
                     "AdaptiveLookahead(a)\na = [0 0 2 0 0 0 3 0 0 1 0 0]"),
        "valid-keys": (cm.ValidKeys(pad) & cm.Causal(),
                       "ValidKeys(valid) & Causal()\n(last 3 positions: padding)"),
        "or": (cm.Window(2) | cm.Prefix(3), None),
        "docstring-example": (cm.Segments(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]))
                              & cm.Chunked(2), "Segments([0 0 0 0 0 1 1 1]) & Chunked(2)"),
    }


def _mask(name: str) -> Callable[[], bytes]:
    def draw() -> bytes:
        spec, title = _specs()[name]
        n = 8 if name == "docstring-example" else 12
        return mask_figure(spec, n, title)
    return draw


#: Every figure of the site: name -> a function returning the SVG bytes.
FIGURES: dict[str, Callable[[], bytes]] = {
    **{f"mask-{name}": _mask(name) for name in _specs()},
    "offsets": offsets_figure,
    "horizon": horizon_figure,
    "block-map": block_map_figure,
    "softmax-weights": softmax_weights_figure,
    "linear-weights": linear_weights_figure,
    "gated-weights": gated_weights_figure,
    "delta-parts": delta_parts_figure,
    "delta-weights": delta_weights_figure,
}
