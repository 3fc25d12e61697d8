"""Rotary position embedding (half split, rotation by -theta) and the fused RoPE + QK-norm + scale.

With x1 = x[..., :D/2] and x2 = x[..., D/2:]:
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
This is a rotation of each (x1_j, x2_j) pair by -angle_j; checkpoints depend on this sign convention.
apply_rope reads B x T x H x D (plus cos/sin, T x D/2 each) and writes B x T x H x D.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check_same_device, check_tensor, resolve_impl
from kernels.rms_norm import rms_norm_ref

_TRITON_AVAILABLE = False


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Rotary embedding (rotation by -theta, half split).

    x: (B, T, H, D) floating, D even. cos, sin: (1 or B, T, 1, D/2), the angles of x's positions
    (already offset for cached decoding). Returns (B, T, H, D) in x's dtype. Differentiable.
    """
    _check_rope_inputs("x", x, cos, sin)
    resolve_impl(impl, x, cos, sin, available=_TRITON_AVAILABLE)
    return apply_rope_ref(x, cos, sin)


def rope_qk_norm(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.2, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE, then QK-norm (RMSNorm over head_dim, default eps), then ``* scale``, for queries and keys.

    q: (B, T, H, D), k: (B, T, Hkv, D) (Hkv may differ from H), same dtype. cos, sin: (1 or B, T, 1, D/2).
    Returns (q, k) with their input shapes and dtypes. Differentiable.
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
    resolve_impl(impl, q, k, cos, sin, available=_TRITON_AVAILABLE)
    return rope_qk_norm_ref(q, k, cos, sin, scale)
