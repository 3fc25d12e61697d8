"""rms_norm / rms_norm_ref against x * rsqrt(mean(x^2) + eps) restated in float64."""

import pytest
import torch
import torch.nn.functional as F
from tritonchat.kernels import rms_norm, rms_norm_ref

from tests.helpers import F32_EPS, rand
from tests.tolerances import EXACT, tol


def _manual(x64, eps):
    return x64 * torch.rsqrt(x64.square().mean(dim=-1, keepdim=True) + eps)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", [(1, 384), (7, 781), (33, 128), (2, 3, 65), (5,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_math(shape, dtype):
    x64 = rand(*shape, seed=sum(shape)) * 3.0 + 0.5
    x = x64.to(dtype).requires_grad_()
    y = rms_norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref64 = x.detach().double().requires_grad_()
    expect = _manual(ref64, torch.finfo(dtype).eps)
    torch.testing.assert_close(y.double(), expect, **tol("norm", dtype))
    dy64 = rand(*shape, seed=99)
    (y.double() * dy64).sum().backward()
    (expect * dy64).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref64.grad, **tol("norm_grad", dtype))


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rms_norm_explicit_eps(eps):
    x = rand(7, 33, seed=3) * 0.1
    torch.testing.assert_close(rms_norm_ref(x, eps), _manual(x, eps), **tol("norm", torch.float64))
    # float64 has no kernel: rms_norm runs the reference, which is F.rms_norm
    torch.testing.assert_close(rms_norm(x, eps=eps), F.rms_norm(x, (33,), eps=eps), **EXACT)


def test_rms_norm_gradcheck():
    x = rand(3, 17, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rms_norm_ref(t, 1e-5), (x,))


def test_rms_norm_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        rms_norm(torch.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        rms_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dims"):
        rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(rand(2, 3), eps=-1.0)


# ---- the Triton kernel (interpreter on CPU, compiled on CUDA), float32 against the float64 formula ----------------

from tritonchat.kernels.rms_norm import rms_norm as rms_norm_kernel_op  # noqa: E402  (same function, imported from its module)

KERNEL_SHAPES = [(1, 384), (7, 781), (33, 1536), (65, 2048), (1823, 64), (2, 3, 1000)]


def _check_kernel(x, seed, eps=None):
    """Run the kernel on x (any layout), compare output and input gradient with the float64 formula."""
    x = x.detach().requires_grad_()
    y = rms_norm_kernel_op(x, eps=eps, impl="triton")
    assert type(y.grad_fn).__name__ == "_RMSNormBackward"  # the kernel ran, not the reference
    assert y.shape == x.shape and y.dtype == x.dtype
    x64 = x.detach().double().requires_grad_()
    expect = _manual(x64, F32_EPS if eps is None else eps)
    torch.testing.assert_close(y.double(), expect, **tol("norm", torch.float32))
    dy = rand(*x.shape, seed=seed + 1)
    y.backward(dy.to(x.dtype))
    (expect * dy).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol("norm_grad", torch.float32))


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_rms_norm_kernel_fp32(shape):
    # float32 math in the kernel: tol("norm") on y (|y| ~ 1), tol("norm_grad") on dx.
    _check_kernel(rand(*shape, seed=len(shape) + shape[-1], dtype=torch.float32) * 2.0 + 0.3, seed=shape[0])


def test_rms_norm_kernel_non_contiguous():
    base = rand(40, 2 * 781, seed=11, dtype=torch.float32)
    _check_kernel(base[::3, :781], seed=1)  # row stride 2*781*3: read in place
    _check_kernel(base[:, ::2], seed=2)  # stride 2 along C: copied once
    _check_kernel(rand(2, 96, 9, seed=12, dtype=torch.float32).transpose(1, 2), seed=3)  # (2, 9, 96) view


def test_rms_norm_kernel_eps():
    # Rows of size ~1e-4: mean(x^2) ~ 1e-8 is below the default eps (float32's, 1.2e-7), so eps shapes the result.
    _check_kernel(rand(9, 300, seed=4, dtype=torch.float32) * 1e-4, seed=5)
    _check_kernel(rand(9, 300, seed=6, dtype=torch.float32), seed=7, eps=0.5)
    # bfloat16 input: F.rms_norm's default eps is float32's too (not bfloat16's 7.8e-3, which would halve y here).
    x = (rand(9, 300, seed=8) * 3e-4).to(torch.bfloat16)
    torch.testing.assert_close(rms_norm_kernel_op(x, impl="triton").float(), rms_norm_ref(x).float(),
                               **tol("norm_vs_ref", torch.bfloat16))


def test_rms_norm_kernel_dtypes():
    x = rand(5, 130, seed=9)
    # float64 has no kernel: "auto" runs the reference, an explicit "triton" refuses.
    torch.testing.assert_close(rms_norm_kernel_op(x), rms_norm_ref(x), **EXACT)
    with pytest.raises(TypeError, match="Triton kernel takes"):
        rms_norm_kernel_op(x, impl="triton")
    with pytest.raises(ValueError, match="at most 16384"):
        rms_norm_kernel_op(rand(1, 16385, dtype=torch.float32), impl="triton")
    y = rms_norm_kernel_op(x.to(torch.float16), impl="triton")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), rms_norm_ref(x.float()), **tol("norm", torch.float16))


def test_rms_norm_kernel_empty_and_inplace_guard():
    e = torch.empty(0, 64, requires_grad=True)
    y = rms_norm_kernel_op(e, impl="triton")
    y.sum().backward()
    assert y.shape == (0, 64) and e.grad.shape == (0, 64)
    # The backward reads the saved output: writing into it afterwards must be caught by autograd, not ignored.
    x = rand(3, 50, seed=10, dtype=torch.float32).requires_grad_()
    y = rms_norm_kernel_op(x, impl="triton")
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
