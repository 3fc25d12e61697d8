"""The Muon step around Polar Express, and the AdamW step, as fused Triton launches (SPEC §6).

For a stack of K same-shape matrices (K, m, n), fp32 state, one Muon step is
    muon_pre:  buf = lerp(buf, G, 1 - mu); G' = lerp(G, buf, mu)                         (Nesterov)
               X = G' * (||G'||_F / sqrt(m)) / ||G'_row||, cast to the Polar-Express dtype (row equilibration)
    polar_express(X)                                                       (kernels/polar_express.py)
    muon_post: X *= sqrt(min(m, n)) / ||X||_F                                              (Muon+)
               v = mean(X^2 over r); buf2 = lerp(buf2, v, 1 - beta2); s = rsqrt(max(buf2, 1e-10))
               X = X s ||X||_F / ||X s||_F    (NorMuon; r = last dim when m >= n, else the row dim)
               P -= lr' X + lr' wd P [X P >= 0], lr' = lr sqrt(max(1, m / n))  (cautious weight decay)
muon_pre is two launches: (1) the momentum update, written back, and each row's sum of squares of G'; (2) the
equilibrated X, recomputing G' from G and the new buffer rather than keeping an fp32 temporary. Per element (fp32
G): (1) reads G, buf, writes buf; (2) reads G, buf, writes X: 16 bytes read, 6 written with a bf16 X.
muon_post never forms the scaled X: every factor above is a per-line (row or column) scale, so (3) sums X^2 per
line (relative to the line's max |X|, so that no finite X overflows: the step does not depend on X's scale), (4) one
small program per matrix turns those sums into buf2 and the per-line factor, and (5) one elementwise pass applies
the update. NaN or inf anywhere in a matrix of X makes that matrix's parameters and buf2 NaN, on both paths.
Per element (bf16 X): reads X twice and P once, writes P: 8 bytes read, 4 written.
AdamW is one elementwise launch per tensor: reads p, g, m, v, writes p, m, v (28 bytes per fp32 element).

Every function here writes its state arguments IN PLACE (momentum_buf; params_stack and second_buf; p, exp_avg,
exp_avg_sq), like the `*_ref` functions beside them, which are the optimizer's reference math (train/optim.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_number, check_same_device, check_tensor, use_kernel
from tritonchat.kernels._dispatch import compiled as compiled_fn
from tritonchat.kernels.polar_express import POLAR_EXPRESS_COEFFS, polar_express, polar_express_ref

__all__ = [
    "adamw_step_",
    "adamw_step_ref",
    "muon_post",
    "muon_post_ref",
    "muon_pre",
    "muon_pre_ref",
    "muon_step_",
    "muon_step_ref",
]


@triton.jit
def _lerp(start, end, w):
    # torch.lerp's formula: start + w (end - start) for |w| < 0.5, else end - (end - start)(1 - w)
    diff = end - start
    return tl.where(w < 0.5, start + w * diff, end - diff * (1.0 - w))


@triton.jit
def _nesterov_kernel(
    g_ptr,  # (K, m, n) gradient stack, any float dtype
    buf_ptr,  # (K, m, n) fp32 momentum buffer, updated in place
    rowsq_ptr,  # (K, m) fp32 out: sum over the row of G'^2
    part_ptr,  # (K, n_parts) fp32 out: sum of rowsq over this program's rows
    m, n, n_parts,  # rows, columns, row blocks per matrix
    w_buf,  # 1 - mu
    w_g,  # mu
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # columns per loop iteration
):
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_off = bk * m * n + rows[:, None] * n
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        g = tl.load(g_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        buf = tl.load(buf_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        buf = _lerp(buf, g, w_buf)
        tl.store(buf_ptr + row_off + cols[None, :], buf, mask=mask)
        gn = _lerp(g, buf, w_g)
        acc += gn * gn
    rowsq = tl.sum(acc, axis=1)
    tl.store(rowsq_ptr + bk * m + rows, rowsq, mask=rows < m)
    tl.store(part_ptr + bk * n_parts + pid, tl.sum(rowsq, axis=0))


@triton.jit
def _equilibrate_kernel(
    g_ptr,  # (K, m, n) gradient stack
    buf_ptr,  # (K, m, n) fp32 momentum buffer, already updated
    rowsq_ptr,  # (K, m) fp32 row sums of G'^2
    part_ptr,  # (K, n_parts) fp32 partial sums of rowsq
    x_ptr,  # (K, m, n) out, the Polar-Express dtype
    m, n, n_parts,  # rows, columns, row blocks per matrix
    w_g,  # mu
    sqrt_m,  # sqrt(m)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # columns per loop iteration
    BLOCK_P: tl.constexpr,  # power of two >= n_parts
):
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    frob = tl.sqrt(tl.sum(tl.load(part_ptr + bk * n_parts + p, mask=p < n_parts, other=0.0), axis=0))
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rowsq = tl.load(rowsq_ptr + bk * m + rows, mask=rows < m, other=1.0)
    scale = (frob / sqrt_m) / tl.maximum(tl.sqrt(rowsq), 1e-12)
    row_off = bk * m * n + rows[:, None] * n
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        g = tl.load(g_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        buf = tl.load(buf_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        x = _lerp(g, buf, w_g) * scale[:, None]
        tl.store(x_ptr + row_off + cols[None, :], x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _line_sumsq_kernel(
    x_ptr,  # (K, m, n) contiguous, viewed as K x L lines of R elements through the strides below
    q_ptr,  # (K, L) fp32 out: sum of (x / lmax)^2 along each line (0 for an all-zero line)
    lmax_ptr,  # (K, L) fp32 out: max |x| along each line
    L, R,  # lines per matrix, elements per line (L R = m n)
    stride_l, stride_r,  # (n, 1) for row lines, (1, n) for column lines
    BLOCK_L: tl.constexpr,  # lines per program
    BLOCK_R: tl.constexpr,  # elements per line per loop iteration
):
    # Squares of x / (running line max), rescaled as the max grows: no overflow for any finite x, while NaN or
    # inf in a line makes its sum NaN.
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    lines = (pid * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    base = x_ptr + bk * L * R + lines[:, None] * stride_l
    big = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        x = tl.load(base + rs[None, :] * stride_r, mask=(lines[:, None] < L) & (rs[None, :] < R), other=0.0)
        x = x.to(tl.float32)
        new = tl.maximum(big, tl.max(tl.abs(x), axis=1))
        inv = 1.0 / tl.where(new > 0.0, new, 1.0)  # one division per line, not per element
        y = x * inv[:, None]
        acc = acc * ((big * inv) * (big * inv)) + tl.sum(y * y, axis=1)
        big = new
    tl.store(q_ptr + bk * L + lines, acc, mask=lines < L)
    tl.store(lmax_ptr + bk * L + lines, big, mask=lines < L)


@triton.jit
def _normuon_kernel(
    q_ptr,  # (K, L) fp32 line sums of (X / lmax)^2 (X = the Polar-Express output)
    lmax_ptr,  # (K, L) fp32 line maxima of |X|
    buf2_ptr,  # (K, L) fp32 second-moment buffer, updated in place
    coef_ptr,  # (K, L) fp32 out: the factor of each line that turns X into the Muon+ X1, times its NorMuon scale
    ratio_ptr,  # (K,) fp32 out: ||X1||_F / ||X1 s||_F, the norm-preserving factor
    L, R,  # lines per matrix, elements per line
    sqrt_min,  # sqrt(min(m, n)), the Muon+ target norm
    w2,  # 1 - beta2
    BLOCK: tl.constexpr,  # lines per loop iteration
):
    # Everything is computed for Xn = X / M, M = max |X| over the matrix (the result does not depend on X's
    # scale, and Xn's squares cannot overflow); NaN anywhere in X reaches every output of its matrix, as in
    # the reference (hence the NaN-propagating maxima).
    bk = tl.program_id(0).to(tl.int64)
    big = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        ls = l0 + tl.arange(0, BLOCK).to(tl.int64)
        big = tl.maximum(big, tl.load(lmax_ptr + bk * L + ls, mask=ls < L, other=0.0))
    M = tl.max(big, axis=0)
    inv = tl.where(M > 0.0, 1.0 / M, 0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        ls = l0 + tl.arange(0, BLOCK).to(tl.int64)
        r = tl.load(lmax_ptr + bk * L + ls, mask=ls < L, other=0.0) * inv
        acc += tl.load(q_ptr + bk * L + ls, mask=ls < L, other=0.0) * (r * r)
    f0 = tl.sqrt(tl.sum(acc, axis=0))  # ||Xn||_F
    c1 = sqrt_min / tl.maximum(f0, 1e-12, propagate_nan=tl.PropagateNan.ALL)  # X1 = c1 Xn has norm sqrt(min(m, n))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        ls = l0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = ls < L
        r = tl.load(lmax_ptr + bk * L + ls, mask=mask, other=0.0) * (inv * c1)
        q1 = tl.load(q_ptr + bk * L + ls, mask=mask, other=0.0) * (r * r)  # line sums of X1^2
        buf2 = _lerp(tl.load(buf2_ptr + bk * L + ls, mask=mask, other=0.0), q1 / R, w2)
        tl.store(buf2_ptr + bk * L + ls, buf2, mask=mask)
        s = tl.rsqrt(tl.maximum(buf2, 1e-10, propagate_nan=tl.PropagateNan.ALL))
        acc += tl.where(mask, s * s * q1, 0.0)
        tl.store(coef_ptr + bk * L + ls, (inv * c1) * s, mask=mask)
    norm_s = tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-12, propagate_nan=tl.PropagateNan.ALL)
    tl.store(ratio_ptr + bk, (c1 * f0) / norm_s)


@triton.jit
def _cautious_update_kernel(
    x_ptr,  # (K, m, n) contiguous Polar-Express output
    p_ptr,  # (K, m, n) contiguous fp32 parameters, updated in place
    coef_ptr,  # (K, L) fp32 per-line factor from _normuon_kernel
    ratio_ptr,  # (K,) fp32 per-matrix factor from _normuon_kernel
    numel, n, L,  # m n, columns, lines per matrix
    lr_eff,  # lr * sqrt(max(1, m / n))
    lr_wd,  # lr_eff * wd
    ROW_LINES: tl.constexpr,  # lines are rows (m >= n) rather than columns
    BLOCK: tl.constexpr,  # elements per program
):
    pid, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    line = offs // n if ROW_LINES else offs % n
    coef = tl.load(coef_ptr + bk * L + line, mask=mask, other=0.0) * tl.load(ratio_ptr + bk)
    x = tl.load(x_ptr + bk * numel + offs, mask=mask, other=0.0).to(tl.float32) * coef
    p = tl.load(p_ptr + bk * numel + offs, mask=mask, other=0.0)
    decay = tl.where(x * p >= 0, lr_wd * p, 0.0)
    tl.store(p_ptr + bk * numel + offs, p - (lr_eff * x + decay), mask=mask)


@triton.jit
def _adamw_kernel(
    p_ptr,  # (numel,) parameter, any float dtype, updated in place
    g_ptr,  # (numel,) gradient, any float dtype
    m_ptr,  # (numel,) first moment (fp32, or bf16 beside a bf16 parameter), updated in place
    v_ptr,  # (numel,) second moment (same), updated in place
    numel,  # elements
    decay,  # 1 - lr * wd
    w1, w2,  # 1 - beta1, 1 - beta2
    bc2,  # 1 - beta2^t
    step_size,  # -lr / (1 - beta1^t)
    eps,  # added to the bias-corrected root
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = _lerp(tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32), g, w1)
    v = _lerp(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), g * g, w2)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    p = p + step_size * m / (tl.sqrt(v / bc2) + eps)  # from the fp32 moments, before they are stored
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _frob(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each matrix of a (K, m, n) stack, shape (K, 1, 1), fp32."""
    return x.float().square().sum(dim=(-2, -1), keepdim=True).sqrt()


def _default_ns_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if t.is_cuda else torch.float32


def _check_state(name: str, t: object, shape: torch.Size, ref: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """A state or companion tensor: given shape, contiguous, on ref's device, fp32 unless fp32=False."""
    check_tensor(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if fp32 and t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    check_same_device(**{name: t, "the first tensor argument": ref})
    return t


def _check_stack(name: str, t: object, fp32: bool = False) -> torch.Tensor:
    check_tensor(name, t, ndim=3)
    return _check_state(name, t, t.shape, t, fp32)


# Warps of the 4096-element momentum tiles (Nesterov, equilibrate): at 4 warps each thread held 32 elements of g, the
# buffer and their 64-bit addresses (166 registers); 8 halve that (`python -m bench.compile_report --family muon`).
_TILE_WARPS = 8


def _tile(contig: int, other: int, cuda: bool) -> tuple[int, int]:
    """(block along the contiguous dim, block along the other): 4096-element tiles on a GPU; on the CPU
    interpreter, which pays per operation rather than per element, tiles as large as 65536."""
    budget = 4096 if cuda else 65536
    bc = max(2, min(triton.next_power_of_2(contig), 256 if cuda else budget))
    return bc, max(2, min(triton.next_power_of_2(other), budget // bc))


def _elementwise_block(numel: int, cuda: bool) -> int:
    return 1024 if cuda else max(16, min(triton.next_power_of_2(numel), 65536))


_ADAMW_REF_CHUNK = 1 << 22  # elements per chunk of adamw_step_ref off a GPU


def _adamw_math(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd) -> None:
    g = grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()  # the state itself when fp32 (updated in place)
    m.lerp_(g, 1 - beta1)
    v.lerp_(g.square(), 1 - beta2)
    pf = p.float() * (1 - lr * wd)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    pf.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    p.copy_(pf)
    if m is not exp_avg:  # 16-bit moments: rounded once, after the update read them in fp32
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)


def _adamw_fused(p, grad, exp_avg, exp_avg_sq, hp) -> None:
    """_adamw_math over flat tensors with the hyperparameters in one fp32 tensor, for torch.compile (one pass:
    reads p, g, m, v, writes p, m, v, whatever the tensors' size). hp = [1 - lr wd, 1 - beta1, 1 - beta2,
    1 - beta2^t, lr / (1 - beta1^t), eps]: values, not constants, so a new step or lr never recompiles."""
    g = grad.float()
    m = exp_avg.float().lerp(g, hp[1])
    v = exp_avg_sq.float().lerp(g * g, hp[2])
    pf = p.float() * hp[0] - hp[4] * m / ((v / hp[3]).sqrt() + hp[5])
    p.copy_(pf)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _adamw_compiled(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd) -> None:
    """adamw_step_ref's update through the compiled _adamw_fused (no chunks: it keeps no temporaries)."""
    hp = torch.tensor([1 - lr * wd, 1 - beta1, 1 - beta2, 1 - beta2**step, lr / (1 - beta1**step), eps],
                      dtype=torch.float32, device=p.device)
    compiled_fn(_adamw_fused, dynamic=True)(p.view(-1), grad.reshape(-1), exp_avg.view(-1), exp_avg_sq.view(-1), hp)


def _check_pre_args(grad_stack, momentum_buf, mu, out_dtype, dtype_name: str = "out_dtype") -> None:
    _check_stack("grad_stack", grad_stack)
    _check_state("momentum_buf", momentum_buf, grad_stack.shape, grad_stack)
    check_number("mu", mu, lo=0.0, hi=1.0)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"{dtype_name} must be None or a floating torch.dtype, got {out_dtype!r}")


def _check_post_args(X, params_stack, second_buf, lr, wd, beta2) -> None:
    _check_stack("X", X)
    _check_state("params_stack", params_stack, X.shape, X)
    K, m, n = X.shape
    _check_state("second_buf", second_buf, torch.Size((K, m, 1) if m >= n else (K, 1, n)), X)
    if K and (m == 0 or n == 0):
        raise ValueError(f"X must have at least one row and one column per matrix, got shape {tuple(X.shape)}")
    check_number("lr", lr, lo=0.0)  # the domains of torch.optim's Adam/Muon hyperparameters
    check_number("wd", wd, lo=0.0)
    check_number("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)


def _muon_pre(grad_stack: torch.Tensor, momentum_buf: torch.Tensor, mu: float, out_dtype: torch.dtype | None,
              impl: str) -> torch.Tensor:
    """muon_pre on checked arguments."""
    out_dtype = out_dtype or _default_ns_dtype(grad_stack)
    if not use_kernel(impl, grad_stack, momentum_buf):
        return muon_pre_ref(grad_stack, momentum_buf, mu, out_dtype)
    K, m, n = grad_stack.shape
    x = torch.empty((K, m, n), dtype=out_dtype, device=grad_stack.device)
    if x.numel() == 0:
        return x
    bc, br = _tile(n, m, grad_stack.is_cuda)
    n_parts = triton.cdiv(m, br)
    rowsq = torch.empty((K, m), dtype=torch.float32, device=x.device)
    part = torch.empty((K, n_parts), dtype=torch.float32, device=x.device)
    grid = (n_parts, K)
    # scalars go in as Python floats: an int 1 would be specialized into a constant by Triton
    _nesterov_kernel[grid](grad_stack, momentum_buf, rowsq, part, m, n, n_parts, float(1 - mu), float(mu),
                           BLOCK_R=br, BLOCK_C=bc, num_warps=_TILE_WARPS)
    _equilibrate_kernel[grid](grad_stack, momentum_buf, rowsq, part, x, m, n, n_parts, float(mu), math.sqrt(m),
                              BLOCK_R=br, BLOCK_C=bc, BLOCK_P=triton.next_power_of_2(n_parts), num_warps=_TILE_WARPS)
    return x


def _muon_post(X: torch.Tensor, params_stack: torch.Tensor, second_buf: torch.Tensor, lr: float, wd: float,
               beta2: float, impl: str) -> None:
    """muon_post on checked arguments."""
    K, m, n = X.shape
    row_lines = m >= n
    if not use_kernel(impl, X, params_stack, second_buf):
        return muon_post_ref(X, params_stack, second_buf, lr, wd, beta2)
    if X.numel() == 0:
        return None
    cuda = X.is_cuda
    L, R = (m, n) if row_lines else (n, m)
    stride_l, stride_r = (n, 1) if row_lines else (1, n)
    q = torch.empty((K, L), dtype=torch.float32, device=X.device)
    lmax = torch.empty_like(q)
    coef = torch.empty_like(q)
    ratio = torch.empty((K,), dtype=torch.float32, device=X.device)
    bc, bo = _tile(R if row_lines else L, L if row_lines else R, cuda)
    bl, br = (bo, bc) if row_lines else (bc, bo)
    _line_sumsq_kernel[(triton.cdiv(L, bl), K)](X, q, lmax, L, R, stride_l, stride_r, BLOCK_L=bl, BLOCK_R=br)
    _normuon_kernel[(K,)](q, lmax, second_buf, coef, ratio, L, R, math.sqrt(min(m, n)), float(1 - beta2),
                          BLOCK=min(1024, triton.next_power_of_2(L)))
    lr_eff = float(lr * math.sqrt(max(1.0, m / n)))
    block = _elementwise_block(m * n, cuda)
    _cautious_update_kernel[(triton.cdiv(m * n, block), K)](X, params_stack, coef, ratio, m * n, n, L, lr_eff,
                                                           lr_eff * wd, ROW_LINES=row_lines, BLOCK=block)
    return None


def muon_pre(grad_stack: torch.Tensor, momentum_buf: torch.Tensor, mu: float, *,
             out_dtype: torch.dtype | None = None, impl: str = "auto") -> torch.Tensor:
    """Nesterov momentum and row equilibration for a Muon stack: the input of Polar Express.

    grad_stack: (K, m, n) contiguous gradients, any float dtype (read as fp32). momentum_buf: (K, m, n) contiguous
    fp32, updated IN PLACE to lerp(buf, G, 1 - mu). mu: the momentum. out_dtype: the Polar-Express dtype (default
    bf16 on CUDA, fp32 elsewhere). Returns X (K, m, n) in out_dtype, every row of norm ||G'||_F / sqrt(m).
    """
    _check_pre_args(grad_stack, momentum_buf, mu, out_dtype)
    return _muon_pre(grad_stack, momentum_buf, mu, out_dtype, impl)


def muon_post(X: torch.Tensor, params_stack: torch.Tensor, second_buf: torch.Tensor, lr: float, wd: float,
              beta2: float, *, impl: str = "auto") -> None:
    """Muon+ scaling, NorMuon variance reduction and the cautious-weight-decay update, IN PLACE.

    X: (K, m, n) contiguous Polar-Express output, any float dtype. params_stack: (K, m, n) contiguous fp32, updated
    in place: P -= lr' X + lr' wd P [X P >= 0] with lr' = lr sqrt(max(1, m / n)). second_buf: contiguous fp32,
    (K, m, 1) when m >= n else (K, 1, n), updated in place to lerp(buf2, mean(X^2 over r), 1 - beta2).
    """
    _check_post_args(X, params_stack, second_buf, lr, wd, beta2)
    _muon_post(X, params_stack, second_buf, lr, wd, beta2, impl)


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                lr: float, beta1: float, beta2: float, eps: float, wd: float, *, impl: str = "auto",
                compiled: bool = False) -> None:
    """One AdamW update, IN PLACE on p, exp_avg and exp_avg_sq (one launch).

    p: any shape, contiguous, any float dtype (math in fp32, stored back in p's dtype). grad: p's shape, any float
    dtype. exp_avg, exp_avg_sq: p's shape, contiguous, fp32 (or bf16 when p is bf16: the reference's storage for
    its bf16 embedding tables; the update reads the fp32 moments before they are rounded). step: this update's
    1-based count t (bias corrections 1 - beta^t). p = p (1 - lr wd) - lr / (1 - beta1^t) m / (sqrt(v / (1 -
    beta2^t)) + eps) with m, v the updated moments. compiled: where the reference runs, run its math as one
    torch.compile'd pass (see adamw_step_ref).
    """
    check_tensor("p", p)
    if not p.is_contiguous():
        raise ValueError("p must be contiguous")
    check_tensor("grad", grad)
    if grad.shape != p.shape:
        raise ValueError(f"grad must have shape {tuple(p.shape)}, got {tuple(grad.shape)}")
    check_same_device(p=p, grad=grad)
    grad = grad.contiguous()  # any layout: the kernel reads it flat
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_state(name, t, p.shape, p, fp32=False)
        if t.dtype != torch.float32 and not (t.dtype == torch.bfloat16 == p.dtype):
            raise TypeError(f"{name} must be float32 (or bfloat16 beside a bfloat16 p), got {t.dtype} "
                            f"for a {p.dtype} p")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    check_number("lr", lr, lo=0.0)  # the domains of torch.optim.AdamW
    check_number("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    check_number("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    check_number("eps", eps, lo=0.0)
    check_number("wd", wd, lo=0.0)
    if not use_kernel(impl, p, grad, exp_avg, exp_avg_sq):
        return adamw_step_ref(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd, compiled=compiled)
    numel = p.numel()
    if numel == 0:
        return None
    block = _elementwise_block(numel, p.is_cuda)
    scalars = (1 - lr * wd, 1 - beta1, 1 - beta2, 1 - beta2**step, -lr / (1 - beta1**step), eps)
    _adamw_kernel[(triton.cdiv(numel, block),)](p, grad, exp_avg, exp_avg_sq, numel, *map(float, scalars),
                                                BLOCK=block)
    return None


def muon_step_(grad_stack: torch.Tensor, params_stack: torch.Tensor, momentum_buf: torch.Tensor,
               second_buf: torch.Tensor, *, lr: float, mu: float, beta2: float, wd: float, ns_steps: int = 5,
               ns_dtype: torch.dtype | None = None, impl: str = "auto", compiled: bool = False) -> None:
    """One whole Muon step on stacks (muon_pre, polar_express, muon_post), IN PLACE on params_stack, momentum_buf
    and second_buf. Shapes and dtypes as in muon_pre / muon_post; ns_dtype as muon_pre's out_dtype. compiled:
    where the reference runs, run it under torch.compile (see muon_step_ref)."""
    # every argument is checked before muon_pre writes momentum_buf
    _check_pre_args(grad_stack, momentum_buf, mu, ns_dtype, "ns_dtype")
    _check_post_args(grad_stack, params_stack, second_buf, lr, wd, beta2)
    if type(ns_steps) is not int or not 0 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps must be an int in [0, {len(POLAR_EXPRESS_COEFFS)}], got {ns_steps!r}")
    if not use_kernel(impl, grad_stack, params_stack, momentum_buf, second_buf):
        return muon_step_ref(grad_stack, params_stack, momentum_buf, second_buf, lr=lr, mu=mu, beta2=beta2, wd=wd,
                             ns_steps=ns_steps, ns_dtype=ns_dtype, compiled=compiled)
    X = _muon_pre(grad_stack, momentum_buf, mu, ns_dtype, impl)
    _muon_post(polar_express(X, ns_steps, impl=impl), params_stack, second_buf, lr, wd, beta2, impl)


def muon_pre_ref(grad_stack: torch.Tensor, momentum_buf: torch.Tensor, mu: float,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of `muon_pre`: train/optim.py's Muon steps 1-2. Updates momentum_buf in place."""
    G = grad_stack.float()
    momentum_buf.lerp_(G, 1 - mu)
    G = G.lerp(momentum_buf, mu)
    target = _frob(G) / math.sqrt(G.size(-2))
    G = G * (target / G.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return G.to(out_dtype or _default_ns_dtype(G))


def muon_post_ref(X: torch.Tensor, params_stack: torch.Tensor, second_buf: torch.Tensor, lr: float, wd: float,
                  beta2: float) -> None:
    """Reference of `muon_post`: train/optim.py's Muon steps 4-6. Updates params_stack and second_buf in place."""
    m, n = X.shape[-2:]
    X = X.float()
    # The result does not depend on X's scale: work on X / max|X| (no overflow in the squares for any finite X;
    # NaN or inf in a matrix gives NaN for all of its outputs).
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(amax > 0, amax, 1.0)
    X = X * (math.sqrt(min(m, n)) / _frob(X).clamp_min(1e-12))
    v = X.square().mean(dim=-1 if m >= n else -2, keepdim=True)
    second_buf.lerp_(v, 1 - beta2)
    scale = second_buf.clamp_min(1e-10).rsqrt()
    Xs = X * scale
    X = Xs * (_frob(X) / _frob(Xs).clamp_min(1e-12))
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    P = params_stack
    mask = (X * P) >= 0
    P -= lr_eff * X + lr_eff * wd * P * mask


def adamw_step_ref(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   lr: float, beta1: float, beta2: float, eps: float, wd: float, *, compiled: bool = False) -> None:
    """Reference of `adamw_step_`: train/optim.py's AdamW update. Updates p, exp_avg, exp_avg_sq in place.
    Off a GPU a large tensor is updated in flat chunks (elementwise math: the same result), so the fp32
    temporaries stay a few MB instead of several copies of the parameter. compiled: one torch.compile'd pass
    per tensor instead (the same math, equal within fp32 rounding; contiguous tensors)."""
    flat = lambda t: t.view(-1) if t.is_contiguous() else None
    views = [flat(p), grad.reshape(-1), flat(exp_avg), flat(exp_avg_sq)]
    if compiled and all(v is not None for v in views) and p.numel():
        return _adamw_compiled(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd)
    n = p.numel()
    if p.is_cuda or n <= _ADAMW_REF_CHUNK or any(v is None for v in views):
        return _adamw_math(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd)
    for a in range(0, n, _ADAMW_REF_CHUNK):
        _adamw_math(*(v[a:a + _ADAMW_REF_CHUNK] for v in views), step, lr, beta1, beta2, eps, wd)


def muon_step_ref(grad_stack: torch.Tensor, params_stack: torch.Tensor, momentum_buf: torch.Tensor,
                  second_buf: torch.Tensor, *, lr: float, mu: float, beta2: float, wd: float, ns_steps: int = 5,
                  ns_dtype: torch.dtype | None = None, compiled: bool = False) -> None:
    """Reference of `muon_step_`: the whole Muon step of train/optim.py on stacks, in place. compiled: the same
    function under torch.compile (dynamic=False: once per stack shape; the hyperparameters go in as 0-D tensors,
    which the math takes as they are, so a new lr or momentum never recompiles)."""
    if compiled and grad_stack.numel():
        t = lambda v: torch.tensor(v, dtype=torch.float32, device=grad_stack.device)  # noqa: E731
        return compiled_fn(muon_step_ref, dynamic=False)(grad_stack, params_stack, momentum_buf, second_buf,
                                                           lr=t(lr), mu=t(mu), beta2=t(beta2), wd=t(wd),
                                                           ns_steps=ns_steps, ns_dtype=ns_dtype)
    X = muon_pre_ref(grad_stack, momentum_buf, mu, ns_dtype)
    muon_post_ref(polar_express_ref(X, ns_steps), params_stack, second_buf, lr, wd, beta2)
