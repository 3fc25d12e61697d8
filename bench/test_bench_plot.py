"""bench.plot: what each chart takes from the result files, and the PNGs (when matplotlib is installed)."""

import json

import pytest
from tritonchat.bench import plot


def kernel_run(stamp="2026-03-02T10:00:00Z"):
    """A kernels result as bench.suite and `pytest bench/ --benchmark` write it (only the fields the charts read)."""
    group = "rms_norm N32768xC1536 fwd"
    return {"name": "kernels", "env": {"time_utc": stamp}, "rows": [
        {"group": group, "impl": "eager", "gbps": 900.0, "ceiling_fraction": 0.3, "speedup_vs_triton": 1 / 3},
        {"group": group, "impl": "triton", "gbps": 2700.0, "ceiling_fraction": 0.9, "speedup_vs_eager": 3.0,
         "speedup_vs_compile": 1.25},
        {"group": "relu2_mlp N32768xC1536xHd6144 fwd+bwd", "impl": "triton", "tflops": 600.0,
         "ceiling_fraction": 0.75, "speedup_vs_eager": 1.2},
        {"group": "ceiling copy", "impl": "torch", "gbps": 3000.0},
    ]}


def train_result(depth, tok_s, stamp, device="NVIDIA H100 80GB HBM3"):
    return {"name": "train_step", "depth": depth, "env": {"device": device, "time_utc": stamp},
            "runs": [{"variant": "triton", "batch": 16, "tok_s_per_gpu": tok_s},
                     {"variant": "eager", "batch": 16, "error": "out of memory"}]}


def test_speedups_take_triton_rows():
    rows = plot.speedups(kernel_run())
    assert ("rms_norm N32768xC1536 fwd", "eager", 3.0) in rows
    assert ("rms_norm N32768xC1536 fwd", "compile", 1.25) in rows
    assert all(base != "triton" for _, base, _ in rows)  # the baselines' own ratios are not triton speedups
    assert len(rows) == 3


def test_ceiling_fractions_tell_memory_from_matmul_bound():
    rows = plot.ceiling_fractions(kernel_run())
    assert ("rms_norm N32768xC1536 fwd", "triton", 0.9, "bytes") in rows
    assert ("relu2_mlp N32768xC1536xHd6144 fwd+bwd", "triton", 0.75, "flops") in rows
    assert len(rows) == 3  # the ceiling case itself has no fraction


def test_depth_series_keeps_the_newest_result_per_depth():
    results = [train_result(12, 300e3, "2026-03-01T00:00:00Z"), train_result(12, 320e3, "2026-03-02T00:00:00Z"),
               train_result(24, 110e3, "2026-03-01T00:00:00Z")]
    series = plot.depth_series(results)
    assert series == {"NVIDIA H100 80GB HBM3 / triton B=16": [(12, 320e3), (24, 110e3)]}


def test_newest_kernel_run_and_results_loading(tmp_path):
    (tmp_path / "kernels_h100_1.json").write_text(json.dumps(kernel_run("2026-03-01T00:00:00Z")))
    (tmp_path / "kernels_h100_2.json").write_text(json.dumps(kernel_run("2026-03-05T00:00:00Z")))
    (tmp_path / "kernels_broken.json").write_text("{")
    assert plot.newest_kernel_run(tmp_path).name == "kernels_h100_2.json"
    assert plot.newest_kernel_run(tmp_path / "nothing") is None
    (tmp_path / "train_step_x.json").write_text(json.dumps(train_result(24, 1e5, "2026-03-01T00:00:00Z")))
    (tmp_path / "infer_x.json").write_text(json.dumps({"name": "infer", "runs": []}))
    assert [r["name"] for r in plot.load_results(tmp_path)] == ["train_step"]


def test_no_results_is_said_plainly(tmp_path, capsys):
    assert plot.main(["--results", str(tmp_path)]) == 0
    assert "no results to plot" in capsys.readouterr().out
    assert not (tmp_path / "plots").exists()


def test_charts_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "kernels_h100_1.json").write_text(json.dumps(kernel_run()))
    for depth, tok_s in ((12, 3e5), (24, 1.1e5)):
        (tmp_path / f"train_step_d{depth}.json").write_text(
            json.dumps(train_result(depth, tok_s, "2026-03-01T00:00:00Z")))
    assert plot.main(["--results", str(tmp_path)]) == 0
    for name in ("speedup.png", "ceiling.png", "depths.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
