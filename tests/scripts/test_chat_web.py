"""scripts.chat_web: a real uvicorn server on 127.0.0.1 (a free port, in a thread) over a tiny random model, driven
by the official `openai` client and by raw HTTP for what that client would refuse to send."""

import concurrent.futures
import contextlib
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from tritonchat.engine.engine import Engine
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer

fastapi = pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the API tests use the openai client (the dev extra)")

from tritonchat.scripts import chat_web  # noqa: E402

MODEL = "tiny"


class Response:
    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def request(url, method, path, body=None, headers=None, timeout=30):
    """One raw HTTP request (the standard library's client): a Response with status_code, text, json()."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, r.read().decode())
    finally:
        conn.close()


@contextlib.contextmanager
def open_stream(url, body):
    """A streaming chat request left open; yields the response (readline() gives the SSE lines). Leaving the block
    closes the connection, as a client that goes away does."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    try:
        yield r
    finally:
        conn.sock.close() if conn.sock else None
        conn.close()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(1)
    words = ["hello", "there", "how", "are", "you", "fine", "thanks", "what", "is", "12", "*", "7", "café"]
    return Tokenizer.train_from_iterator([" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)], 290)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=256), impl="torch")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@contextlib.contextmanager
def serve(app):
    """Run `app` under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def server(model, tok):
    engine = Engine(model, tok, page_size=16, max_batch_size=32, max_seq_len=256, impl="torch")
    cfg = chat_web.ServerConfig(model_name=MODEL, max_prompt_tokens=100, max_messages=8, max_body_bytes=20_000)
    app = chat_web.create_app(engine, cfg)
    with serve(app) as url:
        yield {"url": url, "engine": engine, "app": app, "idle_free": engine.cache.allocator.num_free}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, text, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


def stream_text(client, text, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    out, finish = [], None
    for c in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                            stream=True, **kw):
        for ch in c.choices:
            out.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    return "".join(out), finish


def wait_idle(server, timeout=10):
    """Until the engine thread holds no request and every page is back; returns whether it got there."""
    engine, worker = server["engine"], server["app"].state.worker
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.active == 0 and engine.cache.allocator.num_free == server["idle_free"] and not engine.has_work():
            return True
        time.sleep(0.02)
    return False


def test_chat_and_completions_with_the_openai_client(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = chat(client, "hello there", seed=1)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    text = r.choices[0].message.content
    assert isinstance(text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert stream_text(client, "hello there") == (text, r.choices[0].finish_reason)  # greedy: stream == not
    c = client.completions.create(model=MODEL, prompt="how are", max_tokens=10, temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens <= 10
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="how are", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text
    # sampling: seeded choices are reproducible, n gives n of them, usage is sent at the end of a stream
    a = chat(client, "what is", temperature=1.0, top_p=0.9, seed=5, n=3, max_tokens=8)
    b = chat(client, "what is", temperature=1.0, top_p=0.9, seed=5, n=3, max_tokens=8, extra_body={"top_k": 50})
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert chat(client, "what is", temperature=1.0, top_p=0.9, seed=5, n=3, max_tokens=8).choices == a.choices
    assert len(b.choices) == 3
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
    assert wait_idle(server)


def test_stop_strings_cut_the_text(client):
    full = chat(client, "hello there", max_tokens=24).choices[0].message.content
    cut = next((i for i in range(3, len(full) - 2) if full[i] != " "), None)
    if cut is None:
        pytest.skip(f"the greedy answer is too short to cut: {full!r}")
    stop = full[cut: cut + 2]
    want = full[: full.find(stop)]
    r = chat(client, "hello there", max_tokens=24, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert stream_text(client, "hello there", max_tokens=24, stop=stop) == (want, "stop")


def test_concurrent_streams_equal_sequential_ones(server, client):
    rng = random.Random(3)
    words = ["hello", "there", "how", "are", "you", "fine", "what", "is"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(32)]
    sequential = [stream_text(client, p, max_tokens=10) for p in prompts]
    engine = server["engine"]
    forwards = engine.stats["forwards"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        concurrent_ = list(pool.map(lambda p: stream_text(client, p, max_tokens=10), prompts))
    assert concurrent_ == sequential
    # batched: far fewer forwards than one per request per token
    assert engine.stats["forwards"] - forwards < 32 * 10 / 4
    assert wait_idle(server)


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Each engine step takes 20 ms longer, so a request of 200 tokens is surely still running when the client
    leaves."""
    engine = server["engine"]
    step = engine.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow)
    return engine


def test_a_client_that_disconnects_frees_its_pages(server, slow_engine):
    assert wait_idle(server)
    sampled = slow_engine.stats["sampled_tokens"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with open_stream(server["url"], body) as r:
        assert r.status == 200
        got = [r.readline().decode() for _ in range(6)]
        assert all(line.startswith("data: ") or not line.strip() for line in got), got
        assert slow_engine.cache.allocator.num_free < server["idle_free"]  # it holds pages now
    assert wait_idle(server), "the disconnected stream kept its pages"
    assert slow_engine.stats["sampled_tokens"] - sampled < 150  # cancelled, not run to the end
    # the same for a request that is not streamed: the client gives up waiting
    sampled = slow_engine.stats["sampled_tokens"]
    with pytest.raises(TimeoutError):
        request(server["url"], "POST", "/v1/chat/completions", {**body, "stream": False}, timeout=0.5)
    assert wait_idle(server), "the disconnected request kept its pages"
    assert slow_engine.stats["sampled_tokens"] - sampled < 150


def test_a_full_queue_answers_503(server, slow_engine, client):
    worker = server["app"].state.worker
    worker.max_queue = 1
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100,
                "temperature": 0, "stream": True}
        with open_stream(server["url"], body) as r:
            r.readline()
            with pytest.raises(openai.InternalServerError) as e:
                chat(client, "hi")
            assert e.value.status_code == 503 and "busy" in e.value.message
    finally:
        worker.max_queue = 64
    assert wait_idle(server)


def post(server, body, path="/v1/chat/completions"):
    return request(server["url"], "POST", path, body)


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({**GOOD, "temperature": "hot"}, 400, "'temperature'"),
    ({**GOOD, "max_tokens": -5}, 400, "'max_tokens'"),
    ({**GOOD, "max_tokens": 1.5}, 400, "'max_tokens'"),
    ({**GOOD, "max_tokens": 10_000}, 400, "'max_tokens'"),
    ({**GOOD, "n": 0}, 400, "'n'"),
    ({**GOOD, "stream": "yes"}, 400, "'stream'"),
    ({**GOOD, "stop": 3}, 400, "'stop'"),
    ({**GOOD, "model": "gpt-9"}, 404, "does not exist"),
    ({**GOOD, "messages": "hi"}, 400, "'messages'"),
    ({**GOOD, "messages": []}, 400, "'messages'"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({**GOOD, "messages": [{"role": "assistant", "content": "x"}]}, 400, "user message"),
    ({**GOOD, "messages": [{"role": "user", "content": "x"}] * 9}, 400, "limit of 8"),
    ({**GOOD, "messages": [{"role": "user", "content": "hello " * 150}]}, 400, "over the limit of 100"),
    ({**GOOD, "num_beams": 2, "n": 3}, 400, "'n'"),
    ({**GOOD, "num_beams": 0}, 400, "'num_beams'"),
    ({**GOOD, "seed": 2**70}, 400, "'seed'"),
    ({**GOOD, "temperature": float("nan")}, 400, "'temperature'"),
    ({**GOOD, "n": True}, 400, "'n'"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (json.dumps({**GOOD, "pad": "x" * 30_000}).encode(), 413, "over 20000 bytes"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, needle):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert post(server, GOOD).status_code == 200  # still serving


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|over the limit"):
        chat(client, "hello " * 150)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt=[], max_tokens=2)
    assert chat(client, "hi", max_tokens=2).choices[0].message.content is not None


def test_routes_and_health(server):
    get = lambda path: request(server["url"], "GET", path)
    assert get("/health").json()["status"] == "ok"
    r = get("/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert get("/v1/chat/completions").status_code == 405
    page = get("/")
    assert page.status_code == 200 and "<title>tritonchat</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external asset


def test_beam_search_through_the_api(server, client, model, tok):
    r = chat(client, "hello there", max_tokens=10, n=2, extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert len(r.choices) == 2
    # the server is idle: the same model with a cache of its own gives the reference
    reference = Engine(model, tok, page_size=16, max_batch_size=4, impl="torch")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hello there"}]})
    hyps = reference.beam_search(prompt, num_beams=3, max_tokens=10, length_penalty=0.5)
    assert [c.message.content for c in r.choices] == [tok.decode(h.tokens) for h in hyps[:2]]
    one = chat(client, "hello there", max_tokens=10, extra_body={"num_beams": 1})
    assert one.choices[0].message.content == chat(client, "hello there", max_tokens=10).choices[0].message.content
    streamed = stream_text(client, "hello there", max_tokens=10, extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert streamed[0] == r.choices[0].message.content
    # beam searches and sampled requests at once: each gets what it gets alone
    greedy = [stream_text(client, p, max_tokens=10) for p in ("how are", "you fine")]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        beams = [pool.submit(chat, client, "hello there", max_tokens=10, n=2,
                             extra_body={"num_beams": 3, "length_penalty": 0.5}) for _ in range(2)]
        streams = [pool.submit(stream_text, client, p, max_tokens=10) for p in ("how are", "you fine")]
        assert [f.result() for f in streams] == greedy
        assert all([c.message.content for c in f.result().choices] == [c.message.content for c in r.choices]
                   for f in beams)
    assert wait_idle(server)


def test_api_key(model, tok):
    engine = Engine(model, tok, page_size=16, max_batch_size=4, impl="torch")
    app = chat_web.create_app(engine, chat_web.ServerConfig(model_name=MODEL, api_key="s3cret"))
    with serve(app) as url:
        for key in (None, "wrong", "s3cret-but-longer"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
                r = request(url, method, path, GOOD if method == "POST" else None, headers)
                assert r.status_code == 401, (key, path)
                assert "API key" in r.json()["error"]["message"]
        assert request(url, "GET", "/health").status_code == 200
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert chat(good, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_importing_the_module_loads_no_server_stack():
    code = ("import sys, tritonchat.scripts.chat_web; "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    for argv, needle in ((["--port", "-3"], "--port"), (["--base-dir", str(tmp_path)], "base_checkpoints")):
        rc = chat_web.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"{chat_web.PROG}: error: ") and err.count("\n") == 1, err
        assert needle in err


def tool_transcript(tok, question="what is it"):
    """A chat prompt and the answer a scripted model gives it: text, a calculator call, the forced result, text."""
    from tritonchat.engine.calculator import calculate

    sp = tok.encode_special
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": question}]})
    answer = (tok.encode("fine") + [sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"),
                                    sp("<|output_start|>"), *tok.encode(calculate("12*7")), sp("<|output_end|>")]
              + tok.encode(" thanks") + [sp("<|assistant_end|>")])
    return prompt, prompt + answer


TOOL_PARTS = [{"type": "text", "text": "fine"}, {"type": "python", "text": "12*7"},
              {"type": "python_output", "text": "84"}, {"type": "text", "text": " thanks"}]


def test_tool_calls_in_the_answer(tok):
    from tests.engine.test_engine import ScriptedModel

    prompt, transcript = tool_transcript(tok)
    engine = Engine(ScriptedModel(transcript, tok.get_vocab_size()), tok, max_seq_len=128, impl="torch")
    with serve(chat_web.create_app(engine, chat_web.ServerConfig(model_name=MODEL))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = chat(client, "what is it", max_tokens=40)
        msg = r.choices[0].message
        assert msg.content == "fine[calc: 12*7 = 84]  thanks" and r.choices[0].finish_reason == "stop"
        assert msg.model_extra["parts"] == TOOL_PARTS  # the extension field: the answer's structure
        parts = []
        for c in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what is it"}],
                                                max_tokens=40, temperature=0, stream=True):
            part = c.choices[0].delta.model_extra.get("part") if c.choices else None
            if part and parts and parts[-1]["type"] == part["type"]:
                parts[-1]["text"] += part["text"]
            elif part:
                parts.append(dict(part))
        assert parts == TOOL_PARTS
        # the parts go back as the assistant turn's content of the next request
        history = [{"role": "user", "content": "what is it"}, {"role": "assistant", "content": TOOL_PARTS},
                   {"role": "user", "content": "and?"}]
        r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_the_command_serves_and_stops_on_ctrl_c(tmp_path, model, tok):
    """`python -m scripts.chat_web` on a saved checkpoint: answers, keeps prompt text out of its log, and ends
    after a graceful shutdown on SIGINT (Ctrl-C) while a stream is open: one line, exit code 130 (128 + SIGINT)."""
    import os
    import signal
    from pathlib import Path

    from tritonchat.engine.checkpoint import save_checkpoint

    root = Path(__file__).resolve().parents[2]
    tok.save(tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "ckpt", 3, model.state_dict(), None, {"step": 3, "model_config": model.config.to_dict()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "TRITONCHAT_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--checkpoint-dir", str(tmp_path / "ckpt"),
                             "--tokenizer-dir", str(tmp_path / "tokenizer"), "--port", str(port), "--impl", "torch",
                             "--device", "cpu", "--model-name", MODEL],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if request(url, "GET", "/health", timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)  # the key from the environment
        assert chat(client, "zebra secret", max_tokens=3).choices[0].message.content is not None
        assert request(url, "GET", "/v1/models").status_code == 401
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
        with open_stream(url, body) as _:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Application shutdown complete" in err and err.rstrip().endswith("stopped (interrupted)")
    assert "Traceback" not in err and "zebra" not in err + out


def test_prompt_text_is_logged_only_when_asked(model, tok, caplog):
    for log_prompts in (False, True):
        caplog.clear()
        engine = Engine(model, tok, page_size=16, max_batch_size=4, impl="torch")
        cfg = chat_web.ServerConfig(model_name=MODEL, log_prompts=log_prompts)
        with caplog.at_level("INFO", logger="tritonchat.chat_web"), serve(chat_web.create_app(engine, cfg)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            chat(client, "zebra secret", max_tokens=2)
        assert "completion tokens" in caplog.text  # the request is logged either way, by counts
        assert ("zebra secret" in caplog.text) == log_prompts
