"""rms_norm / rms_norm_ref against x * rsqrt(mean(x^2) + eps) restated in float64."""

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm, rms_norm_ref


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _manual(x64, eps):
    return x64 * torch.rsqrt(x64.square().mean(dim=-1, keepdim=True) + eps)


# (dtype, rtol/atol on the output, rtol/atol on the gradient)
DTYPES = [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)]


@pytest.mark.parametrize("shape", [(1, 384), (7, 781), (33, 128), (2, 3, 65), (5,)])
@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_rms_norm_matches_math(shape, dtype, tol, gtol):
    x64 = _rand(*shape, seed=sum(shape)) * 3.0 + 0.5
    x = x64.to(dtype).requires_grad_()
    y = rms_norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref64 = x.detach().double().requires_grad_()
    expect = _manual(ref64, torch.finfo(dtype).eps)
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol)
    dy64 = _rand(*shape, seed=99)
    (y.double() * dy64).sum().backward()
    (expect * dy64).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref64.grad, rtol=gtol, atol=gtol)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rms_norm_explicit_eps(eps):
    x = _rand(7, 33, seed=3) * 0.1
    torch.testing.assert_close(rms_norm_ref(x, eps), _manual(x, eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms_norm(x, eps=eps), F.rms_norm(x, (33,), eps=eps), rtol=0, atol=0)


def test_rms_norm_gradcheck():
    x = _rand(3, 17, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rms_norm_ref(t, 1e-5), (x,))


def test_rms_norm_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        rms_norm(torch.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        rms_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dims"):
        rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(_rand(2, 3), eps=-1.0)
