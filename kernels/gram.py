"""Symmetric products for Polar Express: the Gram matrix X X^T and the update B = b A + c A A.

Both outputs are symmetric, so one kernel computes only the upper-triangle tiles of an m x m result
(T (T + 1) / 2 of the T x T tiles, T = ceil(m / BLOCK_M)) and writes each computed tile twice: in place and,
through transposed addresses, into the mirrored position. The two copies are the same registers, so the result
is exactly symmetric (C == C^T bit for bit); a diagonal tile keeps its upper half and mirrors it too.

    gram:        C = X X^T              X (K, m, n)   FLOPs ~ K m^2 n (half of the full 2 K m^2 n)
    sym_update:  C = b A + c A A^T      A (K, m, m)   FLOPs ~ K m^3   (half of the full 2 K m^3)
For a symmetric A, A A = A A^T, so the symmetric update is the Gram kernel run on A with an epilogue that adds
b A; each output tile reads row blocks of A only (contiguous loads, no transposed copy).
Bytes: gram reads K m n (each row block once per tile it touches, mostly from L2) and writes K m^2.
Accumulation is fp32 whatever the input dtype (bf16 on GPU); the output has the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_number, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._launch import dot_meta

__all__ = ["gram", "gram_ref", "sym_update", "sym_update_ref"]
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _syrk_kernel(
    x_ptr,  # X, (K, m, kd) with the strides below: the operand of X X^T
    d_ptr,  # D, (K, m, m) with the strides below: the addend (read only when HAS_D)
    c_ptr,  # C, (K, m, m) contiguous output: alpha * X X^T + beta * D
    m,  # rows of X = side of C
    kd,  # reduction length (columns of X)
    stride_xk, stride_xm, stride_xn,  # strides of X (elements)
    stride_dk, stride_dm, stride_dn,  # strides of D (elements)
    alpha,  # scale of the product
    beta,  # scale of D
    HAS_D: tl.constexpr,  # add beta * D in the epilogue
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
    BLOCK_M: tl.constexpr,  # square output tile side
    BLOCK_K: tl.constexpr,  # reduction chunk
):
    # Program p of the T (T + 1) / 2 upper tiles: enumerate the lower triangle row by row, p = r (r + 1) / 2 + c
    # with c <= r, and take tile (row block c, column block r). The float root is corrected in integers.
    p = tl.program_id(0)
    r = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where(r * (r + 1) // 2 > p, r - 1, r)
    r = tl.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
    ti = p - r * (r + 1) // 2
    tj = r
    bk = tl.program_id(1).to(tl.int64)

    # int64 indices throughout (also spares the interpreter its int32 overflow checks)
    rows = (ti * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # output rows = rows of X
    cols = (tj * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # output cols = rows of X as well
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows[:, None] < m
    col_ok = cols[None, :] < m
    x_base = x_ptr + bk * stride_xk
    a_ptrs = x_base + rows[:, None] * stride_xm + ks[None, :] * stride_xn  # (BLOCK_M, BLOCK_K) = X_i
    b_ptrs = x_base + cols[None, :] * stride_xm + ks[:, None] * stride_xn  # (BLOCK_K, BLOCK_M) = X_j^T
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, kd, BLOCK_K):
        k_ok = (k0 + ks) < kd
        a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xn
        b_ptrs += BLOCK_K * stride_xn

    out = acc * alpha
    valid = row_ok & col_ok
    if HAS_D:
        d_ptrs = d_ptr + bk * stride_dk + rows[:, None] * stride_dm + cols[None, :] * stride_dn
        out += beta * tl.load(d_ptrs, mask=valid, other=0.0).to(tl.float32)
    out = out.to(c_ptr.dtype.element_ty)
    # One computed tile, two places: (rows, cols) where row <= col, and (cols, rows) where row < col. Every
    # element of C is written exactly once, and C[j, i] holds the very value stored at C[i, j].
    c_base = c_ptr + bk * m * m
    upper = rows[:, None] <= cols[None, :]
    strict = rows[:, None] < cols[None, :]
    tl.store(c_base + rows[:, None] * m + cols[None, :], out, mask=valid & upper)
    tl.store(c_base + cols[None, :] * m + rows[:, None], out, mask=valid & strict)


def _syrk_config(m: int, kd: int, dtype: torch.dtype, cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages). 128-wide tiles for the speedrun sizes (m >= 512), smaller ones
    for small m so that there are enough tiles to spread over the SMs; fp32 on a GPU halves BLOCK_K for shared
    memory (the CPU interpreter keeps 64, fewer loop trips)."""
    block_m = 128 if m >= 512 else 64 if m > 32 else max(16, triton.next_power_of_2(m))
    block_k = 32 if dtype == torch.float32 and cuda else 64
    block_k = min(block_k, max(16, triton.next_power_of_2(kd)))
    return block_m, block_k, 8 if block_m == 128 else 4, 3


def syrk(x: torch.Tensor, alpha: float = 1.0, d: torch.Tensor | None = None, beta: float = 0.0, *,
          out: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """C = alpha X X^T (+ beta D) for x (K, m, kd) with any strides; D (K, m, m) symmetric. Writes into `out`
    ((K, m, m) contiguous, x's dtype) when given, else allocates it. `block_m` overrides the tile side.
    The launcher behind gram, sym_update and polar_express: it checks nothing, its callers have."""
    K, m, kd = x.shape
    if out is None:
        out = torch.empty((K, m, m), dtype=x.dtype, device=x.device)
    if K == 0 or m == 0:
        return out
    bm, bk, warps, stages = _syrk_config(m, kd, x.dtype, x.is_cuda)
    bm = block_m or bm
    dd = d if d is not None else out
    tiles = triton.cdiv(m, bm)
    grid = (tiles * (tiles + 1) // 2, K)
    _syrk_kernel[grid](
        x, dd, out, m, kd, *x.stride(), *dd.stride(), float(alpha), float(beta),
        HAS_D=d is not None, **dot_meta(x), BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return out


def no_kernel_reason(name: str, t: torch.Tensor) -> Exception | None:
    """Why the symmetric-product kernels cannot take ``t`` (they have no backward and no fp64 path), or None."""
    if torch.is_grad_enabled() and t.requires_grad:
        return TypeError(f"the Triton kernel has no backward, and {name} requires grad; use impl='torch'")
    return dtype_error(name, t, _KERNEL_DTYPES)


def gram(x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """X X^T of each matrix of a stack, exactly symmetric.

    x: (m, n) or (K, m, n), fp32/fp16/bf16 for the kernel (any strides); accumulation in fp32.
    Returns (m, m) or (K, m, m) in x's dtype, contiguous. The kernel path has no autograd.
    """
    check_tensor("x", x, ndim=(2, 3))
    if not use_kernel(impl, x, unsupported=no_kernel_reason("x", x)):
        return gram_ref(x)
    x3 = x if x.ndim == 3 else x.unsqueeze(0)
    out = syrk(x3)
    return out if x.ndim == 3 else out[0]


def sym_update(a: torch.Tensor, b: float, c: float, *, impl: str = "auto") -> torch.Tensor:
    """b A + c A A for a stack of symmetric matrices, exactly symmetric.

    a: (m, m) or (K, m, m), symmetric (only its symmetry makes A A = A A^T; the kernel reads rows of A only),
    fp32/fp16/bf16 for the kernel; accumulation in fp32. b, c: Python numbers.
    Returns a's shape and dtype, contiguous. The kernel path has no autograd.
    """
    check_tensor("a", a, ndim=(2, 3))
    if a.size(-1) != a.size(-2):
        raise ValueError(f"a must be square, got shape {tuple(a.shape)}")
    for name, v in (("b", b), ("c", c)):
        check_number(name, v)
    if not use_kernel(impl, a, unsupported=no_kernel_reason("a", a)):
        return sym_update_ref(a, b, c)
    a3 = a if a.ndim == 3 else a.unsqueeze(0)
    out = syrk(a3, c, a3, b)
    return out if a.ndim == 3 else out[0]


def gram_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch X X^T in x's dtype. x (m, n) or (K, m, n); returns (m, m) or (K, m, m)."""
    return x @ x.mT


def sym_update_ref(a: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """Plain-PyTorch b A + c A A in a's dtype. a (m, m) or (K, m, m)."""
    return b * a + c * (a @ a)
