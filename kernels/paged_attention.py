"""Attention over a paged KV cache (inference), and the append of new keys and values into the pages.

Layout (one layer):
    k_pages, v_pages  (num_pages, page_size, Hkv, D): the page pool.
    block_table       (B, max_pages) int32 or int64: token j of sequence b lives in page block_table[b, j // page_size],
                      row j % page_size.
    seq_lens          (B,) int32 or int64: tokens in the cache of each sequence, the new ones included.
    q                 (B, Tq, H, D), padded on the right; q_lens (B,) int says how many rows of sequence b are
                      real (None: all Tq). Real query t of sequence b sits at position seq_lens[b] - q_lens[b] + t,
                      so one call serves prefill chunks (q_len = chunk length) and decode steps (q_len = 1) alike.
Mask (SPEC §1): the query at position p sees key j iff j <= p and p - j <= window. Query head h reads kv head
h // (H / Hkv). Padding rows (t >= q_lens[b]) of the output are zero.

The kernel runs one program per (sequence, kv head, block of BLOCK_M packed rows, KV split). The G = H / Hkv query
heads of one kv head are packed into the rows together with the queries (row r: query r // G, head r % G), so
every key tile loaded serves all G heads and the KV bytes are read once per kv head. Keys are gathered token by
token through the block table (any page size works). Online softmax in fp32 with exp2 (scale folded into
log2 e). Split-KV (flash-decoding): the visible key range of a program is cut into NUM_SPLITS pieces run by
separate programs, each writing its normalized partial output o_s and log2-sum-exp l_s; a combine kernel merges
them, o = sum_s 2^(l_s - M) o_s / sum_s 2^(l_s - M) with M = max_s l_s. This keeps the GPU busy at batch 1.
Bytes (decode): reads 2 x sum_b min(seq_len_b, window + 1) x Hkv x D x itemsize of KV, plus q; writes B x H x D.
Not differentiable: inference only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tritonchat.kernels._dispatch import check_number, check_same_device, check_tensor, use_kernel
from tritonchat.kernels._launch import capability_major, dot_meta, last_dim_contiguous, sm_count
from tritonchat.kernels.attention import flash_attention_ref

__all__ = ["PagedPlan", "paged_attention", "paged_attention_ref", "paged_kv_append", "paged_kv_append_ref"]
_NO_WINDOW = 1 << 30  # a window wider than any context


@triton.jit
def _paged_attention_kernel(
    Q,  # (B, Tq, H, D) queries, last dim contiguous
    K,  # (num_pages, page_size, Hkv, D) key pages, contiguous
    V,  # (num_pages, page_size, Hkv, D) value pages, same layout as K
    BT,  # (B, max_pages) int block table
    SEQ,  # (B,) int tokens in the cache per sequence (new ones included)
    QLEN,  # (B,) int real query rows per sequence
    Out,  # (B, Tq, H, D) output (NUM_SPLITS == 1) ...
    OP,  # ... or (B, NUM_SPLITS, Tq, H, D) fp32 partial outputs (NUM_SPLITS > 1)
    LP,  # (B, NUM_SPLITS, Tq, H) fp32 partial log2-sum-exp (NUM_SPLITS > 1)
    stride_qb, stride_qt, stride_qh,  # q strides (elements)
    stride_kp, stride_kt, stride_kh,  # page-pool strides: page, row in page, kv head
    stride_btb,  # block-table row stride
    stride_ob, stride_ot, stride_oh,  # output strides
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window (keys j with p - j <= window)
    n_kv_heads,  # Hkv
    Tq,  # padded query rows per sequence
    GROUP: tl.constexpr,  # query heads per kv head (G)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,  # packed (query, head) rows per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    NUM_SPLITS: tl.constexpr,  # KV splits (1: write Out directly)
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    seq_len = tl.load(SEQ + b)
    q_len = tl.load(QLEN + b)
    ctx = seq_len - q_len  # position of query row 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    row_ok = t < q_len
    pos = ctx + t
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # Keys visible to some row of this block: [first row's position - window, last row's position].
    t_first = (pid_m * BLOCK_M) // GROUP
    t_last = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // GROUP, q_len - 1)
    lo = tl.maximum(ctx + t_first - window, 0)
    hi = tl.minimum(ctx + t_last + 1, seq_len)
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    s_lo = lo + pid_s * per_split * BLOCK_N
    s_hi = tl.minimum(hi, s_lo + per_split * BLOCK_N)

    q_off = b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    for start in range(s_lo, s_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < s_hi
        page = tl.load(bt_row + kpos // PAGE_SIZE, mask=k_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_kt + kvh * stride_kh
        kt = tl.load(K + kv_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
        s = tl.dot(q.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 units
        visible = (kpos[None, :] <= pos[:, None]) & (pos[:, None] - kpos[None, :] <= window)
        s = tl.where(visible & k_ok[None, :] & row_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (N, D)
        acc = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_off = b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
        tl.store(Out + o_off[:, None] + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        n_q_heads = n_kv_heads * GROUP
        lrow = ((b.to(tl.int64) * NUM_SPLITS + pid_s) * Tq + t) * n_q_heads + h  # (B, S, Tq, H) index
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LP + lrow, lse, mask=row_ok)
        tl.store(OP + lrow[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    OP,  # (B, NUM_SPLITS, Tq, H, D) fp32 partial outputs
    LP,  # (B, NUM_SPLITS, Tq, H) fp32 partial log2-sum-exp
    Out,  # (B, Tq, H, D) output
    QLEN,  # (B,) int real query rows per sequence
    stride_ob, stride_ot, stride_oh,  # output strides
    Tq,  # padded query rows per sequence
    n_q_heads,  # H
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    NUM_SPLITS: tl.constexpr,  # partials per row
    BLOCK_S: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
):
    pid = tl.program_id(0)  # b * Tq + t
    h = tl.program_id(1)
    b = pid // Tq
    t = pid % Tq
    q_len = tl.load(QLEN + b)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lrow = ((b.to(tl.int64) * NUM_SPLITS + s) * Tq + t) * n_q_heads + h  # (BLOCK_S,)
    s_ok = (s < NUM_SPLITS) & (s * 0 + t < q_len)
    lse = tl.load(LP + lrow, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # only for padding rows, which are not stored
    w = tl.exp2(lse - m)
    part = tl.load(OP + lrow[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    o_off = b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    tl.store(Out + o_off + d, out.to(Out.dtype.element_ty), mask=(d < HEAD_DIM) & (d * 0 + t < q_len))


@triton.jit
def _append_kernel(
    KN,  # (N, Hkv * D) new keys, rows contiguous
    VN,  # (N, Hkv * D) new values
    KP,  # (num_pages * page_size, Hkv * D) key pages viewed as slots
    VP,  # (num_pages * page_size, Hkv * D) value pages viewed as slots
    SLOTS,  # (N,) int64 slot of each new token (page * page_size + row); < 0: skip
    stride_kn, stride_vn,  # row strides of the new keys / values
    ROW: tl.constexpr,  # Hkv * D
    BLOCK: tl.constexpr,  # ROW rounded up to a power of two
):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + i)
    c = tl.arange(0, BLOCK)
    ok = (c < ROW) & (c * 0 + slot >= 0)
    dst = slot * ROW + c
    tl.store(KP + dst, tl.load(KN + i * stride_kn + c, mask=ok), mask=ok)
    tl.store(VP + dst, tl.load(VN + i * stride_vn + c, mask=ok), mask=ok)


# ---- launchers --------------------------------------------------------------------------------------------------
def _pick_splits(programs: int, max_kv_blocks: int, device: torch.device) -> int:
    """Enough splits for about four programs per SM (decode is latency-bound: many loads must be in flight),
    each split keeping at least 4 key blocks so the combine stays cheap."""
    if device.type != "cuda":
        return 1
    want = -(-4 * sm_count(device) // programs)
    return max(1, min(want, max_kv_blocks // 4, 32))


def decode_tiles(rows: int, head_dim: int, dtype: torch.dtype, major: int = 9) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): query rows (Tq x the heads sharing a kv head) and keys per step of the decode kernel on a
    GPU of compute capability `major`.x. 64 keys, or 32 above D = 128; fp32 K/V below sm_90 also step 32 keys: 64
    of D = 128 spill under sm_80's mma.sync (`python -m bench.compile_report --arch 80 --dtype fp32`), while on
    sm_90 it is the 32-key fp32 tile that spills."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    narrow = head_dim > 128 or (dtype == torch.float32 and major < 9)
    return block_m, (32 if narrow else 64)


def _paged_attention_triton(q, k_pages, v_pages, block_table, seq_lens, q_lens, window, scale, num_splits):
    B, Tq, H, D = q.shape
    num_pages, page_size, Hkv, _ = k_pages.shape
    group = H // Hkv
    q = last_dim_contiguous(q)
    block_m, block_n = decode_tiles(Tq * group, D, q.dtype, capability_major(q.device) if q.is_cuda else 9)
    m_blocks = triton.cdiv(Tq * group, block_m)
    if num_splits is None:
        num_splits = _pick_splits(B * Hkv * m_blocks, triton.cdiv(block_table.size(1) * page_size, block_n), q.device)
    out = torch.zeros_like(q)
    if num_splits > 1:
        part = torch.empty((B, num_splits, Tq, H, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, num_splits, Tq, H), device=q.device, dtype=torch.float32)
    else:
        part = lse = out  # unused
    grid = (B * Hkv, m_blocks, num_splits)
    _paged_attention_kernel[grid](
        q, k_pages, v_pages, block_table, seq_lens, q_lens, out, part, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        scale * math.log2(math.e), _NO_WINDOW if window is None else window, Hkv, Tq,
        GROUP=group, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=num_splits, **dot_meta(q), num_warps=4,
    )
    if num_splits > 1:
        _combine_kernel[(B * Tq, H)](
            part, lse, out, q_lens, out.stride(0), out.stride(1), out.stride(2), Tq, H,
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


def _run_start(pages: list[int], page_size: int) -> int | None:
    """The first slot of a sequence whose pages are consecutive (the common case: the engine's allocator hands a
    sequence one run of pages), else None."""
    p0 = pages[0]
    if pages[-1] - p0 == len(pages) - 1 and pages == list(range(p0, p0 + len(pages))):
        return p0 * page_size
    return None


def _strided_runs(members: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """(start, b) pairs, sorted by start, cut into runs whose starts step by one constant > 0."""
    runs, i = [], 0
    while i < len(members):
        j = i + 1
        if j < len(members) and members[j][0] > members[i][0]:
            step = members[j][0] - members[i][0]
            while j + 1 < len(members) and members[j + 1][0] - members[j][0] == step:
                j += 1
            j += 1
        runs.append(members[i:j])
        i = j
    return runs


class PagedPlan:
    """How the PyTorch path reads one step's sequences from the pool, worked out once for every layer (pass it as
    `paged_attention(..., plan=)`): block_table, seq_lens, q_lens as Python lists, Tq the padded query rows.

    Each sequence's keys are a view of the pool where its pages are consecutive (a gather otherwise), and decode
    rows (one query) of sequences of one length whose views step through the pool by one stride attend together,
    in one SDPA call over a strided view. `runs`: those calls; `others`: the sequences attended one by one;
    `whole`: one call covers the batch."""

    def __init__(self, block_table: list[list[int]], seq_lens: list[int], q_lens: list[int], Tq: int,
                 page_size: int, device: torch.device) -> None:
        if not (len(block_table) == len(seq_lens) == len(q_lens)) or page_size < 1:
            raise ValueError(f"PagedPlan needs one block-table row, seq_len and q_len per sequence and page_size >= 1, "
                             f"got {len(block_table)}, {len(seq_lens)}, {len(q_lens)} and {page_size}")
        for b, (pages, n, m) in enumerate(zip(block_table, seq_lens, q_lens)):
            used = pages[: -(-n // page_size)]
            if not 0 <= m <= min(n, Tq) or len(pages) * page_size < n or min(used, default=0) < 0:
                raise ValueError(f"sequence {b}: need 0 <= q_len <= min(seq_len, Tq) ({m}, {n}, {Tq}), pages for "
                                 f"seq_len tokens ({len(pages)} x {page_size}) and page ids >= 0")
        self.batch, self.Tq = len(seq_lens), Tq
        self.runs: list[tuple[int, list[int] | slice, int, int, int]] = []  # (length, rows, count, slot, step)
        self.others: list[tuple[int, int, int, int | None, torch.Tensor | None]] = []  # (b, n, m, slot, pages)
        decode: dict[int, list[tuple[int, int]]] = {}
        for b, (n, m) in enumerate(zip(seq_lens, q_lens)):
            if m == 0:
                continue
            pages = block_table[b][: -(-n // page_size)]
            start = _run_start(pages, page_size)
            if m == 1 and start is not None:
                decode.setdefault(n, []).append((start, b))
            else:
                idx = None if start is not None else torch.tensor(pages, dtype=torch.int64, device=device)
                self.others.append((b, n, m, start, idx))
        for n, members in decode.items():
            for run in _strided_runs(sorted(members)):
                rows: list[int] | slice = [b for _, b in run]
                if rows == list(range(rows[0], rows[0] + len(rows))):  # in batch order: a slice, not a gather
                    rows = slice(rows[0], rows[0] + len(rows))
                self.runs.append((n, rows, len(run), run[0][0], run[1][0] - run[0][0] if len(run) > 1 else 0))
        # one run over the whole batch, one query each: its output is the result itself
        self.whole = Tq == 1 and not self.others and len(self.runs) == 1 and self.runs[0][1] == slice(0, self.batch)


def _paged_attention_torch(q, k_pages, v_pages, plan: PagedPlan, window, scale):
    """The PyTorch path, by the plan; equal to paged_attention_ref (tests/kernels/test_kernels_paged_attention.py)."""
    H, D = q.size(2), q.size(3)
    Hkv = k_pages.size(2)
    row = Hkv * D
    k_flat, v_flat = k_pages.view(-1, Hkv, D), v_pages.view(-1, Hkv, D)
    out = None if plan.whole else torch.zeros_like(q)
    for n, rows, count, start, step in plan.runs:  # a decode row sees every key left after the window's cut
        lo = 0 if window is None else max(0, n - 1 - window)
        shape, stride = (count, Hkv, n - lo, D), (step * row, D, row, 1)
        kt = k_flat.as_strided(shape, stride, k_flat.storage_offset() + (start + lo) * row)
        vt = v_flat.as_strided(shape, stride, v_flat.storage_offset() + (start + lo) * row)
        qt = q.transpose(1, 2) if out is None else q[rows, 0].unsqueeze(2)  # (count, H, 1, D)
        y = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=H != Hkv)
        if out is None:
            return y.transpose(1, 2)
        out[rows, 0] = y[:, :, 0]
    for b, n, m, start, idx in plan.others:
        if idx is None:
            k, v = k_flat[start: start + n], v_flat[start: start + n]
        else:
            k, v = k_pages[idx].flatten(0, 1)[:n], v_pages[idx].flatten(0, 1)[:n]
        lo = 0 if window is None else max(0, n - m - window)  # the first query (position n - m) sees keys >= lo
        out[b, :m] = flash_attention_ref(q[b: b + 1, :m], k[None, lo:], v[None, lo:], causal=m > 1, window=window,
                                         scale=scale)[0]
    return out


def _check_index(name: str, t: object, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.ndim != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.contiguous()  # never narrowed: the kernels read int32 and int64 indices alike


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    q_lens: torch.Tensor | None = None,
    *,
    window: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    impl: str = "auto",
    plan: PagedPlan | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over a paged KV cache (layout and mask in the module docstring).

    q: (B, Tq, H, D); k_pages, v_pages: (num_pages, page_size, Hkv, D), same dtype and device as q, contiguous,
    H % Hkv == 0. block_table: (B, max_pages) int; seq_lens, q_lens: (B,) int with q_lens <= Tq and
    q_lens <= seq_lens <= max_pages * page_size (values are checked for CPU tensors only, to spare a sync).
    window: None or an int >= 0. scale: None means 1/sqrt(D). num_splits: KV splits (None: chosen from the
    batch and the device). Returns (B, Tq, H, D) in q's dtype, zero on padding rows. Not differentiable.
    plan: a `PagedPlan` of these very indices, for a caller that attends with them in many layers (one step of
    every layer of a model) and built them itself: no input is checked, and the PyTorch path follows the plan
    (with impl="torch", block_table, seq_lens and q_lens may then be None: only the Triton path reads them).
    """
    if plan is not None:
        scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
        if use_kernel(impl, q, k_pages, v_pages):
            return _paged_attention_triton(q, k_pages, v_pages, block_table, seq_lens, q_lens, window, scale,
                                           num_splits)
        return _paged_attention_torch(q, k_pages, v_pages, plan, window, scale)
    check_tensor("q", q, ndim=4)
    check_tensor("k_pages", k_pages, ndim=4)
    check_tensor("v_pages", v_pages, ndim=4)
    block_table = _check_index("block_table", block_table, (q.size(0), None))
    seq_lens = _check_index("seq_lens", seq_lens, (q.size(0),))
    q_lens = seq_lens.new_full(seq_lens.shape, q.size(1)) if q_lens is None else _check_index("q_lens", q_lens,
                                                                                              (q.size(0),))
    check_same_device(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, seq_lens=seq_lens, q_lens=q_lens)
    if not (q.dtype == k_pages.dtype == v_pages.dtype):
        raise TypeError(f"q, k_pages, v_pages must share one dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got {tuple(k_pages.shape)} and "
                         f"{tuple(v_pages.shape)}")
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise ValueError("k_pages and v_pages must be contiguous (num_pages, page_size, Hkv, D) tensors")
    B, Tq, H, D = q.shape
    num_pages, page_size, Hkv, _ = k_pages.shape
    if k_pages.size(3) != D:
        raise ValueError(f"q head_dim {D} != page head_dim {k_pages.size(3)}")
    if page_size == 0:
        raise ValueError(f"k_pages and v_pages must have page_size >= 1, got shape {tuple(k_pages.shape)}")
    if D == 0:
        raise ValueError(f"q and the pages must have head_dim >= 1, got shape {tuple(q.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of kv heads ({Hkv})")
    if window is not None and (type(window) is not int or window < 0):
        raise ValueError(f"window must be None or an int >= 0, got {window!r}")
    if scale is not None:
        check_number("scale", scale)
    if num_splits is not None and (type(num_splits) is not int or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if not q.is_cuda:  # value checks cost a device sync on GPU; on CPU they are cheap
        if bool(((q_lens < 0) | (q_lens > Tq) | (seq_lens < q_lens)).any()):
            raise ValueError(f"need 0 <= q_lens <= Tq ({Tq}) and q_lens <= seq_lens, got q_lens {q_lens.tolist()} "
                             f"and seq_lens {seq_lens.tolist()}")
        if bool((seq_lens > block_table.size(1) * page_size).any()):
            raise ValueError(f"seq_lens {seq_lens.tolist()} exceed the block table's capacity "
                             f"({block_table.size(1)} pages x {page_size})")
        used = torch.arange(block_table.size(1)) < (seq_lens[:, None] + page_size - 1) // page_size
        if bool(((block_table < 0) | (block_table >= num_pages))[used].any()):
            raise ValueError(f"block_table refers to pages outside [0, {num_pages})")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if use_kernel(impl, q, k_pages, v_pages):
        return _paged_attention_triton(q, k_pages, v_pages, block_table, seq_lens, q_lens, window, scale, num_splits)
    plan = PagedPlan(block_table.tolist(), seq_lens.tolist(), q_lens.tolist(), Tq, page_size, q.device)
    return _paged_attention_torch(q, k_pages, v_pages, plan, window, scale)


def paged_kv_append(
    k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
    *, impl: str = "auto",
) -> None:
    """Write new keys and values into the page pool, in place.

    k_pages, v_pages: (num_pages, page_size, Hkv, D) contiguous, overwritten at the given slots. k, v: (N, Hkv, D)
    in the pages' dtype. slots: (N,) int, slot = page * page_size + row; a negative slot skips that token
    (padding). Slots must be distinct. Reads and writes 2 x N x Hkv x D elements.
    """
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=(4 if name.endswith("pages") else 3))
    int_slots = isinstance(slots, torch.Tensor) and slots.dtype in (torch.int32, torch.int64)
    if not int_slots or slots.shape != k.shape[:1]:
        raise ValueError(f"slots must be an int tensor of shape ({k.size(0)},)")
    check_same_device(k_pages=k_pages, v_pages=v_pages, k=k, v=v, slots=slots)
    if k_pages.shape != v_pages.shape or not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise ValueError("k_pages and v_pages must be contiguous tensors of one shape")
    if k.shape != v.shape or k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"k and v must have shape (N, {k_pages.size(2)}, {k_pages.size(3)}), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if not (k.dtype == v.dtype == k_pages.dtype == v_pages.dtype):
        raise TypeError(f"k, v and the pages must share one dtype, got {k.dtype}, {v.dtype}, {k_pages.dtype}")
    slots = slots.to(torch.int64).contiguous()
    if not k.is_cuda and bool((slots >= k_pages.size(0) * k_pages.size(1)).any()):
        raise ValueError(f"slots must be < num_pages * page_size ({k_pages.size(0) * k_pages.size(1)})")
    if not use_kernel(impl, k, v, k_pages, v_pages):
        paged_kv_append_ref(k_pages, v_pages, k, v, slots)
        return
    if k.numel() == 0:  # no tokens, or no kv heads / head_dim: nothing to copy
        return
    k, v = k.reshape(k.size(0), -1).contiguous(), v.reshape(v.size(0), -1).contiguous()
    row = k.size(1)
    _append_kernel[(k.size(0),)](k, v, k_pages, v_pages, slots, k.stride(0), v.stride(0),
                                 ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)


# ---- references -------------------------------------------------------------------------------------------------
def paged_attention_ref(q, k_pages, v_pages, block_table, seq_lens, q_lens=None, window=None, scale=None):
    """Gather each sequence's pages into a dense (1, seq_len, Hkv, D) cache and run the dense reference."""
    B, Tq = q.shape[:2]
    page_size = k_pages.size(1)
    q_lens = [Tq] * B if q_lens is None else q_lens.tolist()
    out = torch.zeros_like(q)
    for b, (n, m) in enumerate(zip(seq_lens.tolist(), q_lens)):
        if m == 0:
            continue
        pages = block_table[b, : -(-n // page_size)].long()
        k = k_pages[pages].flatten(0, 1)[:n]
        v = v_pages[pages].flatten(0, 1)[:n]
        out[b, :m] = flash_attention_ref(q[b : b + 1, :m], k[None], v[None], causal=True, window=window, scale=scale)[0]
    return out


def paged_kv_append_ref(k_pages, v_pages, k, v, slots) -> None:
    """Write k[i], v[i] ((N, Hkv, D)) into slot slots[i] = page * page_size + row; slots < 0 are skipped."""
    keep = slots >= 0
    n_slots = k_pages.size(0) * k_pages.size(1)  # view(-1, ...) fails for zero kv heads
    k_pages.view(n_slots, *k_pages.shape[2:])[slots[keep]] = k[keep]
    v_pages.view(n_slots, *v_pages.shape[2:])[slots[keep]] = v[keep]
