"""gram / sym_update (upper-triangle tiles, mirrored) against X X^T and b A + c A A computed in float64."""

import pytest
import torch
from tritonchat.kernels.gram import gram, gram_ref, sym_update, sym_update_ref, syrk
from tritonchat.kernels.polar_express import POLAR_EXPRESS_COEFFS

from tests.helpers import rand32, rel_err
from tests.tolerances import normwise, tol

GRAM_F32 = normwise("gram", torch.float32)  # relative Frobenius error of the fp32 kernels

# (K, m, n): K from 1..8, odd m and n, one tile (m <= 32) and several (m > 32 uses 64-wide tiles).
SHAPES = [(1, 7, 33), (3, 45, 17), (8, 17, 5), (2, 70, 9), (5, 33, 64), (1, 129, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_matches_float64(shape):
    x = rand32(*shape, seed=sum(shape))
    out = gram(x, impl="triton")
    assert out.shape == (shape[0], shape[1], shape[1]) and out.dtype == torch.float32
    # fp32 products, fp32 accumulation over n <= 64 terms: relative error ~1e-7; GRAM_F32 leaves room.
    assert rel_err(out, gram_ref(x.double())) < GRAM_F32
    assert torch.equal(out, out.mT), "mirrored triangle must be bit-identical"


@pytest.mark.parametrize("block_m", [16, 32])
def test_gram_many_tiles_mirror_bit_identical(block_m):
    """Small tiles force many off-diagonal tiles (T = 5 or 3), ragged at the edge (m = 71)."""
    x = rand32(2, 71, 23, seed=block_m)
    out = syrk(x, block_m=block_m)
    assert torch.equal(out, out.mT)
    assert rel_err(out, x.double() @ x.double().mT) < GRAM_F32
    a = syrk(out, 0.25, out, -1.5, block_m=block_m)
    assert torch.equal(a, a.mT)
    assert rel_err(a, sym_update_ref(out.double(), -1.5, 0.25)) < GRAM_F32


def test_gram_every_element_written():
    """The output is allocated with torch.empty; pre-poison a preallocated one and check nothing is left."""
    x = rand32(3, 50, 11, seed=4)
    out = torch.full((3, 50, 50), float("nan"))
    syrk(x, out=out, block_m=16)
    assert torch.isfinite(out).all()


def test_gram_strided_and_2d():
    base = rand32(3, 40, 26, seed=5)
    xt = base.mT  # (3, 26, 40) view with unit stride along rows: the tall form of Polar Express
    out = gram(xt, impl="triton")
    assert rel_err(out, gram_ref(xt.double())) < GRAM_F32 and torch.equal(out, out.mT)
    out2 = gram(base[1], impl="triton")
    assert out2.shape == (40, 40) and rel_err(out2, gram_ref(base[1].double())) < GRAM_F32


@pytest.mark.parametrize("shape", [(1, 9), (4, 37), (8, 20), (2, 65)])
@pytest.mark.parametrize("coeff", [1, 4])
def test_sym_update_matches_float64(shape, coeff):
    K, m = shape
    x = rand32(K, m, m + 3, seed=m) / (m + 3) ** 0.5
    a = gram_ref(x)  # a symmetric input as Polar Express produces it
    a = (a + a.mT) / 2  # make it exactly symmetric
    _, b, c = POLAR_EXPRESS_COEFFS[coeff]
    out = sym_update(a, b, c, impl="triton")
    assert out.shape == a.shape and out.dtype == a.dtype
    assert rel_err(out, sym_update_ref(a.double(), b, c)) < GRAM_F32
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """16-bit inputs, fp32 accumulation, output rounded to the input dtype (relative error ~ its epsilon)."""
    x = rand32(3, 45, 37, seed=6, dtype=dtype)
    out = gram(x, impl="triton")
    assert out.dtype == dtype and torch.equal(out, out.mT)
    assert rel_err(out, x.double() @ x.double().mT) < normwise("gram", dtype)
    a = (gram_ref(x.double()) / 37).to(dtype)
    a = ((a.double() + a.double().mT) / 2).to(dtype)
    s = sym_update(a, -2.8, 0.5, impl="triton")
    assert s.dtype == dtype and torch.equal(s, s.mT)
    assert rel_err(s, sym_update_ref(a.double(), -2.8, 0.5)) < normwise("gram", dtype)


def test_auto_dispatch_and_reference_paths():
    x = rand32(2, 9, 14, seed=7)
    torch.testing.assert_close(gram(x, impl="torch"), gram_ref(x))
    torch.testing.assert_close(gram(x), gram_ref(x), **tol("same_math", torch.float32))
    xd = x.double()  # fp64 has no kernel: auto takes the reference, exactly
    assert torch.equal(gram(xd), gram_ref(xd))
    xg = x.clone().requires_grad_()  # a gradient is needed: auto takes the differentiable reference
    gram(xg).sum().backward()  # d/dX_ab sum_ij (X X^T)_ij = 2 sum_j X_jb
    torch.testing.assert_close(xg.grad, 2 * x.sum(1, keepdim=True).expand(-1, 9, -1), **tol("same_math", torch.float32))


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 or 3 dims"):
        gram(rand32(5))
    with pytest.raises(TypeError, match="floating"):
        gram(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="takes x in"):
        gram(rand32(3, 4, dtype=torch.float64), impl="triton")
    with pytest.raises(TypeError, match="backward"):
        gram(rand32(3, 4).requires_grad_(), impl="triton")
    with pytest.raises(ValueError, match="square"):
        sym_update(rand32(2, 3, 4), 1.0, 1.0)
    with pytest.raises(TypeError, match="b must be a number"):
        sym_update(rand32(3, 3), torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match="impl"):
        gram(rand32(3, 4), impl="cuda")
