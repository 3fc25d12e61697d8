"""bench.loader: a dry run packs batches, times them and writes its result only where asked."""

import json

from tritonchat.bench import loader


def test_dry_run(tmp_path, capsys):
    assert loader.main(["--dry-run"]) == 0
    assert "x GPU need" in capsys.readouterr().out
    assert loader.main(["--dry-run", "--threads", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("loader_*.json")
    result = json.loads(path.read_text())
    (run,) = result["runs"]
    assert run["threads"] == 1 and run["tok_s"] > 0 and result["seq_len"] == 64
    assert abs(result["gpu_bar"]["step_s"] - 2**20 / 8 / 122.9e3) < 1e-9
