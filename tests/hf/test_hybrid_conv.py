"""The hybrid layers' short convolution (``causalmix.hf.hybrid.conv.short_conv``): each
token's window holds the K most recent tokens of its own document, padding skipped; split and
carried through the cache window == whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from causalmix.hf.hybrid.conv import short_conv  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402

K, C = 4, 6


def _oracle(x, weight, bias, valid, ids):
    """Per row and document: the tokens alone through a plain causal ``F.conv1d``."""
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        for d in ids[r].unique():
            keep = (ids[r] == d) & valid[r]
            if keep.any():
                y = F.conv1d(x[r, keep].T[None], weight[:, None], bias, padding=K - 1,
                             groups=C)[0, :, : int(keep.sum())]
                out[r, keep] = y.T
    return out


@pytest.mark.parametrize("t", [1, 3, 7, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [True, False])
def test_documents_restart_and_padding_is_skipped(t, dtype, padded):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, C, generator=g, dtype=dtype)
    weight = torch.randn(C, K, generator=g, dtype=dtype)
    bias = torch.randn(C, generator=g, dtype=dtype)
    valid = torch.rand(2, t, generator=g) > 0.3
    if not padded:
        valid[:] = True
    ids = (torch.rand(2, t, generator=g) > 0.7).long().cumsum(1)
    segments = torch.cat([ids[:, :1], ids], 1)
    out = short_conv(x, weight, bias, valid=valid if padded else None, segments=segments)
    ref = _oracle(x.double(), weight.double(), bias.double(), valid, ids)
    base = _oracle(x, weight, bias, valid, ids)
    assert_close(out.output[valid], ref[valid], base[valid], name="output")
    for r in range(2):  # the window: the last K tokens of the last document, oldest first
        last = (ids[r] == ids[r, -1]) & valid[r]
        tokens = x[r, last][-K:]
        want = torch.cat([x.new_zeros(K - tokens.shape[0], C), tokens]).T
        assert torch.equal(out.window[r], want)


def test_split_and_carried_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, C, generator=g)
    weight, bias = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, 5:8] = False
    for s in (1, 2, 5, 9, 16):
        whole = short_conv(x, weight, bias, valid=valid)
        first = short_conv(x[:, :s], weight, bias, valid=valid[:, :s])
        second = short_conv(x[:, s:], weight, bias, past=first.window, valid=valid[:, s:])
        got = torch.cat([first.output, second.output], 1)
        assert_close(got[valid], whole.output[valid], whole.output[valid], name=f"split {s}")
        assert torch.equal(second.window, whole.window)


def test_without_padding_or_restarts_it_is_the_plain_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, C, generator=g)
    weight, bias = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    out = short_conv(x, weight, bias, segments=torch.zeros(1, 10, dtype=torch.long))
    ref = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=K - 1, groups=C)[..., :9]
    assert torch.equal(out.output, ref.transpose(1, 2))
    gathered = short_conv(x, weight, bias, valid=torch.ones(2, 9, dtype=torch.bool).index_fill(
        1, torch.tensor([8]), False))
    assert_close(gathered.output[:, :8], out.output[:, :8], out.output[:, :8])
