"""Choosing between a Triton kernel and its PyTorch reference, and the input checks every op shares.

Every public op takes ``impl="auto" | "torch" | "triton"`` and asks ``resolve_impl`` which path to run.
The environment is read when an op is called, never at import time.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str, *tensors: torch.Tensor | None, available: bool) -> str:
    """Return ``"torch"`` or ``"triton"`` for one call of an op.

    impl: ``"auto"`` picks Triton when a kernel exists (``available``) and either every tensor is on CUDA or
        ``TRITON_INTERPRET=1`` is set (the interpreter runs kernels on CPU tensors); otherwise the reference.
        ``"torch"`` always picks the reference. ``"triton"`` picks the kernel and raises
        ``NotImplementedError`` when there is none.
    tensors: the op's tensor arguments (``None`` entries are skipped).
    available: whether this op has a Triton kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not available:
            raise NotImplementedError(
                "impl='triton' was requested but this op has no Triton kernel yet; use impl='torch' or impl='auto'"
            )
        return "triton"
    if not available:
        return "torch"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    present = [t for t in tensors if t is not None]
    if present and all(t.is_cuda for t in present):
        return "triton"
    return "torch"


def check_tensor(
    name: str, t: object, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int = 0, floating: bool = True
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the expected rank and (floating) dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.ndim not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all named tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_eps(eps: float | None) -> None:
    """Raise ValueError unless ``eps`` is None or a non-negative number."""
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0):
        raise ValueError(f"eps must be None or a non-negative float, got {eps!r}")
