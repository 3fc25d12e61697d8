"""Load benchmark of the HTTP server (scripts/chat_web.py): N concurrent streaming clients on 127.0.0.1.

    python -m bench.serve                                  # 16 clients, random depth-2 model (CPU-sized)
    python -m bench.serve --clients 64 --depth 12 --gen 128
    python -m bench.serve --checkpoint-dir <dir> --tokenizer-dir <dir>   # a trained model instead
    python -m bench.serve --dry-run                        # 4 clients, depth 1, 8 tokens (a smoke test)

The server runs in this process (uvicorn in a thread, the engine in its own thread, as `python -m scripts.chat_web`
runs it). Every client, a thread of its own, sends --requests streamed /v1/completions requests one after the
other (greedy, `ignore_eos`, so --gen tokens each; the usage chunk gives the count) and times each: time to
first token (the first chunk with text), the gaps between chunks and the whole request. Reported: tokens/s over
all clients (every generated token / wall time from the first request to the last answer), per-stream tokens/s,
and percentiles of time to first token and of inter-token latency. Without a checkpoint the model has random
weights and a small tokenizer trained on the spot: throughput does not depend on the weights. Results:
bench/results/serve_*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

from tritonchat.bench.common import write_result

WORDS = ("the cat sat on a mat what is twelve times seven hello there how are you fine thanks "
         "a small model answers questions about numbers words and letters").split()


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p: float) -> float:
        i = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
        return s[i]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": sum(s) / len(s), "max": s[-1]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    p.add_argument("--gen", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--prompt-words", type=int, default=48, help="words in each (random) prompt")
    p.add_argument("--depth", type=int, default=2, help="random model depth (without --checkpoint-dir)")
    p.add_argument("--vocab-size", type=int, default=360, help="random model's tokenizer vocabulary")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=None, help="default: --clients")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dry-run", action="store_true", help="4 clients, depth 1, 8 tokens: a smoke test")
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    args = p.parse_args(argv)
    if args.dry_run:
        args.clients, args.requests, args.gen, args.prompt_words, args.depth = 4, 1, 8, 12, 1
        args.vocab_size, args.max_seq_len = 300, 128
    return args


def build(args):
    """(engine, tokenizer, what was loaded)."""
    import torch
    from tritonchat.engine.cli import resolve_device
    from tritonchat.engine.engine import Engine
    from tritonchat.engine.gpt import GPTConfig, build_model
    from tritonchat.engine.tokenizer import Tokenizer

    device = resolve_device(args.device)
    batch = args.max_batch_size or args.clients
    if args.checkpoint_dir:
        from tritonchat.engine.checkpoint import find_last_step, load_model

        ckpt = Path(args.checkpoint_dir)
        tok = Tokenizer.from_directory(args.tokenizer_dir or ckpt.parent.parent / "tokenizer")
        model, _ = load_model(ckpt, find_last_step(ckpt), device=device, impl=args.impl)
        what = f"checkpoint {ckpt}"
    else:
        rng = random.Random(0)
        docs = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(200)]
        tok = Tokenizer.train_from_iterator(docs, args.vocab_size)
        torch.manual_seed(0)
        cfg = GPTConfig.from_depth(args.depth, vocab_size=tok.get_vocab_size(), sequence_len=args.max_seq_len)
        model = build_model(cfg, device=device, impl=args.impl)
        what = f"random depth-{args.depth} model, vocab {tok.get_vocab_size()}"
    model.eval()
    engine = Engine(model, tok, page_size=args.page_size, max_batch_size=batch, max_seq_len=args.max_seq_len,
                    impl=model.impl)
    return engine, tok, f"{what} on {device}, impl {model.impl}"


@contextlib.contextmanager
def run_server(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("bench.serve: the server did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def one_request(port: int, body: dict) -> dict:
    """Send one streamed completion; returns ttft, the gaps between text chunks, total time and tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, last, gaps, tokens = None, None, [], 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
    conn.close()
    return {"ttft": ttft, "gaps": gaps, "seconds": time.perf_counter() - t0, "tokens": tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.serve: needs the serve extra ({e.name} is missing): "
                         f"pip install -e '.[serve]'") from None
    import torch
    from tritonchat.scripts.chat_web import ServerConfig, create_app

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    engine, tok, what = build(args)
    app = create_app(engine, ServerConfig(model_name="bench", max_queue=args.clients * 2))
    rng = random.Random(1)
    prompts = [[" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(args.requests)]
               for _ in range(args.clients)]
    results: list[list[dict]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    with run_server(app) as port:
        warm = {"model": "bench", "prompt": "hello", "max_tokens": 2, "temperature": 0, "stream": True}
        one_request(port, warm)

        def client(i: int) -> None:
            try:
                for p in prompts[i]:
                    body = {"model": "bench", "prompt": p, "max_tokens": args.gen, "temperature": 0, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
                    results[i].append(one_request(port, body))
            except Exception as e:  # reported, not raised: the other clients' figures still count
                errors.append(f"client {i}: {e}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        forwards = engine.stats["forwards"]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        forwards = engine.stats["forwards"] - forwards
    if errors:
        raise SystemExit("bench.serve: " + "; ".join(errors[:3]))
    reqs = [r for rs in results for r in rs]
    tokens = sum(r["tokens"] for r in reqs)
    payload = {
        "model": what,
        "config": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "requests": len(reqs),
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "engine_forwards": forwards,
        "tokens_per_second": tokens / wall,
        "requests_per_second": len(reqs) / wall,
        "per_stream_tokens_per_second": percentiles([r["tokens"] / r["seconds"] for r in reqs]),
        "ttft_seconds": percentiles([r["ttft"] for r in reqs if r["ttft"] is not None]),
        "inter_token_seconds": percentiles([g for r in reqs for g in r["gaps"]]),
        "request_seconds": percentiles([r["seconds"] for r in reqs]),
    }
    path = write_result("serve", payload, Path(args.results_dir) if args.results_dir else None)
    t, it = payload["ttft_seconds"], payload["inter_token_seconds"]
    print(f"{what}: {args.clients} clients x {args.requests} requests, {tokens} tokens in {wall:.2f}s = "
          f"{payload['tokens_per_second']:.1f} tok/s ({forwards} forwards); TTFT p50 {t['p50'] * 1e3:.0f} ms, "
          f"p90 {t['p90'] * 1e3:.0f} ms, p99 {t['p99'] * 1e3:.0f} ms; inter-token p50 {it.get('p50', 0) * 1e3:.1f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
