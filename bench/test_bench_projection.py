"""The time-to-GPT-2 projection on the reference speedrun's published numbers (SPEC §7, §12), and the CPU dry
runs of bench.train_step and bench.infer (the same code paths as the GPU runs, on a tiny model)."""

import json
import os

import pytest
import torch
from tritonchat.bench import infer, train_step
from tritonchat.bench.leaderboard import validate
from tritonchat.bench.train_step import project, recipe

H100_PEAK = 989e12


def test_recipe_depth24_matches_the_reference_numbers():
    r = recipe(24)  # ratio 8, T = 2048, V = 32768
    assert r.scaling_params == 729_810_624
    assert r.flops_per_token == pytest.approx(4.775e9, rel=1e-3)
    assert r.total_batch_size == 2**20 and r.steps == 5568
    assert r.tokens == r.steps * r.total_batch_size
    assert r.tokens == pytest.approx(5.84e9, rel=2e-3)
    assert r.total_flops == pytest.approx(2.79e19, rel=2e-3)
    assert r.total_flops == pytest.approx(2.788e19, rel=5e-4)


def test_speedrun_accumulation():
    """2^20 tokens per step over 8 GPUs x 2048 tokens per sequence: 4 micro-batches of 16, or 2 of 32."""
    assert train_step.accumulation(2**20, 8, 16, 2048) == 4
    assert train_step.accumulation(2**20, 8, 32, 2048) == 2
    assert train_step.accumulation(2**20, 8, 128, 2048) == 1  # never below one


def test_projection_reproduces_the_record():
    """The record's implied 122.9K tok/s per GPU on 8 GPUs gives its 1.65 h at about 59% of the bf16 peak."""
    got = project(122.9e3, 4.775e9, 2.788e19, gpus=8, peak_flops=H100_PEAK)
    assert got["projected_hours"] == pytest.approx(1.65, abs=0.005)
    assert got["mfu"] == pytest.approx(0.593, abs=0.002)
    assert got["flops_per_s_per_gpu"] == pytest.approx(122.9e3 * 4.775e9)
    assert got["vs_record"] == pytest.approx(1.0, abs=0.005)


def test_projection_scales_with_throughput_and_gpus():
    base = project(1e5, 4.775e9, 2.788e19)
    assert project(2e5, 4.775e9, 2.788e19)["projected_hours"] == pytest.approx(base["projected_hours"] / 2)
    assert project(1e5, 4.775e9, 2.788e19, gpus=16)["projected_hours"] == pytest.approx(base["projected_hours"] / 2)
    assert base["mfu"] is None  # no peak given (a CPU, an unknown GPU)
    # 2.788e19 FLOPs / (4.775e14 FLOP/s x 8) / 3600 = 2.0277 h
    assert base["projected_hours"] == pytest.approx(2.788e19 / (1e5 * 4.775e9 * 8) / 3600)
    assert base["projected_hours"] == pytest.approx(2.0277, abs=1e-3)


@pytest.mark.parametrize("kw,match", [
    (dict(tok_s_per_gpu=0.0), "tok_s_per_gpu"), (dict(tok_s_per_gpu=float("nan")), "tok_s_per_gpu"),
    (dict(flops_per_token=-1.0), "flops_per_token"), (dict(total_flops=None), "total_flops"),
    (dict(gpus=0), "gpus"), (dict(gpus=2.0), "gpus"),
])
def test_projection_rejects_bad_inputs(kw, match):
    args = dict(tok_s_per_gpu=1e5, flops_per_token=4.775e9, total_flops=2.788e19, gpus=8)
    with pytest.raises(ValueError, match=match):
        project(**{**args, **kw})


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the real benchmark")


@NO_GPU
def test_train_step_without_gpu_says_so(capsys):
    assert train_step.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


NEEDS_INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU dry run's triton variant needs the Triton interpreter (left off under --benchmark)")


@NEEDS_INTERPRETER
def test_train_step_dry_run_writes_a_result_the_leaderboard_understands(tmp_path, capsys):
    """Depth 1, T=32, two accumulated micro-batches; triton (kernels in the interpreter) and eager start from the
    same weights and tokens, so their first losses agree. (`--dry-run` alone also runs torch.compile.)"""
    rc = train_step.main(["--dry-run", "--variants", "triton,eager", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("train_step_cpu_*.json")
    result = json.loads(path.read_text())
    triton, eager = result["runs"]
    assert (triton["variant"], eager["variant"]) == ("triton", "eager")
    r = recipe(1, vocab_size=256, seq_len=32)
    for run in (triton, eager):
        assert run["accum"] == 2 and run["batch"] == 1
        assert run["step_s"] > 0 and run["fwd_bwd_s"] > 0 and run["opt_s"] > 0
        assert run["tok_s_per_gpu"] == pytest.approx(2 * 1 * 32 / run["step_s"])
        assert run["projected_hours"] == pytest.approx(
            r.total_flops / (r.flops_per_token * run["tok_s_per_gpu"] * 8) / 3600)
    assert 4 < eager["first_loss"] < 7  # ln(256) = 5.5 at initialization
    assert triton["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)  # fp32 on CPU
    # The headline is the triton run, whatever its speed; the leaderboard fields come from it.
    assert result["headline"]["variant"] == "triton" and result["tok_s_per_gpu"] == triton["tok_s_per_gpu"]
    assert result["flops_per_token"] == r.flops_per_token and result["recipe"]["total_flops"] == r.total_flops
    assert result["env"]["device"] == "cpu" and "commit" in result["env"]
    # A CPU run is no submission; the same file with a GPU's environment and peak is one.
    problems = validate(result)
    assert any("cpu" in p for p in problems) and any("mfu" in p for p in problems)
    result["env"].update(device="NVIDIA H100 80GB HBM3", gpu={"name": "NVIDIA H100 80GB HBM3"}, commit="0123abcd")
    result["peak_flops"] = H100_PEAK
    result["mfu"] = result["flops_per_token"] * result["tok_s_per_gpu"] / H100_PEAK
    assert validate(result) == []
    assert "GPT-2 h" in capsys.readouterr().out


def test_train_step_rejects_unknown_variants():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--variants", "triton,fast"])


@NO_GPU
def test_infer_without_gpu_says_so(capsys):
    assert infer.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@NEEDS_INTERPRETER
def test_infer_dry_run(tmp_path):
    assert infer.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("infer_cpu_*.json")
    result = json.loads(path.read_text())
    assert [r["variant"] for r in result["runs"]] == ["triton", "torch"]
    for r in result["runs"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_ms_per_step"] > 0
