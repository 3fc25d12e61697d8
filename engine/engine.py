"""Batched inference over the paged KV cache, with sampling, streaming, tool use and prefix reuse.

A request is a prompt (token ids) plus `SamplingParams`. The engine keeps a queue of waiting requests and a
set of running ones; each `step()`:
  1. admits waiting requests while there is room in the batch and pages for their worst case
     (prompt + max_tokens, capped at max_seq_len), so a running sequence never runs out of pages;
     a request that could never fit is refused when it is added, the others wait in the queue;
  2. runs one forward over the sequences with several tokens to feed (prompt prefill, in chunks, and tool
     outputs), padded into one batch, and one forward over the sequences feeding a single token (decode);
  3. samples the next token of every sequence whose input is consumed (temperature, top-k, top-p, with a
     per-request seeded generator, so results do not depend on what else is in the batch), applies the stop
     tokens, the tool-use state machine and the limits, and returns the new tokens as `TokenEvent`s with their
     UTF-8-complete text.
A finished request frees its pages at once and the next waiting one starts (continuous batching).

Tool use (SPEC §11): the tokens between <|python_start|> and <|python_end|> are decoded and given to the
calculator; <|output_start|> result <|output_end|> is then forced into the stream (fed to the model as one chunk,
reported with forced=True). Forced tokens count towards max_tokens.

Beam search (`beam_search`, or `start_beam_search` to advance it one forward at a time between `step()`s) keeps
its beams on shared pages: they fork the prompt's pages instead of copying them.

Prefix reuse: a request made in a `Session` keeps its sequence's pages after it finishes; the session's next
request reuses the longest common prefix of the cached tokens and its prompt and prefills only the rest.
"""

from __future__ import annotations

import codecs
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tritonchat.engine.calculator import calculate
from tritonchat.engine.gpt import HEAD_DIM
from tritonchat.engine.kv_cache import OutOfPages, PagedKVCache, SequenceKV
from tritonchat.kernels import resolve_impl


@dataclass
class SamplingParams:
    """max_tokens: generated tokens at most (forced tool outputs included). temperature 0 is greedy.
    top_k / top_p: None disables. seed: None draws a fresh one. stop_tokens: None means <|assistant_end|> and
    <|bos|> (when the engine has a tokenizer); stop tokens end the request and are not part of the output."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")


@dataclass
class TokenEvent:
    """One new output token (token is None on the closing event, which carries finish_reason)."""

    request_id: int
    token: int | None
    text: str  # the complete UTF-8 characters this token finishes ("" for special tokens)
    forced: bool = False  # a tool output forced by the engine, not sampled
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the closing event


@dataclass
class BeamHypothesis:
    """One finished beam: its tokens (the stop token left out), the sum of their log-probabilities (the stop
    token's included), the score beams are ranked by (logprob / length ** length_penalty, the stop token counted
    in the length) and why it ended ("stop" or "length")."""

    tokens: list[int]
    logprob: float
    score: float
    finish_reason: str


@dataclass
class Generation:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    text: str
    finish_reason: str | None
    forced: list[bool]


class Session:
    """A conversation whose cache outlives each request (one request at a time). Close it to free its pages."""

    def __init__(self) -> None:
        self.kv = SequenceKV()
        self.busy = False
        self.closed = False

    @property
    def cached_tokens(self) -> list[int]:
        return list(self.kv.tokens)


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop: frozenset[int]
    generator: torch.Generator
    session: Session | None
    kv: SequenceKV | None = None
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next sample
    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    in_python: bool = False
    expr: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def sample_from_logits(logits: torch.Tensor, top_k: Sequence[int | None], top_p: Sequence[float | None],
                       generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of temperature-scaled logits (n, V), keeping each row's top_k tokens and the smallest
    set of most likely tokens whose mass reaches top_p; row i draws from generators[i]. Returns (n,) int64."""
    n, V = logits.shape
    # Always draw in sorted order, filtered or not: a row's draw then depends only on its logits and generator.
    vals, order = logits.float().sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.tensor([V if k is None else min(k, V) for k in top_k], device=logits.device)
    keep = rank[None, :] < k[:, None]
    if any(p is not None for p in top_p):
        p = torch.tensor([1.0 if p is None else p for p in top_p], device=logits.device)
        probs = F.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= (probs.cumsum(-1) - probs) < p[:, None]  # mass ranked strictly above; the top token always stays
    probs = F.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return order.gather(1, picks[:, None])[:, 0]


def greedy_tokens(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """logits.argmax(-1) of (n, V) logits: the first index of each row's maximum (NaN counting as the maximum, as
    argmax has it), found through per-block maxima where V splits into blocks (a CPU's argmax is several times
    slower than its max): the first block holding the row's maximum, then the first index of it there."""
    n, V = logits.shape
    if V % block or V <= block or n < 2 or logits.is_cuda:
        return logits.argmax(dim=-1)
    blocks = logits.reshape(n, V // block, block)
    bmax = blocks.amax(dim=-1)  # (n, V / block); NaN where a block holds one
    first = (bmax == bmax.amax(dim=-1, keepdim=True)).to(torch.uint8).argmax(dim=-1)
    rows = torch.arange(n, device=logits.device)
    out = blocks[rows, first].argmax(dim=-1) + first * block
    nan = bmax.isnan().any(dim=-1)
    if bool(nan.any()):  # a NaN row: argmax's own answer
        out[nan] = logits[nan].argmax(dim=-1)
    return out


class Engine:
    """Serve a GPT (engine.gpt) from a paged KV cache. See the module docstring."""

    def __init__(self, model, tokenizer=None, *, page_size: int = 16, num_pages: int | None = None,
                 max_batch_size: int = 32, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 impl: str = "auto", calculator: Callable[[str], str] = calculate) -> None:
        cfg = model.config
        self.model, self.tokenizer, self.calculator = model, tokenizer, calculator
        self.device = next(model.parameters()).device
        self.max_seq_len = cfg.sequence_len if max_seq_len is None else max_seq_len
        if not 1 <= self.max_seq_len <= model.rotary_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {model.rotary_seq_len}] (the rotary table), "
                             f"got {self.max_seq_len}")
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch_size and prefill_chunk must be >= 1, got {max_batch_size}, {prefill_chunk}")
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        if num_pages is None:
            num_pages = max_batch_size * -(-self.max_seq_len // page_size)
        self.impl = resolve_impl(impl, self.device)  # once: "torch" or "triton" for the cache's attention
        self.cache = PagedKVCache(cfg.n_layer, num_pages, page_size, cfg.n_kv_head, HEAD_DIM,
                                  dtype=model.compute_dtype, device=self.device, impl=self.impl)
        self.vocab_size = cfg.vocab_size
        self.special: dict[str, int] = {}
        self._special_ids: frozenset[int] = frozenset()
        if tokenizer is not None:
            self.special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
            self._special_ids = frozenset(self.special.values())
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[int, _Request] = {}
        self._beam_searches = 0  # open BeamSearch objects, which hold pages of the pool
        self.stats = {"prefilled_tokens": 0, "reused_tokens": 0, "forwards": 0, "sampled_tokens": 0,
                      "cow_pages": 0, "beam_peak_pages": 0}

    # ---- requests ---------------------------------------------------------------------------------------------
    def new_session(self) -> Session:
        return Session()

    def close_session(self, session: Session) -> None:
        if session.busy:
            raise ValueError("cannot close a session while its request runs (cancel it first)")
        self.cache.release(session.kv)
        session.closed = True

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                    session: Session | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError for a request that could never run."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len ({self.max_seq_len})")
        need = self.cache.pages_for(self._worst_case(prompt, params))
        if need > self.cache.allocator.num_pages:
            raise ValueError(f"request needs {need} pages (prompt {len(prompt)} + max_tokens {params.max_tokens}) "
                             f"but the pool has {self.cache.allocator.num_pages}; lower max_tokens or add pages")
        if session is not None and (session.busy or session.closed):
            raise ValueError("the session is closed or already has a running request")
        stop = params.stop_tokens
        if stop is None:
            stop = [self.special[n] for n in ("<|assistant_end|>", "<|bos|>") if n in self.special]
        seed = random.SystemRandom().getrandbits(63) if params.seed is None else params.seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        req = _Request(next(self._ids), prompt, params, frozenset(stop), gen, session)
        if session is not None:
            session.busy = True
        self._requests[req.id] = req
        self._waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        req = self._requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        self._finish(req, "cancelled")
        if req in self._running:
            self._running.remove(req)

    def result(self, request_id: int) -> Generation:
        """The request's output so far; a finished request is forgotten once its result is taken."""
        req = self._requests[request_id]
        if req.finish_reason is not None:
            del self._requests[request_id]
        return Generation(req.id, req.prompt, list(req.tokens), "".join(req.text), req.finish_reason,
                          list(req.forced))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # ---- driving ----------------------------------------------------------------------------------------------
    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               session: Session | None = None) -> Iterator[TokenEvent]:
        """Run the engine and yield this request's events as they come (other requests advance alongside).
        Closing the iterator early cancels the request."""
        rid = self.add_request(prompt, params, session)
        done = False
        try:
            while not done:
                for ev in self.step():
                    if ev.request_id == rid:
                        done = ev.finish_reason is not None
                        yield ev
        finally:
            if not done:
                self.cancel(rid)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Iterable[SamplingParams] | None = None) -> list[Generation]:
        """Generate for every prompt (batched, continuously) and return the results in prompt order."""
        plist = list(params) if isinstance(params, Iterable) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while any(self._requests[i].finish_reason is None for i in ids):
            self.step()
        return [self.result(i) for i in ids]

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, run the prefill and decode forwards, sample; returns the new events."""
        self._admit()
        multi = [r for r in self._running if len(r.pending) > 1]
        single = [r for r in self._running if len(r.pending) == 1]
        events: list[TokenEvent] = []
        if multi:
            events += self._forward(self._prefill_group(multi))
        if single:
            events += self._forward([(r, r.pending[:1]) for r in single])
        self._running = [r for r in self._running if r.finish_reason is None]
        return events

    # ---- beam search ------------------------------------------------------------------------------------------
    def beam_pages_needed(self, prompt_len: int, num_beams: int, max_tokens: int) -> int:
        """Pages beam search needs at most: the prompt's once, then each beam's own tail (a copied last page
        and pages for the tokens it generates)."""
        max_new = min(max_tokens, self.max_seq_len - prompt_len + 1)
        return self.cache.pages_for(prompt_len) + num_beams * (self.cache.pages_for(max_new) + 1)

    def start_beam_search(self, prompt: Sequence[int], num_beams: int = 4, max_tokens: int = 256,
                          length_penalty: float = 1.0, early_stopping: bool = False,
                          stop_tokens: Sequence[int] | None = None) -> BeamSearch:
        """A beam search to advance one forward at a time (`BeamSearch.step`), e.g. between `step()`s, so that
        requests keep running beside it. See `beam_search`."""
        return BeamSearch(self, prompt, num_beams, max_tokens, length_penalty, early_stopping, stop_tokens)

    def beam_search(self, prompt: Sequence[int], num_beams: int = 4, max_tokens: int = 256,
                    length_penalty: float = 1.0, early_stopping: bool = False,
                    stop_tokens: Sequence[int] | None = None) -> list[BeamHypothesis]:
        """The num_beams best continuations of `prompt` by beam search, best first.

        Each step extends every beam by every token, keeps the 2 * num_beams best candidates by summed
        log-probability, turns those ending in a stop token (ranked among the first num_beams) into finished
        hypotheses and keeps the best num_beams others as the next beams; beams still running after max_tokens
        tokens (or at max_seq_len) finish with "length". Hypotheses are ranked by logprob / length **
        length_penalty. early_stopping=True ends the search once num_beams hypotheses are finished; False goes on
        until no running beam could still beat the worst of them. num_beams=1 is greedy decoding.

        The beams share pages: the prompt is prefilled once, a child beam forks its parent's pages (reference
        counts in the allocator) and copies only a shared, partly filled last page before appending to it.
        The calculator is not run (tool calls are generated as plain tokens). Raises OutOfPages, before any
        work, when the free pages are too few for the worst case (`beam_pages_needed`)."""
        search = self.start_beam_search(prompt, num_beams, max_tokens, length_penalty, early_stopping, stop_tokens)
        try:
            while not search.step():
                pass
        finally:
            search.close()
        return search.hypotheses

    # ---- internals --------------------------------------------------------------------------------------------
    def _worst_case(self, prompt: list[int], params: SamplingParams) -> int:
        """Most tokens the cache holds for this request: the last generated token is never fed."""
        return min(len(prompt) + params.max_tokens - 1, self.max_seq_len)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            req = self._waiting[0]
            kv = req.session.kv if req.session is not None else SequenceKV()
            reuse = 0
            if req.session is not None:
                common = next((i for i, (a, b) in enumerate(zip(kv.tokens, req.prompt)) if a != b),
                              min(kv.length, len(req.prompt)))
                reuse = min(common, len(req.prompt) - 1)  # the last prompt token is fed to get logits
                self.cache.truncate(kv, reuse)
            try:
                self.cache.reserve(kv, self._worst_case(req.prompt, req.params))
            except OutOfPages as e:
                if self._running or self._beam_searches:
                    return  # wait for running requests (or beam searches) to free pages
                raise OutOfPages(f"request {req.id} cannot start: {e}; the other pages are held by idle sessions "
                                 f"(close them)") from None
            self._waiting.popleft()
            req.kv, req.pending = kv, req.prompt[reuse:]
            self.stats["reused_tokens"] += reuse
            self._running.append(req)

    def _prefill_group(self, reqs: list[_Request]) -> list[tuple[_Request, list[int]]]:
        """Sequences with several tokens to feed, each up to prefill_chunk tokens, while the padded batch
        (B x longest chunk) stays within prefill_chunk tokens; the first one always goes."""
        group: list[tuple[_Request, list[int]]] = []
        longest = 0
        for r in reqs:
            chunk = r.pending[: self.prefill_chunk]
            if group and (len(group) + 1) * max(longest, len(chunk)) > self.prefill_chunk:
                break
            group.append((r, chunk))
            longest = max(longest, len(chunk))
        return group

    def _forward(self, group: list[tuple[_Request, list[int]]]) -> list[TokenEvent]:
        reqs = [r for r, _ in group]
        batch = self.cache.batch([r.kv for r in reqs], [c for _, c in group])
        logits = self.model(batch.idx, cache=batch, last_only=True)  # (B, V) fp32
        batch.commit()
        self.stats["forwards"] += 1
        self.stats["prefilled_tokens"] += sum(len(c) for _, c in group if len(c) > 1)
        for r, c in group:
            del r.pending[: len(c)]
        ready = [i for i, r in enumerate(reqs) if not r.pending]
        if not ready:
            return []
        tokens = self._sample(logits if len(ready) == len(reqs) else logits[ready], [reqs[i] for i in ready])
        events: list[TokenEvent] = []
        for i, tok in zip(ready, tokens):
            events += self._accept(reqs[i], tok)
        return events

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        out = greedy_tokens(logits)
        hot = [i for i, r in enumerate(reqs) if r.params.temperature > 0]
        if hot:
            temps = torch.tensor([reqs[i].params.temperature for i in hot], device=logits.device)
            out[hot] = sample_from_logits(logits[hot] / temps[:, None], [reqs[i].params.top_k for i in hot],
                                          [reqs[i].params.top_p for i in hot], [reqs[i].generator for i in hot])
        self.stats["sampled_tokens"] += len(reqs)
        return out.tolist()

    def _accept(self, req: _Request, tok: int) -> list[TokenEvent]:
        """Apply one sampled token: stop tokens, the tool state machine, the limits."""
        if tok in req.stop:
            return [self._finish(req, "stop")]
        events = [self._emit(req, tok, forced=False)]
        feed = [tok]
        sp = self.special
        if sp and tok == sp["<|python_start|>"]:
            req.in_python, req.expr = True, []
        elif sp and tok == sp["<|python_end|>"] and req.in_python:
            req.in_python = False
            result = self.calculator(self.tokenizer.decode(req.expr))
            forced = [sp["<|output_start|>"], *self.tokenizer.encode(result), sp["<|output_end|>"]]
            for f in forced[: req.params.max_tokens - len(req.tokens)]:
                events.append(self._emit(req, f, forced=True))
                feed.append(f)
        elif req.in_python:
            req.expr.append(tok)
        if len(req.tokens) >= req.params.max_tokens or req.kv.length + len(feed) > self.max_seq_len:
            events.append(self._finish(req, "length"))
        else:
            req.pending = feed
        return events

    def _emit(self, req: _Request, tok: int, forced: bool) -> TokenEvent:
        req.tokens.append(tok)
        req.forced.append(forced)
        text = ""
        if self.tokenizer is not None and tok not in self._special_ids:
            text = req.decoder.decode(self.tokenizer.enc.decode_single_token_bytes(tok))
        req.text.append(text)
        return TokenEvent(req.id, tok, text, forced)

    def _finish(self, req: _Request, reason: str) -> TokenEvent:
        tail = req.decoder.decode(b"", final=True)
        req.text.append(tail)
        req.finish_reason = reason
        req.pending = []
        if req.kv is not None:
            if req.session is not None:  # keep the conversation's pages, return the unused reservation
                self.cache.truncate(req.kv, req.kv.length)
            else:
                self.cache.release(req.kv)
        if req.session is not None:
            req.session.busy = False
        return TokenEvent(req.id, None, tail, finish_reason=reason)


class BeamSearch:
    """One beam search over an engine's cache (see `Engine.beam_search`), advanced by `step()`, one forward each.

    It takes its worst case of pages (`Engine.beam_pages_needed`) from the pool when it starts and holds the part
    its beams do not use as a reserve, so requests admitted meanwhile can never leave it short; `close()` (done
    for it when it finishes) returns everything."""

    def __init__(self, engine: Engine, prompt: Sequence[int], num_beams: int, max_tokens: int,
                 length_penalty: float, early_stopping: bool, stop_tokens: Sequence[int] | None) -> None:
        if type(num_beams) is not int or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        SamplingParams(max_tokens=max_tokens)  # the same check of max_tokens
        prompt = [int(t) for t in prompt]
        if not prompt or min(prompt) < 0 or max(prompt) >= engine.vocab_size:
            raise ValueError(f"the prompt must hold at least one token, ids in [0, {engine.vocab_size})")
        if len(prompt) > engine.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len ({engine.max_seq_len})")
        if stop_tokens is None:
            stop_tokens = [engine.special[n] for n in ("<|assistant_end|>", "<|bos|>") if n in engine.special]
        self.engine, self.cache, self.alloc = engine, engine.cache, engine.cache.allocator
        self.prompt, self.num_beams, self.length_penalty = prompt, num_beams, length_penalty
        self.early_stopping, self.stop = early_stopping, frozenset(stop_tokens)
        self.max_new = min(max_tokens, engine.max_seq_len - len(prompt) + 1)
        self.budget = engine.beam_pages_needed(len(prompt), num_beams, max_tokens)
        if self.budget > self.alloc.num_free:
            raise OutOfPages(f"beam search with {num_beams} beams needs up to {self.budget} pages, "
                             f"{self.alloc.num_free} of {self.alloc.num_pages} are free")
        self._reserve = self.alloc.allocate(self.budget)
        self.hypotheses: list[BeamHypothesis] = []
        self.beams: list[tuple[SequenceKV, list[int], float]] = []  # (pages, tokens, summed logprob)
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.done = False
        self.peak_pages = 0  # distinct pages the beams held at most
        self._closed = False
        engine._beam_searches += 1

    @property
    def pages_in_use(self) -> int:
        return len({p for kv, _, _ in self.beams for p in kv.pages})

    def _release_reserve(self) -> None:
        self.alloc.free(self._reserve)
        self._reserve = []

    def _refill_reserve(self) -> None:
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        self.engine.stats["beam_peak_pages"] = max(self.engine.stats["beam_peak_pages"], self.pages_in_use)
        want = min(self.budget - self.pages_in_use, self.alloc.num_free)
        self._reserve = self.alloc.allocate(max(0, want))

    def _add_hyp(self, tokens: list[int], logprob: float, reason: str) -> None:
        score = logprob / len(tokens) ** self.length_penalty
        out = tokens[:-1] if reason == "stop" else tokens
        self.hypotheses.append(BeamHypothesis(out, logprob, score, reason))
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.num_beams:]

    def _forward(self, seqs: list[SequenceKV], chunks: list[list[int]]) -> torch.Tensor:
        batch = self.cache.batch(seqs, chunks)
        logits = self.engine.model(batch.idx, cache=batch, last_only=True)
        batch.commit()
        self.engine.stats["forwards"] += 1
        return logits

    @torch.inference_mode()
    def step(self) -> bool:
        """One forward (the prompt's prefill first, then one token for every beam); True once finished."""
        if self.done:
            return True
        self._release_reserve()
        try:
            if self.logits is None:
                root = SequenceKV()
                self.beams = [(root, [], 0.0)]
                self.cache.reserve(root, len(self.prompt))
                for i in range(0, len(self.prompt), self.engine.prefill_chunk):
                    self.logits = self._forward([root], [self.prompt[i: i + self.engine.prefill_chunk]])
                self.engine.stats["prefilled_tokens"] += len(self.prompt)
            else:
                self._advance()
        except BaseException:
            self.close()
            raise
        if self.done:
            self.close()
        else:
            self._refill_reserve()
        return self.done

    def _advance(self) -> None:
        nb, beams = self.num_beams, self.beams
        logp = F.log_softmax(self.logits.float(), dim=-1)
        scores = torch.tensor([b[2] for b in beams], dtype=torch.float64)[:, None] + logp.double().cpu()
        V = scores.size(1)
        vals, order = scores.view(-1).sort(descending=True, stable=True)
        children: list[tuple[int, list[int], float]] = []
        for rank, (v, idx) in enumerate(zip(vals[: 2 * nb].tolist(), order[: 2 * nb].tolist())):
            parent, t = divmod(idx, V)
            tokens = beams[parent][1] + [t]
            if t in self.stop:
                if rank < nb:
                    self._add_hyp(tokens, v, "stop")
                continue
            children.append((parent, tokens, v))
            if len(children) == nb:
                break
        self.engine.stats["sampled_tokens"] += len(beams)
        self.steps += 1
        if self.steps == self.max_new:
            for _, tokens, v in children:
                self._add_hyp(tokens, v, "length")
            self.done = True
            return
        if not children:
            self.done = True
            return
        if len(self.hypotheses) >= nb:
            lp = self.length_penalty
            # the best running beam's score can only fall; its best normalized score comes at the longest
            # length when lp > 0, at the next token otherwise
            bound = children[0][2] / (self.max_new ** lp if lp > 0 else (self.steps + 1) ** lp)
            if self.early_stopping or nb == 1 or bound <= self.hypotheses[-1].score:
                self.done = True
                return
        # fork the children off their parents, drop the parents, then give each child its own last page
        kids = [self.cache.fork(beams[parent][0]) for parent, _, _ in children]
        for kv, _, _ in beams:
            self.cache.release(kv)
        self.beams = [(kv, tokens, v) for kv, (_, tokens, v) in zip(kids, children)]
        for kv, _, _ in self.beams:
            self.engine.stats["cow_pages"] += self.cache.make_writable(kv, kv.length + 1)
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        self.logits = self._forward([b[0] for b in self.beams], [[b[1][-1]] for b in self.beams])

    def close(self) -> None:
        """Return every page (the beams' and the reserve); the search ends where it is."""
        if self._closed:
            return
        for kv, _, _ in self.beams:
            self.cache.release(kv)
        self.beams = []
        self._release_reserve()
        self.done = self._closed = True
        self.engine._beam_searches -= 1
