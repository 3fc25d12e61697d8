"""bench.suite: the whole budgeted run on CPU (--dry-run), the budget's skips and hard stop, the estimate."""

import json
import time

import pytest
import torch
from tritonchat.bench import suite


def test_dry_run_exercises_every_part_and_writes_each_result(tmp_path, capsys):
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--quiet"]) == 0
    files = {p.name.split("_cpu_")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(files) == {"kernel_check", "kernels", "train_step", "infer"}
    for name, r in files.items():
        assert r["name"] == name and r["env"]["device"] == "cpu" and r["env"]["commit"]
    check = files["kernel_check"]
    assert check["rows"] and all(r["ok"] for r in check["rows"]) and not check["failed"]
    families = {r["family"] for r in check["rows"]}
    assert {"rms_norm", "flash_attention", "paged_attention", "linear_softcap_ce", "polar_express"} <= families
    kern = files["kernels"]
    assert {"copy_gbps", "matmul_tflops"} <= set(kern["ceilings"]) and not kern["errors"]
    timed = {(r["family"], r["impl"]) for r in kern["rows"] if "family" in r}
    assert ("rms_norm", "triton") in timed and ("rms_norm", "eager") in timed and ("rms_norm", "compile") in timed
    assert all(r["median_ms"] > 0 for r in kern["rows"])
    assert "targets" not in kern  # judged on a GPU only
    assert {r["variant"] for r in files["train_step"]["runs"]} == {"triton", "compile"}
    assert all("tok_s_per_gpu" in r for r in files["train_step"]["runs"])
    assert {r["variant"] for r in files["infer"]["runs"]} == {"triton", "torch"}
    out = capsys.readouterr().out
    assert "check: " in out and "within tolerance" in out and "judged on a GPU" in out


def test_a_budget_too_small_skips_each_unit_and_says_so(tmp_path, capsys):
    t = time.monotonic()
    assert suite.main(["--dry-run", "--budget", "1", "--parts", "check,train", "--out", str(tmp_path), "--quiet"]) == 0
    assert time.monotonic() - t < 30
    check = json.loads(next(tmp_path.glob("kernel_check_*.json")).read_text())
    assert not check["rows"] and check["skipped"] and all(s.endswith(": budget") for s in check["skipped"])
    assert "check skipped:" in capsys.readouterr().out


def test_the_hard_stop_ends_a_unit_but_never_a_write():
    budget = suite.Budget(0.3)
    with pytest.raises(suite.BudgetExceeded, match="budget ran out"):
        with budget.hard_stop():
            time.sleep(3)
    budget = suite.Budget(0.3)
    with budget.hard_stop():
        budget.armed = False  # what the suite does around a result file
        time.sleep(0.5)
        budget.armed = True
    assert budget.left() < 0


def test_estimate_reads_the_compile_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"records": [{"seconds": 100.0}, {"seconds": 20.0}]}))
    est = suite.estimate(json.loads(report.read_text()))
    assert est["check"] > 120 and est["kernels"] > 0 and est["train"] > 0 and est["infer"] > 0
    assert suite.estimate(None, no_compile=True)["kernels"] < est["kernels"]
    assert suite.main(["--estimate", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "total" in out


@pytest.mark.parametrize("argv", [["--parts", "check,bogus"], ["--budget", "0"], ["--budget", "nan"]])
def test_bad_arguments_are_one_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        suite.parse_args(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_without_a_gpu_nothing_is_timed_and_it_says_why(capsys):
    assert suite.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
