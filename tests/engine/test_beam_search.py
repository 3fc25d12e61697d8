"""Beam search on a tiny random GPT with a 6-token vocabulary: greedy at one beam, the brute-force optimum when the
beams can hold every prefix, and pages shared between beams (reference counts, copy on write)."""

import itertools
import math

import pytest
import torch
from tritonchat.engine.engine import Engine, SamplingParams
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.kv_cache import OutOfPages, PageAllocator, SequenceKV

V = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=128)
    m = build_model(cfg, impl="torch")
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 2.0 / math.sqrt(p.size(1)))
            else:
                p.uniform_(0.2, 0.8)
    return m.eval()


@torch.no_grad()
def seq_logprob(model, prompt, tokens):
    """Sum of log p(tokens | prompt) from the plain full forward (the oracle)."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


@torch.no_grad()
def brute_force(model, prompt, max_new, stop, length_penalty):
    """The best-scoring continuation over all of them: ended by the stop token (counted in the length) or at
    max_new tokens. One plain forward over all V ** max_new full-length continuations scores every prefix."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=max_new)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    logp = torch.log_softmax(model(ids).double(), dim=-1)[:, len(prompt) - 1: -1]  # (N, max_new, V)
    step = logp.gather(2, seqs[:, :, None])[:, :, 0].cumsum(1)  # log p of each prefix
    best = None
    for row, seq in enumerate(seqs.tolist()):
        for n in range(1, max_new + 1):
            if any(t in stop for t in seq[: n - 1]) or (n < max_new and seq[n - 1] not in stop):
                continue
            score = step[row, n - 1].item() / n ** length_penalty
            if best is None or score > best[0]:
                best = (score, seq[: n - 1] if seq[n - 1] in stop else seq[:n])
    return best


def test_one_beam_is_greedy(model):
    engine = Engine(model, impl="torch", page_size=4, max_batch_size=4)
    for prompt, stop in [([1, 2, 3], ()), ([4, 0, 5, 5, 1], (2,)), ([3], (0, 1))]:
        greedy = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_tokens=stop))[0]
        (h,) = engine.beam_search(prompt, num_beams=1, max_tokens=10, stop_tokens=stop)
        assert h.tokens == greedy.tokens and h.finish_reason == greedy.finish_reason
    assert engine.cache.allocator.num_used == 0


@pytest.mark.parametrize("stop,length_penalty", [((), 1.0), ((2,), 1.0), ((2,), 0.0), ((0, 4), 2.0)])
def test_beam_search_finds_the_brute_force_optimum(model, stop, length_penalty):
    prompt, max_new = [1, 3, 5, 0, 2], 4
    engine = Engine(model, impl="torch", page_size=4, num_pages=1200, max_batch_size=4)
    # V ** (max_new - 1) beams keep every prefix: the search is then exhaustive
    hyps = engine.beam_search(prompt, num_beams=V ** (max_new - 1), max_tokens=max_new, stop_tokens=stop,
                              length_penalty=length_penalty)
    score, tokens = brute_force(model, prompt, max_new, set(stop), length_penalty)
    assert hyps[0].tokens == tokens
    assert hyps[0].score == pytest.approx(score, abs=1e-4)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert engine.cache.allocator.num_used == 0


def test_beam_search_beats_or_equals_greedy(model):
    engine = Engine(model, impl="torch", page_size=4, max_batch_size=4)
    prompt = [2, 2, 4, 1]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=()))[0].tokens
    best = engine.beam_search(prompt, num_beams=4, max_tokens=6, stop_tokens=())[0]
    assert best.logprob >= seq_logprob(model, prompt, greedy) - 1e-4
    assert best.logprob == pytest.approx(seq_logprob(model, prompt, best.tokens), abs=1e-4)


def test_beam_search_through_the_paged_attention_kernel(model):
    """The shared and copied pages read through kernels.paged_attention (Triton; the interpreter on a CPU) give
    the beams of the reference path."""
    prompt = [1, 2, 3, 4, 5, 0]
    ref = Engine(model, impl="torch", page_size=4, max_batch_size=4).beam_search(prompt, num_beams=3, max_tokens=4,
                                                                                stop_tokens=(2,))
    engine = Engine(model, impl="auto", page_size=4, max_batch_size=4)
    got = engine.beam_search(prompt, num_beams=3, max_tokens=4, stop_tokens=(2,))
    assert [h.tokens for h in got] == [h.tokens for h in ref]
    assert [h.score for h in got] == pytest.approx([h.score for h in ref], abs=1e-4)
    assert engine.stats["cow_pages"] > 0 and engine.cache.allocator.num_used == 0


def test_beams_share_the_prompt_pages(model):
    page_size, num_beams, max_new = 4, 4, 6
    prompt = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4]  # 10 tokens: 2 full pages and a partly filled third
    engine = Engine(model, impl="torch", page_size=page_size, num_pages=64, max_batch_size=4)
    alloc = engine.cache.allocator
    search = engine.start_beam_search(prompt, num_beams=num_beams, max_tokens=max_new, stop_tokens=())
    assert alloc.num_used == search.budget  # its worst case, taken from the pool up front
    search.step()  # the prefill
    search.step()  # the first token: 4 beams forked off the prompt
    pages = [kv.pages for kv, _, _ in search.beams]
    assert len(pages) == num_beams
    shared = pages[0][:2]
    assert all(p[:2] == shared for p in pages)  # the full prompt pages: one copy for all beams
    assert all(alloc.refcount(p) == num_beams for p in shared)
    assert len({p[2] for p in pages}) == num_beams  # the partly filled page: copied on write, one per beam
    assert search.pages_in_use == 2 + num_beams < num_beams * 3
    assert engine.stats["cow_pages"] == num_beams - 1  # the last beam writes to the original in place
    while not search.step():
        assert search.pages_in_use <= 2 + num_beams * 2
    full_copies = num_beams * engine.cache.pages_for(len(prompt) + max_new - 1)  # 16 without sharing
    assert search.peak_pages < full_copies
    assert alloc.num_used == 0 and alloc.num_free == 64


def test_requests_run_beside_a_beam_search(model):
    """A search advanced between steps: requests admitted meanwhile get what they get alone, the search what it
    gets alone, and a request that must wait for pages waits (no OutOfPages)."""
    prompts = [[1, 2, 3], [4, 5], [0, 0, 1, 3]]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_tokens=())
    alone = Engine(model, impl="torch", page_size=4, max_batch_size=4)
    want = [g.tokens for g in alone.generate(prompts, params)]
    want_beams = alone.beam_search([5, 4, 3], num_beams=3, max_tokens=6, stop_tokens=(2,))
    need = alone.beam_pages_needed(3, 3, 6)
    # room for the search and one request at a time
    engine = Engine(model, impl="torch", page_size=4, num_pages=need + 3, max_batch_size=4)
    search = engine.start_beam_search([5, 4, 3], num_beams=3, max_tokens=6, stop_tokens=(2,))
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_work() or not search.done:
        search.step()
        engine.step()
        assert search.done or engine.num_running <= 1  # the search holds its worst case
    assert [engine.result(i).tokens for i in ids] == want
    assert [h.tokens for h in search.hypotheses] == [h.tokens for h in want_beams]
    assert engine.cache.allocator.num_used == 0


def test_fork_and_copy_on_write(model):
    engine = Engine(model, impl="torch", page_size=4, num_pages=8, max_batch_size=2)
    cache = engine.cache
    s = SequenceKV()
    cache.reserve(s, 6)
    b = cache.batch([s], [[1, 2, 3, 4, 5, 0]])
    model(b.idx, cache=b)
    b.commit()
    t = cache.fork(s)
    assert t.pages == s.pages and cache.allocator.num_used == 2 and cache.allocator.num_refs == 4
    before = cache.k[:, s.pages[1]].clone()
    assert cache.make_writable(t, 7) == 1  # the half-full second page is copied
    assert t.pages[0] == s.pages[0] and t.pages[1] != s.pages[1]
    assert torch.equal(cache.k[:, t.pages[1]], before)
    assert cache.make_writable(s, 7) == 0  # s owns its page alone now
    cache.release(s)
    cache.release(t)
    assert cache.allocator.num_used == 0 and cache.allocator.num_free == 8


def test_allocator_refcounts():
    a = PageAllocator(3)
    p = a.allocate(2)
    a.share(p)
    a.free(p)
    assert a.num_used == 2 and a.num_free == 1
    a.free(p)
    assert a.num_used == 0
    with pytest.raises(ValueError, match="double free"):
        a.free(p[:1])
    with pytest.raises(ValueError, match="not allocated"):
        a.share([0])


def test_beam_search_bad_input(model):
    engine = Engine(model, impl="torch", page_size=4, num_pages=6, max_batch_size=2)
    with pytest.raises(ValueError, match="num_beams"):
        engine.beam_search([1], num_beams=0)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.beam_search([1], num_beams=2, max_tokens=-1)
    with pytest.raises(OutOfPages):
        engine.beam_search([1, 2, 3], num_beams=8, max_tokens=20)
    assert engine.cache.allocator.num_used == 0
