"""RMSNorm over the last dim, without a weight (the model's ``norm``), and the fused residual entry of a block.

    rms_norm(x)               y = x * r,  r = 1 / sqrt(mean(x^2 over the last dim) + eps)
    mix_rms_norm(x, x0, a, b) h = a*x + b*x0,  y = rms_norm(h);  returns (h, y)

eps defaults to the eps of the math dtype, as in ``F.rms_norm``: ``torch.finfo(torch.float32).eps`` for
float32/bfloat16/float16 inputs (the math runs in float32), ``torch.finfo(torch.float64).eps`` for float64.

Bytes moved over N rows of C elements of s bytes (fp32 rstd per row is noise):
    rms_norm      forward reads N*C*s, writes N*C*s;  backward reads 2*N*C*s (dy, y), writes N*C*s
    mix_rms_norm  forward reads 2*N*C*s, writes 2*N*C*s (h and y);
                  backward reads 4*N*C*s (dy, dh, x, x0), writes 2*N*C*s (dx, dx0)

Backward, with n = h*r:  dL/dh = r * (dy - n * mean(dy*n)) (+ the gradient of h itself, for mix_rms_norm);
dx = a*dL/dh, dx0 = b*dL/dh, da = sum(dL/dh * x), db = sum(dL/dh * x0).
rms_norm saves its output y (the next matmul keeps it anyway) instead of x; mix_rms_norm saves x and x0
(x0 is one tensor shared by every layer) and recomputes h in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_eps, check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._launch import as_rows, num_warps_for

__all__ = ["mix_rms_norm", "mix_rms_norm_ref", "rms_norm", "rms_norm_ref"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels do float32 math
_MAX_C = 16384  # one row lives in registers; longer rows run the reference under impl="auto"


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # (N, C) rows of x, unit stride along C
    X0,  # (N, C) rows of x0, unit stride along C (MIX only)
    A,  # pointer to the scalar a (MIX only)
    B,  # pointer to the scalar b (MIX only)
    H,  # (N, C) out, contiguous: h = a*x + b*x0 (MIX only)
    Y,  # (N, C) out, contiguous: h * rstd
    RSTD,  # (N,) fp32 out: 1 / sqrt(mean(h^2) + eps), kept for the backward
    stride_x,  # elements between consecutive rows of X
    stride_x0,  # elements between consecutive rows of X0
    N,  # number of rows
    C,  # row length
    eps,  # added to mean(h^2)
    MIX: tl.constexpr,  # True: h = a*x + b*x0 is computed and stored; False: h = x
    ROWS: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # power of two >= C
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < C)
    r = rows[:, None]
    h = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if MIX:
        x0 = tl.load(X0 + r * stride_x0 + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(A).to(tl.float32) * h + tl.load(B).to(tl.float32) * x0
        tl.store(H + r * C + cols, h.to(H.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / C + eps)
    tl.store(Y + r * C + cols, (h * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # (N, C) gradient of the normed output, unit stride along C
    DH,  # (N, C) gradient of h as an output of its own, unit stride along C (MIX only)
    Y,  # (N, C) contiguous normed output saved by the forward (plain only)
    X,  # (N, C) forward input x, unit stride along C (MIX only)
    X0,  # (N, C) forward input x0, unit stride along C (MIX only)
    A,  # pointer to the scalar a (MIX only)
    B,  # pointer to the scalar b (MIX only)
    RSTD,  # (N,) fp32 from the forward
    DX,  # (N, C) out, contiguous: dL/dx (plain: dL/dh)
    DX0,  # (N, C) out, contiguous: dL/dx0 (MIX only)
    PART,  # (2, N) fp32 out: per-row sum(dL/dh * x) and sum(dL/dh * x0), summed on the host (MIX only)
    stride_dy,  # elements between rows of DY
    stride_dh,  # elements between rows of DH
    stride_x,  # elements between rows of X
    stride_x0,  # elements between rows of X0
    N,  # number of rows
    C,  # row length
    MIX: tl.constexpr,  # see the forward
    ROWS: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # power of two >= C
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < C)
    r = rows[:, None]
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
    dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    if MIX:
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + r * stride_x0 + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A).to(tl.float32)
        b = tl.load(B).to(tl.float32)
        n = (a * x + b * x0) * rstd
    else:
        n = tl.load(Y + r * C + cols, mask=mask, other=0.0).to(tl.float32)
    # n = h * r, r = (mean(h^2) + eps)^(-1/2), dr/dh = -r^3 h / C  =>  dL/dh = r * (dy - n * mean(dy * n))
    dh = rstd * (dy - n * (tl.sum(dy * n, axis=1) / C)[:, None])
    if MIX:
        dh += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * C + cols, (a * dh).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX0 + r * C + cols, (b * dh).to(DX0.dtype.element_ty), mask=mask)
        tl.store(PART + rows, tl.sum(dh * x, axis=1), mask=row_ok)
        tl.store(PART + N + rows, tl.sum(dh * x0, axis=1), mask=row_ok)
    else:
        tl.store(DX + r * C + cols, dh.to(DX.dtype.element_ty), mask=mask)


def _meta(N: int, C: int) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters: a program takes enough rows to hold about 4096 elements (short rows share a
    program), with about 16 fp32 values per thread."""
    block = triton.next_power_of_2(C)
    rows = min(16, max(1, 4096 // block))
    return (triton.cdiv(N, rows),), {"ROWS": rows, "BLOCK_C": block, "num_warps": num_warps_for(rows * block)}


def _default_eps(eps: float | None) -> float:
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def _rms_norm_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C) -> y (x's shape, contiguous), rstd (N,) fp32. Inference entry point (no autograd)."""
    x2 = as_rows(x)
    N, C = x2.shape
    # Outputs are allocated in their final shape (contiguous), not as views of an (N, C) buffer, so that
    # autograd lets callers modify them in place.
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        grid, meta = _meta(N, C)
        _rms_norm_fwd_kernel[grid](x2, x2, x2, x2, y, y, rstd, x2.stride(0), x2.stride(0), N, C, eps, MIX=False, **meta)
    return y, rstd


def _mix_rms_norm_fwd(x, x0, a, b, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = a*x + b*x0 and y = rms_norm(h), both with x's shape; rstd (N,) fp32."""
    x2, x02 = as_rows(x), as_rows(x0)
    N, C = x2.shape
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # final shapes, contiguous (see _rms_norm_fwd)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        grid, meta = _meta(N, C)
        _rms_norm_fwd_kernel[grid](x2, x02, a, b, h, y, rstd, x2.stride(0), x02.stride(0), N, C, eps, MIX=True, **meta)
    return h, y, rstd


def _no_kernel_reason(x: torch.Tensor) -> Exception | None:
    """Why the kernels cannot take x (float64, rows over _MAX_C), or None."""
    if x.size(-1) > _MAX_C:
        return ValueError(f"the Triton kernel takes rows of at most {_MAX_C} elements, got x with {x.size(-1)}")
    return dtype_error("x", x, _KERNEL_DTYPES)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm_fwd(x, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, rstd = ctx.saved_tensors
        dy2, y2 = as_rows(dy), y.view(-1, y.size(-1))
        N, C = y2.shape
        dx = torch.empty_like(y2)
        if N:
            grid, meta = _meta(N, C)
            _rms_norm_bwd_kernel[grid](dy2, dy2, y2, y2, y2, y2, y2, rstd, dx, dx, rstd,
                                       dy2.stride(0), dy2.stride(0), C, C, N, C, MIX=False, **meta)
        return dx.view(y.shape), None


class _MixRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x0, a, b, eps: float):
        h, y, rstd = _mix_rms_norm_fwd(x, x0, a, b, eps)
        ctx.save_for_backward(x, x0, a, b, rstd)
        return h, y

    @staticmethod
    def backward(ctx, dh: torch.Tensor, dy: torch.Tensor):
        x, x0, a, b, rstd = ctx.saved_tensors
        x2, x02, dy2, dh2 = as_rows(x), as_rows(x0), as_rows(dy), as_rows(dh)
        N, C = x2.shape
        dx = torch.empty((N, C), dtype=x.dtype, device=x.device)
        dx0 = torch.empty((N, C), dtype=x0.dtype, device=x.device)
        part = torch.empty((2, N), dtype=torch.float32, device=x.device)  # every row writes its two partials
        if N:
            grid, meta = _meta(N, C)
            _rms_norm_bwd_kernel[grid](dy2, dh2, dy2, x2, x02, a, b, rstd, dx, dx0, part, dy2.stride(0),
                                       dh2.stride(0), x2.stride(0), x02.stride(0), N, C, MIX=True, **meta)
        da, db = part.sum(dim=1)  # fixed-order reduction of per-row partials: deterministic
        return dx.view(x.shape), dx0.view(x.shape), da.to(a.dtype).view(a.shape), db.to(b.dtype).view(b.shape), None


def rms_norm(x: torch.Tensor, eps: float | None = None, *, impl: str = "auto") -> torch.Tensor:
    """Weightless RMSNorm over the last dim.

    x: (..., C), any floating dtype (the kernel takes float32/bfloat16/float16, C <= 16384; others run the
    reference). eps: None means the math dtype's eps (float32's for 16-bit inputs, as ``F.rms_norm``).
    Returns a tensor of x's shape and dtype (contiguous on the kernel path). Differentiable.
    """
    check_tensor("x", x, min_ndim=1)
    check_eps(eps)
    if x.size(-1) == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not use_kernel(impl, x, unsupported=_no_kernel_reason(x)):
        return rms_norm_ref(x, eps)
    return _RMSNorm.apply(x, _default_eps(eps))


def mix_rms_norm(
    x: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float | None = None,
    *, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual entry of a block: h = a*x + b*x0, then RMSNorm of h, in one pass.

    x, x0: (..., C), same shape and floating dtype. a, b: 0-dim or 1-element floating tensors on x's device
    (per-layer scalars such as resid_lambdas[i]; any float dtype, read as float32 by the kernel).
    eps as in ``rms_norm``. Returns (h, rms_norm(h)), both x's shape and dtype. Differentiable in x, x0, a, b,
    through both outputs.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("x0", x0, min_ndim=1)
    for name, s in (("a", a), ("b", b)):
        check_tensor(name, s)
        if s.ndim > 1 or s.numel() != 1:
            raise ValueError(f"{name} must be a 0-dim or 1-element tensor, got shape {tuple(s.shape)}")
    check_same_device(x=x, x0=x0, a=a, b=b)
    check_eps(eps)
    if x.shape != x0.shape:
        raise ValueError(f"x and x0 must have the same shape, got {tuple(x.shape)} and {tuple(x0.shape)}")
    if x.dtype != x0.dtype:
        raise TypeError(f"x and x0 must have the same dtype, got {x.dtype} and {x0.dtype}")
    if x.size(-1) == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not use_kernel(impl, x, x0, a, b, unsupported=_no_kernel_reason(x)):
        return mix_rms_norm_ref(x, x0, a, b, eps)
    return _MixRMSNorm.apply(x, x0, a, b, _default_eps(eps))


def rms_norm_ref(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Plain-PyTorch RMSNorm; same semantics (and dtype handling) as ``F.rms_norm`` over the last dim."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def mix_rms_norm_ref(
    x: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: h = a*x + b*x0 with a, b cast to x's dtype (as the model writes it); (h, rms_norm(h))."""
    h = a.to(x.dtype) * x + b.to(x.dtype) * x0
    return h, rms_norm_ref(h, eps)
