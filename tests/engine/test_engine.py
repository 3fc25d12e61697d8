"""The paged-cache engine on CPU with a tiny random GPT: exactness against the plain forward, batching,
sampling, limits, page accounting, prefix reuse, tool use and streaming (the last two with a scripted model)."""

import math
import random

import pytest
import torch
import torch.nn as nn
from tritonchat.engine.engine import Engine, SamplingParams, sample_from_logits
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.kv_cache import OutOfPages, PageAllocator
from tritonchat.engine.tokenizer import Tokenizer

from tests.tolerances import tol


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "what", "is", "twelve", "times", "seven", "café", "東京"]
    docs = [" ".join(rng.choice(words) for _ in range(30)) + f" {rng.randint(0, 999)} * {rng.randint(0, 99)}"
            for _ in range(100)]
    return Tokenizer.train_from_iterator(docs, 300)


def random_gpt(seq_len=32, vocab=300, seed=0):
    """GQA (2 query heads, 1 kv head), 2 layers; every weight random so attention, smear, value embeddings and
    backout all matter and greedy argmaxes are far from ties."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=256)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
            else:
                p.uniform_(0.2, 0.8)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_gpt()


@torch.no_grad()
def greedy_full_forward(model, prompt, n):
    """The oracle: re-run the whole sequence through the plain forward and take the argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 1, 42, 11, 64, 128], [200], [9, 8, 7, 6, 5]]
GREEDY = SamplingParams(max_tokens=26, temperature=0.0, stop_tokens=())


def test_greedy_matches_full_forward_and_batching(model):
    # 12 + 26 tokens passes sequence_len (32): the window of every layer then cuts the oldest keys.
    want = [greedy_full_forward(model, p, 26) for p in PROMPTS]
    engine = Engine(model, page_size=4, max_batch_size=4, max_seq_len=64, prefill_chunk=5, impl="torch")
    got = engine.generate(PROMPTS, GREEDY)
    assert [g.tokens for g in got] == want
    assert all(g.finish_reason == "length" for g in got)
    for p, w in zip(PROMPTS, want):  # each alone, other page size
        alone = Engine(model, page_size=16, max_batch_size=1, max_seq_len=64, impl="torch")
        assert alone.generate([p], GREEDY)[0].tokens == w
    assert engine.cache.allocator.num_used == 0


def test_paged_kernel_path_in_interpreter(model):
    prompts, n = [PROMPTS[0], PROMPTS[2]], 4
    want = [greedy_full_forward(model, p, n) for p in prompts]
    engine = Engine(model, page_size=16, max_batch_size=2, max_seq_len=64, prefill_chunk=8, impl="triton")
    got = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, stop_tokens=()))
    assert [g.tokens for g in got] == want


def test_bf16_engine_under_interpreter_follows_fp32():
    """The engine in bf16 (bf16 embeddings and activations, a bf16 page pool, the paged kernel in the
    interpreter) picks the fp32 engine's greedy tokens wherever fp32's choice is not a near-tie: bf16 rounds
    activations to 2^-8 relative, which can only flip an argmax whose margin is of that order. A kernel that
    computed garbage in bf16 would drift at once (and typically repeat one token forever)."""
    import copy

    model = random_gpt()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # wider logit gaps (the softcap saturates beyond this)
    prompt, n = PROMPTS[0], 12
    params = SamplingParams(max_tokens=n, temperature=0.0, stop_tokens=())
    fp32 = Engine(model, page_size=16, max_batch_size=1, max_seq_len=64, impl="triton").generate([prompt], params)
    want = fp32[0].tokens
    with torch.no_grad():  # fp32 margins between the two best logits along fp32's own path
        top2 = model(torch.tensor([prompt + want[:-1]]))[0, len(prompt) - 1:].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    decisive = next((i for i, m in enumerate(margins) if m < 0.2), n)
    assert decisive >= 8 and len(set(want[:decisive])) > 1, (margins, want)  # the comparison means something
    m16 = copy.deepcopy(model)
    m16.set_compute_dtype(torch.bfloat16)
    engine = Engine(m16, page_size=16, max_batch_size=1, max_seq_len=64, impl="triton")
    assert engine.cache.k.dtype == torch.bfloat16
    got = engine.generate([prompt], params)[0].tokens
    assert got[:decisive] == want[:decisive], (got, want, margins)


def test_sampling_is_seeded_and_batch_independent(model):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    params = [SamplingParams(max_tokens=12, temperature=1.5, top_k=k, top_p=p, seed=s, stop_tokens=())
              for k, p, s in [(None, None, 1), (20, None, 2), (50, 0.9, 3)]]
    engine = Engine(model, max_batch_size=3, max_seq_len=64, impl="torch")
    batched = [g.tokens for g in engine.generate(prompts, params)]
    for p, sp, b in zip(prompts, params, batched):
        assert engine.generate([p], sp)[0].tokens == b  # alone, and again: same seed, same tokens
    reseeded = engine.generate([prompts[0]], SamplingParams(max_tokens=12, temperature=1.5, seed=99, stop_tokens=()))
    assert reseeded[0].tokens != batched[0]


def test_sample_from_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(sample_from_logits(logits, [1, 1, 1], [None] * 3, gens), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, [None] * 3, [1e-6] * 3, gens), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(30):
        picks = sample_from_logits(logits, [3, 3, 3], [None] * 3, gens)
        assert all(int(picks[i]) in top3[i].tolist() for i in range(3))
    # top_p keeps the smallest head of the distribution whose mass reaches p
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    need = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    for _ in range(30):
        pick = int(sample_from_logits(logits[:1], [None], [0.5], gens[:1])[0])
        assert pick in order[:need].tolist()


def test_max_tokens_and_context_limit(model):
    engine = Engine(model, max_seq_len=20, impl="torch")
    g = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=5, temperature=0.0, stop_tokens=()))[0]
    assert len(g.tokens) == 5 and g.finish_reason == "length"
    g = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=100, temperature=0.0, stop_tokens=()))[0]
    assert len(PROMPTS[2]) + len(g.tokens) - 1 == 20 and g.finish_reason == "length"  # the cache filled up
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request(list(range(21)))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_stop_tokens_end_without_being_output(model):
    free = Engine(model, max_seq_len=64, impl="torch").generate([PROMPTS[0]], GREEDY)[0].tokens
    stop = free[3]
    g = Engine(model, max_seq_len=64, impl="torch").generate(
        [PROMPTS[0]], SamplingParams(max_tokens=26, temperature=0.0, stop_tokens=[stop]))[0]
    assert g.tokens == free[: free.index(stop)] and g.finish_reason == "stop"


def test_continuous_batching_reuses_pages_without_leaks(model):
    prompts = [[i + 1, 2 * i + 3, 100 + i] for i in range(6)]
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=())
    want = [greedy_full_forward(model, p, 6) for p in prompts]
    # Each request needs ceil((3 + 6 - 1) / 4) = 2 pages; 5 pages fit two at a time (max_batch_size 3).
    engine = Engine(model, page_size=4, num_pages=5, max_batch_size=3, max_seq_len=64, impl="torch")
    ids = [engine.add_request(p, params) for p in prompts]
    seen_pages, peak = [], 0
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.cache.allocator.num_used)
        assert engine.num_running <= 2
        seen_pages.append(sorted(p for r in engine._running for p in r.kv.pages))
    assert peak <= 4 and engine.cache.allocator.num_used == 0 and engine.cache.allocator.num_free == 5
    assert [engine.result(i).tokens for i in ids] == want
    assert seen_pages[0] and any(set(s) & set(seen_pages[0]) for s in seen_pages[3:])  # pages came back


def test_out_of_pages_is_a_clear_error(model):
    engine = Engine(model, page_size=4, num_pages=3, max_seq_len=64, impl="torch")
    with pytest.raises(ValueError, match="needs 4 pages .* pool has 3"):
        engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=12))
    session = engine.new_session()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=()), session)
    while engine.has_work():
        engine.step()
    assert engine.cache.allocator.num_used == 2  # the idle session keeps its conversation
    engine.add_request([9, 9, 9], SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=()))
    with pytest.raises(OutOfPages, match="idle sessions"):
        engine.step()
    engine.close_session(session)
    engine.step()
    alloc = PageAllocator(2)
    pages = alloc.allocate(2)
    with pytest.raises(OutOfPages):
        alloc.allocate(1)
    alloc.free(pages)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[:1])


def test_prefix_reuse_matches_fresh_prefill(model):
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_tokens=())
    engine = Engine(model, page_size=4, max_seq_len=64, impl="torch")
    session = engine.new_session()
    turn1 = PROMPTS[0]
    out1 = list(engine.stream(turn1, params, session))
    tokens1 = [e.token for e in out1 if e.token is not None]
    assert session.cached_tokens == turn1 + tokens1[:-1]  # the last sampled token was never fed
    turn2 = turn1 + tokens1 + [77, 78, 79]
    before = dict(engine.stats)
    rid = engine.add_request(turn2, params, session)
    while engine.has_work():
        engine.step()
    reused = engine.stats["reused_tokens"] - before["reused_tokens"]
    prefilled = engine.stats["prefilled_tokens"] - before["prefilled_tokens"]
    assert reused == len(turn1) + len(tokens1) - 1 and prefilled == len(turn2) - reused
    fresh = Engine(model, page_size=8, max_seq_len=64, impl="torch")
    assert engine.result(rid).tokens == fresh.generate([turn2], params)[0].tokens
    # A conversation edited early on reuses only the common prefix, and still matches a fresh prefill.
    turn3 = turn1[:4] + [1, 2, 3]
    rid = engine.add_request(turn3, params, session)
    while engine.has_work():
        engine.step()
    assert engine.result(rid).tokens == fresh.generate([turn3], params)[0].tokens
    engine.close_session(session)
    assert engine.cache.allocator.num_used == 0


def test_closing_a_stream_cancels_and_frees(model):
    engine = Engine(model, max_seq_len=64, impl="torch")
    events = engine.stream(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0, stop_tokens=()))
    first = [next(events) for _ in range(3)]
    events.close()
    assert all(e.token is not None for e in first)
    assert engine.cache.allocator.num_used == 0 and not engine.has_work()


class ScriptedModel(nn.Module):
    """Predicts transcript[p + 1] at position p, whatever the input; records every token it is fed."""

    def __init__(self, transcript, vocab):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=128)
        self.rotary_seq_len, self.compute_dtype = 640, torch.float32
        self.anchor = nn.Parameter(torch.zeros(1))
        self.transcript, self.fed = transcript, []

    def forward(self, idx, cache, last_only=False):
        for row, n in zip(idx.tolist(), cache.q_lens_list):
            self.fed.extend(row[:n])
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        nxt = [[self.transcript[min(p + 1, len(self.transcript) - 1)] for p in row] for row in cache.positions.tolist()]
        logits.scatter_(2, torch.tensor(nxt)[..., None], 10.0)
        return cache.last_rows(logits) if last_only else logits


@pytest.mark.parametrize("expr,result", [("12*7", "84"), ("__import__('os')", None)])
def test_tool_use_forces_calculator_output(tok, expr, result):
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode("what is it"), sp("<|user_end|>"),
              sp("<|assistant_start|>")]
    from tritonchat.engine.calculator import calculate

    answer = calculate(expr)
    assert (answer == result) if result else answer.startswith("error")
    call = [sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode(answer), sp("<|output_end|>")]
    tail = tok.encode(" done")
    transcript = prompt + call + forced + tail + [sp("<|assistant_end|>")]
    model = ScriptedModel(transcript, tok.get_vocab_size())
    engine = Engine(model, tok, page_size=4, max_seq_len=256, impl="torch")
    g = engine.generate([prompt], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert g.tokens == call + forced + tail and g.finish_reason == "stop"
    assert g.forced == [False] * len(call) + [True] * len(forced) + [False] * len(tail)
    assert g.text == tok.decode(tok.encode(expr)) + answer + " done"
    assert model.fed == transcript[:-1]  # the prompt, the call with the forced output, the tail; not the stop
    # forced tokens count towards max_tokens
    g = Engine(model, tok, max_seq_len=64, impl="torch").generate([prompt], SamplingParams(max_tokens=len(call) + 2,
                                                                                             temperature=0.0))[0]
    assert g.tokens == call + forced[:2] and g.finish_reason == "length"


def test_streaming_text_is_utf8_safe(tok):
    text = "café 東京 ok"
    byte_ids = [tok.enc.encode_single_token(bytes([b])) for b in text.encode()]  # one token per byte
    prompt = [tok.get_bos_token_id()]
    transcript = prompt + byte_ids + [tok.encode_special("<|assistant_end|>")]
    engine = Engine(ScriptedModel(transcript, tok.get_vocab_size()), tok, max_seq_len=64, impl="torch")
    events = list(engine.stream(prompt, SamplingParams(max_tokens=60, temperature=0.0)))
    pieces = [e.text for e in events]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[3:5] == ["", "é"]  # the first byte of é completes nothing
    assert events[-1].token is None and events[-1].finish_reason == "stop"


def test_paged_batch_indexing():
    from tritonchat.engine.kv_cache import PagedKVCache, SequenceKV

    cache = PagedKVCache(n_layer=1, num_pages=6, page_size=4, n_kv_head=1, head_dim=16)
    a, b = SequenceKV(), SequenceKV()
    cache.reserve(a, 5)
    cache.reserve(b, 3)
    a.tokens.extend([10, 11, 12, 13, 14])  # as if prefilled: 5 tokens cached in a's 2 pages
    with pytest.raises(ValueError, match="reserve first"):
        cache.batch([a], [[1, 2, 3, 4]])
    cache.reserve(a, 8)
    batch = cache.batch([a, b], [[20, 21, 22], [30]])
    pa, pb = a.pages, b.pages
    assert batch.idx.tolist() == [[20, 21, 22], [30, 0, 0]]
    assert batch.positions.tolist() == [[5, 6, 7], [0, 0, 0]]
    assert batch.slots.tolist() == [pa[1] * 4 + 1, pa[1] * 4 + 2, pa[1] * 4 + 3, pb[0] * 4, -1, -1]
    assert batch.seq_lens.tolist() == [8, 1] and batch.q_lens.tolist() == [3, 1]
    assert batch.prev_tokens.tolist() == [14, -1]
    assert batch.block_table.tolist() == [pa, pb + [0]]
    batch.commit()
    assert a.tokens[-3:] == [20, 21, 22] and b.tokens == [30]
    with pytest.raises(OutOfPages):
        cache.reserve(b, 100)
    assert len(b.pages) == 1 and cache.allocator.num_used == 3  # a failed reservation takes nothing
    cache.truncate(a, 4)
    assert a.tokens == [10, 11, 12, 13] and len(a.pages) == 1 and cache.allocator.num_used == 2
    cache.release(a)
    cache.release(b)
    assert cache.allocator.num_used == 0


@torch.no_grad()
def test_cached_forward_logits_match_full_forward(model):
    # Two sequences fed in uneven chunks through the cache give the plain forward's logits at every position.
    from tritonchat.engine.kv_cache import PagedKVCache, SequenceKV

    seqs = [list(range(3, 43)), [9, 8, 7, 6, 5, 4, 3]]  # 40 tokens passes the 32-token window
    cache = PagedKVCache(2, 20, 4, 1, 128, impl="torch")
    kvs = [SequenceKV(), SequenceKV()]
    for kv, s in zip(kvs, seqs):
        cache.reserve(kv, len(s))
    got = [[], []]
    cuts = [(0, 13, 0, 4), (13, 14, 4, 5), (14, 40, 5, 7)]
    for a0, a1, b0, b1 in cuts:
        batch = cache.batch(kvs, [seqs[0][a0:a1], seqs[1][b0:b1]])
        logits = model(batch.idx, cache=batch)
        batch.commit()
        got[0].append(logits[0, : a1 - a0])
        got[1].append(logits[1, : b1 - b0])
    for s, g in zip(seqs, got):
        torch.testing.assert_close(torch.cat(g), model(torch.tensor([s]))[0], **tol("model_logits", torch.float32))


def test_allocator_hands_out_runs_of_pages():
    alloc = PageAllocator(12)
    a, b = alloc.allocate(3), alloc.allocate(4)
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    alloc.free(a)
    assert alloc.allocate(2) == [0, 1]  # the lowest run that fits
    assert alloc.allocate(4) == [7, 8, 9, 10]  # page 2 alone is too short
    assert alloc.allocate(1, after=10) == [11]  # extends a run in place
    assert alloc.allocate(1, after=11) == [2]  # nothing after the last page: the lowest free one
    alloc.free([4, 8])
    assert alloc.allocate(2) == [4, 8]  # no run of two left: any free pages
    assert alloc.num_free == 0 and alloc.num_used == 12


def test_greedy_tokens_equals_argmax():
    from tritonchat.engine.engine import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for V in (1000, 2048, 4096):
        for t in range(30):
            x = torch.randn(5, V, generator=g) if t % 2 else torch.randint(0, 3, (5, V), generator=g).float()
            if t % 3 == 0:
                x[2, torch.randint(0, V, (2,), generator=g)] = float("nan")
            x[4] = float("-inf") if t % 5 == 0 else x[4]
            assert torch.equal(greedy_tokens(x), x.argmax(-1))


def test_greedy_is_the_same_on_views_strided_runs_and_gathers(model):
    """Greedy tokens do not depend on how the CPU path reads the pool: equal prompts admitted together (one
    strided call a layer), mixed lengths (views, a call each) and a pool fragmented so that sequences get scattered
    pages (gathers) all give the plain forward's tokens."""
    same = [PROMPTS[0]] * 3 + [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_tokens=())
    want = {tuple(p): greedy_full_forward(model, p, 20) for p in [*same, *PROMPTS]}
    for prompts, fragment in ((same, False), (PROMPTS, False), (same, True), (PROMPTS, True)):
        engine = Engine(model, page_size=4, num_pages=64, max_batch_size=4, max_seq_len=64, impl="torch")
        holes = engine.cache.allocator.allocate(63)  # leave every other page free: no run of two
        engine.cache.allocator.free(holes[1::2] if fragment else holes)
        plans = []

        def batch(seqs, chunks, real=engine.cache.batch, plans=plans):
            plans.append(real(seqs, chunks))
            return plans[-1]

        engine.cache.batch = batch
        got = engine.generate(prompts, params)
        assert [g.tokens for g in got] == [want[tuple(p)] for p in prompts]
        decode = [b._plan for b in plans if b.idx.size(1) == 1]
        if fragment:
            assert any(p.others for p in decode)  # gathered (a sequence within its first page is still a view)
        else:
            assert all(p.runs and not p.others for p in decode)
            if prompts is same:  # all four in one call
                assert any(p.whole and p.batch == 4 for p in decode)
            else:  # three lengths, three calls
                assert any(len(p.runs) == 3 for p in decode)


def test_flat_cached_layers_equal_the_blocks(model):
    """GPT._cached_layers (a cached step on the PyTorch path, written out flat) gives the blocks' logits, for a
    prefill chunk and the decode steps after it, bf16 tables included."""
    import copy

    from tritonchat.engine.kv_cache import PagedKVCache, SequenceKV

    for m in (model, copy.deepcopy(model)):
        if m is not model:
            m.set_compute_dtype(torch.float32, torch.bfloat16)
        logits = {}
        for flat in (True, False):
            m.flat_decode = flat
            cache = PagedKVCache(2, 16, 4, 1, 128)
            seqs = [SequenceKV(), SequenceKV()]
            for s in seqs:
                cache.reserve(s, 20)
            out = []
            with torch.inference_mode():
                for chunks in ([[5, 17, 99, 3, 250], [9, 8]], [[7], [1]], [[40], [41]], [[2], [3, 4, 5]]):
                    b = cache.batch(seqs, chunks)
                    out.append(m(b.idx, cache=b))
                    b.commit()
            logits[flat] = out
        m.flat_decode = True
        for a, b in zip(logits[True], logits[False]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prepacked_lm_head_follows_the_weight():
    """PagedKVCache.linear (the lm_head of cached CPU inference, through a prepacked weight at 4 rows and more)
    equals F.linear, is remade after the weight changes in place, and leaves the model copyable."""
    import copy

    from tritonchat.engine.kv_cache import PagedKVCache

    cache = PagedKVCache(1, 2, 4, 1, 128)
    w = torch.randn(300, 64)
    for rows in (1, 5, 32):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(cache.linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    packed = dict(cache._packed)
    assert packed or not torch.backends.mkldnn.is_available()  # the prepacked path ran where the build has it
    with torch.no_grad():
        w.mul_(-2.0)  # an optimizer step between two rounds of sampling
    x = torch.randn(8, 64)
    torch.testing.assert_close(cache.linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    engine = Engine(random_gpt(), page_size=4, max_batch_size=4, max_seq_len=32, impl="torch")
    engine.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=3, temperature=0.0, stop_tokens=()))
    copy.deepcopy(engine.model)  # the packed copy lives in the cache, not the model
