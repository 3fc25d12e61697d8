"""Causal attention with an optional sliding window and grouped-query heads: Triton flash attention
(forward and backward) and its PyTorch reference.

Queries are the last Tq of Tk positions: query i sits at absolute position p = Tk - Tq + i and sees key j
iff j <= p and p - j <= window (window None: no limit; window 0: only itself). Every query therefore
sees at least one key. Query head h reads key/value head h // (H / Hkv).
FLOPs (forward): 4 x B x H x D x (number of visible (query, key) pairs); backward 2.5x that (five
matmuls per tile against two, the score matmul recomputed).

The kernels live in kernels/flash_attention_kernels.py. Tile shapes come from ATTENTION_CONFIGS: on CUDA
each kernel is autotuned over that list by ``kernels._launch.autotune`` (keyed by power-of-two size buckets,
so a growing sequence does not re-tune on every length); ``config="<name>"`` pins one entry, which is also
what CPU tensors (the Triton interpreter) get by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
from tritonchat.kernels._dispatch import check_number, check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._launch import autotune, capability_major, dot_meta, last_dim_contiguous
from tritonchat.kernels.flash_attention_kernels import (
    attn_bwd_delta_kernel,
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_fwd_kernel,
)

__all__ = ["flash_attention", "flash_attention_ref", "ATTENTION_CONFIGS"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp32 accumulation inside
_MAX_HEAD_DIM = 128  # larger heads run the reference under impl="auto"
_LOG2E = 1.4426950408889634
_DELTA_BLOCK = 64  # rows per program of the backward's delta = rowsum(dO * O)


# name -> (held, iterated, num_warps, num_stages). "held" is the tile a program keeps in registers (query
# rows in the forward and dQ kernels, keys in the dK/dV kernel); "iterated" is the tile its loop steps over.
ATTENTION_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "h128_i64_w8_s3": (128, 64, 8, 3),
    "h128_i128_w8_s2": (128, 128, 8, 2),
    "h128_i32_w4_s3": (128, 32, 4, 3),
    "h128_i32_w8_s3": (128, 32, 8, 3),
    "h128_i32_w8_s4": (128, 32, 8, 4),
    "h64_i64_w4_s3": (64, 64, 4, 3),
    "h64_i32_w4_s4": (64, 32, 4, 4),
    "h16_i16_w4_s1": (16, 16, 4, 1),  # short sequences and one-token decode; many tile boundaries in tests
}


# What the autotuner may pick, per kernel and operand width: `python -m bench.compile_report` compiles each for
# sm_90 at D = 128, and every candidate here fits shared memory and spills no register (the other named configs
# spill: 128x128 tiles in every kernel, 128x32 at 4 warps). The dK/dV kernel holds two 128 x D fp32 accumulators
# (64 registers per thread each at 8 warps) beside the S^T and dP^T tiles, so its 128-key tiles step 32 query rows
# (224 registers at 3 stages); stepping 64 rows needs ~256 and spills at every pipelined depth (72-216 bytes at 2-4
# stages; only the unpipelined 1-stage compile fits, at 254, with nothing to hide its load latency at 1 block/SM).
# fp32 operands take twice the shared memory and registers: at D = 128 even 32x32 tiles spill, so fp32 runs 16x16.
_SPACE_16BIT = ("h128_i64_w8_s3", "h64_i64_w4_s3", "h64_i32_w4_s4", "h16_i16_w4_s1")
_SPACE_DKDV_16BIT = ("h128_i32_w8_s3", "h128_i32_w8_s4", "h64_i32_w4_s4", "h16_i16_w4_s1")
_SPACE_FP32 = ("h16_i16_w4_s1",)
# Below sm_90 the dots are mma.sync, whose accumulators take more registers: these 8-warp 128-row tiles spill there
# (8-32 bytes at sm_80: `python -m bench.compile_report --arch 80`), so they are Hopper-only candidates.
_SM90_ONLY = frozenset({"h128_i64_w8_s3", "h128_i32_w8_s3", "h128_i32_w8_s4"})


INTERPRETER_CONFIG = "h64_i32_w4_s4"  # the CPU default: few, unequal tiles (the interpreter pays per tile)
_KERNELS = {  # kind -> (kernel, whether the held tile is the query tile BLOCK_M)
    "fwd": (attn_fwd_kernel, True),
    "dq": (attn_bwd_dq_kernel, True),
    "dkdv": (attn_bwd_dkdv_kernel, False),
}


def autotune_space(kind: str, dtype: torch.dtype, major: int = 9) -> tuple[str, ...]:
    """The ATTENTION_CONFIGS names the autotuner times for kernel `kind` ("fwd", "dq", "dkdv") on `dtype` inputs on a
    GPU of compute capability `major`.x."""
    if dtype == torch.float32:
        return _SPACE_FP32
    space = _SPACE_DKDV_16BIT if kind == "dkdv" else _SPACE_16BIT
    return space if major >= 9 else tuple(n for n in space if n not in _SM90_ONLY)


def _blocks(name: str, held_is_m: bool) -> dict[str, int]:
    held, iterated = ATTENTION_CONFIGS[name][:2]
    return {"BLOCK_M": held, "BLOCK_N": iterated} if held_is_m else {"BLOCK_M": iterated, "BLOCK_N": held}


def _launch(kind: str, config: str | None, key: tuple, grid, outputs: tuple, *args, **consts) -> None:
    """Run kernel `kind` with the pinned config, or with the autotuned one for `key` when config is None.
    grid(block_m, block_n) gives the launch grid; `outputs` are what the kernel writes (compared across configs
    by the tuner)."""
    kernel, held_is_m = _KERNELS[kind]

    def run(name: str) -> None:
        blocks = _blocks(name, held_is_m)
        _, _, num_warps, num_stages = ATTENTION_CONFIGS[name]
        kernel[grid(blocks["BLOCK_M"], blocks["BLOCK_N"])](*args, **consts, **blocks, num_warps=num_warps,
                                                          num_stages=num_stages)

    if config is None:
        q = args[0]
        major = capability_major(q.device) if q.is_cuda else 9  # the interpreter tunes the Hopper space
        config = autotune(("attention", kind, *key), autotune_space(kind, key[1], major), run, outputs)
    run(config)


def _check_config(config: str | None) -> None:
    if config is not None and config not in ATTENTION_CONFIGS:
        raise ValueError(f"config must be None (autotune) or one of {sorted(ATTENTION_CONFIGS)}, got {config!r}")


def _constants(q: torch.Tensor, k: torch.Tensor, causal: bool, window: int | None) -> tuple[int, dict, tuple]:
    """(window as an int, the kernels' shared constexprs, the autotuning key: size buckets and constexprs)."""
    tq, tk, h, hkv, d = q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)
    windowed = causal and window is not None and window < tk - 1  # a wider window masks nothing
    consts = dict(GROUP=h // hkv, CAUSAL=bool(causal), WINDOWED=windowed, HEAD_DIM=d,
                  BLOCK_D=max(16, triton.next_power_of_2(d)), **dot_meta(q))
    key = (q.device.index, q.dtype, triton.next_power_of_2(tq), triton.next_power_of_2(tk),
           triton.next_power_of_2(window + 1) if windowed else 0, *consts.values())
    return (window if windowed else 0), consts, key


def _attention_forward(q, k, v, causal: bool, window: int | None, scale: float, config: str | None):
    """o (B, Tq, H, D) in q's dtype and lse2 (B, H, Tq) fp32 (log2 of the softmax denominator, base-2 scores)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    b, tq, h, _ = q.shape
    tk = k.size(1)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    win, consts, key = _constants(q, k, causal, window)
    _launch(
        "fwd", config, key, lambda bm, bn: (triton.cdiv(tq, bm), b * h), (o, lse),
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        h, tq, tk, win, scale * _LOG2E, **consts,
    )
    return o, lse


def _attention_backward(do, q, k, v, o, lse, causal: bool, window: int | None, scale: float, config: str | None):
    """dq, dk, dv (dk, dv summed over the query heads sharing each kv head)."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    b, tq, h, d = q.shape
    tk, hkv = k.size(1), k.size(2)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    win, consts, key = _constants(q, k, causal, window)
    delta = torch.empty_like(lse)
    attn_bwd_delta_kernel[(triton.cdiv(tq, _DELTA_BLOCK), b * h)](
        o, do, delta, *_strides(o), *_strides(do), h, tq,
        HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], BLOCK_M=_DELTA_BLOCK,
    )
    _launch(
        "dkdv", config, key, lambda bm, bn: (triton.cdiv(tk, bn), b * hkv), (dk, dv),
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        h, hkv, tq, tk, win, scale * _LOG2E, scale, **consts,
    )
    _launch(
        "dq", config, key, lambda bm, bn: (triton.cdiv(tq, bm), b * h), (dq,),
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        h, tq, tk, win, scale * _LOG2E, scale, **consts,
    )
    return dq, dk, dv


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _no_kernel_reason(q: torch.Tensor) -> Exception | None:
    """Why the kernels cannot take q (float64, heads over 128), or None (flash_attention has checked the rest)."""
    if q.size(3) > _MAX_HEAD_DIM:
        return ValueError(f"the Triton kernel takes q with head_dim <= {_MAX_HEAD_DIM}, got {q.size(3)}")
    return dtype_error("q", q, _KERNEL_DTYPES)


def _scores_bounded(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> bool:
    """True when every score q.k * scale is finite and positive scale: then SDPA's boolean mask (added as -inf)
    gives exactly the masked softmax. A NaN or inf in q or k, or scores that could overflow, take the explicit
    path, where a masked key's inf or NaN never reaches a visible one."""
    if scale is not None and scale <= 0 or q.numel() == 0 or k.numel() == 0:
        return False
    f = torch.promote_types(q.dtype, torch.float32)
    sm = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    bound = q.detach().abs().amax().to(f) * k.detach().abs().amax().to(f) * (q.size(-1) * sm)
    return bool(bound < torch.finfo(f).max / 4)  # NaN compares False


def attention_mask(tq: int, tk: int, window: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i (at position Tk - Tq + i) may attend to key j."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) <= window
    return mask


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, config):
        o, lse = _attention_forward(q, k, v, causal, window, scale, config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, window, scale, config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    *,
    impl: str = "auto",
    config: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, causal with an optional sliding window, GQA-aware.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with H % Hkv == 0 and Tq <= Tk when causal (the queries are
    the last Tq positions, as in cached decoding). All three share one floating dtype and device.
    window: None (unlimited) or an int >= 0, only with causal=True. scale: None means 1/sqrt(D).
    Returns (B, Tq, H, D) in q's dtype. Differentiable.
    impl: "auto" runs the Triton kernel on CUDA (and under TRITON_INTERPRET=1) for float32/bfloat16/float16
    and head_dim <= 128, the reference otherwise; "torch" / "triton" force one. The kernel accepts any
    batch/time/head strides (no transposes or copies of the model's views).
    config: a name from ATTENTION_CONFIGS pinning the kernels' tiles; None autotunes on CUDA and uses
    INTERPRETER_CONFIG on CPU. Ignored by the reference.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(
            f"q (B, Tq, H, D) and k/v (B, Tk, Hkv, D) must agree on B and D, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    h, hkv = q.size(2), k.size(2)
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the number of kv heads ({hkv})")
    if causal and q.size(1) > k.size(1):
        raise ValueError(
            f"causal attention needs Tq <= Tk (queries are the last Tq positions), got Tq={q.size(1)}, Tk={k.size(1)}"
        )
    if window is not None:
        if type(window) is not int or window < 0:
            raise ValueError(f"window must be None or an int >= 0, got {window!r}")
        if not causal:
            raise ValueError("a sliding window requires causal=True")
    if scale is not None:
        check_number("scale", scale)  # any finite value: scale <= 0 is a softmax like any other
    if q.size(3) == 0:
        raise ValueError(f"q, k, v must have head_dim >= 1, got shape {tuple(q.shape)}")
    if k.size(1) == 0 and q.size(1) > 0:
        raise ValueError("attention needs at least one key: k and v have Tk = 0 keys")
    _check_config(config)
    if use_kernel(impl, q, k, v, unsupported=_no_kernel_reason(q)):
        sm_scale = 1.0 / math.sqrt(q.size(3)) if scale is None else float(scale)
        if config is None and not q.is_cuda:
            config = INTERPRETER_CONFIG
        return _FlashAttention.apply(q, k, v, causal, window, sm_scale, config)
    return flash_attention_ref(q, k, v, causal, window, scale)


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch attention through SDPA. q (B, Tq, H, D); k, v (B, Tk, Hkv, D). Returns (B, Tq, H, D)."""
    tq, tk, h, hkv = q.size(1), k.size(1), q.size(2), k.size(2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    if h != hkv:
        kt = kt.repeat_interleave(h // hkv, dim=1)
        vt = vt.repeat_interleave(h // hkv, dim=1)
    if not causal:
        y = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    elif tq == tk and (window is None or window >= tk - 1) and (scale is None or scale > 0):
        # SDPA's is_causal path returns NaN for scale <= 0 (the explicit mask below does not)
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    elif (torch.compiler.is_compiling() and (scale is None or scale > 0)) or _scores_bounded(qt, kt, scale):
        # SDPA's fused masked path: no (Tq, Tk) scores are kept for backward. Under torch.compile the bound is not
        # read (a host read would split the graph): the compiled caller, the model, attends with RMS-normed q, k.
        mask = attention_mask(tq, tk, window, device=q.device)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    else:  # an explicit masked softmax: SDPA adds a boolean mask as -inf, so an inf score at a masked key is NaN
        mask = attention_mask(tq, tk, window, device=q.device)
        sm = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        f = torch.promote_types(q.dtype, torch.float32)  # fp32 math for 16-bit inputs, float64 stays float64
        s = (qt.to(f) @ kt.to(f).transpose(-2, -1)) * sm
        y = (torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vt.to(f)).to(q.dtype)
    return y.transpose(1, 2)
