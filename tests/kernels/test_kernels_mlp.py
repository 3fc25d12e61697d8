"""relu2_mlp / relu2_mlp_ref against explicit matmuls in float64."""

import pytest
import torch

from kernels import relu2_mlp, relu2_mlp_ref


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _manual(x, w_fc, w_proj):
    h = x @ w_fc.T
    h = torch.where(h > 0, h, torch.zeros_like(h))
    return (h * h) @ w_proj.T


# (x dtype, output tolerance, gradient tolerance); weights stay fp32 masters (or fp64) and are cast to x's dtype.
CASES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-4), (torch.bfloat16, 5e-2, 5e-2)]


@pytest.mark.parametrize("lead,c,hd", [((1,), 384, 1536), ((7,), 96, 384), ((2, 33), 78, 50)])
@pytest.mark.parametrize("dtype,tol,gtol", CASES)
def test_relu2_mlp_matches_math(lead, c, hd, dtype, tol, gtol):
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x64 = _rand(*lead, c, seed=c)
    w_fc = (_rand(hd, c, seed=1) / c**0.5).to(wdtype).requires_grad_()
    w_proj = (_rand(c, hd, seed=2) / hd**0.5).to(wdtype).requires_grad_()
    x = x64.to(dtype).requires_grad_()
    y = relu2_mlp(x, w_fc, w_proj)
    assert y.dtype == dtype and y.shape == (*lead, c)
    # The oracle sees the same rounded inputs, in float64.
    xs, fs, ps = (t.detach().double().requires_grad_() for t in (x, w_fc, w_proj))
    if dtype == torch.bfloat16:
        fs_in, ps_in = fs.to(torch.bfloat16).double(), ps.to(torch.bfloat16).double()
    else:
        fs_in, ps_in = fs, ps
    expect = _manual(xs, fs_in, ps_in)
    scale = expect.abs().max().item()
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol * scale)
    dy = _rand(*lead, c, seed=7)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    assert w_fc.grad.dtype == wdtype and w_proj.grad.dtype == wdtype
    for got, want in ((x.grad, xs.grad), (w_fc.grad, fs.grad), (w_proj.grad, ps.grad)):
        gscale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=gtol, atol=gtol * gscale)


def test_relu2_mlp_gradcheck():
    x, w_fc, w_proj = _rand(3, 5, seed=1), _rand(11, 5, seed=2), _rand(4, 11, seed=3)
    args = tuple(t.requires_grad_() for t in (x, w_fc, w_proj))
    assert torch.autograd.gradcheck(relu2_mlp_ref, args)


def test_relu2_mlp_bad_inputs():
    x, w_fc, w_proj = _rand(2, 8), _rand(32, 8), _rand(8, 32)
    with pytest.raises(ValueError, match="w_fc must have shape"):
        relu2_mlp(x, _rand(32, 7), w_proj)
    with pytest.raises(ValueError, match="w_proj must have shape"):
        relu2_mlp(x, w_fc, _rand(8, 31))
    with pytest.raises(ValueError, match="w_fc must have 2 dims"):
        relu2_mlp(x, _rand(1, 32, 8), w_proj)
    with pytest.raises(TypeError, match="floating"):
        relu2_mlp(x.long(), w_fc, w_proj)
    with pytest.raises(ValueError, match="same device"):
        relu2_mlp(x, w_fc.to("meta"), w_proj)
