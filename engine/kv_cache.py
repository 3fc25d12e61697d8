"""The paged KV cache: a page pool shared by all sequences, its allocator, per-sequence state, and the
per-step view the model attends through.

Keys and values of every layer live in two tensors (n_layer, num_pages, page_size, Hkv, D). A sequence owns a
list of pages (its block table row); token j sits in page pages[j // page_size], row j % page_size, in every
layer. Pages are handed out and taken back by a free-list allocator, so finished sequences' pages are reused by
new ones and a sequence can be cut back (prefix reuse) by returning its tail pages. Pages are reference-counted:
`fork` gives a second sequence the same pages (beam search's beams share their prompt), and `make_writable`
copies a shared, partly filled page before a sequence appends to it (copy on write).

Inference state is explicit: the engine builds a `PagedBatch` for each forward step (which tokens of which
sequences, at which positions), the model reads positions from it and appends k/v through it, and the engine
calls `PagedBatch.commit()` afterwards to advance the sequences. The model never advances the cache itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tritonchat.kernels import PagedPlan, paged_attention, paged_kv_append, resolve_impl


class OutOfPages(RuntimeError):
    """The page pool has fewer free pages than a request needs."""


class PageAllocator:
    """Page ids 0..num_pages-1, free or in use, with a reference count per page in use.

    `allocate` hands out pages with count 1, `share` adds a reference (a forked sequence, e.g. a beam, reading the
    same prompt pages), `free` drops one and returns the page to the pool when none is left. Freeing a page that
    is not in use (a double free, a foreign id) is an error.

    Pages come as one run of consecutive ids where the pool has one (the lowest that fits; `after=p` first tries
    the run right after page p, to extend a sequence in place), so that a sequence's tokens are usually one
    contiguous stretch of the pool, which the CPU attention reads as a view instead of a gather. A fragmented
    pool still hands out any free pages (the lowest ids)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._is_free = bytearray(b"\x01" * num_pages)
        self._num_free = num_pages
        self._refs: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        """Distinct pages in use (a shared page counts once)."""
        return len(self._refs)

    @property
    def num_refs(self) -> int:
        """References held over all pages in use: what num_used would be without sharing."""
        return sum(self._refs.values())

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def _pick(self, n: int, after: int | None) -> list[int]:
        run = b"\x01" * n
        if after is not None and 0 <= after + 1 and after + 1 + n <= self.num_pages:
            if self._is_free[after + 1: after + 1 + n] == run:
                return list(range(after + 1, after + 1 + n))
        start = self._is_free.find(run)
        if start >= 0:
            return list(range(start, start + n))
        return np.flatnonzero(np.frombuffer(self._is_free, dtype=np.uint8))[:n].tolist()

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._num_free:
            raise OutOfPages(f"need {n} pages but only {self._num_free} of {self.num_pages} are free")
        if n == 0:
            return []
        pages = self._pick(n, after)
        for p in pages:
            self._is_free[p] = 0
            self._refs[p] = 1
        self._num_free -= n
        return pages

    def share(self, pages: Sequence[int]) -> None:
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"page {p} is not allocated: cannot share it")
        for p in pages:
            self._refs[p] += 1

    def free(self, pages: Sequence[int]) -> None:
        for p in pages:
            n = self._refs.get(p)
            if n is None:
                raise ValueError(f"page {p} is not allocated (double free?)")
            if n > 1:
                self._refs[p] = n - 1
            else:
                del self._refs[p]
                self._is_free[p] = 1
                self._num_free += 1


@dataclass
class SequenceKV:
    """One sequence's share of the cache: its pages and the tokens whose k/v they hold.

    The token ids are kept so that a later request can reuse the longest common prefix, and so that the smear
    of the first new token can use the previous token's normed embedding (a function of its id alone)."""

    pages: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)


class PagedKVCache:
    """The page pool of all layers plus its allocator."""

    def __init__(self, n_layer: int, num_pages: int, page_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", impl: str = "auto") -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size, self.impl = page_size, resolve_impl(impl, device)
        shape = (n_layer, num_pages, page_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = PageAllocator(num_pages)
        self._packed: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(weight) -> (its key, prepacked copy)
        self._pack_ok = self.k.device.type == "cpu"

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T for the model's inference on a CPU (GPT uses it for the lm_head), through a copy of w prepacked
        for oneDNN's GEMM: at a decode step's 4 rows and more it is faster than the plain matmul. The copy is
        made on first use and remade whenever w changes (e.g. an optimizer step between two rounds of sampling, as
        in RL); it lives, one more copy of w, as long as the cache. Plain F.linear off a CPU, for other dtypes, or
        where the build has no oneDNN."""
        rows = x.numel() // max(1, x.size(-1))
        if (rows < 4 or not self._pack_ok or x.dtype != torch.float32 or w.dtype != torch.float32
                or x.device != w.device):  # one to three rows: the plain GEMV is as fast (bench/cpu.py)
            return F.linear(x, w.to(x.dtype))
        key = (w.data_ptr(), w._version, tuple(w.shape))
        try:
            entry = self._packed.get(id(w))
            if entry is None or entry[0] != key:
                self._packed[id(w)] = entry = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
            return torch.ops.mkldnn._linear_pointwise(x, entry[1], None, "none", [None], "")
        except (AttributeError, RuntimeError, NotImplementedError):  # no oneDNN here: the plain matmul from now on
            self._pack_ok = False
            self._packed.clear()
            return F.linear(x, w)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def reserve(self, seq: SequenceKV, n_tokens: int) -> None:
        """Give `seq` pages for n_tokens tokens in total (raises OutOfPages, allocating nothing, when short)."""
        extra = self.pages_for(n_tokens) - len(seq.pages)
        if extra > 0:
            seq.pages.extend(self.allocator.allocate(extra, after=seq.pages[-1] if seq.pages else None))

    def truncate(self, seq: SequenceKV, n_tokens: int) -> None:
        """Keep the first n_tokens tokens of `seq` and return the pages past them to the pool."""
        n_tokens = max(0, min(n_tokens, seq.length))
        del seq.tokens[n_tokens:]
        keep = self.pages_for(n_tokens)
        self.allocator.free(seq.pages[keep:])
        del seq.pages[keep:]

    def release(self, seq: SequenceKV) -> None:
        self.allocator.free(seq.pages)
        seq.pages.clear()
        seq.tokens.clear()

    def fork(self, seq: SequenceKV) -> SequenceKV:
        """A new sequence holding the same tokens on the same pages (shared, not copied); pages `seq` reserved
        past its tokens are not shared. Write to either only after `make_writable`."""
        pages = seq.pages[: self.pages_for(seq.length)]
        self.allocator.share(pages)
        return SequenceKV(list(pages), list(seq.tokens))

    def make_writable(self, seq: SequenceKV, n_tokens: int) -> int:
        """Pages for n_tokens tokens in all, every page the new tokens go to owned by `seq` alone: a shared,
        partly filled last page is copied first (copy on write). Returns the number of pages copied."""
        self.reserve(seq, n_tokens)
        copied = 0
        for i in range(seq.length // self.page_size, self.pages_for(n_tokens)):
            old = seq.pages[i]
            if self.allocator.refcount(old) > 1:
                (new,) = self.allocator.allocate(1, after=seq.pages[i - 1] if i else None)
                self.k[:, new].copy_(self.k[:, old])
                self.v[:, new].copy_(self.v[:, old])
                self.allocator.free([old])
                seq.pages[i] = new
                copied += 1
        return copied

    def batch(self, seqs: Sequence[SequenceKV], chunks: Sequence[Sequence[int]]) -> PagedBatch:
        return PagedBatch(self, seqs, chunks)


class PagedBatch:
    """One forward step over some sequences: the `cache` argument of `GPT.forward`.

    chunks[i] are the new tokens of seqs[i] (at least one each); `idx` holds them padded on the right with
    token 0 to (B, T). What the model uses:
        positions    (B, T) int64 absolute position of every token (0 on padding)
        prev_tokens  (B,) int64 the token just before each chunk, -1 where the sequence starts
        all_have_prev  True when no sequence starts in this step (every prev_tokens >= 0)
        token_range  (min, max) of idx, read on the host
        attend(layer, q, k, v, window) -> (B, T, H, D): append this chunk's k, v of `layer` to the pages, then
                     attend over each whole sequence (paged_attention); padding rows come back zero.
    After the forward, `commit()` records the chunks as cached.
    """

    def __init__(self, cache: PagedKVCache, seqs: Sequence[SequenceKV], chunks: Sequence[Sequence[int]]) -> None:
        if len(seqs) != len(chunks) or not seqs:
            raise ValueError(f"need one non-empty chunk per sequence, got {len(seqs)} sequences, {len(chunks)} chunks")
        ps = cache.page_size
        B, T = len(seqs), max(len(c) for c in chunks)
        idx: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens, q_lens, prev = [], [], []
        for i, (s, c) in enumerate(zip(seqs, chunks)):
            n, m = s.length, len(c)
            if m == 0:
                raise ValueError(f"sequence {i} has an empty chunk")
            if n + m > len(s.pages) * ps:
                raise ValueError(f"sequence {i} holds {len(s.pages)} pages, too few for {n + m} tokens: reserve first")
            pages, pad = s.pages, [0] * (T - m)
            idx += c
            idx += pad
            pos += range(n, n + m)
            pos += pad
            slots += [pages[p // ps] * ps + p % ps for p in range(n, n + m)]
            slots += [-1] * (T - m)
            seq_lens.append(n + m)
            q_lens.append(m)
            prev.append(s.tokens[-1] if n else -1)
        # One host-to-device copy for the index tensors the model reads every step.
        flat = torch.tensor(idx + pos + slots + prev, dtype=torch.int64).to(cache.device, non_blocking=True)
        N = B * T
        slots_t, self.prev_tokens = flat[2 * N: 3 * N], flat[3 * N:]
        self.cache, self.seqs, self.chunks = cache, list(seqs), [list(c) for c in chunks]
        self.idx, self.positions, self.slots = flat[:N].view(B, T), flat[N: 2 * N].view(B, T), slots_t
        self.token_range = (min(idx), max(idx))  # of idx, padding included: the model's id check reads it here
        self.all_have_prev = min(prev) >= 0  # no sequence starts in this step
        self.seq_lens_list, self.q_lens_list = seq_lens, q_lens
        # The slots of the real tokens (padding skipped), for the PyTorch path's append: one index_copy_ a layer.
        self._real_rows = None
        self._real_slots = slots_t
        if any(m != T for m in q_lens):
            rows = [i * T + t for i, m in enumerate(q_lens) for t in range(m)]
            self._real_rows = torch.tensor(rows, dtype=torch.int64).to(cache.device, non_blocking=True)
            self._real_slots = slots_t[self._real_rows]
        self._plan = None
        if cache.impl == "torch":
            self._plan = PagedPlan([s.pages for s in seqs], seq_lens, q_lens, T, ps, cache.device)

    @functools.cached_property
    def block_table(self) -> torch.Tensor:
        """(B, max_pages) int32: each sequence's pages, padded with page 0."""
        width = max(1, max(len(s.pages) for s in self.seqs))
        rows = [s.pages + [0] * (width - len(s.pages)) for s in self.seqs]
        return torch.tensor(rows, dtype=torch.int32).to(self.cache.device, non_blocking=True)

    @functools.cached_property
    def seq_lens(self) -> torch.Tensor:
        """(B,) int32 tokens in the cache per sequence, this step's included."""
        return torch.tensor(self.seq_lens_list, dtype=torch.int32).to(self.cache.device, non_blocking=True)

    @functools.cached_property
    def q_lens(self) -> torch.Tensor:
        """(B,) int32 this step's real tokens per sequence."""
        return torch.tensor(self.q_lens_list, dtype=torch.int32).to(self.cache.device, non_blocking=True)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The cache's `PagedKVCache.linear` (a prepacked x @ w.T on a CPU)."""
        return self.cache.linear(x, w)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """q (B, T, H, D), k and v (B, T, Hkv, D) for this step's tokens -> (B, T, H, D)."""
        B, T, Hkv, D = k.shape
        kp, vp = self.cache.k[layer], self.cache.v[layer]
        k, v = k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
        if self.cache.impl == "torch":  # the indices are built (and checked) here, once a step
            if self._real_rows is not None:
                k, v = k[self._real_rows], v[self._real_rows]
            kp.view(-1, Hkv, D).index_copy_(0, self._real_slots, k)
            vp.view(-1, Hkv, D).index_copy_(0, self._real_slots, v)
        else:
            paged_kv_append(kp, vp, k, v, self.slots, impl=self.cache.impl)
        if self._plan is not None:  # the plan stands in for the index tensors (never built on this path)
            return paged_attention(q, kp, vp, None, None, None, window=window, impl="torch", plan=self._plan)
        return paged_attention(q, kp, vp, self.block_table, self.seq_lens, self.q_lens, window=window,
                               impl=self.cache.impl)

    def last_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The row of each sequence's last real token: (B, T, ...) -> (B, ...)."""
        if x.size(1) == 1:
            return x[:, 0]
        return x[torch.arange(x.size(0), device=x.device), self.q_lens.to(x.device).long() - 1]

    def commit(self) -> None:
        """Record this step's chunks as cached (call once, after the forward)."""
        for s, c in zip(self.seqs, self.chunks):
            s.tokens.extend(c)
