"""Rotary position embedding (half split, rotation by -theta) and the fused RoPE + QK-norm + scale.

With x1 = x[..., :D/2] and x2 = x[..., D/2:]:
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
This is a rotation of each (x1_j, x2_j) pair by -angle_j; checkpoints depend on this sign convention.
Its transpose (the backward) is the rotation by +angle_j: dx1 = dy1*cos - dy2*sin, dx2 = dy1*sin + dy2*cos.

rope_qk_norm then normalizes each head, out = scale * y * r with r = 1/sqrt(mean(y^2 over D) + eps)
(eps = float32's, the default of ``F.rms_norm`` for float32/bfloat16/float16), for q and k in one launch.
Backward, with o = scale * y * r (the saved output):  dL/dy = r * (scale*do - o * mean(do*o) / scale).

Bytes moved, s bytes per element, q of (B, T, H, D), k of (B, T, Hkv, D) (cos/sin and fp32 rstd are noise):
    apply_rope    forward and backward each read B*T*H*D*s and write B*T*H*D*s
    rope_qk_norm  forward reads (H+Hkv)*B*T*D*s, writes the same; backward reads 2x that (do, o), writes 1x
One program handles one token (b, t): it loads the token's cos/sin row once and uses it for every head of
q and of k. Outputs are contiguous (B, T, heads, D); inputs may be any view with unit stride along D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_number, check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._launch import last_dim_contiguous, num_warps_for
from tritonchat.kernels.rms_norm import rms_norm_ref

__all__ = ["apply_rope", "apply_rope_ref", "rope_qk_norm", "rope_qk_norm_ref"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels do float32 math
_MAX_TILE = 16384  # heads x D elements of one token held in registers; bigger runs the reference under "auto"


@triton.jit
def _rope_tile(
    X,  # input tensor (one of q, k)
    OUT,  # contiguous (B*T, nh, D) output
    RSTD,  # (B*T, nh) fp32 out, 1/sqrt(mean(y^2) + eps) per head (NORM only)
    x_base,  # int64 element offset of this token in X
    stride_h,  # elements between heads in X
    pid,  # int64 token index b*T + t
    nh,  # number of heads of X
    c,  # (1, BLOCK_HALF) fp32 cos of this token
    s,  # (1, BLOCK_HALF) fp32 sin of this token (negated for the transpose)
    scale,  # output multiplier (NORM only)
    eps,  # added to mean(y^2) (NORM only)
    HALF: tl.constexpr,  # D / 2
    NORM: tl.constexpr,  # True: RMSNorm over D and * scale after the rotation
    BLOCK_H: tl.constexpr,  # power of two >= nh
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads[:, None] < nh) & (cols < HALF)
    src = X + x_base + heads[:, None] * stride_h + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c + x2 * s
    y2 = x2 * c - x1 * s
    if NORM:
        rstd = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * HALF) + eps)
        tl.store(RSTD + pid * nh + heads, rstd, mask=heads < nh)
        g = (rstd * scale)[:, None]
        y1 = y1 * g
        y2 = y2 * g
    dst = OUT + pid * nh * (2 * HALF) + heads[:, None] * (2 * HALF) + cols
    tl.store(dst, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(
    Q,  # (B, T, H, D) input, unit stride along D
    K,  # (B, T, Hkv, D) input, unit stride along D (HAS_K only)
    COS,  # (1 or B, 1 or T, 1, D/2) cos table slice, unit stride along D/2
    SIN,  # same shape as COS
    QO,  # contiguous (B, T, H, D) output
    KO,  # contiguous (B, T, Hkv, D) output (HAS_K only)
    QRSTD,  # (B*T, H) fp32 out (NORM only)
    KRSTD,  # (B*T, Hkv) fp32 out (NORM and HAS_K only)
    T,  # sequence length
    H,  # heads of Q
    HKV,  # heads of K
    sq_b, sq_t, sq_h,  # element strides of Q along B, T, H
    sk_b, sk_t, sk_h,  # element strides of K along B, T, H
    sc_b, sc_t,  # element strides of COS along B, T (0 where broadcast)
    ss_b, ss_t,  # element strides of SIN along B, T (0 where broadcast)
    scale,  # output multiplier (NORM only)
    eps,  # RMSNorm eps (NORM only)
    HALF: tl.constexpr,  # D / 2
    HAS_K: tl.constexpr,  # also rotate K (with the same cos/sin row)
    NORM: tl.constexpr,  # RMSNorm over D and * scale after the rotation
    TRANSPOSE: tl.constexpr,  # rotate by +theta instead of -theta (the backward of apply_rope)
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    j = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + b * sc_b + t * sc_t + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + b * ss_b + t * ss_t + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    if TRANSPOSE:
        s = -s
    _rope_tile(Q, QO, QRSTD, b * sq_b + t * sq_t, sq_h, pid, H, c, s, scale, eps, HALF, NORM, BLOCK_H, BLOCK_HALF)
    if HAS_K:
        _rope_tile(K, KO, KRSTD, b * sk_b + t * sk_t, sk_h, pid, HKV, c, s, scale, eps, HALF, NORM, BLOCK_HKV,
                   BLOCK_HALF)


@triton.jit
def _rope_norm_bwd_tile(
    DO,  # gradient of the output (one of dq_out, dk_out), unit stride along D
    OUT,  # contiguous (B*T, nh, D) output saved by the forward
    RSTD,  # (B*T, nh) fp32 from the forward
    DX,  # contiguous (B*T, nh, D) out: gradient of the input
    do_base,  # int64 element offset of this token in DO
    stride_h,  # elements between heads in DO
    pid,  # int64 token index b*T + t
    nh,  # number of heads
    c,  # (1, BLOCK_HALF) fp32 cos of this token
    s,  # (1, BLOCK_HALF) fp32 sin of this token
    scale,  # the forward's output multiplier
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= nh
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads[:, None] < nh) & (cols < HALF)
    src = DO + do_base + heads[:, None] * stride_h + cols
    do1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    do2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    off = pid * nh * (2 * HALF) + heads[:, None] * (2 * HALF) + cols
    o1 = tl.load(OUT + off, mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(OUT + off + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + pid * nh + heads, mask=heads < nh, other=0.0)[:, None]
    # o = scale * n, n = y * r  =>  dL/dy = r * (dn - n * mean(dn * n)) with dn = scale * do, n = o / scale
    m = ((tl.sum(do1 * o1, axis=1) + tl.sum(do2 * o2, axis=1)) / (2 * HALF) / scale)[:, None]
    dy1 = rstd * (scale * do1 - o1 * m)
    dy2 = rstd * (scale * do2 - o2 * m)
    tl.store(DX + off, (dy1 * c - dy2 * s).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + off + HALF, (dy1 * s + dy2 * c).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_norm_bwd_kernel(
    DQO,  # (B, T, H, D) gradient of the q output, unit stride along D
    DKO,  # (B, T, Hkv, D) gradient of the k output, unit stride along D
    QO,  # contiguous (B, T, H, D) q output saved by the forward
    KO,  # contiguous (B, T, Hkv, D) k output saved by the forward
    QRSTD,  # (B*T, H) fp32 from the forward
    KRSTD,  # (B*T, Hkv) fp32 from the forward
    COS,  # cos table slice, as in the forward
    SIN,  # sin table slice, as in the forward
    DQ,  # contiguous (B, T, H, D) out: gradient of q
    DK,  # contiguous (B, T, Hkv, D) out: gradient of k
    T,  # sequence length
    H,  # heads of q
    HKV,  # heads of k
    sq_b, sq_t, sq_h,  # element strides of DQO along B, T, H
    sk_b, sk_t, sk_h,  # element strides of DKO along B, T, H
    sc_b, sc_t,  # element strides of COS along B, T (0 where broadcast)
    ss_b, ss_t,  # element strides of SIN along B, T (0 where broadcast)
    scale,  # the forward's output multiplier
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    j = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + b * sc_b + t * sc_t + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + b * ss_b + t * ss_t + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    _rope_norm_bwd_tile(DQO, QO, QRSTD, DQ, b * sq_b + t * sq_t, sq_h, pid, H, c, s, scale, HALF, BLOCK_H, BLOCK_HALF)
    _rope_norm_bwd_tile(DKO, KO, KRSTD, DK, b * sk_b + t * sk_t, sk_h, pid, HKV, c, s, scale, HALF, BLOCK_HKV,
                        BLOCK_HALF)


def _bth(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _bt(table: torch.Tensor) -> tuple[int, int]:
    """Strides of a cos/sin slice along B and T, 0 on a broadcast (size-1) dim. An offset slice such as
    cos[:, pos:pos + T] is a view: its data pointer already points at row pos."""
    return (table.stride(0) if table.size(0) > 1 else 0), (table.stride(1) if table.size(1) > 1 else 0)


def _meta(h: int, hkv: int, half: int) -> dict:
    bh, bk, bhalf = (max(1, triton.next_power_of_2(n)) for n in (h, hkv, half))  # >= 1: zero heads/D masked
    tile = max(bh, bk) * bhalf * 2
    return {"BLOCK_H": bh, "BLOCK_HKV": bk, "BLOCK_HALF": bhalf, "num_warps": num_warps_for(tile)}


def _rope_fwd(q, k, cos, sin, *, norm: bool, scale: float = 1.0, transpose: bool = False):
    """Launch the forward for q (and k when not None). Returns (q_out, k_out, q_rstd, k_rstd); k_out and the
    rstds are None where not computed. Usable without autograd (inference)."""
    q, cos, sin = last_dim_contiguous(q), last_dim_contiguous(cos), last_dim_contiguous(sin)
    B, T, H, D = q.shape
    qo = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    qr = torch.empty((B * T, H), dtype=torch.float32, device=q.device) if norm else qo
    ko, kr = None, None
    if k is not None:
        k = last_dim_contiguous(k)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        kr = torch.empty((B * T, k.size(2)), dtype=torch.float32, device=q.device) if norm else ko
    hkv = k.size(2) if k is not None else 1
    eps = torch.finfo(torch.float32).eps
    if B * T * D and (H or hkv):
        kk = k if k is not None else q
        _rope_fwd_kernel[(B * T,)](
            q, kk, cos, sin, qo, ko if k is not None else qo, qr, kr if k is not None else qr,
            T, H, hkv, *_bth(q), *_bth(kk), *_bt(cos), *_bt(sin), scale, eps,
            HALF=D // 2, HAS_K=k is not None, NORM=norm, TRANSPOSE=transpose, **_meta(H, hkv, D // 2),
        )
    return qo, ko, (qr if norm else None), (kr if norm and k is not None else None)


def _check_rope_inputs(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensor(name, x, ndim=4)
    check_tensor("cos", cos, ndim=4)
    check_tensor("sin", sin, ndim=4)
    check_same_device(**{name: x, "cos": cos, "sin": sin})
    d = x.size(-1)
    if d % 2 != 0:
        raise ValueError(f"{name} head_dim must be even for RoPE, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    half = (*x.shape[:-1], d // 2)
    if cos.size(-1) != d // 2 or cos.size(2) != 1:
        raise ValueError(
            f"cos/sin must have shape (1 or B, T, 1, {d // 2}) for {name} of shape {tuple(x.shape)}, "
            f"got {tuple(cos.shape)}"
        )
    try:
        ok = torch.broadcast_shapes(cos.shape, half) == torch.Size(half)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not broadcast to {tuple(half)} "
            f"(needed for {name} of shape {tuple(x.shape)})"
        )


def _no_kernel_reason(name: str, x: torch.Tensor, heads: int) -> Exception | None:
    """Why the kernels cannot take x (float64, a token too big for registers), or None."""
    tile = triton.next_power_of_2(heads) * triton.next_power_of_2(x.size(-1))
    if tile > _MAX_TILE:
        return ValueError(f"the Triton kernel takes at most {_MAX_TILE} (padded heads x D) per token, got {name} "
                          f"with {tile}")
    return dtype_error(name, x, _KERNEL_DTYPES)


class _ApplyRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_fwd(x, None, cos, sin, norm=False)[0]

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_fwd(dy, None, cos, sin, norm=False, transpose=True)[0], None, None


class _RopeQKNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, scale: float):
        qo, ko, qr, kr = _rope_fwd(q, k, cos, sin, norm=True, scale=scale)
        ctx.save_for_backward(qo, ko, qr, kr, cos, sin)
        ctx.scale = scale
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        qo, ko, qr, kr, cos, sin = ctx.saved_tensors
        dqo, dko, cos, sin = (last_dim_contiguous(t) for t in (dqo, dko, cos, sin))
        B, T, H, D = qo.shape
        dq, dk = torch.empty_like(qo), torch.empty_like(ko)
        if B * T * D and (H or ko.size(2)):
            _rope_qk_norm_bwd_kernel[(B * T,)](
                dqo, dko, qo, ko, qr, kr, cos, sin, dq, dk, T, H, ko.size(2),
                *_bth(dqo), *_bth(dko), *_bt(cos), *_bt(sin), ctx.scale,
                HALF=D // 2, **_meta(H, ko.size(2), D // 2),
            )
        return dq, dk, None, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Rotary embedding (rotation by -theta, half split).

    x: (B, T, H, D) floating, D even, any view with unit stride along D (others are copied once).
    cos, sin: (1 or B, T, 1, D/2), the angles of x's positions (already offset for cached decoding, e.g.
    ``cos[:, pos:pos + T]``). Returns (B, T, H, D) in x's dtype, contiguous on the kernel path.
    Differentiable in x (the kernel path treats cos and sin as constants).
    """
    _check_rope_inputs("x", x, cos, sin)
    if not use_kernel(impl, x, cos, sin, unsupported=_no_kernel_reason("x", x, x.size(2))):
        return apply_rope_ref(x, cos, sin)
    return _ApplyRope.apply(x, cos, sin)


def rope_qk_norm(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.2, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE, then QK-norm (RMSNorm over head_dim, default eps), then ``* scale``, for queries and keys.

    q: (B, T, H, D), k: (B, T, Hkv, D) (Hkv may differ from H), same dtype; any views with unit stride along
    D. cos, sin: (1 or B, T, 1, D/2), possibly a slice at a position offset. One kernel launch handles q
    and k. Returns (q, k) with their input shapes and dtypes (contiguous on the kernel path).
    Differentiable in q and k (the kernel path treats cos and sin as constants).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if q.shape[:2] != k.shape[:2] or q.size(-1) != k.size(-1):
        raise ValueError(
            f"q (B, T, H, D) and k (B, T, Hkv, D) must agree on B, T and D, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    _check_rope_inputs("q", q, cos, sin)
    _check_rope_inputs("k", k, cos, sin)
    if q.size(-1) == 0:
        raise ValueError(f"q and k must have head_dim >= 2 (QK-norm over head_dim), got shape {tuple(q.shape)}")
    scale = check_number("scale", scale, nonzero=True)
    if not use_kernel(impl, q, k, cos, sin, unsupported=_no_kernel_reason("q", q, max(q.size(2), k.size(2)))):
        return rope_qk_norm_ref(q, k, cos, sin, scale)
    return _RopeQKNorm.apply(q, k, cos, sin, float(scale))


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch RoPE. x (B, T, H, D); cos, sin broadcastable to (B, T, H, D/2). Returns x's dtype."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def rope_qk_norm_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RoPE, then RMSNorm over head_dim (default eps), then ``* scale``, for q and k."""
    q = rms_norm_ref(apply_rope_ref(q, cos, sin)) * scale
    k = rms_norm_ref(apply_rope_ref(k, cos, sin)) * scale
    return q, k
