"""Triton kernels of flash attention (causal, sliding window, GQA): forward, backward delta, dK/dV, dQ.

Layout: q, o, dq, do (B, Tq, H, D) and k, v, dk, dv (B, Tk, Hkv, D) with any batch/time/head strides and a
unit stride on D; lse and delta (B, H, Tq) fp32, contiguous. Query row i sits at position p = i + Tk - Tq
and, when causal, sees key j iff j <= p and (no window or p - j <= window). Query head h reads kv head
h // GROUP.

Scores are kept in base 2: s2 = (q . k) * scale * log2(e), so softmax is exp2(s2 - max) and the saved
log-sum-exp is lse2 = m2 + log2(l). Backward, with P = exp2(s2 - lse2) recomputed per tile:
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),
    dQ = scale * dS K,  dK = scale * dS^T Q.

Each program walks its loop axis in three phases, [lo, s1) masked (the window's lower edge), [s1, s2) with
every pair visible (no mask), [s2, hi) masked (the diagonal and ragged ends); lo and hi come from the window,
so tiles entirely outside it are never loaded and a window-w layer costs O(T * w), not O(T^2). The loops are
written out in each kernel rather than shared through helpers: the interpreter pays for every nested call.
The launchers, the configs and the autotuning live in kernels/attention.py.
Bytes moved, forward: q read once, k and v read once per query tile that sees them, o written once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _key_range(m0, Tk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # Key tiles of the query rows at positions [m0, m0 + BLOCK_M): (lo, s1, s2, hi), multiples of BLOCK_N but hi.
    # Every quantity is >= 0 before a floor division (Triton's integer // truncates toward zero).
    if CAUSAL:
        hi = tl.minimum(Tk, m0 + BLOCK_M)  # keys after the last row's position are never visible
        full_hi = (m0 + 1) // BLOCK_N * BLOCK_N  # tiles entirely at or before the first row's position
        if WINDOWED:
            lo = tl.maximum(m0 - window, 0) // BLOCK_N * BLOCK_N  # the first row's first key
            full_lo = (tl.maximum(m0 + BLOCK_M - 1 - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # the last row's
        else:
            lo = m0 * 0
            full_lo = lo
    else:
        lo = m0 * 0
        full_lo = lo
        hi = Tk + lo
        full_hi = Tk // BLOCK_N * BLOCK_N + lo
    s1 = tl.minimum(tl.maximum(full_lo, lo), hi)
    s2 = tl.maximum(tl.minimum(full_hi, hi), s1)
    return lo, s1, s2, hi


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, LSE,  # q (B, Tq, H, D), k/v (B, Tk, Hkv, D), out o like q, out lse2 (B, H, Tq) fp32
    stride_qb, stride_qt, stride_qh,  # strides of q (the D stride is 1)
    stride_kb, stride_kt, stride_kh,  # strides of k
    stride_vb, stride_vt, stride_vh,  # strides of v
    stride_ob, stride_ot, stride_oh,  # strides of o
    H, Tq, Tk,  # query heads, query length, key length (queries are the last Tq positions)
    window,  # visible distance p - j <= window when WINDOWED
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # query heads per kv head
    CAUSAL: tl.constexpr,  # mask keys after the query's position
    WINDOWED: tl.constexpr,  # also mask keys further than window behind
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
):
    # Grid (cdiv(Tq, BLOCK_M), B * H). Reads q once and the visible k/v tiles (BLOCK_N x D each per step);
    # writes o and lse2 once. Online softmax: m = running max, l = running sum of exp2(s - m).
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest rows start first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = ((bh % H) // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)[:, None]
    tile_ok = (offs_m < Tq)[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qt + offs_d[None, :], mask=tile_ok, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    pos_m = offs_m + (Tk - Tq)  # >= 0 when causal
    lo, s1, s2, hi = _key_range(pid_m * BLOCK_M + (Tk - Tq), Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for phase in tl.static_range(3):
        if phase == 0:
            start, stop = lo, s1
        elif phase == 1:
            start, stop = s1, s2
        else:
            start, stop = s2, hi
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = K_head + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = V_head + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]
            if phase != 1 or BLOCK_D != HEAD_DIM:
                kv_ok = (cols[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
                v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            s = s * qk_scale
            if phase != 1:
                ok = cols[None, :] < Tk
                if CAUSAL:
                    ok = ok & (cols[None, :] <= pos_m[:, None])
                if WINDOWED:
                    ok = ok & (pos_m[:, None] - cols[None, :] <= window)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None],
                         input_precision=DOT_PRECISION)
            m_i = m_new
    # Every real row sees at least its own key, so l_i > 0 there; padding rows are never stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows64 * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, m_i + tl.log2(l_safe), mask=offs_m < Tq)


@triton.jit
def attn_bwd_delta_kernel(
    Out, DO, DELTA,  # o (B, Tq, H, D), do like o (any strides), out delta (B, H, Tq) fp32
    stride_ob, stride_ot, stride_oh,  # strides of o
    stride_dob, stride_dot, stride_doh,  # strides of do
    H, Tq,  # query heads, query length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows per program
):
    # delta = rowsum(dO * O) in fp32. Grid (cdiv(Tq, BLOCK_M), B * H). Reads 2 x Tq x D, writes Tq per head.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)[:, None]
    tile_ok = (offs_m < Tq)[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows64 * stride_ot + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64 * stride_dot + offs_d[None, :], mask=tile_ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, k, v, do as in forward; lse2, delta (B, H, Tq); out dk, dv like k
    stride_qb, stride_qt, stride_qh,  # strides of q
    stride_kb, stride_kt, stride_kh,  # strides of k
    stride_vb, stride_vt, stride_vh,  # strides of v
    stride_dob, stride_dot, stride_doh,  # strides of do
    stride_dkb, stride_dkt, stride_dkh,  # strides of dk and of dv (allocated alike)
    H, Hkv, Tq, Tk,  # query heads, kv heads, query length, key length
    window,  # visible distance when WINDOWED
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    GROUP: tl.constexpr,  # query heads per kv head, all reduced into one dK/dV
    CAUSAL: tl.constexpr,  # mask keys after the query's position
    WINDOWED: tl.constexpr,  # also mask keys further than window behind
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
):
    # Grid (cdiv(Tk, BLOCK_N), B * Hkv). Holds one k/v tile; for each of the GROUP query heads reads the
    # q/do tiles (BLOCK_M x D each per step) whose rows can see it; writes dk, dv once (no atomics).
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = bhk % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)[:, None]
    tile_ok = (cols < Tk)[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + hk.to(tl.int64) * stride_kh + cols64 * stride_kt + offs_d[None, :], mask=tile_ok,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk.to(tl.int64) * stride_vh + cols64 * stride_vt + offs_d[None, :], mask=tile_ok,
                other=0.0)

    # Query rows (index i, position i + Tk - Tq) that see some key of [n0, n0 + BLOCK_N): lo, s1, s2, hi as in
    # _key_range, in row indices (all >= 0 before a floor division).
    n0 = pid_n * BLOCK_N
    off = Tk - Tq
    if CAUSAL:
        lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M  # the first row at or after the first key
        full_lo = (tl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # after the last key
        if WINDOWED:
            hi = tl.minimum(Tq, tl.maximum(n0 + BLOCK_N + window - off, 0))  # 1 + the last key's last viewer
            full_hi = tl.minimum(tl.maximum(n0 + window - off + 1, 0) // BLOCK_M, Tq // BLOCK_M) * BLOCK_M
        else:
            hi = Tq + n0 * 0
            full_hi = Tq // BLOCK_M * BLOCK_M + n0 * 0
    else:
        lo = n0 * 0
        full_lo = lo
        hi = Tq + lo
        full_hi = Tq // BLOCK_M * BLOCK_M + lo
    s1 = tl.minimum(tl.maximum(full_lo, lo), hi)
    s2 = tl.maximum(tl.minimum(full_hi, hi), s1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        LSE_head = LSE + (b * H + h) * Tq
        DELTA_head = DELTA + (b * H + h) * Tq
        for phase in tl.static_range(3):
            if phase == 0:
                start, stop = lo, s1
            elif phase == 1:
                start, stop = s1, s2
            else:
                start, stop = s2, hi
            for start_m in range(start, stop, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < Tq
                q_ptrs = Q_head + rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :]
                do_ptrs = DO_head + rows.to(tl.int64)[:, None] * stride_dot + offs_d[None, :]
                if phase != 1 or BLOCK_D != HEAD_DIM:
                    qd_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
                    q = tl.load(q_ptrs, mask=qd_ok, other=0.0)
                    do = tl.load(do_ptrs, mask=qd_ok, other=0.0)
                else:
                    q = tl.load(q_ptrs)
                    do = tl.load(do_ptrs)
                if phase != 1:
                    lse = tl.load(LSE_head + rows, mask=row_ok, other=0.0)
                    delta = tl.load(DELTA_head + rows, mask=row_ok, other=0.0)
                else:
                    lse = tl.load(LSE_head + rows)
                    delta = tl.load(DELTA_head + rows)
                s_t = tl.dot(k.to(DOT_DTYPE), tl.trans(q).to(DOT_DTYPE), input_precision=DOT_PRECISION)  # S^T (N, M)
                s_t = s_t * qk_scale
                if phase != 1:
                    pos = rows + off
                    ok = row_ok[None, :]
                    if CAUSAL:
                        ok = ok & (cols[:, None] <= pos[None, :])
                    if WINDOWED:
                        ok = ok & (pos[None, :] - cols[:, None] <= window)
                    s_t = tl.where(ok, s_t, float("-inf"))
                p_t = tl.exp2(s_t - lse[None, :])
                dv = tl.dot(p_t.to(do.dtype).to(DOT_DTYPE), do.to(DOT_DTYPE), dv, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v.to(DOT_DTYPE), tl.trans(do).to(DOT_DTYPE), input_precision=DOT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype).to(DOT_DTYPE), q.to(DOT_DTYPE), dk, input_precision=DOT_PRECISION)
    out = b * stride_dkb + hk.to(tl.int64) * stride_dkh + cols64 * stride_dkt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # q, k, v, do as in forward; lse2, delta (B, H, Tq); out dq like q
    stride_qb, stride_qt, stride_qh,  # strides of q
    stride_kb, stride_kt, stride_kh,  # strides of k
    stride_vb, stride_vt, stride_vh,  # strides of v
    stride_dob, stride_dot, stride_doh,  # strides of do
    stride_dqb, stride_dqt, stride_dqh,  # strides of dq
    H, Tq, Tk,  # query heads, query length, key length
    window,  # visible distance when WINDOWED
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    GROUP: tl.constexpr,  # query heads per kv head
    CAUSAL: tl.constexpr,  # mask keys after the query's position
    WINDOWED: tl.constexpr,  # also mask keys further than window behind
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    DOT_DTYPE: tl.constexpr,  # dtype of the tl.dot operands (kernels._launch.dot_meta)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (kernels._launch.dot_meta)
):
    # Grid (cdiv(Tq, BLOCK_M), B * H). The forward's key range; reads k, v (BLOCK_N x D) per step, writes dq once.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = ((bh % H) // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)[:, None]
    tile_ok = (offs_m < Tq)[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qt + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64 * stride_dot + offs_d[None, :], mask=tile_ok,
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    pos_m = offs_m + (Tk - Tq)
    lo, s1, s2, hi = _key_range(pid_m * BLOCK_M + (Tk - Tq), Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for phase in tl.static_range(3):
        if phase == 0:
            start, stop = lo, s1
        elif phase == 1:
            start, stop = s1, s2
        else:
            start, stop = s2, hi
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = K_head + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = V_head + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]
            if phase != 1 or BLOCK_D != HEAD_DIM:
                kv_ok = (cols[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
                v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale
            if phase != 1:
                ok = cols[None, :] < Tk
                if CAUSAL:
                    ok = ok & (cols[None, :] <= pos_m[:, None])
                if WINDOWED:
                    ok = ok & (pos_m[:, None] - cols[None, :] <= window)
                s = tl.where(ok, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype).to(DOT_DTYPE), k.to(DOT_DTYPE), dq, input_precision=DOT_PRECISION)
    out = DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqt + offs_d[None, :]
    tl.store(out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)
