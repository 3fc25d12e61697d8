"""polar_express / polar_express_ref against the Polar-Express loop written out in float64.

Under the test settings (TRITON_INTERPRET=1) impl="auto" runs the Triton path for fp32/fp16/bf16 inputs, so the
tests below that do not name an impl check the kernels too; fp64 inputs always take the reference."""

import pytest
import torch
from tritonchat.kernels.polar_express import POLAR_EXPRESS_COEFFS, polar_express, polar_express_ref

from tests.helpers import rand, rel_err
from tests.tolerances import normwise, tol

# The five (a, b, c) triples, typed in again from the specification so a slip in the module shows up here.
SPEC_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _manual(g, steps):
    """One matrix at a time; always iterate on the wide orientation (X X^T is the small Gram matrix)."""
    out = []
    for x in g.reshape(-1, *g.shape[-2:]):
        tall = x.size(0) > x.size(1)
        x = x.T if tall else x
        x = x / (1.01 * torch.sqrt((x * x).sum()) + 1e-6)
        for a, b, c in SPEC_COEFFS[:steps]:
            gram = x @ x.T
            x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
        out.append(x.T if tall else x)
    return torch.stack(out).reshape(g.shape)


def test_coefficients_match_spec():
    assert POLAR_EXPRESS_COEFFS == tuple(SPEC_COEFFS)


# Outputs are at most about 1.2. bf16 rounds every product of five iterations: errors of up to ~0.07 are seen here,
# which is why the optimizer's bf16 path is judged by its spectrum below.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", [(12, 12), (3, 16, 40), (2, 40, 16), (1, 7, 33), (4, 33, 33), (64, 128)])
@pytest.mark.parametrize("steps", [0, 1, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_polar_express_matches_math(shape, steps, dtype):
    g = (rand(*shape, seed=sum(shape)) * 0.02).to(dtype)
    y = polar_express(g, steps=steps)
    assert y.shape == g.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), _manual(g.double(), steps), **tol("polar_express", dtype))


def test_polar_express_gradcheck():
    for shape in ((3, 5), (2, 5, 3)):
        g = rand(*shape, seed=1).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: polar_express_ref(t, 3), (g,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_tall_equivalence(dtype):
    g = rand(3, 48, 80, seed=2).to(dtype)
    wide = polar_express(g)
    tall = polar_express(g.mT.contiguous())
    torch.testing.assert_close(tall, wide.mT, **tol("polar_express", dtype))


def test_stack_equals_per_matrix():
    g = rand(5, 24, 40, seed=3).float()
    stacked = polar_express(g)
    for i in range(5):
        torch.testing.assert_close(stacked[i], polar_express(g[i]), **tol("same_math", torch.float32))


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (4, 96, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_singular_values_near_one(shape, dtype):
    g = (rand(*shape, seed=4) * 3.0).to(dtype)
    y = polar_express(g)
    s = torch.linalg.svdvals(y.float())
    assert s.min() > 0.7 and s.max() < 1.2, (s.min().item(), s.max().item())
    # and the singular vectors are kept: the result is close to the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    exact = u @ vh
    assert (y.double() - exact).norm() / exact.norm() < 0.2


def test_polar_express_bad_inputs():
    with pytest.raises(ValueError, match="steps"):
        polar_express(rand(4, 6), steps=6)
    with pytest.raises(ValueError, match="steps"):
        polar_express(rand(4, 6), steps=-1)
    with pytest.raises(ValueError, match="2 or 3 dims"):
        polar_express(rand(2, 2, 4, 6))
    with pytest.raises(ValueError, match="2 or 3 dims"):
        polar_express(rand(6))
    with pytest.raises(TypeError, match="floating"):
        polar_express(torch.ones(4, 6, dtype=torch.int64))


# The Triton path (gram + sym_update + baddbmm) against the reference run in float64. (K, m, n): K from 1..8,
# odd m and n, wide (m <= n) and tall (m > n, run on the transposed view), one tile and several (m or n > 32).
# test_polar_express_matches_math above runs the same path (impl="auto") on six more shapes.
TRITON_SHAPES = [(8, 5, 17), (2, 70, 9), (5, 33, 47), (6, 11, 3)]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(shape):
    g = rand(*shape, seed=sum(shape)).float()
    y = polar_express(g, impl="triton")
    assert y.shape == g.shape and y.dtype == torch.float32 and y.is_contiguous()
    # fp32 through five iterations whose coefficients reach 22: relative errors ~3e-6 are seen (the bound: 1e-4).
    assert rel_err(y, polar_express_ref(g.double())) < normwise("polar_express", torch.float32)


@pytest.mark.parametrize("shape", [(3, 45, 17), (2, 17, 45)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(shape, dtype):
    """16-bit storage between the products, fp32 accumulation inside them. The first iteration (b = -22, c = 16)
    amplifies rounding: in bf16 (eps 7.8e-3) both this path and the eager reference land near 5% relative error
    (fp16: ~0.3%), so the check is a bound plus "not clearly worse than the eager reference in that dtype"."""
    g = rand(*shape, seed=9).to(dtype)
    y = polar_express(g, impl="triton")
    assert y.dtype == dtype
    exact = polar_express_ref(g.double())
    assert rel_err(y, exact) < normwise("polar_express", dtype)
    assert rel_err(y, exact) < 1.5 * rel_err(polar_express_ref(g), exact)  # hand-set: at most 1.5x the eager error


def test_triton_steps_strides_and_2d():
    g = rand(3, 30, 19, seed=10).float()
    for steps in (0, 2):
        got, want = polar_express(g, steps, impl="triton"), polar_express_ref(g.double(), steps)
        assert rel_err(got, want) < normwise("polar_express_few_steps", torch.float32)
    view = g.mT  # non-contiguous (3, 19, 30): copied, then run wide
    bound = normwise("polar_express", torch.float32)
    assert rel_err(polar_express(view, impl="triton"), polar_express_ref(view.double())) < bound
    assert rel_err(polar_express(g[0], impl="triton"), polar_express_ref(g[0].double())) < bound


def test_triton_dispatch_rules():
    g = rand(2, 9, 13, seed=11).float()
    with pytest.raises(TypeError, match="takes g in"):
        polar_express(g.double(), impl="triton")
    with pytest.raises(TypeError, match="backward"):
        polar_express(g.clone().requires_grad_(), impl="triton")
    gg = g.clone().requires_grad_()  # auto with a gradient needed: the differentiable reference
    polar_express(gg, 2).sum().backward()
    assert gg.grad is not None and torch.isfinite(gg.grad).all()
