"""flash_attention / flash_attention_ref against attention written query by query in float64."""

import math

import pytest
import torch

from kernels import flash_attention, flash_attention_ref


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _manual(q, k, v, causal=True, window=None, scale=None):
    """Loop over (batch, head, query); query i sits at position Tk - Tq + i and reads kv head h // (H / Hkv)."""
    b_, tq, h_, d = q.shape
    tk, hkv = k.size(1), k.size(2)
    scale = 1 / math.sqrt(d) if scale is None else scale
    rows = []
    for b in range(b_):
        heads = []
        for h in range(h_):
            g = h // (h_ // hkv)
            outs = []
            for i in range(tq):
                p = tk - tq + i
                keys = [j for j in range(tk) if not causal or (j <= p and (window is None or p - j <= window))]
                s = torch.stack([(q[b, i, h] * k[b, j, g]).sum() * scale for j in keys])
                w = torch.exp(s - s.max())
                w = w / w.sum()
                outs.append((w[:, None] * v[b, keys, g]).sum(0))
            heads.append(torch.stack(outs))  # (Tq, D)
        rows.append(torch.stack(heads, dim=1))  # (Tq, H, D)
    return torch.stack(rows)  # (B, Tq, H, D)


CASES = [  # (B, Tq, Tk, H, Hkv, D, window)
    (2, 33, 33, 4, 2, 16, None),
    (2, 33, 33, 4, 2, 16, 7),
    (1, 17, 17, 3, 3, 8, 0),
    (1, 17, 17, 2, 1, 8, 1),
    (1, 9, 9, 2, 2, 8, 8),
    (1, 9, 9, 2, 2, 8, 100),
    (2, 1, 20, 4, 2, 16, None),
    (2, 1, 20, 4, 4, 16, 7),
    (1, 5, 12, 4, 2, 8, 3),
    (1, 5, 12, 2, 2, 12, None),
]
# (dtype, output tolerance, gradient tolerance relative to max(gradient scale, 1): with window 0 the q and k
# gradients are exactly zero)
DTYPES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-4), (torch.bfloat16, 3e-2, 5e-2)]


@pytest.mark.parametrize("b,tq,tk,h,hkv,d,window", CASES)
@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_attention_matches_math(b, tq, tk, h, hkv, d, window, dtype, tol, gtol):
    seed = tq * 100 + tk + h
    q = (_rand(b, tq, h, d, seed=seed) * 1.5).to(dtype).requires_grad_()
    k = (_rand(b, tk, hkv, d, seed=seed + 1) * 1.5).to(dtype).requires_grad_()
    v = _rand(b, tk, hkv, d, seed=seed + 2).to(dtype).requires_grad_()
    y = flash_attention(q, k, v, window=window)
    assert y.shape == (b, tq, h, d) and y.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expect = _manual(q64, k64, v64, window=window)
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol)
    dy = _rand(b, tq, h, d, seed=3)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=gtol, atol=gtol * max(want.abs().max().item(), 1.0))


def test_attention_window_zero_returns_values():
    # Each query sees only its own key, so the output is v itself (repeated over the grouped heads).
    q, k, v = _rand(2, 6, 4, 8, seed=1), _rand(2, 6, 2, 8, seed=2), _rand(2, 6, 2, 8, seed=3)
    y = flash_attention(q, k, v, window=0)
    torch.testing.assert_close(y, v.repeat_interleave(2, dim=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tq,tk", [(7, 7), (3, 10), (12, 5)])
def test_attention_non_causal_and_scale(tq, tk):
    q, k, v = _rand(1, tq, 4, 8, seed=tq), _rand(1, tk, 2, 8, seed=tk), _rand(1, tk, 2, 8, seed=tk + 1)
    y = flash_attention(q, k, v, causal=False, scale=0.3)
    torch.testing.assert_close(y, _manual(q, k, v, causal=False, scale=0.3), rtol=1e-10, atol=1e-10)
    y = flash_attention(q[:, : min(tq, tk)], k, v, scale=0.05, window=2)
    torch.testing.assert_close(y, _manual(q[:, : min(tq, tk)], k, v, window=2, scale=0.05), rtol=1e-10, atol=1e-10)


def test_decode_matches_full_sequence():
    # The last query of a full causal pass equals a one-query decode over the same keys.
    q, k, v = _rand(2, 11, 4, 8, seed=1), _rand(2, 11, 2, 8, seed=2), _rand(2, 11, 2, 8, seed=3)
    for window in (None, 3):
        full = flash_attention(q, k, v, window=window)
        step = flash_attention(q[:, -1:], k, v, window=window)
        torch.testing.assert_close(step, full[:, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tq,tk,window", [(5, 5, None), (5, 5, 1), (2, 6, 2)])
def test_attention_gradcheck(tq, tk, window):
    q = _rand(1, tq, 2, 4, seed=1).requires_grad_()
    k = _rand(1, tk, 1, 4, seed=2).requires_grad_()
    v = _rand(1, tk, 1, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention_ref(a, b, c, window=window), (q, k, v))


def test_attention_bad_inputs():
    q, k, v = _rand(1, 4, 4, 8), _rand(1, 4, 2, 8), _rand(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_attention(_rand(1, 4, 3, 8), k, v)
    with pytest.raises(ValueError, match="4 dims"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="agree on B and D"):
        flash_attention(q, _rand(1, 4, 2, 6), _rand(1, 4, 2, 6))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(_rand(1, 5, 4, 8), k, v)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="causal=True"):
        flash_attention(q, k, v, causal=False, window=3)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.float(), v)
    with pytest.raises(TypeError, match="floating"):
        flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="same device"):
        flash_attention(q, k, v.to("meta"))
