"""Serve a checkpoint over HTTP: an OpenAI-compatible API and a web chat page, on one batched engine.

    python -m scripts.chat_web                          # http://127.0.0.1:8000, the page at /
    python -m scripts.chat_web --port 8080 --api-key s3cret --host 0.0.0.0

Endpoints: POST /v1/chat/completions and /v1/completions (streamed by server-sent events with "stream": true),
GET /v1/models, GET /health (no key needed) and the chat page at /. One engine thread drives `Engine.step` for
every request at once (continuous batching across HTTP requests); each HTTP request gets its events through its
own asyncio queue. A client that disconnects is cancelled at once, which frees its pages. Extensions to the OpenAI
request: `top_k`, `ignore_eos` (generate max_tokens tokens whatever comes), and `num_beams` (with `length_penalty`,
`early_stopping`) for beam search.

Needs the `serve` extra (FastAPI, uvicorn): `pip install -e ".[serve]"`. Importing this module loads neither.
"""


import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonchat.engine.cli import EXIT_INTERRUPTED, HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.engine import Engine, SamplingParams, TokenEvent
from tritonchat.engine.kv_cache import OutOfPages

PROG = command_name("scripts.chat_web")
PAGE = Path(__file__).with_name("chat_web.html")
API_KEY_ENV = "TRITONCHAT_API_KEY"
log = logging.getLogger("tritonchat.chat_web")
# How tool-use tokens read in the plain `content` string (as in chat_cli); `parts` carries them structured.
MARKERS = {"<|python_start|>": "[calc: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "] "}


@dataclass
class ServerConfig:
    """The server's name for the model and its limits. max_prompt_tokens / max_tokens_limit: None means the
    engine's max_seq_len. A request past a limit gets a 4xx naming it."""

    model_name: str = "tritonchat"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    default_max_tokens: int = 256
    max_queue: int = 64  # requests (choices) waiting or running at once; more get 503
    max_n: int = 8
    max_beams: int = 8
    log_prompts: bool = False


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFull(Exception):
    pass


# ---- the engine thread ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One choice of one HTTP request. on_event is called on the engine thread with TokenEvents, then a final
    TokenEvent (finish_reason set); or once with a `BeamResult`, or once with an Exception."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Any], None]
    beam: dict | None = None  # num_beams, length_penalty, early_stopping, num_return
    rid: int | None = None
    cancelled: bool = False


@dataclass
class BeamResult:
    hypotheses: list  # engine.BeamHypothesis, best first


class EngineWorker:
    """Owns the engine: a thread that takes jobs and cancellations from an inbox and steps the engine while there
    is work. Nothing else touches the engine while the thread runs (read-only counters aside)."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._beams: deque[Job] = deque()  # beam-search jobs waiting for pages
        self._searches: dict[int, tuple[Job, Any]] = {}  # running ones: their engine.BeamSearch
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> int:
        return self._active

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tritonchat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none: QueueFull when they would pass max_queue."""
        with self._lock:
            if self._active + len(jobs) > self.max_queue:
                raise QueueFull
            self._active += len(jobs)
        for job in jobs:
            self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(("cancel", job))

    def _done(self, job: Job) -> None:
        with self._lock:
            self._active -= 1

    def _handle(self, kind: str, job: Job | None) -> None:
        if kind == "add":
            if job.cancelled:
                self._done(job)
            elif job.beam is not None:
                self._beams.append(job)
            else:
                try:
                    job.rid = self.engine.add_request(job.prompt, job.params)
                except Exception as e:  # ValueError: the request can never run; anything else is a bug
                    self._done(job)
                    job.on_event(e if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__}: {e}"))
                    return
                self._jobs[job.rid] = job
        elif kind == "cancel":
            if job.rid is not None and job.rid in self._jobs:
                self.engine.cancel(job.rid)
                del self._jobs[job.rid]
                self.engine.result(job.rid)  # forget it
                self._done(job)
            elif job in self._beams:
                self._beams.remove(job)
                self._done(job)
            elif id(job) in self._searches:
                self._searches.pop(id(job))[1].close()
                self._done(job)

    def _advance_beams(self) -> None:
        """Start the waiting beam searches that fit, then advance each running one by one forward."""
        while self._beams:
            job = self._beams[0]
            b = job.beam
            try:
                search = self.engine.start_beam_search(
                    job.prompt, num_beams=b["num_beams"], max_tokens=job.params.max_tokens,
                    length_penalty=b["length_penalty"], early_stopping=b["early_stopping"],
                    stop_tokens=job.params.stop_tokens)
            except OutOfPages as e:
                if self.engine.has_work() or self._searches:
                    break  # wait for the running requests and searches to free their pages
                self._beams.popleft()
                self._done(job)
                job.on_event(ValueError(str(e)))
                continue
            except ValueError as e:
                self._beams.popleft()
                self._done(job)
                job.on_event(e)
                continue
            self._beams.popleft()
            self._searches[id(job)] = (job, search)
        for key, (job, search) in list(self._searches.items()):
            try:
                done = search.step()
            except Exception as e:
                log.exception("beam search failed")
                search.close()
                done, out = True, RuntimeError(f"the engine failed: {type(e).__name__}")
            else:
                out = BeamResult(search.hypotheses[: job.beam["num_return"]])
            if done:
                del self._searches[key]
                self._done(job)
                job.on_event(out)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            idle = not engine.has_work() and not self._beams and not self._searches
            try:
                kind, job = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
                self._handle(kind, job)
                while True:
                    kind, job = self._inbox.get_nowait()
                    self._handle(kind, job)
            except queue.Empty:
                pass
            except Exception:  # a bug: keep the thread serving the others
                log.exception("engine thread: handling a request failed")
            if self._stopping.is_set():
                break
            if self._beams or self._searches:
                self._advance_beams()
            if not engine.has_work():
                continue
            try:
                events = engine.step()
            except Exception as e:  # a bug or an exhausted device: fail what runs, keep serving
                log.exception("engine step failed")
                for rid, j in list(self._jobs.items()):
                    engine.cancel(rid)
                    engine.result(rid)
                    self._done(j)
                    j.on_event(RuntimeError(f"the engine failed: {type(e).__name__}"))
                self._jobs.clear()
                continue
            for ev in events:
                j = self._jobs.get(ev.request_id)
                if j is None:
                    continue
                if ev.finish_reason is not None:
                    del self._jobs[ev.request_id]
                    engine.result(ev.request_id)
                    self._done(j)
                j.on_event(ev)
        # shutting down: cancel what is left so every page goes back
        for job, search in self._searches.values():
            search.close()
            job.on_event(RuntimeError("the server is shutting down"))
        self._searches.clear()
        for rid, j in list(self._jobs.items()):
            engine.cancel(rid)
            engine.result(rid)
            j.on_event(RuntimeError("the server is shutting down"))
        self._jobs.clear()


# ---- request validation --------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return type(x) is int


def _is_num(x) -> bool:
    return type(x) in (int, float)


def _opt(body: dict, name: str, check: Callable[[Any], bool], what: str, default=None):
    x = body.get(name, None)
    if x is None:
        return default
    if not check(x):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(x)[:80]}", param=name, code="invalid_type")
    return x


@dataclass
class Choice:
    """The parsed generation settings of a request."""

    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    num_beams: int
    length_penalty: float
    early_stopping: bool
    ignore_eos: bool


def parse_settings(body: dict, cfg: ServerConfig, limit: int) -> Choice:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, limit)
    elif not _is_int(max_tokens):
        raise APIError(400, f"'max_tokens' must be an integer, got {json.dumps(max_tokens)[:80]}", param="max_tokens",
                       code="invalid_type")
    elif not 1 <= max_tokens <= limit:
        raise APIError(400, f"'max_tokens' must be in [1, {limit}], got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    temperature = _opt(body, "temperature", lambda x: _is_num(x) and 0 <= x <= 2, "a number in [0, 2]", 1.0)
    top_p = _opt(body, "top_p", lambda x: _is_num(x) and 0 < x <= 1, "a number in (0, 1]")
    top_k = _opt(body, "top_k", lambda x: _is_int(x) and x >= 0, "an integer >= 0 (0 disables)")
    seed = _opt(body, "seed", lambda x: _is_int(x) and 0 <= x < 2**63 - cfg.max_n,
                f"an integer in [0, 2**63 - {cfg.max_n})")
    n = _opt(body, "n", lambda x: _is_int(x) and 1 <= x <= cfg.max_n, f"an integer in [1, {cfg.max_n}]", 1)
    stream = _opt(body, "stream", lambda x: type(x) is bool, "a boolean", False)
    opts = _opt(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    include_usage = opts.get("include_usage") is True
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop",
                       code="invalid_type")
    num_beams = _opt(body, "num_beams", lambda x: _is_int(x) and 1 <= x <= cfg.max_beams,
                     f"an integer in [1, {cfg.max_beams}]", 1)
    length_penalty = _opt(body, "length_penalty", lambda x: _is_num(x) and -10 <= x <= 10, "a number in [-10, 10]",
                          1.0)
    early_stopping = _opt(body, "early_stopping", lambda x: type(x) is bool, "a boolean", False)
    ignore_eos = _opt(body, "ignore_eos", lambda x: type(x) is bool, "a boolean", False)
    if num_beams > 1 and n > num_beams:
        raise APIError(400, f"'n' ({n}) cannot exceed 'num_beams' ({num_beams}): beam search returns its n best "
                            f"hypotheses", param="n", code="invalid_value")
    return Choice(max_tokens, float(temperature), top_p, top_k or None, seed, stop, n, stream, include_usage,
                  num_beams, float(length_penalty), early_stopping, ignore_eos)


# ---- turning token events into text ---------------------------------------------------------------------------
class TextState:
    """One choice's output: the rendered `content` (tool markers inline, stop strings cut), its parts
    (text / python / python_output) and the deltas still to send."""

    def __init__(self, special: dict[str, int], stop: list[str]) -> None:
        self.kind_of = {special[k]: k for k in MARKERS if k in special}
        self.stop = stop
        self.held = ""  # text that may be the start of a stop string
        self.kind = "text"
        self.parts: list[dict] = []
        self.content: list[str] = []
        self.deltas: list[tuple[str, str, str]] = []  # (content, part type, raw text)
        self.tokens = 0
        self.stopped = False

    def _out(self, content: str, raw: str | None = None) -> None:
        raw = content if raw is None else raw
        if not content and not raw:
            return
        self.content.append(content)
        if self.parts and self.parts[-1]["type"] == self.kind:
            self.parts[-1]["text"] += raw
        else:
            self.parts.append({"type": self.kind, "text": raw})
        self.deltas.append((content, self.kind, raw))

    def flush(self) -> None:
        if self.held:
            held, self.held = self.held, ""
            self._out(held)

    def add(self, ev: TokenEvent) -> bool:
        """Take one event; True when a stop string ended the choice."""
        if ev.token is not None:
            self.tokens += 1
        name = self.kind_of.get(ev.token)
        if name is not None:
            self.flush()
            if name in ("<|python_start|>", "<|output_start|>"):
                self.kind = "python" if name == "<|python_start|>" else "python_output"
                self.parts.append({"type": self.kind, "text": ""})
            self.content.append(MARKERS[name])
            self.deltas.append((MARKERS[name], self.kind, ""))
            if name in ("<|python_end|>", "<|output_end|>"):
                self.kind = "text"
            return False
        if self.kind != "text" or not self.stop:
            self._out(ev.text)
            return False
        self.held += ev.text
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = self.held[: min(hits)]
            self.flush()
            self.stopped = True
            return True
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        if len(self.held) > keep:
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
            self._out(out)
        return False

    def take(self) -> list[tuple[str, str, str]]:
        d, self.deltas = self.deltas, []
        return d

    def text(self) -> str:
        return "".join(self.content)


# ---- the app -------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServerConfig | None = None):
    """The FastAPI app serving `engine` under `config`; its lifespan starts and stops the engine thread."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    cfg = dataclasses.replace(config) if config is not None else ServerConfig()
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("the server needs an engine with a tokenizer")
    limit_prompt = min(cfg.max_prompt_tokens or engine.max_seq_len, engine.max_seq_len)
    limit_tokens = min(cfg.max_tokens_limit or engine.max_seq_len, engine.max_seq_len)
    worker = EngineWorker(engine, cfg.max_queue)
    page = PAGE.read_text(encoding="utf-8")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="tritonchat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.engine, app.state.config = worker, engine, cfg

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}", code="not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def _method(request, e):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), cfg.api_key.encode())
        if not ok:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    async def read_json(request: Request) -> dict:
        check_key(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", code="body_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cfg.max_body_bytes:
                raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise APIError(404, f"the model {str(model)[:100]!r} does not exist; this server serves "
                                f"{cfg.model_name!r}", param="model", code="model_not_found")
        return body

    def check_prompt(ids: list[int]) -> None:
        if len(ids) > limit_prompt:
            raise APIError(400, f"the prompt is {len(ids)} tokens, over the limit of {limit_prompt}",
                           param="messages", code="context_length_exceeded")

    def make_jobs(prompts: list[list[int]], s: Choice, stop_tokens, on_event) -> list[Job]:
        jobs = []
        for p_index, prompt in enumerate(prompts):
            if s.num_beams > 1:
                params = SamplingParams(max_tokens=s.max_tokens, temperature=0.0, stop_tokens=stop_tokens)
                beam = {"num_beams": s.num_beams, "length_penalty": s.length_penalty,
                        "early_stopping": s.early_stopping, "num_return": s.n}
                jobs.append(Job(prompt, params, on_event(p_index * s.n), beam=beam))
                continue
            for j in range(s.n):
                seed = None if s.seed is None else s.seed + j
                params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                                        top_p=s.top_p, seed=seed, stop_tokens=stop_tokens)
                jobs.append(Job(prompt, params, on_event(p_index * s.n + j)))
        return jobs

    async def generate(request: Request, kind: str, prompts: list[list[int]], s: Choice, stop_tokens=None):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(index):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

        jobs = make_jobs(prompts, s, [] if s.ignore_eos else stop_tokens, on_event)
        n_choices = len(prompts) * s.n
        states = [TextState(engine.special, s.stop) for _ in range(n_choices)]
        job_of = {}
        for i, job in enumerate(jobs):
            job_of[i if s.num_beams == 1 else i * s.n] = job
        try:
            worker.submit(jobs)
        except QueueFull:
            raise APIError(503, f"the server is busy ({cfg.max_queue} requests queued or running); retry later",
                           code="server_busy", type="server_error") from None
        t0 = time.perf_counter()
        prompt_tokens = sum(len(p) for p in prompts)
        if cfg.log_prompts:
            log.info("%s prompts %s", rid, [tok.decode(p) for p in prompts])
        finish = [None] * n_choices

        async def choice_events():
            """(index, deltas, finish_reason) as events arrive, until every choice has finished."""
            while any(f is None for f in finish):
                index, ev = await events.get()
                if isinstance(ev, Exception):
                    user = isinstance(ev, ValueError)
                    raise APIError(400 if user else 500, str(ev),
                                   type="invalid_request_error" if user else "server_error")
                if isinstance(ev, BeamResult):
                    for j in range(s.n):
                        st = states[index + j]
                        stopped = False
                        if j < len(ev.hypotheses):
                            h = ev.hypotheses[j]
                            stopped = h.finish_reason == "stop"
                            for fe in _beam_events(engine, h.tokens):
                                if st.add(fe):
                                    stopped = True
                                    break
                            st.flush()
                        finish[index + j] = "stop" if stopped else "length"
                        yield index + j, st.take(), finish[index + j]
                    continue
                st = states[index]
                if finish[index] is not None:
                    continue
                if ev.finish_reason is not None:
                    st.flush()
                    finish[index] = "length" if ev.finish_reason == "length" else "stop"
                    yield index, st.take(), finish[index]
                elif st.add(ev):
                    worker.cancel(job_of[index])
                    finish[index] = "stop"
                    yield index, st.take(), "stop"
                else:
                    d = st.take()
                    if d:
                        yield index, d, None

        def usage() -> dict:
            completion = sum(st.tokens for st in states)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def cancel_all() -> None:
            for i, job in job_of.items():
                if finish[i] is None:
                    worker.cancel(job)

        def done_log() -> None:
            log.info("%s %s: %d choices, %d prompt + %d completion tokens in %.2fs", rid, kind, n_choices,
                     prompt_tokens, usage()["completion_tokens"], time.perf_counter() - t0)

        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not s.stream:
            async def collect():
                async for _ in choice_events():
                    pass

            async def watch():
                while not await request.is_disconnected():
                    await asyncio.sleep(0.1)

            task, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(watch())
            try:
                done, _ = await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not task.done():
                    task.cancel()
                    cancel_all()
            if task not in done:
                log.info("%s: the client went away", rid)
                return JSONResponse({}, status_code=499)
            if task.exception() is not None:
                cancel_all()  # the other choices of a request that failed
                raise task.exception()
            done_log()
            choices = []
            for i, st in enumerate(states):
                if kind == "chat":
                    msg = {"role": "assistant", "content": st.text(), "parts": st.parts}
                    choices.append({"index": i, "message": msg, "finish_reason": finish[i], "logprobs": None})
                else:
                    choices.append({"index": i, "text": st.text(), "finish_reason": finish[i], "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": cfg.model_name,
                                 "choices": choices, "usage": usage(), "system_fingerprint": None})

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def sse(choices: list, **extra) -> str:
            payload = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": cfg.model_name,
                       "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(index, delta_content, part=None, finish_reason=None, role=False):
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_content is not None:
                    delta["content"] = delta_content
                if part is not None:
                    delta["part"] = part
                return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {"index": index, "text": delta_content or "", "finish_reason": finish_reason, "logprobs": None}

        async def stream():
            finished = False
            try:
                if kind == "chat":
                    yield sse([chunk(i, "", role=True) for i in range(n_choices)])
                try:
                    async for index, deltas, fin in choice_events():
                        for content, ptype, raw in deltas:
                            yield sse([chunk(index, content, {"type": ptype, "text": raw})])
                        if fin is not None:
                            yield sse([chunk(index, None if kind == "chat" else "", finish_reason=fin)])
                except APIError as e:
                    cancel_all()
                    yield f"data: {json.dumps(e.body())}\n\n"
                if s.include_usage:
                    yield sse([], usage=usage())
                yield "data: [DONE]\n\n"
                finished = True
                done_log()
            finally:
                if not finished:
                    log.info("%s: the client went away mid-stream", rid)
                    cancel_all()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_type")
        if len(messages) > cfg.max_messages:
            raise APIError(400, f"{len(messages)} messages, over the limit of {cfg.max_messages}", param="messages",
                           code="too_many_messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"message {i}: expected an object with a role system, user or assistant",
                               param="messages", code="invalid_type")
        s = parse_settings(body, cfg, limit_tokens)
        clean = [{"role": m["role"], "content": m.get("content")} for m in messages]
        try:
            prompt = tok.render_for_completion({"messages": clean})
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None
        check_prompt(prompt)
        return await generate(request, "chat", [prompt], s)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt",
                           code="invalid_type")
        if len(prompts) > cfg.max_messages:
            raise APIError(400, f"{len(prompts)} prompts, over the limit of {cfg.max_messages}", param="prompt")
        s = parse_settings(body, cfg, limit_tokens)
        ids = [tok.encode(p, prepend="<|bos|>") for p in prompts]
        for p in ids:
            check_prompt(p)
        return await generate(request, "text", ids, s, stop_tokens=[tok.get_bos_token_id()])

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "tritonchat", "max_model_len": engine.max_seq_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": worker.active}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    return app


def _beam_events(engine: Engine, tokens: list[int]) -> list[TokenEvent]:
    """TokenEvents for a finished token list, with UTF-8-complete text, as the engine would have streamed them."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out = []
    specials = set(engine.special.values())
    for t in tokens:
        text = "" if t in specials else dec.decode(engine.tokenizer.enc.decode_single_token_bytes(t))
        out.append(TokenEvent(-1, t, text))
    tail = dec.decode(b"", final=True)
    if tail:
        out.append(TokenEvent(-1, None, tail))
    return out


# ---- the command line ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    from tritonchat.scripts.chat_cli import add_model_flags

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every endpoint but /health and the page "
                        f"(default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--model-name", default=None, help="the model id of /v1/models (default: tritonchat-<source>)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running at most; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-messages", type=int, default=64, help="messages per chat request at most")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the engine's max_seq_len")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: max_seq_len)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--log-prompts", action="store_true", help="log prompt text (off: only counts are logged)")
    add_model_flags(p)
    args = p.parse_args(argv)
    for flag in ("port", "max_batch_size", "max_queue", "max_body_bytes", "max_messages", "default_max_tokens"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def config_from_args(args: argparse.Namespace, source: str) -> ServerConfig:
    return ServerConfig(model_name=args.model_name or f"tritonchat-{source}",
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                        default_max_tokens=args.default_max_tokens, max_queue=args.max_queue,
                        log_prompts=args.log_prompts)


def _main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                         f"pip install 'tritonchat[serve]'") from None
    from tritonchat.engine.paths import get_base_dir
    from tritonchat.scripts.chat_cli import build_engine, resolve_source

    engine, _, where = build_engine(args, max_batch_size=args.max_batch_size)
    source = "custom" if args.checkpoint_dir else resolve_source(args, Path(args.base_dir or get_base_dir()))
    cfg = config_from_args(args, source)
    app = create_app(engine, cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"tritonchat: {where}", file=sys.stderr)
    print(f"tritonchat: serving {cfg.model_name!r} on http://{args.host}:{args.port}/"
          f"{' (API key required)' if cfg.api_key else ''}; Ctrl-C stops", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=5))
    try:  # uvicorn turns Ctrl-C into a graceful shutdown (the lifespan stops the engine thread), then re-raises it
        server.run()
    except KeyboardInterrupt:
        print(f"{PROG}: stopped (interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{PROG}: stopped", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
