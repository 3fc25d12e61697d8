"""RMSNorm over the last dim, without a weight: the model's ``norm``.

y = x / sqrt(mean(x^2 over the last dim) + eps), eps defaulting to ``torch.finfo(x.dtype).eps``.
Reads N x C, writes N x C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import check_eps, check_tensor, resolve_impl

# No Triton kernel yet: the public function always runs the reference.
_TRITON_AVAILABLE = False


def rms_norm_ref(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Plain-PyTorch RMSNorm; same semantics (and dtype handling) as ``F.rms_norm`` over the last dim."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rms_norm(x: torch.Tensor, eps: float | None = None, *, impl: str = "auto") -> torch.Tensor:
    """Weightless RMSNorm over the last dim.

    x: (..., C), any floating dtype. eps: None means ``torch.finfo(x.dtype).eps``.
    Returns a tensor of x's shape and dtype. Differentiable.
    """
    check_tensor("x", x, min_ndim=1)
    check_eps(eps)
    if x.size(-1) == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    resolve_impl(impl, x, available=_TRITON_AVAILABLE)
    return rms_norm_ref(x, eps)
