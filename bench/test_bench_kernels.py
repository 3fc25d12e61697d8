"""Kernel benchmarks under pytest: every case of bench/cases.py, each implementation in each mode.

    pytest bench/                      each case once at a tiny size, fp32, Triton in the interpreter (smoke)
    pytest bench/ --benchmark          bf16 at the speedrun shapes (depth 24, micro-batch 16) on a CUDA GPU

On a GPU the correctness check is asserted after timing, so a failing implementation still leaves its numbers
(and its error, in extra_info["max_rel_err"]) in the saved run. `python -m bench.suite` runs the same cases under
a time budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from tritonchat.bench import cases as bc
from tritonchat.bench.cases import BenchState, KernelBench


def _params(full: bool):
    out = []
    for case in bc.build_cases(full):
        for mode in case.modes:
            for impl in sorted(case.impls, key=bc.ORDER.index):
                out.append(pytest.param(case, mode, impl, id=f"{case.family}-{case.label}-{mode}-{impl}"))
    return out


def pytest_generate_tests(metafunc):
    if {"case", "mode", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize("case,mode,impl", _params(bool(metafunc.config.getoption("benchmark"))))


@pytest.fixture(autouse=True)
def _one_thread(request):
    """The smoke's tiny interpreter launches run faster on one thread (and leave the other cores alone)."""
    if request.config.getoption("benchmark"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- ceilings: measured in the same run as the cases (KERNELS.md), first so that every case can use them -----
@pytest.mark.parametrize("what", ["copy", "matmul"])
def test_ceiling(what, kbench):
    step, work, formula = bc.ceiling_case(what, kbench)
    median = kbench.run(step, group=f"ceiling {what}", impl="torch", work=work, formula=formula,
                        dtype=str(kbench.dtype))
    if median is not None:
        kbench.ceiling("copy_gbps" if what == "copy" else "matmul_tflops",
                       work[1] / median / (1e9 if what == "copy" else 1e12))


def test_kernel(case, mode: str, impl: str, kbench):
    try:
        step, errs = bc.check(case, mode, impl, kbench)
    except bc.Unavailable as e:
        pytest.skip(str(e))
    kbench.run(step, group=f"{case.family} {case.label} {mode}", impl=impl, work=case.work(mode),
               formula=case.formula, family=case.family, shape=case.label, mode=mode, dtype=str(kbench.dtype),
               max_rel_err=max(errs, default=0.0))
    tol = bc.tolerance(case, kbench.dtype)
    assert max(errs, default=0.0) < tol, f"{impl} vs eager: relative errors {errs} (tol {tol})"


def test_cases_cover_every_family():
    """The suite benchmarks each kernel family, each with its eager and compiled baselines, at both sizes."""
    for full in (False, True):
        cases = bc.build_cases(full)
        assert {c.family for c in cases} >= {"rms_norm", "mix_rms_norm", "rope_qk_norm", "softcap_ce",
                                               "linear_softcap_ce", "relu2_mlp", "polar_express", "flash_attention",
                                               "paged_attention"}
        for c in cases:
            assert {"eager", "compile", "triton"} <= set(c.impls), c.family
            kind, amount = c.work(c.modes[-1])
            assert kind in ("bytes", "flops") and amount > 0 and math.isfinite(amount)
    assert bc._pairs(4, None) == 10 and bc._pairs(4, 1) == 7  # 1+2+3+4; 1+2+2+2


def test_every_target_names_a_full_size_case():
    """Each KERNELS.md target selects at least one speedrun-shape case, and its comparator is one of them."""
    cases = bc.build_cases(True)
    for t in bc.TARGETS:
        hit = [c for c in cases if c.family == t.family and t.mode in c.modes and t.shape in c.label]
        assert hit, t
        if t.what.startswith("vs "):
            assert all(t.what[3:] in c.impls for c in hit), t


def test_targets_are_judged_from_the_rows():
    rows = [
        {"family": "rms_norm", "shape": "s", "mode": "fwd+bwd", "impl": "eager", "median_ms": 3.0},
        {"family": "rms_norm", "shape": "s", "mode": "fwd+bwd", "impl": "compile", "median_ms": 1.1},
        {"family": "rms_norm", "shape": "s", "mode": "fwd+bwd", "impl": "triton", "median_ms": 1.0,
         "ceiling_fraction": 0.9},
    ]
    got = {r["what"]: r for r in bc.evaluate_targets(rows, None, [t for t in bc.TARGETS if t.family == "rms_norm"])}
    assert got["vs eager"]["got"] == pytest.approx(3.0) and got["vs eager"]["met"] is True
    assert got["vs compile"]["got"] == pytest.approx(1.1) and got["vs compile"]["met"] is False
    assert got["vs liger"]["got"] is None and got["vs liger"]["met"] is None  # not measured: neither met nor missed
    assert got["ceiling"]["met"] is True
    missing = bc.evaluate_targets([], None, [bc.Target("relu2_mlp", "ceiling", 0.9)])
    assert missing == [{"family": "relu2_mlp", "shape": "*", "mode": "fwd+bwd", "what": "ceiling", "need": 0.9,
                        "got": None, "met": None}]


class _FakeClock:
    """Stands in for a timer: calls the step a few times and reports a fixed median; keeps what it is given."""

    def __init__(self, *medians: float) -> None:
        self._medians, self.calls, self.recorded, self.groups = list(medians), 0, [], []

    def __call__(self, step, group):
        for _ in range(3):
            step()
            self.calls += 1
        self.groups.append(group)
        return self._medians.pop(0)

    def record(self, extra):
        self.recorded.append(dict(extra))


def test_timing_records_rates_ceiling_fractions_ratios_and_telemetry():
    """The GPU-only bookkeeping, driven on CPU by a stand-in clock: rates from the work and the median, the
    fraction of the measured ceiling, speedups in both directions, and the environment in the saved JSON."""
    state = BenchState(timing=True)
    clock = _FakeClock(0.004, 0.001, 0.25)
    kb = KernelBench(state, clock, device="cpu")
    calls = []
    kb.ceiling("copy_gbps", 8.0)
    group = "rms_norm N1xC1 fwd"
    t_eager = kb.run(lambda: calls.append("e"), group=group, impl="eager", work=("bytes", 16e6), formula="2*N*C*s")
    t_triton = kb.run(lambda: calls.append("t"), group=group, impl="triton", work=("bytes", 16e6), formula="2*N*C*s")
    kb.run(lambda: None, group="mlp fwd", impl="triton", work=("flops", 1e9), formula="4*N*C*Hd")
    assert (t_eager, t_triton) == (0.004, 0.001)
    assert calls.count("e") == 2 + 3 and calls.count("t") == 2 + 3  # two warm-up calls, then the clock's
    eager, triton = clock.recorded[0], clock.recorded[1]
    assert clock.groups[1] == group and triton["impl"] == "triton" and triton["formula"] == "2*N*C*s"
    assert eager["gbps"] == pytest.approx(16e6 / 0.004 / 1e9) and triton["gbps"] == pytest.approx(16.0)
    assert triton["ceiling_fraction"] == pytest.approx(16.0 / 8.0) and triton["median_ms"] == pytest.approx(1.0)
    assert triton["speedup_vs_eager"] == pytest.approx(4.0) and "speedup_vs_triton" not in eager
    assert clock.recorded[2]["tflops"] == pytest.approx(1e9 / 0.25 / 1e12)
    assert "ceiling_fraction" not in clock.recorded[2]  # no matmul ceiling was measured
    saved = {"benchmarks": [{"group": group, "extra_info": dict(eager)}, {"group": group, "extra_info": dict(triton)}]}
    state.complete_json(saved, {"device": "NVIDIA H100", "gpu": {"sm_clock_mhz": 1980}})
    assert saved["benchmarks"][0]["extra_info"]["speedup_vs_triton"] == pytest.approx(0.25)
    assert saved["tritonchat"]["env"]["gpu"] == {"sm_clock_mhz": 1980}
    assert saved["tritonchat"]["ceilings"] == {"copy_gbps": 8.0}
    payload = state.payload()  # what a result file holds: every row with its speedups over all the others
    assert payload["rows"][0]["speedup_vs_triton"] == pytest.approx(0.25)
    lines = state.summary_lines()
    assert any("triton" in ln and "x4.00 vs eager" in ln and "200.0% of ceiling" in ln for ln in lines)


def test_smoke_mode_runs_nothing_more():
    kb = KernelBench(BenchState(timing=False), lambda step, group: pytest.fail("no clock in the smoke"))
    calls = []
    assert kb.run(lambda: calls.append(1), group="g", impl="triton", work=("bytes", 1.0), formula="f") is None
    assert calls == [] and kb.dtype == torch.float32 and kb.device.type == "cpu"


def test_default_clock_times_on_cpu():
    kb = KernelBench(BenchState(timing=True), device="cpu")
    calls = []
    t = kb.run(lambda: calls.append(1), group="g", impl="eager", work=("bytes", 1.0), formula="f")
    assert t is not None and t >= 0 and len(calls) == 2 + 3  # warm-up, then median_seconds' three CPU calls
