"""One Triton GEMM with a fused elementwise epilogue, for the ReLU^2 MLP (kernels/mlp.py).

    gemm(a, b, trans_b=True)   c = epilogue(a @ b^T)   a (M, K), b (N, K): a weight in nn.Linear layout
    gemm(a, b, trans_b=False)  c = epilogue(a @ b)     a (M, K), b (K, N)

Epilogues, applied to the fp32 accumulator `acc` of a tile before the one store:
    "none"        c = acc
    "relu2"       c = relu(acc)^2                  the MLP forward: h = relu(x W_fc^T)^2, z never stored
    "relu2_grad"  c = 2 * sqrt(aux) * acc          the MLP backward with aux = h: relu(z) = sqrt(h), so
                                                   dz = 2 relu(z) dh with dh = dy W_proj never stored
FLOPs 2*M*N*K. Bytes (s = element size): reads (M*K + K*N) * s once in the ideal (tiles re-read A and B
through L2), plus M*N*s for aux; writes M*N*s. All operands share one dtype; math is fp32.

Two kernels share the tile ordering and the epilogue:
- `_gemm_kernel`: one program per (BLOCK_M, BLOCK_N) tile, pointer loads with masks (any CUDA GPU, interpreter);
- `_gemm_tma_kernel`: persistent (one program per SM loops over tiles) with host-side TMA tensor descriptors,
  which zero-fill out-of-range reads and clip out-of-range writes, so it needs no masks. Hopper (sm90+) only,
  and only when every row stride is 16-byte aligned. Both APIs (`triton.tools.tensor_descriptor`, descriptor
  `.load/.store`) exist since Triton 3.4; a config that fails to compile or run is skipped by the tuner.
  Worth trying on a GPU: `tl.range(..., flatten=True)` / `warp_specialize=True` on the tile loop (overlaps one
  tile's epilogue with the next tile's loads), epilogue sub-tiling (store the tile in two BLOCK_N/2 halves to
  cut registers), and BLOCK_K=128 with 2-3 stages.

Choosing a config: `config=None` on CUDA times every eligible name of `tune_configs(dtype)` once per
(device, dtype, epilogue, layout, M rounded up to a power of two, N, K) through `kernels._launch.autotune`
(its decisions: `kernels._launch.tuned_configs()`); on CPU tensors (the Triton interpreter) it is always
INTERPRETER_CONFIG. Passing a name pins that config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from tritonchat.kernels._launch import autotune, capability_major, dot_meta, sm_count

__all__ = ["gemm", "gemm_ref", "GEMM_CONFIGS"]
EPILOGUES = {"none": 0, "relu2": 1, "relu2_grad": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemmConfig:
    """One named point of the tuning space.

    group_m: M tiles walked down before moving one tile right, so GROUP_M row bands of A and one column band of
    B stay in L2 while they are reused. tma: the persistent TMA kernel (sm90+, aligned strides) instead of the
    pointer kernel.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False


GEMM_CONFIGS: dict[str, GemmConfig] = {
    # Hopper bf16 candidates: Hopper's warpgroup MMA works on 64-row slabs per 4 warps, so 128-row tiles keep 8
    # warps (or 4 warps twice) busy; shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes: 48 KB for
    # 128x256x64, so 3 stages fit the 227 KB a block may have (fp32 operands need twice that: TUNE_FP32 below).
    "ptr_128x256x64_w8_s3": GemmConfig(128, 256, 64, 8, 8, 3),
    "ptr_128x128x64_w8_s4": GemmConfig(128, 128, 64, 8, 8, 4),
    "ptr_128x128x64_w4_s4": GemmConfig(128, 128, 64, 8, 4, 4),
    "ptr_64x128x64_w4_s4": GemmConfig(64, 128, 64, 8, 4, 4),  # short inputs (prompts, decode)
    "tma_128x256x64_w8_s3": GemmConfig(128, 256, 64, 8, 8, 3, tma=True),
    "tma_128x128x64_w8_s4": GemmConfig(128, 128, 64, 8, 8, 4, tma=True),
    # fp32 candidate: 4-byte operands, so BLOCK_K = 32 keeps 3 stages at 96 KB
    "ptr_128x128x32_w8_s3": GemmConfig(128, 128, 32, 8, 8, 3),
    # For tests: the interpreter's default (larger tiles run faster there), and small tiles so that odd shapes
    # cross several tile edges and a partial L2 group.
    "test_64x64x64": GemmConfig(64, 64, 64, 2, 4, 1),
    "test_32x64x32": GemmConfig(32, 64, 32, 2, 4, 1),
    "test_tma_32x64x32": GemmConfig(32, 64, 32, 2, 4, 1, tma=True),
}
# The autotune spaces: every candidate compiles for sm_90 within shared memory and without spills
# (`python -m bench.compile_report`); a TMA candidate is dropped where TMA is not available.
TUNE_16BIT = ("ptr_128x256x64_w8_s3", "ptr_128x128x64_w8_s4", "ptr_128x128x64_w4_s4", "ptr_64x128x64_w4_s4",
              "tma_128x256x64_w8_s3", "tma_128x128x64_w8_s4")
TUNE_FP32 = ("ptr_128x128x32_w8_s3", "ptr_64x128x64_w4_s4")
# fp32 through sm_80's mma.sync: the 4-warp 64x128x64 tile spills there (`bench.compile_report --arch 80 --dtype fp32`)
_FP32_SM90_ONLY = frozenset({"ptr_64x128x64_w4_s4"})


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: tiles 0..GROUP_M-1 go down one column of tiles, then the next column, ...; the last group
    # may hold fewer than GROUP_M rows of tiles.
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    in_group = tile % per_group
    return first_m + in_group % rows, in_group // rows


@triton.jit
def _epilogue(acc, aux, EPILOGUE: tl.constexpr):
    if EPILOGUE == 1:
        r = tl.where(acc < 0.0, 0.0, acc)  # relu that keeps NaN (tl.maximum would turn it into 0)
        acc = r * r
    elif EPILOGUE == 2:
        acc = 2.0 * tl.sqrt(aux.to(tl.float32)) * acc
    return acc


@triton.jit
def _aux_half(C, AUX, part, offs_m, mask_m, col0, N, HALF: tl.constexpr):
    offs_n = col0 + tl.arange(0, HALF)
    c_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    aux = tl.load(AUX + c_offs, mask=mask, other=0.0)
    tl.store(C + c_offs, _epilogue(part, aux, 2).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(
    A,  # (M, K) left operand, unit stride along K
    B,  # right operand as (K, N) through its strides (b^T when trans_b: stride_bk = 1)
    C,  # (M, N) out, contiguous
    AUX,  # (M, N) contiguous, read by EPILOGUE == 2 only (any pointer otherwise)
    M,  # rows of A and C
    N,  # columns of C
    K,  # reduction length
    stride_am,  # elements between rows of A
    stride_bk,  # elements between consecutive k of B
    stride_bn,  # elements between consecutive n of B
    EPILOGUE: tl.constexpr,  # 0 none, 1 relu^2, 2 times 2*sqrt(aux)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # L2 grouping of M tiles
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if EPILOGUE == 2:
        # The AUX tile beside the fp32 accumulator is what fills the registers: read and finish it by column halves.
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _aux_half(C, AUX, lo, offs_m, mask_m, pid_n * BLOCK_N, N, BLOCK_N // 2)
        _aux_half(C, AUX, hi, offs_m, mask_m, pid_n * BLOCK_N + BLOCK_N // 2, N, BLOCK_N // 2)
    else:
        c_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(C + c_offs, _epilogue(acc, acc, EPILOGUE).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tma_kernel(
    a_desc,  # TMA descriptor of A (M, K), block (BLOCK_M, BLOCK_K)
    b_desc,  # TMA descriptor of B: (N, K) block (BLOCK_N, BLOCK_K) when TRANS_B, else (K, N) block (BLOCK_K, BLOCK_N)
    c_desc,  # TMA descriptor of the out C (M, N), block (BLOCK_M, BLOCK_N); (BLOCK_M, BLOCK_N // 2) for EPILOGUE == 2
    aux_desc,  # TMA descriptor of AUX (M, N), block as c_desc's, read by EPILOGUE == 2 only (c_desc otherwise)
    M,  # rows of A and C
    N,  # columns of C
    K,  # reduction length
    num_programs,  # grid size: program p handles tiles p, p + num_programs, ...
    EPILOGUE: tl.constexpr,  # 0 none, 1 relu^2, 2 times 2*sqrt(aux)
    TRANS_B: tl.constexpr,  # B is stored (N, K) and used transposed
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # L2 grouping of M tiles
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])  # rows >= M and columns >= K arrive as zeros
            if TRANS_B:
                b = tl.trans(b_desc.load([off_n, kt * BLOCK_K]))
            else:
                b = b_desc.load([kt * BLOCK_K, off_n])
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 2:  # by column halves, as in _gemm_kernel: c_desc and aux_desc have (BLOCK_M, BLOCK_N/2) blocks
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            off_hi = off_n + BLOCK_N // 2
            c_desc.store([off_m, off_n], _epilogue(lo, aux_desc.load([off_m, off_n]), 2).to(c_desc.dtype))
            c_desc.store([off_m, off_hi], _epilogue(hi, aux_desc.load([off_m, off_hi]), 2).to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], _epilogue(acc, acc, EPILOGUE).to(c_desc.dtype))  # outside (M, N): dropped


def tune_configs(dtype: torch.dtype, major: int = 9) -> tuple[str, ...]:
    """The GEMM_CONFIGS names the autotuner times for operands of `dtype` on a GPU of compute capability `major`.x
    (the TMA candidates are further dropped where TMA is not available)."""
    if dtype != torch.float32:
        return TUNE_16BIT
    return TUNE_FP32 if major >= 9 else tuple(n for n in TUNE_FP32 if n not in _FP32_SM90_ONLY)


INTERPRETER_CONFIG = "test_64x64x64"
_INTERPRETER_PROGRAMS = 3  # persistent kernel on CPU: 3 programs, so each one loops over several tiles


@functools.cache
def _tensor_descriptor_cls():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton < 3.4
        return None
    return TensorDescriptor


def _tma_eligible(*tensors: torch.Tensor) -> bool:
    """TMA wants 16-byte aligned bases and row strides, a Triton with host descriptors and, on CUDA, sm90+."""
    if _tensor_descriptor_cls() is None:
        return False
    t0 = tensors[0]
    if t0.is_cuda and capability_major(t0.device) < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _launch(cfg: GemmConfig, a, b, out, aux, trans_b: bool, epilogue: int) -> None:
    M, K = a.shape
    N = out.shape[1]
    meta = dict(EPILOGUE=epilogue, **dot_meta(a), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if not cfg.tma:
        stride_bk, stride_bn = (1, b.stride(0)) if trans_b else (b.stride(0), 1)
        _gemm_kernel[(tiles,)](a, b, out, out if aux is None else aux, M, N, K, a.stride(0), stride_bk, stride_bn,
                               EVEN_K=K % cfg.block_k == 0, **meta)
        return
    desc = _tensor_descriptor_cls()
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    a_desc = desc.from_tensor(a, [bm, bk])
    b_desc = desc.from_tensor(b, [bn, bk] if trans_b else [bk, bn])
    c_block = [bm, bn // 2] if epilogue == 2 else [bm, bn]  # the AUX epilogue stores by column halves
    c_desc = desc.from_tensor(out, c_block)
    aux_desc = c_desc if aux is None else desc.from_tensor(aux, c_block)
    programs = min(tiles, sm_count(a.device) if a.is_cuda else _INTERPRETER_PROGRAMS)
    _gemm_tma_kernel[(programs,)](a_desc, b_desc, c_desc, aux_desc, M, N, K, programs, TRANS_B=trans_b, **meta)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    trans_b: bool,
    epilogue: str = "none",
    aux: torch.Tensor | None = None,
    config: str | None = None,
) -> torch.Tensor:
    """c = epilogue(a @ (b^T if trans_b else b)), in a's dtype (fp16, bf16 or fp32), fp32 accumulation.

    a: (M, K) contiguous. b: (N, K) if trans_b else (K, N), contiguous, a's dtype and device.
    epilogue: "none", "relu2" (relu(acc)^2) or "relu2_grad" (2*sqrt(aux)*acc, aux (M, N) contiguous >= 0).
    config: a name in GEMM_CONFIGS, or None (autotuned on CUDA, INTERPRETER_CONFIG on CPU).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != a.dtype:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 and match a ({a.dtype}), got {t.dtype}")
        if t.device != a.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous and on {a.device}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {tuple(EPILOGUES)}, got {epilogue!r}")
    M, K = a.shape
    N, Kb = b.shape if trans_b else (b.shape[1], b.shape[0])
    if Kb != K:
        raise ValueError(f"inner dims differ: a {tuple(a.shape)}, b {tuple(b.shape)} with trans_b={trans_b}")
    if (epilogue == "relu2_grad") != (aux is not None):
        raise ValueError("aux (M, N) is required by epilogue='relu2_grad' and by no other epilogue")
    if aux is not None and not isinstance(aux, torch.Tensor):
        raise TypeError(f"aux must be None or a torch.Tensor, got {type(aux).__name__}")
    if aux is not None and (aux.shape != (M, N) or aux.dtype != a.dtype or aux.device != a.device
                            or not aux.is_contiguous()):
        raise ValueError(f"aux must be a contiguous ({M}, {N}) {a.dtype} tensor on {a.device}")
    if config is not None and config not in GEMM_CONFIGS:
        raise ValueError(f"config must be None or one of {tuple(GEMM_CONFIGS)}, got {config!r}")
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()  # acc = 0 and every epilogue maps 0 to 0
    code = EPILOGUES[epilogue]
    tma_ok = _tma_eligible(a, b, out, *(() if aux is None else (aux,)))
    if config is not None and GEMM_CONFIGS[config].tma and not tma_ok:
        raise ValueError(f"config {config!r} needs TMA: sm90+, Triton >= 3.4 and 16-byte aligned rows")
    if config is None and not a.is_cuda:
        config = INTERPRETER_CONFIG
    if config is None:
        bucket = 1 << max(M - 1, 0).bit_length()
        key = ("gemm", a.device.index, a.dtype, epilogue, trans_b, bucket, N, K)
        candidates = [n for n in tune_configs(a.dtype, capability_major(a.device)) if tma_ok or not GEMM_CONFIGS[n].tma]
        config = autotune(key, candidates, lambda name: _launch(GEMM_CONFIGS[name], a, b, out, aux, trans_b, code),
                          (out,))
    _launch(GEMM_CONFIGS[config], a, b, out, aux, trans_b, code)
    return out


def gemm_ref(
    a: torch.Tensor, b: torch.Tensor, *, trans_b: bool, epilogue: str = "none", aux: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-PyTorch `gemm` (fp32 math, result in a's dtype): the test oracle and the benchmark baseline."""
    acc = a.float() @ (b.float().t() if trans_b else b.float())
    if epilogue == "relu2":
        acc = torch.relu(acc).square()
    elif epilogue == "relu2_grad":
        acc = 2.0 * aux.float().sqrt() * acc
    return acc.to(a.dtype)
