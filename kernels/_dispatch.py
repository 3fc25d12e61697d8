"""Choosing between a Triton kernel and its PyTorch reference, and the input checks every op shares.

One vocabulary everywhere (ops, model, engine, optimizer, command lines): ``impl="auto" | "torch" | "triton"``.
    "torch"   the PyTorch reference, always;
    "triton"  the Triton kernel, or a clear error when it cannot take the inputs;
    "auto"    the kernel when the tensors live where kernels run (CUDA, or CPU under ``TRITON_INTERPRET=1``,
              the Triton interpreter) and the kernel takes the inputs; the reference otherwise.
``resolve_impl`` turns "auto" into "torch" or "triton" for a device (the model, engine and trainer call it once,
when they are built); ``use_kernel`` is the per-call decision every op makes. The environment is read when
they are called, never at import time.
"""

from __future__ import annotations

import math
import os

import torch

IMPLS = ("auto", "torch", "triton")


_COMPILED: dict = {}


def compiled(fn, dynamic: bool = False):
    """``torch.compile(fn, dynamic=dynamic)``, built once per (function, dynamic) on first use, never at import.

    For the references' fused math where no Triton kernel runs (a CPU): dynamic=False compiles once per input
    shape (the trainer's shapes are fixed); dynamic=True once for elementwise math over flat tensors of any size.
    Hyperparameters that change from step to step go in as 0-D tensors, so they never cause a recompile."""
    key = (fn, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[key]


def _check_impl(impl: object) -> None:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _kernel_device(device: torch.device) -> bool:
    """Whether Triton kernels run on tensors of this device: CUDA, or the CPU under the Triton interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"triton"``: what ``impl`` means for work on ``device``.

    "auto" resolves to "triton" on CUDA (and on the CPU when ``TRITON_INTERPRET=1``), else to "torch";
    "torch" and "triton" are returned as they are. Raises ValueError for any other name.
    """
    _check_impl(impl)
    if impl != "auto":
        return impl
    return "triton" if _kernel_device(torch.device(device)) else "torch"


def use_kernel(impl: str, *tensors: torch.Tensor | None, unsupported: Exception | None = None) -> bool:
    """The one decision of an op call: True runs the Triton kernel, False the reference.

    tensors: the op's tensor arguments (``None`` entries are skipped; the op has checked they share a device).
    unsupported: None when the kernel takes these inputs, else the error that says why not (a TypeError for a
        dtype, a ValueError for a size); impl="auto" then takes the reference and impl="triton" raises it.
    impl="triton" on tensors where no kernel can run (a CPU tensor without the interpreter) raises ValueError.
    """
    _check_impl(impl)
    if impl == "torch":
        return False
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if not _kernel_device(device):
        if impl == "triton":
            raise ValueError(
                f"impl='triton' runs Triton kernels on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1); "
                f"the inputs are on {device}"
            )
        return False
    if unsupported is not None:
        if impl == "triton":
            raise unsupported
        return False
    return True


def dtype_error(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> TypeError | None:
    """The TypeError that says a kernel does not take ``t``'s dtype, or None when it does."""
    if t.dtype in dtypes:
        return None
    return TypeError(f"the Triton kernel takes {name} in {', '.join(map(str, dtypes))}, got {t.dtype}")


def _check_tensor_device(name: str, t: object) -> None:
    """TypeError unless ``t`` is a tensor, ValueError unless it lives on the CPU or a CUDA device (not meta)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be a CPU or CUDA tensor, got a tensor on {t.device}")


def check_tensor(
    name: str, t: object, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int = 0, floating: bool = True
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a CPU or CUDA tensor of the expected rank and (floating) dtype."""
    _check_tensor_device(name, t)
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
    """Raise TypeError unless all are tensors, ValueError unless they live on one device, a CPU or CUDA one."""
    for name, t in tensors.items():
        _check_tensor_device(name, t)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_eps(eps: float | None) -> None:
    """Raise unless ``eps`` is None or a finite non-negative number (see ``check_number``)."""
    if eps is not None:
        check_number("eps", eps, lo=0.0)


def check_number(name: str, v: object, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, nonzero: bool = False) -> float:
    """``v`` as a float; TypeError unless a real number (not a bool), ValueError unless finite and in bounds."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if ok and nonzero:
        ok = v != 0
    if not ok:
        bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi}"] if hi is not None else []
        bounds += ["!= 0"] if nonzero else []
        raise ValueError(f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {v!r}")
    return float(v)
