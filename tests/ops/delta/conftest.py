"""Shared scaffolding of the delta-rule tests: specs, inputs, and the comparison of an
implementation with the reference (outputs, final state, every gradient), given to the tests as
the ``delta`` fixture (test modules never import each other)."""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.delta import delta_attention
from causalmix.testing import assert_all_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

B, H, D, DV = 2, 4, 8, 6


def _ids(total: int, seed: int, batch: bool) -> torch.Tensor:
    """Contiguous segment ids over [0, total): runs of random length 1..40."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B if batch else 1):
        lens = torch.randint(1, 40, (total,), generator=g)
        rows.append(torch.repeat_interleave(torch.arange(total), lens)[:total])
    return torch.stack(rows) if batch else rows[0]


def specs(total: int) -> dict:
    """Every served spec family, for a call covering absolute positions [0, total)."""
    return {
        "causal": Causal(),
        "full": Full(),
        "prefix": Prefix(45),
        "prefix_batch": Prefix(torch.tensor([3, 80])),
        "chunked": Chunked(8),
        "chunked_la": Chunked(5, lookahead=2),
        "seg_causal": Segments(_ids(total, 1, False)) & Causal(),
        "seg_full": Segments(_ids(total, 2, True)),
        "seg_prefix": Segments(_ids(total, 3, False)) & Prefix(50),
        "seg_chunked": Chunked(6) & Segments(_ids(total, 4, True)),
        "seg_chunked_la": Segments(_ids(total, 5, False)) & Chunked(4, lookahead=1),
    }


class Inputs:
    """Random inputs of one call: unit keys (stable transitions), beta in ``beta_range``,
    log-gates in ``[-strength, 0]`` (``vector``: per key dimension, ``[B, Tk, H, D]``, KDA);
    ``do`` / ``ds`` weigh the output and the final state in the loss whose gradients are
    compared."""

    def __init__(self, t: int, seed: int, *, heads=(H, H, H), tk: int | None = None,
                 strength: float = 1.5, beta_range=(0.05, 1.95), gated: bool = True,
                 reverse: bool = True, state: bool = True, vector: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        tk = t if tk is None else tk
        hq, hk, hv = heads
        hout = max(hq, hv)
        self.q = torch.randn(B, t, hq, D, generator=g)
        self.k = torch.nn.functional.normalize(torch.randn(B, tk, hk, D, generator=g), dim=-1)
        self.v = torch.randn(B, tk, hv, DV, generator=g)
        lo, hi = beta_range
        self.beta = lo + (hi - lo) * torch.rand(B, tk, hout, generator=g)
        gate = (B, tk, hout, D) if vector else (B, tk, hout)
        self.log_gate = -strength * torch.rand(*gate, generator=g) if gated else None
        self.reverse_log_gate = -strength * torch.rand(*gate, generator=g) \
            if gated and reverse else None
        self.initial_state = torch.randn(B, hout, D, DV, generator=g) if state else None
        self.do = torch.randn(B, t, hout, DV, generator=g)
        self.ds = torch.randn(B, hout, D, DV, generator=g)

    def names(self) -> list[str]:
        out = ["out", "state", "dq", "dk", "dv", "dbeta"]
        out += ["dlog_gate"] if self.log_gate is not None else []
        out += ["dreverse_log_gate"] if self.reverse_log_gate is not None else []
        out += ["dinitial_state"] if self.initial_state is not None else []
        return out


class Harness:
    """The ``delta`` fixture: specs, inputs and the checks against the reference."""

    B, H, D, DV = B, H, D, DV
    LENGTHS = (1, 7, 63, 113, 500)
    DIVISOR = {1: 1, 7: 7, 63: 21, 113: 113, 500: 50}
    specs = staticmethod(specs)
    Inputs = Inputs

    @staticmethod
    def run(impl: str, x: Inputs, spec, *, off: int, c: int, dtype) -> list[torch.Tensor]:
        """Output, final state and the gradients of ``out . do + state . ds`` w.r.t. q, k, v,
        beta, the gates and the initial state given, all in ``dtype`` (beta, gates and state
        in the compute dtype)."""
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        qkv = [t.detach().to(dtype).requires_grad_() for t in (x.q, x.k, x.v)]
        rest = [None if t is None else t.detach().to(sd).requires_grad_()
                for t in (x.beta, x.log_gate, x.reverse_log_gate, x.initial_state)]
        out, state = delta_attention(*qkv, spec, beta=rest[0], log_gate=rest[1],
                                     reverse_log_gate=rest[2], initial_state=rest[3],
                                     q_offset=off, k_offset=off, return_final_state=True,
                                     impl=impl, chunk_size=c)
        loss = (out.to(sd) * x.do.to(sd)).sum() + (state * x.ds.to(sd)).sum()
        wrt = qkv + [t for t in rest if t is not None]
        # a spec without a reverse part never reads reverse_log_gate: its gradient is 0
        grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        return [out, state, *grads]

    def check(self, impl: str, x: Inputs, spec, *, dtype, off: int, c: int = 16,
              label: str = "") -> None:
        """``impl`` against the reference in fp64 (the truth), with the reference run in
        ``dtype`` as the same-precision baseline."""
        truth = self.run("reference", x, spec, off=off, c=c, dtype=torch.float64)
        base = self.run("reference", x, spec, off=off, c=c, dtype=dtype)
        got = self.run(impl, x, spec, off=off, c=c, dtype=dtype)
        assert_all_close(x.names(), got, truth, base,
                         label=f"{impl} {spec!r} T={x.q.shape[1]} {dtype} {label}")


@pytest.fixture
def delta() -> Harness:
    return Harness()
