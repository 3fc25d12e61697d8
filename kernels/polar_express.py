"""Polar Express: the Muon orthogonalization, a fixed sequence of odd matrix polynomials.

Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X, pushing every singular value towards 1 while
keeping the singular vectors. For a wide X (m <= n), A = X X^T is m x m; for a tall X we use X^T X
(n x n) and multiply from the right, so the Gram matrix is always the small side.
FLOPs per step (wide, K x m x n): 2Kmmn (A) + 2Kmmm (A@A) + 2Kmmn (B@X); A and B are symmetric.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check_tensor, resolve_impl

_TRITON_AVAILABLE = False

# (a, b, c) for each iteration, in order.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express_ref(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Plain-PyTorch Polar Express in g's dtype. g (m, n) or (K, m, n). Returns g's shape and dtype."""
    x = g / (g.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    wide = g.size(-2) <= g.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if wide:
            gram = x @ x.mT  # (K, m, m)
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
        else:
            gram = x.mT @ x  # (K, n, n)
            poly = b * gram + c * (gram @ gram)
            x = a * x + x @ poly
    return x


def polar_express(g: torch.Tensor, steps: int = 5, *, impl: str = "auto") -> torch.Tensor:
    """Approximate the orthogonal polar factor of each matrix in a stack (Muon's update direction).

    g: (m, n) or (K, m, n), floating; the computation runs in g's dtype (bf16 on GPU in the optimizer).
    Each matrix is first scaled to Frobenius norm just under 1, then ``steps`` (0..5) iterations run with
    ``POLAR_EXPRESS_COEFFS``. Returns a tensor of g's shape and dtype whose singular values lie near 1.
    """
    check_tensor("g", g, ndim=(2, 3))
    if type(steps) is not int or not 0 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be an int in [0, {len(POLAR_EXPRESS_COEFFS)}], got {steps!r}")
    resolve_impl(impl, g, available=_TRITON_AVAILABLE)
    return polar_express_ref(g, steps)
