"""Every kernel config the launchers and autotuners can pick at the speedrun shapes compiles for Hopper (sm_90) in
bf16: within shared memory, without a spilled register, on wgmma where a bf16 dot has 64-row tiles or more. Needs no
GPU: Triton compiles for the sm_90 target on the CPU (bench/compile_report.py)."""

import json
from pathlib import Path

import pytest
from tritonchat.bench import compile_report


def test_bf16_speedrun_configs_compile_clean_for_sm90(tmp_path):
    if not Path(compile_report._cuobjdump()).exists():
        pytest.skip("this Triton wheel has no bundled cuobjdump")
    rc = compile_report.main(["--arch", "90", "--dtype", "bf16", "--fail-on-spill", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "compile_report_sm90_bf16.json").read_text())
    summary = report["summary"]
    assert rc == 0, summary["violations"]
    assert summary["failed"] == 0 and summary["spilling"] == 0
    assert summary["compiled"] >= 70  # every family is there (norms, rope, CE, GEMM, attention, Muon, paged)
    families = {r["family"] for r in report["records"] if r["ok"]}
    assert families >= {"rms_norm", "rope_qk_norm", "linear_softcap_ce", "relu2_mlp", "flash_attention",
                        "polar_express", "muon", "paged_attention"}
    assert all(r["wgmma"] for r in report["records"] if r["ok"] and r["dot"] and r["rows"] >= 64)


def test_a_compile_that_does_not_finish_is_stopped_and_is_a_violation():
    import time

    start = time.monotonic()
    with pytest.raises(compile_report.CompileTimeout, match="within 0.2 s"):
        with compile_report._alarm(0.2):
            time.sleep(5)
    assert time.monotonic() - start < 2
    rec = {"ok": False, "timed_out": True, "error": "did not finish compiling within 60 s"}
    assert compile_report.violations(rec) == ["did not finish compiling within 60 s"]
    assert compile_report.violations({"ok": False, "error": "x"}) == ["compile failed"]


def test_ampere_leaves_out_the_tma_plans_and_keeps_the_rest():
    plans = compile_report.plans("bf16")
    ampere = compile_report.reachable(plans, 80)
    assert any(p.tma for p in plans) and not any(p.tma for p in ampere)
    assert len(ampere) == sum(not p.tma for p in plans) and compile_report.reachable(plans, 90) == plans
    assert compile_report.SHARED_LIMIT[80] < compile_report.SHARED_LIMIT[90]


def test_the_hopper_only_attention_tiles_leave_the_ampere_space():
    import torch
    from tritonchat.kernels import attention as att

    for kind in ("fwd", "dq", "dkdv"):
        hopper, ampere = att.autotune_space(kind, torch.bfloat16, 9), att.autotune_space(kind, torch.bfloat16, 8)
        assert ampere and set(ampere) < set(hopper) and not set(ampere) & att._SM90_ONLY
        assert att.autotune_space(kind, torch.float32, 8) == att.autotune_space(kind, torch.float32, 9)
    labels = {p.label for p in compile_report.plans("bf16", families=("flash_attention",), arch=80)}
    assert "fwd h128_i64_w8_s3" not in labels and "fwd h64_i64_w4_s3" in labels


def test_the_fp32_spaces_follow_the_architecture():
    import torch
    from tritonchat.kernels import matmul as mm
    from tritonchat.kernels.paged_attention import decode_tiles

    assert set(mm.tune_configs(torch.float32, 8)) < set(mm.tune_configs(torch.float32, 9))
    assert mm.tune_configs(torch.bfloat16, 8) == mm.tune_configs(torch.bfloat16, 9)
    assert decode_tiles(1, 128, torch.bfloat16, 8) == decode_tiles(1, 128, torch.bfloat16, 9) == (16, 64)
    assert decode_tiles(1, 128, torch.float32, 9) == (16, 64) and decode_tiles(1, 128, torch.float32, 8) == (16, 32)
    assert decode_tiles(64, 256, torch.bfloat16, 9) == (64, 32)
