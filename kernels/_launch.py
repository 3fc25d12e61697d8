"""What every launcher in kernels/ repeats, written once: layouts, the interpreter's tl.dot up-cast, device
properties, warps for a block, and the autotuner with its cache of decisions.

Nothing here runs at import: device queries are cached functions, the tuner's cache fills on first use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import triton.language as tl

# ---- layouts ----------------------------------------------------------------------------------------------------


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (or length <= 1), else a contiguous copy.

    Kernels address the other dims through strides but read the last one with vector loads."""
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C) with unit stride along C: a view whenever reshape allows one."""
    return last_dim_contiguous(t.reshape(-1, t.size(-1)))


# ---- tl.dot operands --------------------------------------------------------------------------------------------


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_meta(t: torch.Tensor) -> dict:
    """The two constexprs of every kernel that calls tl.dot, for operands like ``t``; kernels write
    ``tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)``.

    DOT_DTYPE: the operands' dtype on CUDA (the cast is a no-op; 16-bit operands use the tensor cores); fp32 in
    the Triton interpreter (CPU tensors), whose tl.dot multiplies bfloat16 bit patterns (fp32 is exact there for
    fp16/bf16 inputs: their products are exact in fp32).
    DOT_PRECISION: "ieee" for fp32 operands (full fp32 products, as torch computes them), "tf32" otherwise
    (ignored by Triton for 16-bit operands). Written inline rather than through a jit helper: the interpreter
    pays for every nested call."""
    up = not t.is_cuda
    return {"DOT_DTYPE": tl.float32 if up else _TL_DTYPES.get(t.dtype, tl.float32),
            "DOT_PRECISION": "ieee" if up or t.dtype == torch.float32 else "tf32"}


# ---- device properties and launch shapes ------------------------------------------------------------------------


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _props(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _props(_index(device))[1]


def capability_major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA device (9 for Hopper; cached per device)."""
    return _props(_index(device))[0]


def num_warps_for(elements: int, *, lo: int = 1, hi: int = 16, per_warp: int = 512) -> int:
    """Warps for a program holding ``elements`` values: one warp per ``per_warp`` (16 fp32 values per thread),
    rounded down to a power of two within [lo, hi]."""
    warps = 1 << max(0, (max(1, elements // per_warp)).bit_length() - 1)
    return max(lo, min(hi, warps))


# ---- autotuning ---------------------------------------------------------------------------------------------------

_TUNED: dict[tuple, str] = {}  # the only module state in kernels/: decisions, key -> config name


def autotune(key: tuple, candidates: Sequence[str], run: Callable[[str], object],
             outputs: Sequence[torch.Tensor]) -> str:
    """The fastest of ``candidates`` for ``key``, timed once and remembered.

    run(name) launches the kernel(s) with one config and writes ``outputs`` (it must not accumulate into them).
    A config that fails to compile or launch (shared memory, registers, an API this Triton lacks) is skipped; so
    is one whose outputs differ from the first config that ran, so a config that compiles but computes garbage
    on this GPU cannot win. Raises RuntimeError when no candidate runs."""
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench  # imported on first use: nothing at module import

    best, best_ms, first, failures = None, math.inf, None, {}
    for name in candidates:
        try:
            ms = do_bench(lambda name=name: run(name), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - any failure of one config only removes it from the race
            failures[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        got = [o.detach().to(torch.float32, copy=True) for o in outputs]
        if first is None:
            first = got
        elif not all(torch.equal(g.isnan(), f.isnan()) and (g - f).nan_to_num().norm() <= 1e-2 * f.nan_to_num().norm()
                     for g, f in zip(got, first)):
            failures[name] = "result differs from the first config's"
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    if best is None:
        raise RuntimeError(f"no kernel config could run for {key}: {failures}")
    _TUNED[key] = best
    return best


def tuned_configs() -> dict[tuple, str]:
    """The autotuner's decisions so far: key (the kernel's name first) -> config name."""
    return dict(_TUNED)


def forget_tuned() -> None:
    """Drop every remembered decision (the next call of each shape tunes again)."""
    _TUNED.clear()
