"""Polar Express: the Muon orthogonalization, a fixed sequence of odd matrix polynomials.

Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X, pushing every singular value towards 1 while
keeping the singular vectors. For a wide X (m <= n), A = X X^T is m x m; for a tall X we use X^T X
(n x n) and multiply from the right, so the Gram matrix is always the small side.
FLOPs per step (wide, K x m x n): 2Kmmn (A) + 2Kmmm (A@A) + 2Kmmn (B@X); A and B are symmetric.

The Triton path (kernels/gram.py) computes A and B = b A + c A A from upper-triangle tiles only, which halves
the first two terms: K m^2 n + K m^3 + 2 K m^2 n per step. A tall stack runs the same kernels on the transposed
view X^T (strides only, no copy). The last product X' = a X + B X is a general GEMM with nothing symmetric to
exploit; it goes to cuBLAS through torch.baddbmm, whose beta * C epilogue already fuses the a X term (X is read
once as C, no extra pass), at the library's own GEMM rate, which a hand-written Triton GEMM could at best match.
The first normalization X / (1.01 ||X||_F + 1e-6) is two Triton launches: per-chunk sums of squares, then a
scale pass that adds up its matrix's partial sums itself (no atomics, so results are deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_tensor, use_kernel
from tritonchat.kernels.gram import no_kernel_reason, syrk

__all__ = ["POLAR_EXPRESS_COEFFS", "polar_express", "polar_express_ref"]


# (a, b, c) for each iteration, in order.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


_CHUNK = 16384  # elements summed by one program of the normalization (a matrix of m n elements has


@triton.jit
def _sumsq_partial_kernel(
    x_ptr,  # (K, numel) contiguous input
    part_ptr,  # (K, n_parts) fp32 output: sum of squares of each chunk
    numel,  # elements per matrix
    n_parts,  # chunks per matrix
    CHUNK: tl.constexpr,  # elements per program
    BLOCK: tl.constexpr,  # elements per loop iteration
):
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = x_ptr + bk * numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = pid.to(tl.int64) * CHUNK + i + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(base + offs, mask=offs < numel, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(part_ptr + bk * n_parts + pid, tl.sum(acc, axis=0))


@triton.jit
def _frob_scale_kernel(
    x_ptr,  # (K, numel) contiguous input
    part_ptr,  # (K, n_parts) fp32 partial sums of squares from _sumsq_partial_kernel
    y_ptr,  # (K, numel) contiguous output, x's dtype: x / (1.01 ||x||_F + 1e-6)
    numel,  # elements per matrix
    n_parts,  # chunks per matrix
    CHUNK: tl.constexpr,  # elements per program
    BLOCK: tl.constexpr,  # elements per loop iteration
    BLOCK_P: tl.constexpr,  # power of two >= n_parts
):
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    total = tl.sum(tl.load(part_ptr + bk * n_parts + p, mask=p < n_parts, other=0.0), axis=0)
    denom = tl.sqrt(total) * 1.01 + 1e-6
    for i in range(0, CHUNK, BLOCK):
        offs = pid.to(tl.int64) * CHUNK + i + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        x = tl.load(x_ptr + bk * numel + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + bk * numel + offs, (x / denom).to(y_ptr.dtype.element_ty), mask=mask)


def _frob_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (1.01 ||x||_F + 1e-6) per matrix of a contiguous (K, m, n) stack, into a new tensor of x's dtype.
    Reads K m n twice (once per launch), writes K m n."""
    K, numel = x.size(0), x.size(1) * x.size(2)
    y = torch.empty_like(x)
    if numel == 0 or K == 0:
        return y
    chunk = min(_CHUNK, max(1024, triton.next_power_of_2(numel)))
    block = min(1024, chunk) if x.is_cuda else chunk  # the CPU interpreter pays per operation, not per element
    n_parts = triton.cdiv(numel, chunk)
    part = torch.empty((K, n_parts), dtype=torch.float32, device=x.device)
    _sumsq_partial_kernel[(n_parts, K)](x, part, numel, n_parts, CHUNK=chunk, BLOCK=block, num_warps=4)
    _frob_scale_kernel[(n_parts, K)](x, part, y, numel, n_parts, CHUNK=chunk, BLOCK=block,
                                     BLOCK_P=triton.next_power_of_2(n_parts), num_warps=4)
    return y


def _polar_express_triton(g: torch.Tensor, steps: int) -> torch.Tensor:
    """g (K, m, n) contiguous. Iterates on the wide orientation: for a tall g the Gram operand is the view
    g^T and the update multiplies from the right, X' = a X + X B, which is the transposed wide step."""
    tall = g.size(1) > g.size(2)
    x = _frob_normalize(g)
    side = min(g.size(1), g.size(2))
    A = torch.empty((g.size(0), side, side), dtype=g.dtype, device=g.device)
    B = torch.empty_like(A)
    nxt = torch.empty_like(x)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        syrk(x.mT if tall else x, out=A)  # A = X X^T (wide) or X^T X (tall), exactly symmetric
        syrk(A, c, A, b, out=B)  # B = b A + c A A
        if tall:
            torch.baddbmm(x, x, B, beta=a, out=nxt)  # X' = a X + X B
        else:
            torch.baddbmm(x, B, x, beta=a, out=nxt)  # X' = a X + B X
        x, nxt = nxt, x
    return x


def polar_express(g: torch.Tensor, steps: int = 5, *, impl: str = "auto") -> torch.Tensor:
    """Approximate the orthogonal polar factor of each matrix in a stack (Muon's update direction).

    g: (m, n) or (K, m, n), floating; the computation runs in g's dtype (bf16 on GPU in the optimizer), with
    fp32 accumulation in the kernels. Each matrix is first scaled to Frobenius norm just under 1, then ``steps``
    (0..5) iterations run with ``POLAR_EXPRESS_COEFFS``. Returns a new contiguous tensor of g's shape and dtype
    whose singular values lie near 1. The Triton path (fp32/fp16/bf16; a non-contiguous g is copied first) has no
    autograd: under impl='auto' a g that needs a gradient, or an fp64 g, takes the reference.
    """
    check_tensor("g", g, ndim=(2, 3))
    if type(steps) is not int or not 0 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be an int in [0, {len(POLAR_EXPRESS_COEFFS)}], got {steps!r}")
    if not use_kernel(impl, g, unsupported=no_kernel_reason("g", g)):
        return polar_express_ref(g, steps)
    g3 = (g if g.ndim == 3 else g.unsqueeze(0)).contiguous()
    out = _polar_express_triton(g3, steps)
    return out if g.ndim == 3 else out[0]


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
