"""The ReLU^2 MLP: y = relu(x W_fc^T)^2 W_proj^T, weights cast to the activation dtype.

With x (N, C), W_fc (Hd, C), W_proj (C_out, Hd), z = x W_fc^T, h = relu(z)^2:

    forward    h  = relu(x W_fc^T)^2    Triton GEMM, relu^2 in the epilogue: z never reaches memory
               y  = h W_proj^T          cuBLAS
    backward   dW_proj = dy^T h         cuBLAS
               dz = 2 relu(z) (dy W_proj) = 2 sqrt(h) (dy W_proj)
                                        Triton GEMM, the derivative in the epilogue: dh never reaches memory
               dW_fc = dz^T x,  dx = dz W_fc   cuBLAS

What is saved for backward: h only (plus x and the cast weights, which any MLP keeps). h must be written anyway
(it is the second GEMM's input), and relu(z) = sqrt(h) recovers the gate and its value, so saving z as well
would add an N x Hd write in forward and a read in backward for nothing. Precision: in bf16, h carries a
relative error of 2^-9, so sqrt(h) carries 2^-10, the order of storing relu(z) itself in bf16 (underflow of z^2
needs relu(z) < 1e-19). In fp16, h under 2^-14 is subnormal (spacing 2^-24), so sqrt(h) is off by at most 2^-12
in absolute terms there, and dz by 2^-11 |dh|; fp32 loses nothing that matters.

N x Hd passes besides the GEMMs' own operands: eager forward writes z, reads z and writes relu(z), reads that and
writes h (5 passes); backward writes dh, reads dh and relu(z) and writes d relu(z), reads that and relu(z) again and
writes dz (at least 7 passes). Here forward writes h (1 pass) and backward reads h and writes dz (2 passes),
besides the read of h that dW_proj = dy^T h needs either way. At N=32768, Hd=6144, bf16 one pass is 403 MB.
FLOPs: 2*N*C*Hd per GEMM; forward 2 GEMMs, backward 4 (6 in all per training step, 12*N*C*Hd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tritonchat.kernels._dispatch import check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels.matmul import GEMM_CONFIGS, gemm

__all__ = ["relu2_mlp", "relu2_mlp_ref"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # other dtypes run the reference under "auto"


def _relu2_mlp_fwd(x2d, w_fc, w_proj, config):
    """x2d (N, C), w_fc (Hd, C), w_proj (C_out, Hd), all contiguous in one dtype. Returns y (N, C_out), h (N, Hd)."""
    h = gemm(x2d, w_fc, trans_b=True, epilogue="relu2", config=config)
    return torch.matmul(h, w_proj.t()), h


def _relu2_mlp_bwd(dy, x2d, w_fc, w_proj, h, config, needs=(True, True, True)):
    """Gradients (dx, dW_fc, dW_proj) in the activation dtype; None where `needs` says no."""
    need_x, need_fc, need_proj = needs
    dx = dw_fc = dw_proj = None
    if need_proj:
        dw_proj = torch.matmul(dy.t(), h)
    if need_x or need_fc:
        dz = gemm(dy, w_proj, trans_b=False, epilogue="relu2_grad", aux=h, config=config)
        if need_fc:
            dw_fc = torch.matmul(dz.t(), x2d)
        if need_x:
            dx = torch.matmul(dz, w_fc)
    return dx, dw_fc, dw_proj


class _Relu2MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w_fc, w_proj, config):
        y, h = _relu2_mlp_fwd(x2d, w_fc, w_proj, config)
        ctx.save_for_backward(x2d, w_fc, w_proj, h)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, w_fc, w_proj, h = ctx.saved_tensors
        grads = _relu2_mlp_bwd(dy.contiguous(), x2d, w_fc, w_proj, h, ctx.config, ctx.needs_input_grad[:3])
        return (*grads, None)


def relu2_mlp(
    x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, *, impl: str = "auto", config: str | None = None
) -> torch.Tensor:
    """ReLU^2 MLP: ``F.linear(relu(F.linear(x, w_fc))**2, w_proj)`` with both weights cast to x's dtype.

    x: (..., C) floating (bf16 on GPU). w_fc: (Hd, C), w_proj: (C_out, Hd), usually fp32 masters
    (Hd = 4C and C_out = C in the model). Returns (..., C_out) in x's dtype. Differentiable,
    gradients flow to the fp32 weights through the cast.
    impl: "auto" runs the Triton kernels on CUDA (or under TRITON_INTERPRET=1) for fp32/bf16/fp16 x and the
    reference otherwise; "torch" / "triton" force one path ("triton" raises TypeError for other dtypes).
    config: Triton path only: a name in ``kernels.matmul.GEMM_CONFIGS`` pinned for both Triton GEMMs, or None
    (autotuned on CUDA, the interpreter's small config on CPU).
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
    if config is not None and config not in GEMM_CONFIGS:
        raise ValueError(f"config must be None or one of {tuple(GEMM_CONFIGS)}, got {config!r}")
    if not use_kernel(impl, x, w_fc, w_proj, unsupported=dtype_error("x", x, _KERNEL_DTYPES)):
        return relu2_mlp_ref(x, w_fc, w_proj)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.size(-1)).contiguous()  # (N, C); reshape(-1, C) fails for C = 0
    # The casts stay outside the Function: autograd turns the activation-dtype weight grads back into fp32.
    w_fc_c = w_fc.to(x.dtype).contiguous()
    w_proj_c = w_proj.to(x.dtype).contiguous()
    y = _Relu2MLPFunction.apply(x2d, w_fc_c, w_proj_c, config)
    return y.view(*lead, w_proj.size(0))


def relu2_mlp_ref(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ReLU^2 MLP. x (..., C); w_fc (Hd, C); w_proj (C_out, Hd). Returns (..., C_out), x's dtype."""
    h = F.linear(x, w_fc.to(x.dtype))
    h = F.relu(h).square()
    return F.linear(h, w_proj.to(x.dtype))
