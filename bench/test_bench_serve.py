"""bench.serve --dry-run: 4 streaming clients against the server in this process; the result file's figures."""

import json

import pytest

pytest.importorskip("fastapi", reason="bench.serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="bench.serve needs the serve extra (pip install -e '.[serve]')")

from tritonchat.bench import serve  # noqa: E402


def test_serve_benchmark_dry_run(tmp_path, capsys):
    assert serve.main(["--dry-run", "--impl", "torch", "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("serve_*.json")
    r = json.loads(path.read_text())
    assert r["name"] == "serve" and r["env"]["device"] and "commit" in r["env"] and r["env"]["torch"]
    assert r["requests"] == 4 and r["generated_tokens"] == 4 * 8  # ignore_eos: every request runs to max_tokens
    assert r["tokens_per_second"] > 0 and 0 < r["ttft_seconds"]["p50"] <= r["ttft_seconds"]["p99"]
    assert r["engine_forwards"] < 4 * 8  # the clients were batched together
    assert "tok/s" in capsys.readouterr().out


def test_percentiles():
    p = serve.percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] in (50.0, 51.0) and p["p99"] == 99.0 and p["max"] == 100.0
    assert serve.percentiles([]) == {}
