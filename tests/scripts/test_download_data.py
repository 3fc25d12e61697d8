"""scripts.download_data against a local HTTP server on 127.0.0.1 serving fixture shards: a clean download, a
dropped connection resumed with Range (and restarted where Range is ignored), corrupt shards, 404, 500s, reruns
that skip complete shards, Ctrl-C, an unreachable host."""

import _thread
import io
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tritonchat.scripts import download_data as dd
from tritonchat.train import data

CLIMBMIX_3 = ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]  # what `-n 2` fetches


def _shard(i: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"document {j} of shard {i} " * (5 + j % 7) for j in range(60)]}), buf,
                   row_group_size=20)
    return buf.getvalue()


class ShardServer:
    """Serves `files` under /data/ with Range support. Faults, each used up as it is served: `fail[name]` 500s,
    `corrupt[name]` bodies with a damaged footer (same length), `drop[name]` = bytes after which the connection
    closes, `interrupt[name]` = bytes after which Ctrl-C reaches the main thread, `pause[name]` = bytes after which
    the body stalls for 0.3 s. `ranges=False` ignores Range."""

    def __init__(self):
        self.files = {name: _shard(i) for i, name in enumerate(CLIMBMIX_3)}
        self.fail, self.corrupt, self.drop, self.interrupt, self.pause = {}, {}, {}, {}, {}
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.lock = threading.Lock()

    def take(self, faults: dict, name: str):
        with self.lock:
            value = faults.get(name)
            if value is None:
                return None
            if isinstance(value, list):  # one value per request
                value = value.pop(0)
                if not faults[name]:
                    del faults[name]
            else:
                del faults[name]
            return value

    def names(self) -> list[str]:
        return [name for name, _ in self.requests]


def _handler(srv: ShardServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.removeprefix("/data/")
            rng = self.headers.get("Range")
            with srv.lock:
                srv.requests.append((name, rng))
            if srv.take(srv.fail, name):
                return self.send_error(500)
            if name not in srv.files:
                return self.send_error(404)
            body = srv.files[name]
            if srv.take(srv.corrupt, name):
                body = body[:-8] + b"\x00garbage"  # footer length and magic overwritten
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng and srv.ranges else 0
            if start >= len(body) and rng and srv.ranges:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206 if rng and srv.ranges else 200)
            if rng and srv.ranges:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            body = body[start:]
            cut, stop_at, pause_at = srv.take(srv.drop, name), srv.take(srv.interrupt, name), srv.take(srv.pause, name)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.close_connection = True
                return
            if stop_at is not None:
                self.wfile.write(body[:stop_at])
                self.wfile.flush()
                _thread.interrupt_main()
                time.sleep(0.3)
                body = body[stop_at:]
            if pause_at is not None:
                self.wfile.write(body[:pause_at])
                self.wfile.flush()
                time.sleep(0.3)
                body = body[pause_at:]
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    srv = ShardServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(srv))
    srv.url = f"http://127.0.0.1:{httpd.server_address[1]}/data"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(dd.URL_ENV, raising=False)


def _run(srv, out, *extra):
    argv = ["-n", "2", "--base-url", srv.url, "--out", str(out), "--retry-wait", "0", "--progress-every", "0.05",
            "-w", "2", *extra]
    return dd.main(argv)


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_shard_indices_follow_the_reference():
    climbmix, fineweb = dd.DATASETS["climbmix"], dd.DATASETS["fineweb-edu"]
    assert dd.shard_indices(climbmix, 2) == [0, 1, 6542]
    assert dd.shard_indices(climbmix, 0) == [6542]
    assert len(dd.shard_indices(climbmix, -1)) == 6543 == len(dd.shard_indices(climbmix, 10**6))
    assert dd.shard_indices(fineweb, 3) == [0, 1, 2]
    assert len(dd.shard_indices(fineweb, -1)) == 1823


def test_clean_download(server, tmp_path, capsys):
    assert _run(server, tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == CLIMBMIX_3  # no .part left
    for name in CLIMBMIX_3:
        assert (tmp_path / name).read_bytes() == server.files[name]
    assert sorted(server.names()) == CLIMBMIX_3
    files = data.list_data_files(tmp_path)
    assert data.split_files(files, "val")[0].name == "shard_06542.parquet"  # the reference's validation shard
    out = capsys.readouterr().out
    assert "3/3 shards" in out and f"--data {tmp_path}" in out


def test_progress_lines_while_waiting(server, tmp_path, capsys):
    server.pause[CLIMBMIX_3[0]] = 500
    assert _run(server, tmp_path, "-w", "3") == 0
    progress = [line for line in _err_lines(capsys) if re.match(r"download: \d/3 shards, \S+ \w?B fetched at ", line)]
    assert progress and all(" s" in line for line in progress)


def test_rerun_skips_complete_shards(server, tmp_path):
    assert _run(server, tmp_path) == 0
    server.requests.clear()
    assert _run(server, tmp_path) == 0
    assert server.requests == []


def test_dropped_connection_resumes_with_range(server, tmp_path):
    name = CLIMBMIX_3[1]
    server.drop[name] = 1000
    assert _run(server, tmp_path) == 0
    assert [r for n, r in server.requests if n == name] == [None, "bytes=1000-"]
    assert (tmp_path / name).read_bytes() == server.files[name]


def test_server_without_range_restarts(server, tmp_path):
    name = CLIMBMIX_3[1]
    server.ranges, server.drop[name] = False, 1000
    assert _run(server, tmp_path) == 0
    assert [r for n, r in server.requests if n == name] == [None, "bytes=1000-"]  # asked, got the whole file
    assert (tmp_path / name).read_bytes() == server.files[name]


def test_part_files_are_continued_on_a_rerun(server, tmp_path):
    half, whole = CLIMBMIX_3[0], CLIMBMIX_3[1]
    (tmp_path / (half + ".part")).write_bytes(server.files[half][:500])
    (tmp_path / (whole + ".part")).write_bytes(server.files[whole])  # complete, not yet renamed: the server says 416
    (tmp_path / CLIMBMIX_3[2]).write_bytes(server.files[CLIMBMIX_3[2]])
    assert _run(server, tmp_path) == 0
    assert sorted(server.requests) == [(half, "bytes=500-"), (whole, f"bytes={len(server.files[whole])}-")]
    assert sorted(p.name for p in tmp_path.iterdir()) == CLIMBMIX_3
    for name in CLIMBMIX_3:
        assert (tmp_path / name).read_bytes() == server.files[name]


def test_corrupt_shard_is_fetched_again(server, tmp_path):
    name = CLIMBMIX_3[2]
    server.corrupt[name] = True  # the first response only
    (tmp_path / CLIMBMIX_3[0]).write_bytes(b"not parquet")  # a damaged shard already in place is replaced
    assert _run(server, tmp_path) == 0
    assert server.names().count(name) == 2
    for name in CLIMBMIX_3:
        assert (tmp_path / name).read_bytes() == server.files[name]


def test_corrupt_shard_is_never_renamed_into_place(server, tmp_path, capsys):
    name = CLIMBMIX_3[1]
    server.corrupt[name] = [True, True]
    assert _run(server, tmp_path, "--attempts", "2", "-w", "1") == 2
    (err,) = [line for line in _err_lines(capsys) if "error" in line]
    assert err.startswith(f"{dd.PROG}: error: {server.url}/{name}: not a readable parquet file")
    assert "gave up after 2 attempts" in err
    assert server.names().count(name) == 2
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_404_is_one_line_without_retry(server, tmp_path, capsys):
    name = CLIMBMIX_3[1]
    del server.files[name]
    assert _run(server, tmp_path, "--attempts", "5") == 2
    lines = _err_lines(capsys)
    assert lines[-1] == f"{dd.PROG}: error: {server.url}/{name}: HTTP 404 Not Found (no such shard at this base URL)"
    assert server.names().count(name) == 1


def test_500_is_retried(server, tmp_path):
    name = CLIMBMIX_3[0]
    server.fail[name] = [True, True]
    assert _run(server, tmp_path, "--attempts", "3") == 0
    assert server.names().count(name) == 3
    assert (tmp_path / name).read_bytes() == server.files[name]


def test_ctrl_c_keeps_the_part_file(server, tmp_path, capsys):
    name = CLIMBMIX_3[0]
    server.interrupt[name] = 700
    assert _run(server, tmp_path, "-w", "1") == 130
    assert _err_lines(capsys)[-1] == f"{dd.PROG}: interrupted"
    assert not any(t.name.startswith("download-") for t in threading.enumerate())  # every worker has ended
    assert not (tmp_path / name).exists()
    kept = (tmp_path / (name + ".part")).stat().st_size
    assert kept >= 700
    server.requests.clear()
    assert _run(server, tmp_path) == 0
    assert (name, f"bytes={kept}-") in server.requests
    assert sorted(p.name for p in tmp_path.iterdir()) == CLIMBMIX_3
    for n in CLIMBMIX_3:
        assert (tmp_path / n).read_bytes() == server.files[n]


def test_unreachable_host(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data"
    monkeypatch.setenv(dd.URL_ENV, url)  # the environment variable names the base URL
    assert dd.main(["-n", "0", "--out", str(tmp_path), "--attempts", "2", "--retry-wait", "0"]) == 2
    lines = [line for line in _err_lines(capsys) if "error" in line]
    assert lines == [f"{dd.PROG}: error: {url}/shard_06542.parquet: cannot connect to 127.0.0.1:{port}: "
                     f"Connection refused (gave up after 2 attempts)"]


@pytest.mark.parametrize("argv, message", [
    (["-n", "-2"], "--num-files must be -1"),
    (["-w", "0"], "--num-workers must be at least 1"),
    (["--base-url", "ftp://example.org"], "--base-url=ftp://example.org: not an http"),
])
def test_usage_errors(argv, message, capsys):
    assert dd.main(argv) == 2
    assert message in capsys.readouterr().err
