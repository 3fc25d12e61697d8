"""apply_rope / rope_qk_norm and their refs against the rotation written out pair by pair in float64."""

import math

import pytest
import torch
from tritonchat.kernels import apply_rope, apply_rope_ref, rope_qk_norm, rope_qk_norm_ref

from tests.helpers import F32_EPS, rand
from tests.tolerances import EXACT, tol


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


DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPES = [(2, 7, 4, 16, 0), (1, 1, 3, 128, 37), (3, 33, 2, 10, 5)]  # (B, T, H, D, position offset)


@pytest.mark.parametrize("b,t,h,d,offset", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_matches_math(b, t, h, d, offset, dtype):
    cos64, sin64 = _cos_sin(t, d, offset)
    x = rand(b, t, h, d, seed=t * d).to(dtype).requires_grad_()
    y = apply_rope(x, cos64.to(dtype), sin64.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    c, s = cos64.to(dtype).double(), sin64.to(dtype).double()  # the tables as the op saw them
    expect = _manual_rope(x64, c, s)
    torch.testing.assert_close(y.double(), expect, **tol("rope", dtype))
    dy = rand(b, t, h, d, seed=1)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol("rope_grad", dtype))


def test_apply_rope_is_rotation_by_minus_theta():
    # Pair (1, 0) at angle pi/2 must go to (cos, -sin) = (0, -1).
    x = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    ang = torch.tensor(math.pi / 2, dtype=torch.float64).view(1, 1, 1, 1)
    y = apply_rope_ref(x, ang.cos(), ang.sin())
    # hand-derived: cos(pi/2) is 6.1e-17 in float64, not 0, so the 0 is only 0 up to that
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("h,hkv", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_norm_matches_math(h, hkv, dtype):
    b, t, d = 2, 9, 24
    cos64, sin64 = _cos_sin(t, d, offset=3)
    q = (rand(b, t, h, d, seed=h) * 2).to(dtype).requires_grad_()
    k = (rand(b, t, hkv, d, seed=10 + hkv) * 0.5).to(dtype).requires_grad_()
    qo, ko = rope_qk_norm(q, k, cos64.to(dtype), sin64.to(dtype))
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == ko.dtype == dtype
    q64, k64 = (t_.detach().double().requires_grad_() for t_ in (q, k))
    c, s = cos64.to(dtype).double(), sin64.to(dtype).double()
    eps = torch.finfo(dtype).eps
    qe = _manual_norm(_manual_rope(q64, c, s), eps) * 1.2
    ke = _manual_norm(_manual_rope(k64, c, s), eps) * 1.2
    torch.testing.assert_close(qo.double(), qe, **tol("rope", dtype, scale=1.2))  # |out| ~ the 1.2 scale
    torch.testing.assert_close(ko.double(), ke, **tol("rope", dtype, scale=1.2))
    dq, dk = rand(*q.shape, seed=2), rand(*k.shape, seed=3)
    ((qo.double() * dq).sum() + (ko.double() * dk).sum()).backward()
    ((qe * dq).sum() + (ke * dk).sum()).backward()
    # bf16 rounds the rotated q/k before the norm, so gradient errors are judged against the gradient's scale.
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad)):
        torch.testing.assert_close(got.double(), want, **tol("rope_grad", dtype, scale=want.abs().max().item()))


def test_rope_qk_norm_custom_scale():
    cos, sin = _cos_sin(5, 8)
    q, k = rand(1, 5, 2, 8, seed=1), rand(1, 5, 1, 8, seed=2)
    q1, k1 = rope_qk_norm_ref(q, k, cos, sin, scale=1.0)
    q3, k3 = rope_qk_norm(q, k, cos, sin, scale=3.0)
    torch.testing.assert_close(q3, 3 * q1, **tol("float64_few_flops", torch.float64))
    torch.testing.assert_close(k3, 3 * k1, **tol("float64_few_flops", torch.float64))


def test_rope_gradcheck():
    cos, sin = _cos_sin(4, 6, offset=2)
    q = rand(2, 4, 2, 6, seed=1).requires_grad_()
    k = rand(2, 4, 1, 6, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rope_ref(a, cos, sin), (q,))
    assert torch.autograd.gradcheck(lambda a, b: rope_qk_norm_ref(a, b, cos, sin), (q, k))


def test_rope_bad_inputs():
    cos, sin = _cos_sin(5, 8)
    q, k = rand(1, 5, 2, 8), rand(1, 5, 1, 8)
    with pytest.raises(ValueError, match="4 dims"):
        apply_rope(q[0], cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope(rand(1, 5, 2, 7), cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(q, *_cos_sin(4, 8))
    with pytest.raises(ValueError, match="same shape"):
        apply_rope(q, cos, sin[:, :1])
    with pytest.raises(ValueError, match="agree on B, T and D"):
        rope_qk_norm(q, rand(1, 5, 1, 6), cos, sin)
    with pytest.raises(TypeError, match="same dtype"):
        rope_qk_norm(q, k.float(), cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rope(q.long(), cos, sin)


# ---- the Triton kernels (interpreter on CPU, compiled on CUDA), float32 against the float64 formula ---------------

from tritonchat.kernels.rope import apply_rope as apply_rope_op  # noqa: E402  (same functions, imported from their module)
from tritonchat.kernels.rope import rope_qk_norm as rope_qk_norm_op  # noqa: E402

# (B, T, H, Hkv, D, position offset of the first token)
KERNEL_CASES = [
    (2, 8, 12, 4, 128, 0),  # the model's head_dim, GQA
    (1, 1, 6, 2, 128, 1500),  # decode: one token at position 1500
    (3, 5, 3, 3, 10, 5),  # D/2 = 5, not a power of two
    (2, 9, 5, 1, 64, 7),
    (4, 1, 2, 2, 16, 2047),
]


def _table_slice(t, d, offset, t_max=2048):
    """cos/sin rows [offset, offset + t) sliced out of a full fp32 table, as the model does when decoding: a view
    whose data starts mid-buffer."""
    cos, sin = _cos_sin(t_max + 1, d)
    cos, sin = cos.float()[:, offset:offset + t], sin.float()[:, offset:offset + t]
    assert offset == 0 or cos.storage_offset() > 0
    return cos, sin


def _check_qk(q, k, cos, sin, seed, scale=1.2):
    """rope_qk_norm on (q, k) (any views) against the float64 rotation + norm; outputs and both gradients.
    float32 tolerances: tol("rope") on the outputs (|out| ~ scale), tol("rope_grad") on the gradients."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = rope_qk_norm_op(q, k, cos, sin, scale=scale, impl="triton")
    assert type(qo.grad_fn).__name__ == "_RopeQKNormBackward"  # the kernel ran, not the reference
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == ko.dtype == q.dtype
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    c, s = cos.double(), sin.double()
    qe = _manual_norm(_manual_rope(q64, c, s), F32_EPS) * scale
    ke = _manual_norm(_manual_rope(k64, c, s), F32_EPS) * scale
    torch.testing.assert_close(qo.double(), qe, **tol("rope", torch.float32))
    torch.testing.assert_close(ko.double(), ke, **tol("rope", torch.float32))
    dq, dk = rand(*q.shape, seed=seed), rand(*k.shape, seed=seed + 1)
    ((qo.double() * dq).sum() + (ko.double() * dk).sum()).backward()
    ((qe * dq).sum() + (ke * dk).sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, **tol("rope_grad", torch.float32))
    torch.testing.assert_close(k.grad.double(), k64.grad, **tol("rope_grad", torch.float32))


@pytest.mark.parametrize("b,t,h,hkv,d,offset", KERNEL_CASES)
def test_rope_qk_norm_kernel_fp32(b, t, h, hkv, d, offset):
    cos, sin = _table_slice(t, d, offset)
    q = (rand(b, t, h, d, seed=h * d + t) * 2).float()
    k = (rand(b, t, hkv, d, seed=hkv * d + t + 1) * 0.5 + 0.1).float()
    _check_qk(q, k, cos, sin, seed=offset)


@pytest.mark.parametrize("b,t,h,hkv,d,offset", KERNEL_CASES[:3])
def test_apply_rope_kernel_fp32(b, t, h, hkv, d, offset):
    cos, sin = _table_slice(t, d, offset)
    x = rand(b, t, h, d, seed=d + t).float().requires_grad_()
    y = apply_rope_op(x, cos, sin, impl="triton")
    assert type(y.grad_fn).__name__ == "_ApplyRopeBackward" and y.shape == x.shape and y.dtype == x.dtype
    x64 = x.detach().double().requires_grad_()
    expect = _manual_rope(x64, cos.double(), sin.double())
    torch.testing.assert_close(y.double(), expect, **tol("rope", torch.float32))
    dy = rand(b, t, h, d, seed=3)
    y.backward(dy.float())
    (expect * dy).sum().backward()
    # rope is linear in x: the backward is the transposed rotation, held to the output's bound
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol("rope", torch.float32))


def test_rope_qk_norm_kernel_per_sequence_positions():
    # Batched decoding with a different position per sequence: cos/sin of shape (B, 1, 1, D/2).
    b, h, hkv, d = 3, 4, 2, 32
    tabs = [_table_slice(1, d, off) for off in (0, 17, 900)]
    cos, sin = torch.cat([c for c, _ in tabs]), torch.cat([s for _, s in tabs])
    _check_qk(rand(b, 1, h, d, seed=1).float(), rand(b, 1, hkv, d, seed=2).float(), cos, sin, seed=3, scale=3.0)
    # Chunks of 3 tokens at per-sequence positions, gathered from the full tables: (B, T, 1, D/2).
    full_cos, full_sin = _table_slice(2048, d, 0)
    positions = torch.tensor([[5, 6, 7], [100, 101, 102], [2040, 2041, 2042]])
    cos, sin = full_cos[0, positions], full_sin[0, positions]
    assert cos.shape == (b, 3, 1, d // 2)
    _check_qk(rand(b, 3, h, d, seed=4).float(), rand(b, 3, hkv, d, seed=5).float(), cos, sin, seed=6)


def test_rope_qk_norm_kernel_views():
    b, t, h, hkv, d = 2, 6, 4, 2, 16
    cos, sin = _table_slice(t, d, 3)
    # q and k sliced out of one fused projection output, then .view()-ed: strided, read in place.
    qkv = rand(b, t, (h + 2 * hkv) * d, seed=4).float()
    q = qkv[..., : h * d].view(b, t, h, d)
    k = qkv[..., h * d : (h + hkv) * d].view(b, t, hkv, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_qk(q, k, cos, sin, seed=5)
    # (B, H, T, D) storage seen as (B, T, H, D), and a head dim with stride 2 (copied once).
    q = rand(b, h, t, d, seed=6).float().transpose(1, 2)
    k = rand(b, t, hkv, 2 * d, seed=7).float()[..., ::2]
    _check_qk(q, k, cos, sin, seed=8)
    # Gradients of strided inputs land in the right places of the fused buffer.
    qkv.requires_grad_()
    q = qkv[..., : h * d].view(b, t, h, d)
    k = qkv[..., h * d : (h + hkv) * d].view(b, t, hkv, d)
    qo, ko = rope_qk_norm_op(q, k, cos, sin, impl="triton")
    (qo.sum() + ko.square().sum()).backward()
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64 = qkv64[..., : h * d].view(b, t, h, d), qkv64[..., h * d : (h + hkv) * d].view(b, t, hkv, d)
    qe, ke = rope_qk_norm_ref(q64, k64, cos.double(), sin.double())
    (qe.sum() + ke.square().sum()).backward()
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, **tol("rope_grad", torch.float32))
    assert qkv.grad[..., (h + hkv) * d :].abs().max() == 0


def test_rope_qk_norm_kernel_bf16_with_fp32_tables():
    # The model's case: bf16 q/k, fp32 cos/sin buffers. The kernel rotates and normalizes in fp32 and rounds
    # once; the reference rounds the rotation to bf16 first: agreement to bf16 rounding.
    b, t, h, hkv, d = 2, 7, 4, 2, 128
    cos, sin = _table_slice(t, d, 11)
    q, k = rand(b, t, h, d, seed=1).bfloat16(), rand(b, t, hkv, d, seed=2).bfloat16()
    qo, ko = rope_qk_norm_op(q, k, cos, sin, impl="triton")
    qe, ke = rope_qk_norm_ref(q, k, cos, sin)
    assert qo.dtype == ko.dtype == torch.bfloat16
    torch.testing.assert_close(qo.float(), qe.float(), **tol("rope", torch.bfloat16))
    torch.testing.assert_close(ko.float(), ke.float(), **tol("rope", torch.bfloat16))


def test_rope_kernel_dtypes_and_limits():
    cos, sin = _cos_sin(5, 8)
    q, k = rand(1, 5, 2, 8, seed=1), rand(1, 5, 1, 8, seed=2)
    # float64 has no kernel: "auto" runs the reference, an explicit "triton" refuses.
    torch.testing.assert_close(apply_rope_op(q, cos, sin), apply_rope_ref(q, cos, sin), **EXACT)
    with pytest.raises(TypeError, match="Triton kernel takes"):
        apply_rope_op(q, cos, sin, impl="triton")
    with pytest.raises(TypeError, match="Triton kernel takes"):
        rope_qk_norm_op(q, k, cos, sin, impl="triton")
    big = torch.zeros(1, 1, 64, 512)
    cb = torch.zeros(1, 1, 1, 256)
    with pytest.raises(ValueError, match="at most 16384"):
        rope_qk_norm_op(big, big, cb, cb, impl="triton")


def test_rope_qk_norm_kernel_inplace_guard():
    # The backward reads the saved outputs: writing into one afterwards must be caught by autograd.
    cos, sin = _table_slice(3, 8, 0)
    q = rand(1, 3, 2, 8, seed=1).float().requires_grad_()
    k = rand(1, 3, 1, 8, seed=2).float().requires_grad_()
    qo, ko = rope_qk_norm_op(q, k, cos, sin, impl="triton")
    ko.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (qo.sum() + ko.sum()).backward()
