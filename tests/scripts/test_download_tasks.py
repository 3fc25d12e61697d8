"""scripts.download_tasks against a local HTTP server on 127.0.0.1 serving a dataset-viewer style listing and the
parquet files it names: files land where the task loaders read them, a rerun fetches nothing, a missing split, an
unreachable listing and bad flags end in one line."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tritonchat.scripts import download_tasks as dt
from tritonchat.tasks.gsm8k import GSM8K


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _gsm8k_rows(split: str, n: int) -> list[dict]:
    return [{"question": f"{split} question {i}: what is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n"
             f"#### {i + 1}"} for i in range(n)]


class Hub:
    """/parquet?dataset=REPO answers the listing; /files/<path> the files. `requests` records every path."""

    def __init__(self):
        self.files = {  # train comes in two files, listed out of order
            "openai/gsm8k/main/train/0001.parquet": _parquet(_gsm8k_rows("train-b", 3)),
            "openai/gsm8k/main/train/0000.parquet": _parquet(_gsm8k_rows("train-a", 4)),
            "openai/gsm8k/main/test/0000.parquet": _parquet(_gsm8k_rows("test", 5)),
            "openai/gsm8k/socratic/train/0000.parquet": _parquet(_gsm8k_rows("socratic", 2)),
            "openai/gsm8k/socratic/test/0000.parquet": _parquet(_gsm8k_rows("socratic", 2)),
        }
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def listing(self, repo: str) -> dict:
        out = []
        for path, body in self.files.items():
            r, config, split, filename = path.rsplit("/", 3)
            if r == repo:
                out.append(dict(dataset=repo, config=config, split=split, filename=filename, size=len(body),
                                url=f"{self.url}/files/{path}"))
        return {"parquet_files": out}


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            with hub.lock:
                hub.requests.append(parts.path)
            if parts.path == "/parquet":
                body = json.dumps(hub.listing(parse_qs(parts.query)["dataset"][0])).encode()
            elif parts.path.removeprefix("/files/") in hub.files:
                body = hub.files[parts.path.removeprefix("/files/")]
            else:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def hub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", dt.LISTING_ENV):
        monkeypatch.delenv(var, raising=False)
    h = Hub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    h.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield h
    httpd.shutdown()
    httpd.server_close()


def _run(hub, base, *names):
    return dt.main([*names, "--base-dir", str(base), "--listing-url", hub.url + "/parquet?dataset={repo}",
                    "--retry-wait", "0", "--progress-every", "0.05"])


def test_files_land_where_the_loader_reads_them(hub, tmp_path, capsys):
    assert _run(hub, tmp_path, "gsm8k", "gsm8k-socratic") == 0
    folder = tmp_path / "tasks_data" / "gsm8k"
    assert sorted(p.name for p in folder.iterdir()) == ["test-00000.parquet", "train-00000.parquet",
                                                        "train-00001.parquet"]
    assert (tmp_path / "tasks_data" / "gsm8k-socratic" / "test-00000.parquet").is_file()
    assert hub.requests.count("/parquet") == 1  # one listing per repository
    train = GSM8K(split="train", base_dir=tmp_path, shuffle_seed=None)
    assert train.num_examples() == 7  # the files in name order: 0000 (4 rows), then 0001 (3)
    assert train.get_example(0)["messages"][0]["content"].startswith("train-a question 0")
    assert train.get_example(4)["messages"][0]["content"].startswith("train-b question 0")
    test = GSM8K(split="test", base_dir=tmp_path, shuffle_seed=None)
    assert test.evaluate(test.get_example(2), "so the answer is #### 3")
    assert "2 dataset(s) ready" in capsys.readouterr().out


def test_rerun_fetches_only_the_listing(hub, tmp_path):
    assert _run(hub, tmp_path, "gsm8k") == 0
    hub.requests.clear()
    assert _run(hub, tmp_path, "gsm8k") == 0
    assert hub.requests == ["/parquet"]


def test_missing_split_is_one_line(hub, tmp_path, capsys):
    del hub.files["openai/gsm8k/main/test/0000.parquet"]
    assert _run(hub, tmp_path, "gsm8k") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{dt.PROG}: error:") and "split 'test'" in err[-1] and "openai/gsm8k" in err[-1]


def test_unreachable_listing_is_one_line(tmp_path, capsys, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv(dt.LISTING_ENV, f"http://127.0.0.1:{port}/parquet?dataset={{repo}}")
    assert dt.main(["gsm8k", "--base-dir", str(tmp_path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot read the file listing from 127.0.0.1" in err[-1]


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "unknown dataset 'nosuch'"),
    (["-w", "0"], "--num-workers must be at least 1"),
    (["--listing-url", "ftp://x/{repo}"], "not an http(s) URL"),
    (["--listing-url", "http://x/parquet"], "with {repo} in it"),
])
def test_usage_errors(argv, message, capsys, tmp_path):
    assert dt.main([*argv, "--base-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_every_dataset_names_a_loader_folder():
    from tritonchat.tasks import datafiles

    assert set(dt.DEFAULT) <= set(dt.TASK_DATA)
    for name in ("smoltalk", "mmlu", "arc-easy", "arc-challenge", "gsm8k", "humaneval"):
        assert name in datafiles.__doc__ and name in dt.TASK_DATA
