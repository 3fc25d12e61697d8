"""paged_attention / paged_kv_append (Triton, in the interpreter on CPU) against dense attention.

Each case writes dense per-sequence keys/values into randomly shuffled pages of a pool, then checks the paged
kernel and the paged reference against `flash_attention_ref` on the dense tensors (queries are the last q_len
positions of each sequence), to tol("attention_kernel") (the interpreter's fp32 dot is exact up to summation order).
"""

import pytest
import torch
from tritonchat.kernels.attention import flash_attention_ref
from tritonchat.kernels.paged_attention import paged_attention, paged_attention_ref, paged_kv_append

from tests.tolerances import tol

TOL = tol("attention_kernel", torch.float32)  # the kernel, fp32, against dense float64 attention


def make_case(seq_lens, q_lens, tq, h, hkv, d, page_size, dtype=torch.float32, seed=0, spare_pages=3):
    """Dense q/k/v per sequence and the same k/v scattered into shuffled pages (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    max_pages = max(-(-n // page_size) for n in seq_lens) + 1  # one spare column: never read
    num_pages = B * max_pages + spare_pages
    k_pages = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)  # garbage where unused
    v_pages = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)
    block_table = perm[: B * max_pages].view(B, max_pages).to(torch.int32)
    dense = []
    for b, n in enumerate(seq_lens):
        k = (torch.randn(n, hkv, d, generator=g) * 1.5).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        for j in range(n):
            page, row = block_table[b, j // page_size], j % page_size
            k_pages[page, row], v_pages[page, row] = k[j], v[j]
        dense.append((k, v))
    q = (torch.randn(B, tq, h, d, generator=g) * 1.5).to(dtype)
    return q, k_pages, v_pages, block_table, torch.tensor(seq_lens, dtype=torch.int32), \
        torch.tensor(q_lens, dtype=torch.int32), dense


def dense_expect(q, q_lens, dense, window):
    out = torch.zeros_like(q, dtype=torch.float64)
    for b, (k, v) in enumerate(dense):
        m = int(q_lens[b])
        if m:
            out[b, :m] = flash_attention_ref(q[b : b + 1, :m].double(), k[None].double(), v[None].double(),
                                             window=window)[0]
    return out


CASES = [  # (seq_lens, q_lens, Tq, H, Hkv, D, page_size, window, num_splits)
    ([37, 5, 50], [1, 1, 1], 1, 4, 2, 16, 16, None, 1),  # decode, GQA 2
    ([37, 5, 50], [1, 1, 1], 1, 4, 2, 16, 16, None, 3),  # decode, split-KV
    ([70, 129], [1, 1], 1, 3, 1, 32, 64, 20, 4),  # decode, GQA 3, window, more splits than some ranges need
    ([23, 41], [23, 41], 41, 2, 2, 16, 16, None, 1),  # prefill, padded rows
    ([23, 41], [23, 41], 41, 4, 1, 16, 64, 9, 2),  # prefill, window, GQA 4, split
    ([30, 66, 9], [7, 1, 9], 9, 2, 1, 24, 16, 12, 1),  # mixed chunk / decode / prefill, D not a power of two
    ([30, 66, 9], [7, 1, 9], 9, 2, 1, 24, 16, 0, 2),  # window 0: each query sees itself
]


@pytest.mark.parametrize("seq_lens,q_lens,tq,h,hkv,d,page_size,window,num_splits", CASES)
def test_paged_attention_matches_dense(seq_lens, q_lens, tq, h, hkv, d, page_size, window, num_splits):
    q, kp, vp, bt, sl, ql, dense = make_case(seq_lens, q_lens, tq, h, hkv, d, page_size, seed=sum(seq_lens))
    expect = dense_expect(q, ql, dense, window)
    got = paged_attention(q, kp, vp, bt, sl, ql, window=window, num_splits=num_splits, impl="triton")
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), expect, **TOL)
    ref = paged_attention_ref(q, kp, vp, bt, sl, ql, window=window)
    torch.testing.assert_close(ref.double(), expect, **tol("attention", torch.float32))
    for b, m in enumerate(q_lens):  # padding rows stay zero
        assert not got[b, m:].any()


def test_paged_attention_fp16_and_scale():
    q, kp, vp, bt, sl, ql, dense = make_case([40, 17], [1, 3], 3, 4, 2, 16, 16, dtype=torch.float16, seed=5)
    got = paged_attention(q, kp, vp, bt, sl, ql, scale=0.2, num_splits=2, impl="triton")
    expect = paged_attention_ref(q.float(), kp.float(), vp.float(), bt, sl, ql, scale=0.2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expect, **tol("attention_kernel", torch.float16))


@pytest.mark.parametrize("seq_lens,q_lens,tq,h,hkv,d,page_size,window,num_splits", [CASES[1], CASES[4], CASES[5]])
def test_paged_attention_bf16_matches_reference(seq_lens, q_lens, tq, h, hkv, d, page_size, window, num_splits):
    """bf16 pages and queries (the engine's dtype on a GPU) through the kernel, in the interpreter too: the
    kernel's tl.dot gets fp32 operands there (kernels._launch.dot_meta). Against the fp32 reference on the same
    bf16 values: P is rounded to bf16 before the P V product and the output once, so 2^-7 relative is the bound."""
    case = make_case(seq_lens, q_lens, tq, h, hkv, d, page_size, dtype=torch.bfloat16, seed=sum(seq_lens) + 1)
    q, kp, vp, bt, sl, ql, _ = case
    got = paged_attention(q, kp, vp, bt, sl, ql, window=window, num_splits=num_splits, impl="triton")
    assert got.dtype == torch.bfloat16
    expect = paged_attention_ref(q.float(), kp.float(), vp.float(), bt, sl, ql, window=window)
    torch.testing.assert_close(got.float(), expect, rtol=2**-7, atol=2**-7)


def test_paged_attention_default_q_lens_is_full_rows():
    q, kp, vp, bt, sl, ql, dense = make_case([12, 20], [4, 4], 4, 2, 2, 16, 16, seed=9)
    got = paged_attention(q, kp, vp, bt, sl, window=5, impl="triton")
    torch.testing.assert_close(got.double(), dense_expect(q, ql, dense, 5), **TOL)


def test_append_then_attend_matches_full_sequence():
    # Decode one token per sequence: append its k/v through paged_kv_append, then attend; equals dense attention
    # over the sequence with the new token at the end.
    g = torch.Generator().manual_seed(3)
    q, kp, vp, bt, sl, ql, dense = make_case([19, 33], [1, 1], 1, 2, 1, 16, 16, seed=11)
    new_k, new_v = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    pos = sl.long()  # the new token's position = current length
    slots = bt[torch.arange(2), pos // 16].long() * 16 + pos % 16
    paged_kv_append(kp, vp, new_k, new_v, slots, impl="triton")
    got = paged_attention(q, kp, vp, bt, sl + 1, impl="triton")
    grown = [(torch.cat([k, new_k[b : b + 1]]), torch.cat([v, new_v[b : b + 1]])) for b, (k, v) in enumerate(dense)]
    torch.testing.assert_close(got.double(), dense_expect(q, ql, grown, None), **TOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_append_writes_only_its_slots(impl):
    g = torch.Generator().manual_seed(4)
    kp, vp = torch.randn(5, 8, 3, 16, generator=g), torch.randn(5, 8, 3, 16, generator=g)
    k, v = torch.randn(6, 3, 16, generator=g), torch.randn(6, 3, 16, generator=g)
    slots = torch.tensor([3, -1, 17, 39, 0, -1])
    k_before, v_before = kp.clone(), vp.clone()
    paged_kv_append(kp, vp, k, v, slots, impl=impl)
    flat_k, flat_v = kp.view(-1, 3, 16), vp.view(-1, 3, 16)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat_k[untouched], k_before.view(-1, 3, 16)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(-1, 3, 16)[untouched])


def test_bad_inputs():
    q, kp, vp, bt, sl, ql, _ = make_case([10, 20], [1, 1], 1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        paged_attention(q[:, :, :3], kp, vp, bt, sl)
    with pytest.raises(TypeError, match="share one dtype"):
        paged_attention(q.double(), kp, vp, bt, sl)
    with pytest.raises(TypeError, match="int32 or int64"):
        paged_attention(q, kp, vp, bt.float(), sl)
    with pytest.raises(ValueError, match="block_table must have shape"):
        paged_attention(q, kp, vp, bt[:1], sl)
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(q, kp.transpose(1, 2), vp.transpose(1, 2), bt, sl)
    with pytest.raises(ValueError, match="q_lens"):
        paged_attention(q, kp, vp, bt, sl, torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="capacity"):
        paged_attention(q, kp, vp, bt, torch.tensor([10, 999]))
    with pytest.raises(ValueError, match="outside"):
        paged_attention(q, kp, vp, torch.full_like(bt, kp.size(0)), sl)
    with pytest.raises(ValueError, match="window"):
        paged_attention(q, kp, vp, bt, sl, window=-1)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention(q, kp, vp, bt, sl, num_splits=0)
    with pytest.raises(ValueError, match="CPU or CUDA tensor"):
        paged_attention(q, kp, vp, bt.to("meta"), sl)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="slots"):
        paged_kv_append(kp, vp, k, v, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_pages"):
        paged_kv_append(kp, vp, k, v, torch.tensor([0, kp.size(0) * kp.size(1)]))
    with pytest.raises(ValueError, match="shape"):
        paged_kv_append(kp, vp, k[:, :1], v[:, :1], torch.tensor([0, 1]))


def _laid_out(starts, seq_lens, q_lens, tq, h, hkv, d, page_size, num_pages, seed=0, scatter=()):
    """A pool of garbage with sequence b on the consecutive pages from starts[b] (or on shuffled free pages when b
    is in `scatter`); returns the paged inputs and the dense k/v of each sequence."""
    g = torch.Generator().manual_seed(seed)
    kp, vp = (torch.randn(num_pages, page_size, hkv, d, generator=g) for _ in range(2))
    need = [-(-n // page_size) for n in seq_lens]
    used = [p for b, s in enumerate(starts) if b not in scatter for p in range(s, s + need[b])]
    assert len(used) == len(set(used)), "sequences overlap"
    spare = [p for p in torch.randperm(num_pages, generator=g).tolist() if p not in set(used)]
    table = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int32)
    dense = []
    for b, n in enumerate(seq_lens):
        pages = [spare.pop() for _ in range(need[b])] if b in scatter else list(range(starts[b], starts[b] + need[b]))
        table[b, : need[b]] = torch.tensor(pages)
        k, v = torch.randn(n, hkv, d, generator=g) * 1.5, torch.randn(n, hkv, d, generator=g)
        for j in range(n):
            kp[pages[j // page_size], j % page_size], vp[pages[j // page_size], j % page_size] = k[j], v[j]
        dense.append((k, v))
    q = torch.randn(len(seq_lens), tq, h, d, generator=g) * 1.5
    return q, kp, vp, table, torch.tensor(seq_lens), torch.tensor(q_lens), dense


TORCH_CASES = [  # (starts (pages), seq_lens, q_lens, Tq, H, Hkv, D, page_size, window, scatter, runs, whole)
    ([0, 3, 6, 9], [40, 40, 40, 40], [1, 1, 1, 1], 1, 4, 2, 16, 16, None, (), 1, True),  # one strided run
    ([0, 3, 6, 9], [40, 40, 40, 40], [1, 1, 1, 1], 1, 2, 2, 16, 16, 9, (), 1, True),  # ... under a window
    ([9, 0, 3, 6], [40, 40, 40, 40], [1, 1, 1, 1], 1, 2, 1, 16, 16, 20, (), 1, False),  # run out of batch order
    ([0, 3, 7, 12], [33, 33, 33, 33], [1, 1, 1, 1], 1, 2, 2, 16, 16, None, (), 2, False),  # uneven steps
    ([0, 4, 8, 12], [50, 17, 50, 9], [1, 1, 1, 1], 1, 2, 2, 8, 16, 12, (), 3, False),  # lengths differ
    ([0, 4, 8, 12], [50, 50, 50, 50], [1, 1, 1, 1], 1, 3, 1, 16, 16, None, (1,), 2, False),  # one gathered
    ([0, 4, 8, 12], [50, 23, 50, 9], [6, 1, 1, 9], 9, 2, 2, 24, 16, 7, (3,), 2, False),  # prefill chunks
    ([0, 7, 10, 17], [50, 23, 50, 9], [6, 0, 1, 2], 6, 2, 1, 16, 8, 0, (), 1, False),  # window 0, an empty row
]


@pytest.mark.parametrize("starts,seq_lens,q_lens,tq,h,hkv,d,page_size,window,scatter,runs,whole", TORCH_CASES)
def test_torch_path_views_and_strided_runs(starts, seq_lens, q_lens, tq, h, hkv, d, page_size, window, scatter,
                                           runs, whole):
    """The PyTorch path reads consecutive pages as views and groups equal-length decode rows that step through the
    pool evenly into one call (the plan says so): equal to the gathering reference and to dense float64."""
    from tritonchat.kernels.paged_attention import PagedPlan

    q, kp, vp, bt, sl, ql, dense = _laid_out(starts, seq_lens, q_lens, tq, h, hkv, d, page_size, 24, scatter=scatter)
    plan = PagedPlan(bt.tolist(), seq_lens, q_lens, tq, page_size, q.device)
    assert len(plan.runs) == runs and plan.whole == whole
    want = paged_attention_ref(q, kp, vp, bt, sl, ql, window=window)
    for got in (paged_attention(q, kp, vp, bt, sl, ql, window=window, impl="torch"),
                paged_attention(q, kp, vp, bt, sl, ql, window=window, impl="torch", plan=plan)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), dense_expect(q, ql, dense, window), **TOL)


def test_torch_path_keeps_nan_to_its_sequence():
    """NaN in one sequence's keys comes out in that sequence's rows only, and NaN in the pool past a sequence's
    length (stale rows of an earlier one) never reaches it."""
    q, kp, vp, bt, sl, ql, dense = _laid_out([0, 3, 6], [40, 40, 40], [1, 1, 1], 1, 2, 2, 16, 16, 12)
    kp[3, 2] = float("nan")  # sequence 1, token 2
    kp[2, 10], vp[8, 9] = float("nan"), float("inf")  # past the 40 tokens of sequences 0 and 2
    got = paged_attention(q, kp, vp, bt, sl, ql, impl="torch")
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
    torch.testing.assert_close(got[[0, 2]], paged_attention_ref(q, kp, vp, bt, sl, ql)[[0, 2]])


def test_plan_bad_inputs():
    from tritonchat.kernels.paged_attention import PagedPlan

    with pytest.raises(ValueError, match="one block-table row"):
        PagedPlan([[0]], [4, 4], [1, 1], 1, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="sequence 0"):
        PagedPlan([[0]], [40], [1], 1, 16, torch.device("cpu"))  # 40 tokens on one page of 16
    with pytest.raises(ValueError, match="sequence 1"):
        PagedPlan([[0], [1]], [4, 2], [1, 3], 3, 16, torch.device("cpu"))  # q_len > seq_len
    with pytest.raises(ValueError, match="sequence 0"):
        PagedPlan([[-1]], [4], [1], 1, 16, torch.device("cpu"))
