"""mix_rms_norm (h = a*x + b*x0, then RMSNorm of h) and mix_rms_norm_ref against the formula in float64."""

import pytest
import torch
from tritonchat.kernels.rms_norm import mix_rms_norm, mix_rms_norm_ref

from tests.helpers import F32_EPS, rand
from tests.tolerances import tol

F32 = torch.float32


def _math(x, x0, a, b, eps):
    h = a * x + b * x0
    return h, h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)


def _scalars(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = (1.0 + 0.2 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.1 + 0.2 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def _check(x, x0, a, b, seed, *, use_h=True, use_y=True, impl="triton"):
    """Run mix_rms_norm on (x, x0, a, b) and compare h, y and every gradient with the float64 formula.

    Tolerances (float32 inputs): tol("norm") on h and y, tol("norm_grad") on dx and dx0; da and db are sums over
    all N*C elements, so they are judged relative to the sum of |dh * x| (the size of the terms they add up)."""
    leaves = [t.detach().requires_grad_() for t in (x, x0, a, b)]
    h, y = mix_rms_norm(*leaves, impl=impl)
    assert type(y.grad_fn).__name__ == "_MixRMSNormBackward"  # the kernel ran, not the reference
    assert h.shape == y.shape == x.shape and h.dtype == y.dtype == x.dtype
    ref = [t.detach().double().requires_grad_() for t in (x, x0, a, b)]
    he, ye = _math(*ref, F32_EPS)
    torch.testing.assert_close(h.double(), he, **tol("norm", F32))
    torch.testing.assert_close(y.double(), ye, **tol("norm", F32))
    dh, dy = rand(*x.shape, seed=seed + 1), rand(*x.shape, seed=seed + 2)
    loss = (h.double() * dh).sum() * use_h + (y.double() * dy).sum() * use_y
    loss_e = (he * dh).sum() * use_h + (ye * dy).sum() * use_y
    loss.backward()
    loss_e.backward()
    for got, want in zip(leaves[:2], ref[:2]):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol("norm_grad", F32))
    g = (ref[0].grad / ref[2].detach()).abs()  # |dL/dh|
    for got, want, src in zip(leaves[2:], ref[2:], ref[:2]):
        assert got.grad.shape == got.shape and got.grad.dtype == got.dtype
        scale = (g * src.detach().abs()).sum().item()
        torch.testing.assert_close(got.grad.double(), want.grad, **tol("norm_scalar_grad", F32, scale=scale))


# (x shape, shape of a and b): rows 1..1823, C from 48 to 2048 including non-powers of two
CASES = [((1, 2048), ()), ((19, 781), (1,)), ((40, 1536), ()), ((1823, 48), (1,)), ((2, 5, 384), ())]


@pytest.mark.parametrize("shape,sshape", CASES)
def test_mix_rms_norm_kernel_fp32(shape, sshape):
    seed = shape[0] + shape[-1]
    x = rand(*shape, seed=seed, dtype=F32) * 1.5
    x0 = rand(*shape, seed=seed + 7, dtype=F32) + 0.2
    _check(x, x0, *_scalars(sshape, seed), seed=seed)


@pytest.mark.parametrize("use_h,use_y", [(True, False), (False, True)])
def test_mix_rms_norm_kernel_one_output_used(use_h, use_y):
    # Only one of (h, y) feeds the loss: the other's gradient arrives as zeros (or not at all).
    x, x0 = rand(6, 100, seed=1, dtype=F32), rand(6, 100, seed=2, dtype=F32)
    _check(x, x0, *_scalars((), 3), seed=4, use_h=use_h, use_y=use_y)


def test_mix_rms_norm_kernel_non_contiguous():
    base = rand(30, 2 * 333, seed=5, dtype=F32)
    x = base[::2, :333]  # row-strided view: read in place
    x0 = rand(333, 15, seed=6, dtype=F32).t()  # (15, 333) with stride 15 along C: copied once
    _check(x, x0, *_scalars((1,), 7), seed=8)


def test_mix_rms_norm_kernel_chain_like_the_model():
    """Three layers x_{i+1} = h_i + f_i(normed_i), each h the next residual, as a block uses them."""
    depth, n, c = 3, 12, 96
    x0 = rand(n, c, seed=20, dtype=F32).requires_grad_()
    lams = [_scalars((), 21 + i) for i in range(depth)]
    ws = [(rand(c, c, seed=30 + i, dtype=F32) / c**0.5) for i in range(depth)]

    def run(op, dtype):
        x0_ = x0.detach().to(dtype).requires_grad_()
        ab = [(a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()) for a, b in lams]
        x = x0_
        for (a, b), w in zip(ab, ws):
            h, y = op(x, x0_, a, b)
            x = h + torch.tanh(y @ w.to(dtype))
        (x * rand(n, c, seed=40, dtype=dtype)).sum().backward()
        return [x, x0_.grad] + [t.grad for pair in ab for t in pair]

    got = run(lambda *t: mix_rms_norm(*t, impl="triton"), torch.float32)
    want = run(lambda *t: _math(*t, F32_EPS), torch.float64)
    for g, w in zip(got, want):  # outputs three layers deep are held to the gradient bound too
        torch.testing.assert_close(g.double(), w, **tol("norm_grad", F32))


def test_mix_rms_norm_kernel_bf16_with_fp32_scalars():
    # The model's case: bf16 activations, fp32 per-layer scalars. The kernel rounds h once (the reference
    # rounds a*x, b*x0 and the sum), so the two agree to bf16 rounding: tol("norm", bf16).
    x, x0 = rand(16, 768, seed=9, dtype=torch.bfloat16), rand(16, 768, seed=10, dtype=torch.bfloat16)
    a, b = _scalars((), 11)
    leaves = [t.detach().requires_grad_() for t in (x, x0, a, b)]
    h, y = mix_rms_norm(*leaves, impl="triton")
    ref = [t.detach().requires_grad_() for t in (x, x0, a, b)]
    he, ye = mix_rms_norm_ref(*ref)
    torch.testing.assert_close(h.float(), he.float(), **tol("norm", torch.bfloat16))
    torch.testing.assert_close(y.float(), ye.float(), **tol("norm", torch.bfloat16))
    dy = rand(16, 768, seed=12, dtype=torch.bfloat16)
    (h.float().sum() + (y * dy).float().sum()).backward()
    (he.float().sum() + (ye * dy).float().sum()).backward()
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), want.grad.float(),
                                   **tol("norm_grad", torch.bfloat16, scale=want.grad.abs().max()))


def test_mix_rms_norm_scalars_without_grad_and_determinism():
    x = rand(33, 200, seed=13, dtype=F32).requires_grad_()
    x0 = rand(33, 200, seed=14, dtype=F32)
    a, b = torch.tensor(0.9), torch.tensor([0.15])  # plain constants: only x gets a gradient
    h, y = mix_rms_norm(x, x0, a, b, impl="triton")
    he, ye = mix_rms_norm_ref(x, x0, a, b)
    torch.testing.assert_close(y, ye, **tol("norm", F32))
    (gx,) = torch.autograd.grad((h + y).square().sum(), x)
    (gxe,) = torch.autograd.grad((he + ye).square().sum(), x)
    torch.testing.assert_close(gx, gxe, **tol("norm_grad", F32))
    # da and db come from per-row partials summed in a fixed order: bitwise equal run to run.
    grads = []
    for _ in range(2):
        a2, b2 = _scalars((), 15)
        h, y = mix_rms_norm(x.detach(), x0, a2, b2, impl="triton")
        grads.append(torch.autograd.grad((h * x0).sum() + y.sum(), (a2, b2)))
    assert all(torch.equal(p, q) for p, q in zip(*grads))


def test_mix_rms_norm_ref_and_dispatch():
    x, x0 = rand(4, 10, seed=16), rand(4, 10, seed=17)
    a, b = torch.tensor(1.1, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    he, ye = _math(x, x0, a, b, torch.finfo(torch.float64).eps)
    for impl in ("auto", "torch"):  # float64 has no kernel: "auto" runs the reference
        h, y = mix_rms_norm(x, x0, a, b, impl=impl)
        torch.testing.assert_close(h, he, **tol("float64_few_flops", torch.float64))
        torch.testing.assert_close(y, ye, **tol("norm", torch.float64))
    h, y = mix_rms_norm_ref(x, x0, a, b, eps=0.5)
    torch.testing.assert_close(y, _math(x, x0, a, b, 0.5)[1], **tol("norm", torch.float64))
    x32, x032 = x.float(), x0.float()
    h, y = mix_rms_norm(x32, x032, a.float(), b.float(), eps=0.5, impl="triton")
    torch.testing.assert_close(y.double(), _math(x, x0, a, b, 0.5)[1], **tol("norm", F32))


def test_mix_rms_norm_bad_inputs():
    x, x0 = rand(3, 8, seed=1, dtype=F32), rand(3, 8, seed=2, dtype=F32)
    a, b = torch.tensor(1.0), torch.tensor(0.5)
    with pytest.raises(ValueError, match="same shape"):
        mix_rms_norm(x, x0[:2], a, b)
    with pytest.raises(TypeError, match="same dtype"):
        mix_rms_norm(x, x0.double(), a, b)
    with pytest.raises(ValueError, match="0-dim or 1-element"):
        mix_rms_norm(x, x0, torch.ones(2), b)
    with pytest.raises(ValueError, match="0-dim or 1-element"):
        mix_rms_norm(x, x0, a, torch.ones(1, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mix_rms_norm(x, x0, 1.0, b)
    with pytest.raises(TypeError, match="floating"):
        mix_rms_norm(x, x0, a, torch.tensor(1))
    with pytest.raises(ValueError, match="CPU or CUDA tensor"):
        mix_rms_norm(x, x0, a, torch.tensor(0.5, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        mix_rms_norm(x, x0, a, b, eps=-1.0)
    with pytest.raises(ValueError, match="non-empty last dim"):
        mix_rms_norm(x[:, :0], x0[:, :0], a, b)
    with pytest.raises(TypeError, match="Triton kernel takes"):
        mix_rms_norm(x.double(), x0.double(), a, b, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        mix_rms_norm(x, x0, a, b, impl="cuda")
