"""Softcapped cross-entropy, alone and fused with the lm_head projection.

z = softcap * tanh(logits / softcap) in fp32, then cross-entropy against integer targets, positions whose
target equals ``ignore_index`` contributing nothing. The mean divides by the number of counted targets
(at least 1), so a fully ignored batch gives a loss of 0.0 and zero gradients instead of NaN.
The references hold the N x V fp32 logits; the fused kernel is meant never to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import check_same_device, check_tensor, resolve_impl

_TRITON_AVAILABLE = False
REDUCTIONS = ("mean", "sum", "none")


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
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    flat = targets.reshape(-1)
    losses = F.cross_entropy(z, flat, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses.reshape(targets.shape)
    if reduction == "sum":
        return losses.sum()
    count = (flat != ignore_index).sum().clamp(min=1)
    return losses.sum() / count


def linear_softcap_cross_entropy_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch lm_head + softcapped cross-entropy. x (..., C); weight (Vp, C); targets (...)."""
    logits = F.linear(x, weight.to(x.dtype))
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return softcap_cross_entropy_ref(logits, targets, softcap, ignore_index, reduction)


def _check_ce_args(
    logits_shape: torch.Size,
    vocab: int,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    reduction: str,
) -> None:
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
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be None, 0 (disabled) or positive, got {softcap!r}")
    if vocab < 1:
        raise ValueError("the vocabulary (last dim of the logits) must be non-empty")
    # One host sync: an out-of-range target would otherwise be a device-side assert or silent garbage.
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} bad value(s), e.g. {first}"
        )


def softcap_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of softcapped logits, computed in fp32 (float64 for float64 logits).

    logits: (..., V) any floating dtype. targets: (...) integer, in [0, V) or ``ignore_index``.
    softcap: None or 0 disables the cap. reduction: "mean" over non-ignored targets (0.0 when all are
    ignored), "sum", or "none" (fp32, targets' shape, 0 at ignored positions). Differentiable in logits.
    """
    check_tensor("logits", logits, min_ndim=1)
    _check_ce_args(logits.shape, logits.size(-1), targets, softcap, ignore_index, reduction)
    check_same_device(logits=logits, targets=targets)
    resolve_impl(impl, logits, targets, available=_TRITON_AVAILABLE)
    return softcap_cross_entropy_ref(logits, targets, softcap, ignore_index, reduction)


def linear_softcap_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    vocab_size: int | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """The lm_head projection fused with softcapped cross-entropy.

    x: (..., C) floating (bf16 on GPU). weight: (Vp, C), cast to x's dtype (fp32 master allowed).
    targets: (...) integer. vocab_size: keep only the first vocab_size logits (rows of weight beyond it are
    padding and never reach the loss); None keeps all Vp. Other arguments as in ``softcap_cross_entropy``.
    Returns fp32 (float64 for float64 x). Differentiable in x and weight.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same_device(x=x, weight=weight, targets=targets)
    if weight.size(1) != x.size(-1):
        raise ValueError(f"weight must have shape (V, C) with C = x.size(-1) = {x.size(-1)}, got {tuple(weight.shape)}")
    if vocab_size is not None and not (type(vocab_size) is int and 1 <= vocab_size <= weight.size(0)):
        raise ValueError(f"vocab_size must be None or an int in [1, {weight.size(0)}], got {vocab_size!r}")
    vocab = weight.size(0) if vocab_size is None else vocab_size
    _check_ce_args(torch.Size((*x.shape[:-1], vocab)), vocab, targets, softcap, ignore_index, reduction)
    resolve_impl(impl, x, weight, targets, available=_TRITON_AVAILABLE)
    return linear_softcap_cross_entropy_ref(x, weight, targets, softcap, ignore_index, reduction, vocab_size)
