"""Softcapped cross-entropy over logits (the lm_head fused version is kernels/linear_cross_entropy.py).

z = softcap * tanh(logits / softcap) in fp32, then cross-entropy against integer targets, positions whose
target equals ``ignore_index`` contributing nothing. The mean divides by the number of counted targets
(at least 1), so a fully ignored batch gives a loss of 0.0 and zero gradients instead of NaN.
The reference holds the N x V fp32 logits; the fused op (kernels/linear_cross_entropy.py) never does, and
drives this file's row kernel through ``ce_rows``.

One kernel does the per-row work. With lse = log(sum_j exp(z_j)) and p = exp(z - lse):
    loss = lse - z[target]
    dloss/dlogits_j = scale * (p_j - [j == target]) * (1 - tanh(logits_j / c)^2)
where scale is the upstream gradient of the row (1/count for "mean", 1 for "sum", the caller's per-row
gradient for "none") and 0 for an ignored row. Pass 1 streams the row in blocks of BLOCK_V with an online
log-sum-exp (running max m, running sum s rescaled by exp(m_old - m_new)); pass 2, only when a gradient is
wanted, streams it again and writes the gradient, optionally over the logits themselves (each element is
read before it is written, and a program touches only its own row).
Bytes over N rows of V logits of s bytes: forward-only reads N*V*s; with the gradient reads 2*N*V*s (the
second read of a row mostly hits L2) and writes N*V*s; plus 4 bytes of loss and 8 of target per row.

tanh is evaluated as sign(u) * (1 - e) / (1 + e) with e = exp(-2|u|) <= 1, so no logit (1e4, 1e30, inf)
can overflow it, switching to its Taylor series below |u| = 1/8 where 1 - e would cancel; the slope
1 - tanh^2 is 4e / (1 + e)^2, exact to a few ulps at both ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_number, check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._launch import as_rows, num_warps_for

__all__ = ["softcap_cross_entropy", "softcap_cross_entropy_ref"]
REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel does fp32 math on these
_MAX_BLOCK_V = 4096  # columns per step of the row loop: 16 fp32 registers per thread at 8 warps


@triton.jit
def _tanh(u):
    """(tanh(u), e = exp(-2|u|)) in fp32, finite for every finite or infinite u."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)  # in [0, 1]: the exponent is never positive
    a2 = a * a
    # tanh(a) = a - a^3/3 + 2a^5/15 - 17a^7/315 + O(a^9); the next term is < 2e-9 relative at a = 1/8
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -t, t), e


@triton.jit
def _softcap_ce_kernel(
    LOGITS,  # (N, V) logits in any float dtype, unit stride along V
    GRAD,  # (N, V) out: dloss/dlogits in GRAD's dtype, unit stride along V; may be LOGITS itself
    TARGETS,  # (N,) integer class ids, or ignore_index
    LOSS,  # (N,) fp32 out: lse - z[target], 0 where the target is ignored
    SCALE,  # fp32 gradient scale: (N,) one per row if ROW_SCALE, else a single value
    stride_logits,  # elements between consecutive rows of LOGITS
    stride_grad,  # elements between consecutive rows of GRAD
    V,  # classes per row
    ignore_index,  # the target value of a row that is not counted
    softcap,  # c in z = c * tanh(logits / c); unused unless HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,  # False: z = logits
    COMPUTE_GRAD: tl.constexpr,  # False: only the loss (evaluation), one pass
    ROW_SCALE: tl.constexpr,  # True: SCALE holds one value per row
    BLOCK_V: tl.constexpr,  # power of two, columns per loop step
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    counted = target != ignore_index
    x_row = LOGITS + row * stride_logits
    cols = tl.arange(0, BLOCK_V)

    # z[target], read directly (an ignored row reads column 0 and discards it)
    z_target = tl.load(x_row + tl.where(counted, target, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        t_target, e_target = _tanh(z_target / softcap)
        z_target = softcap * t_target

    # pass 1: online log-sum-exp of z
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t, e = _tanh(z / softcap)
            z = softcap * t
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # lse = m + log(s); with |z| ~ 1e4 the fp32 lse would lose ~1e-3 of absolute precision, so keep
    # the differences to m exact: loss = (m - z[target]) + log(s), p = exp(z - m) / s
    tl.store(LOSS + row, tl.where(counted, (m - z_target) + tl.log(s), 0.0))

    # pass 2: gradient, scale * (p - onehot) * slope
    if COMPUTE_GRAD:
        if ROW_SCALE:
            scale = tl.load(SCALE + row)
        else:
            scale = tl.load(SCALE)
        scale = tl.where(counted, scale, 0.0) / s
        g_row = GRAD + row * stride_grad
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t, e = _tanh(z / softcap)
                z = softcap * t
                slope = 4.0 * e / ((1.0 + e) * (1.0 + e))  # 1 - tanh^2 = 1/cosh^2 = 4e/(1+e)^2
            else:
                slope = 1.0
            g = (tl.exp(z - m) - tl.where(idx == target, s, 0.0)) * (scale * slope)  # s*(p - onehot) * scale/s
            g = tl.where(counted, g, 0.0)  # an ignored row gets exact zeros, whatever its logits (NaN included)
            tl.store(g_row + idx, g.to(GRAD.dtype.element_ty), mask=mask)


def ce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    row_scale: bool = False,
    block_v: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses (N,) fp32 of logits (N, V) with unit column stride against targets (N,).

    grad: None (loss only) or an (N, V) buffer with unit column stride that receives the gradient scaled by
    ``scale`` (fp32, one value, or (N,) when row_scale); it may be ``logits`` itself (overwritten in place).
    block_v: columns per loop step (a power of two); default min(next_pow2(V), 4096).
    out: an (N,) fp32 contiguous buffer for the losses (default: a new one). Returns the losses.
    """
    n, v = logits.shape
    if logits.stride(1) != 1 or targets.shape != (n,) or not targets.is_contiguous():
        raise ValueError(f"logits must be (N, V) with unit column stride and targets (N,) contiguous, got "
                         f"{tuple(logits.shape)}/{logits.stride()} and {tuple(targets.shape)}")
    if grad is not None:
        if grad.shape != logits.shape or grad.stride(1) != 1 or scale is None or scale.dtype != torch.float32:
            raise ValueError("grad must be shaped like logits with unit column stride, and scale an fp32 tensor")
        if scale.numel() != (n if row_scale else 1) or not scale.is_contiguous():
            raise ValueError(f"scale must hold {n if row_scale else 1} contiguous value(s), got {scale.numel()}")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device) if out is None else out
    if losses.shape != (n,) or losses.dtype != torch.float32 or not losses.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n},) fp32 tensor")
    if n == 0:
        return losses
    block = block_v or min(triton.next_power_of_2(v), _MAX_BLOCK_V)
    _softcap_ce_kernel[(n,)](
        logits, logits if grad is None else grad, targets, losses, losses if scale is None else scale,
        logits.stride(0), logits.stride(0) if grad is None else grad.stride(0), v, ignore_index,
        float(softcap) if softcap else 1.0,
        HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=grad is not None, ROW_SCALE=row_scale, BLOCK_V=block,
        num_warps=num_warps_for(block, lo=4, hi=8),
    )
    return losses


def mean_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, scale): counted targets (at least 1) and the per-row gradient scale of a "mean"/"sum" loss,
    both on the targets' device (no host sync)."""
    count = (targets != ignore_index).sum().clamp(min=1)
    scale = count.reciprocal().float() if reduction == "mean" else torch.ones((), device=targets.device)
    return count, scale.reshape(1)


def reduce_losses(losses: torch.Tensor, count: torch.Tensor, shape: torch.Size, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses.view(shape)
    return losses.sum() if reduction == "sum" else losses.sum() / count


def check_ce_args(
    logits_shape: torch.Size,
    vocab: int,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    reduction: str,
    vocab_name: str = "logits (last dim)",
) -> None:
    """The argument checks shared by both cross-entropies (values of the targets: ``check_target_values``)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != logits_shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the logits' leading shape {tuple(logits_shape[:-1])}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if softcap is not None:
        check_number("softcap", softcap, lo=0.0)  # 0 disables the cap
    if vocab < 1:
        raise ValueError(f"the vocabulary must be non-empty: {vocab_name} has size 0")


def check_target_values(targets: torch.Tensor, vocab: int, ignore_index: int, check_targets: bool) -> None:
    """Every target in [0, vocab) or ignore_index: one host sync on CUDA (call it after the device check)."""
    if not check_targets or torch.compiler.is_compiling():
        return
    # An out-of-range target would otherwise be a device-side assert or silent garbage.
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} bad value(s), e.g. {first}"
        )


class _SoftcapCE(torch.autograd.Function):
    """"mean"/"sum": the gradient is computed with the loss and scaled by the upstream scalar in backward.
    "none": the forward computes losses only; backward re-reads the logits with the per-row upstream grads."""

    @staticmethod
    def forward(ctx, logits, targets, softcap, ignore_index, reduction):
        z, t = as_rows(logits), targets.reshape(-1).contiguous()
        ctx.meta = (logits.shape, softcap, ignore_index, reduction)
        if reduction == "none":
            ctx.save_for_backward(z, t)
            return ce_rows(z, t, softcap, ignore_index).view(targets.shape)
        count, scale = mean_scale(t, ignore_index, reduction)
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # contiguous, whatever z's row stride
        losses = ce_rows(z, t, softcap, ignore_index, grad=grad, scale=scale)
        ctx.save_for_backward(grad)
        return reduce_losses(losses, count, targets.shape, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        shape, softcap, ignore_index, reduction = ctx.meta
        if reduction == "none":
            z, t = ctx.saved_tensors
            grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
            ce_rows(z, t, softcap, ignore_index, grad=grad, scale=dloss.reshape(-1).float().contiguous(),
                     row_scale=True)
        else:
            (grad,) = ctx.saved_tensors
            grad = grad * dloss
        return grad.view(shape), None, None, None, None


def softcap_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    *,
    impl: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """Cross-entropy of softcapped logits, computed in fp32 (float64 for float64 logits).

    logits: (..., V) any floating dtype (the kernel takes fp32/bf16/fp16; float64 runs the reference).
    targets: (...) integer, in [0, V) or ``ignore_index``. softcap: None or 0 disables the cap.
    reduction: "mean" over non-ignored targets (0.0 when all are ignored), "sum", or "none" (fp32, targets'
    shape, 0 at ignored positions). Differentiable in logits; the gradient has the logits' dtype.
    check_targets: verify every target is in range (one host sync on CUDA); pass False only for targets
    known to be valid (e.g. a training loop's own tokens).
    """
    check_tensor("logits", logits, min_ndim=1)
    check_ce_args(logits.shape, logits.size(-1), targets, softcap, ignore_index, reduction)
    check_same_device(logits=logits, targets=targets)
    check_target_values(targets, logits.size(-1), ignore_index, check_targets)
    if not use_kernel(impl, logits, targets, unsupported=dtype_error("logits", logits, _KERNEL_DTYPES)):
        return softcap_cross_entropy_ref(logits, targets, softcap, ignore_index, reduction)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftcapCE.apply(logits, targets, softcap, ignore_index, reduction)
    t = targets.reshape(-1).contiguous()
    count, _ = mean_scale(t, ignore_index, reduction)
    return reduce_losses(ce_rows(as_rows(logits), t, softcap, ignore_index), count, targets.shape, reduction)


def softcap_cross_entropy_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain-PyTorch softcapped cross-entropy. logits (..., V) any float dtype; targets (...) integer.

    Returns a scalar ("mean", "sum") or losses shaped like targets ("none", 0 where ignored), in fp32
    (float64 when the logits are float64).
    """
    # fp32 for bf16/fp16/fp32 logits; float64 stays float64 (useful for gradcheck).
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.size(-1))
    flat = targets.reshape(-1).long()  # F.cross_entropy takes int64 class ids only
    if z.requires_grad:  # an ignored row's logits must not reach its gradient (NaN there would stay NaN)
        z = z.masked_fill((flat == ignore_index)[:, None], 0.0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    losses = F.cross_entropy(z, flat, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses.reshape(targets.shape)
    if reduction == "sum":
        return losses.sum()
    count = (flat != ignore_index).sum().clamp(min=1)
    return losses.sum() / count
