"""The ReLU^2 MLP: y = relu(x W_fc^T)^2 W_proj^T, weights cast to the activation dtype.

FLOPs: 2 x N x C x Hd for each of the two GEMMs (forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import check_same_device, check_tensor, resolve_impl

_TRITON_AVAILABLE = False


def relu2_mlp_ref(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ReLU^2 MLP. x (..., C); w_fc (Hd, C); w_proj (C_out, Hd). Returns (..., C_out), x's dtype."""
    h = F.linear(x, w_fc.to(x.dtype))
    h = F.relu(h).square()
    return F.linear(h, w_proj.to(x.dtype))


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """ReLU^2 MLP: ``F.linear(relu(F.linear(x, w_fc))**2, w_proj)`` with both weights cast to x's dtype.

    x: (..., C) floating (bf16 on GPU). w_fc: (Hd, C), w_proj: (C_out, Hd), usually fp32 masters
    (Hd = 4C and C_out = C in the model). Returns (..., C_out) in x's dtype. Differentiable,
    gradients flow to the fp32 weights through the cast.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("w_fc", w_fc, ndim=2)
    check_tensor("w_proj", w_proj, ndim=2)
    check_same_device(x=x, w_fc=w_fc, w_proj=w_proj)
    if w_fc.size(1) != x.size(-1):
        raise ValueError(f"w_fc must have shape (Hd, C) with C = x.size(-1) = {x.size(-1)}, got {tuple(w_fc.shape)}")
    if w_proj.size(1) != w_fc.size(0):
        raise ValueError(
            f"w_proj must have shape (C_out, Hd) with Hd = w_fc.size(0) = {w_fc.size(0)}, got {tuple(w_proj.shape)}"
        )
    resolve_impl(impl, x, w_fc, w_proj, available=_TRITON_AVAILABLE)
    return relu2_mlp_ref(x, w_fc, w_proj)
