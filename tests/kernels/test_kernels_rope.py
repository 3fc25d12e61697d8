"""apply_rope / rope_qk_norm and their refs against the rotation written out pair by pair in float64."""

import math

import pytest
import torch

from kernels import apply_rope, apply_rope_ref, rope_qk_norm, rope_qk_norm_ref


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos_sin(t, d, offset=0, base=100000.0):
    """The model's tables: angle[t, j] = (t + offset) * base^(-2j/d), shaped (1, T, 1, D/2)."""
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(offset, offset + t, dtype=torch.float64), inv_freq)
    return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]


def _manual_rope(x, cos, sin):
    """Rotate each pair (x[j], x[j + D/2]) by -angle_j, element by element along the head dim."""
    d = x.size(-1) // 2
    out = torch.empty_like(x)
    c, s = cos.expand(*x.shape[:-1], d), sin.expand(*x.shape[:-1], d)
    for j in range(d):
        a, b = x[..., j], x[..., j + d]
        out[..., j] = a * c[..., j] + b * s[..., j]
        out[..., j + d] = -a * s[..., j] + b * c[..., j]
    return out


def _manual_norm(x, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


# (dtype, output tolerance, gradient tolerance)
DTYPES = [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-4), (torch.bfloat16, 3e-2, 6e-2)]
SHAPES = [(2, 7, 4, 16, 0), (1, 1, 3, 128, 37), (3, 33, 2, 10, 5)]  # (B, T, H, D, position offset)


@pytest.mark.parametrize("b,t,h,d,offset", SHAPES)
@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_apply_rope_matches_math(b, t, h, d, offset, dtype, tol, gtol):
    cos64, sin64 = _cos_sin(t, d, offset)
    x = _rand(b, t, h, d, seed=t * d).to(dtype).requires_grad_()
    y = apply_rope(x, cos64.to(dtype), sin64.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    c, s = cos64.to(dtype).double(), sin64.to(dtype).double()  # the tables as the op saw them
    expect = _manual_rope(x64, c, s)
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol)
    dy = _rand(b, t, h, d, seed=1)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=gtol, atol=gtol)


def test_apply_rope_is_rotation_by_minus_theta():
    # Pair (1, 0) at angle pi/2 must go to (cos, -sin) = (0, -1).
    x = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    ang = torch.tensor(math.pi / 2, dtype=torch.float64).view(1, 1, 1, 1)
    y = apply_rope_ref(x, ang.cos(), ang.sin())
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("h,hkv", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_rope_qk_norm_matches_math(h, hkv, dtype, tol, gtol):
    b, t, d = 2, 9, 24
    cos64, sin64 = _cos_sin(t, d, offset=3)
    q = (_rand(b, t, h, d, seed=h) * 2).to(dtype).requires_grad_()
    k = (_rand(b, t, hkv, d, seed=10 + hkv) * 0.5).to(dtype).requires_grad_()
    qo, ko = rope_qk_norm(q, k, cos64.to(dtype), sin64.to(dtype))
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == ko.dtype == dtype
    q64, k64 = (t_.detach().double().requires_grad_() for t_ in (q, k))
    c, s = cos64.to(dtype).double(), sin64.to(dtype).double()
    eps = torch.finfo(dtype).eps
    qe = _manual_norm(_manual_rope(q64, c, s), eps) * 1.2
    ke = _manual_norm(_manual_rope(k64, c, s), eps) * 1.2
    torch.testing.assert_close(qo.double(), qe, rtol=tol, atol=tol * 1.2)
    torch.testing.assert_close(ko.double(), ke, rtol=tol, atol=tol * 1.2)
    dq, dk = _rand(*q.shape, seed=2), _rand(*k.shape, seed=3)
    ((qo.double() * dq).sum() + (ko.double() * dk).sum()).backward()
    ((qe * dq).sum() + (ke * dk).sum()).backward()
    # bf16 rounds the rotated q/k before the norm, so gradient errors are judged against the gradient's scale.
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=gtol, atol=gtol * want.abs().max().item())


def test_rope_qk_norm_custom_scale():
    cos, sin = _cos_sin(5, 8)
    q, k = _rand(1, 5, 2, 8, seed=1), _rand(1, 5, 1, 8, seed=2)
    q1, k1 = rope_qk_norm_ref(q, k, cos, sin, scale=1.0)
    q3, k3 = rope_qk_norm(q, k, cos, sin, scale=3.0)
    torch.testing.assert_close(q3, 3 * q1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(k3, 3 * k1, rtol=1e-14, atol=1e-14)


def test_rope_gradcheck():
    cos, sin = _cos_sin(4, 6, offset=2)
    q = _rand(2, 4, 2, 6, seed=1).requires_grad_()
    k = _rand(2, 4, 1, 6, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rope_ref(a, cos, sin), (q,))
    assert torch.autograd.gradcheck(lambda a, b: rope_qk_norm_ref(a, b, cos, sin), (q, k))


def test_rope_bad_inputs():
    cos, sin = _cos_sin(5, 8)
    q, k = _rand(1, 5, 2, 8), _rand(1, 5, 1, 8)
    with pytest.raises(ValueError, match="4 dims"):
        apply_rope(q[0], cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope(_rand(1, 5, 2, 7), cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(q, *_cos_sin(4, 8))
    with pytest.raises(ValueError, match="same shape"):
        apply_rope(q, cos, sin[:, :1])
    with pytest.raises(ValueError, match="agree on B, T and D"):
        rope_qk_norm(q, _rand(1, 5, 1, 6), cos, sin)
    with pytest.raises(TypeError, match="same dtype"):
        rope_qk_norm(q, k.float(), cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rope(q.long(), cos, sin)
