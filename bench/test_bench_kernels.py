"""Kernel benchmarks: every fused op against its eager reference, torch.compile(reference) and Liger-Kernel.

    pytest bench/                      each case once at a tiny size, fp32, Triton in the interpreter (smoke)
    pytest bench/ --benchmark          bf16 at the speedrun shapes (depth 24, micro-batch 16) on a CUDA GPU

Every case checks each implementation against the eager reference (outputs, and gradients in fwd+bwd;
relative Frobenius error under the case's bf16 tolerance on a GPU, under FP32_TOL in the smoke); on a GPU the
check is asserted after timing, so a failing implementation still leaves its numbers (and its error, in
extra_info["max_rel_err"]) in the saved run. "fwd" runs under torch.no_grad(); "fwd+bwd" is the forward plus
torch.autograd.grad of the outputs against fixed random upstream gradients. Figures of merit (KERNELS.md):
bytes moved (each input read once, each output written once) for memory-bound ops, FLOPs for matmul-bound
ones; the formula is written next to each case and stored with the result. The two ceiling cases, timed
first, give the copy bandwidth and the cuBLAS bf16 rate that every case is compared against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from bench._util import (
    BenchState,
    KernelBench,
    liger_linear_softcap_ce,
    liger_mix_rms_norm,
    liger_relu2_mlp,
    liger_rms_norm,
    liger_rope_qk_norm,
    liger_softcap_ce,
    optional_attr,
)
from bench.common import rel_err

FP32_TOL = 1e-3  # smoke (fp32, interpreter): every implementation against the eager reference
BF16_TOL = 2e-2
# Speedrun shapes (KERNELS.md, depth 24): B x T = 16 x 2048 tokens, C = 1536, 12 heads of 128, V = 32768.
B, T, C, H, D, V = 16, 2048, 1536, 12, 128, 32768
N = B * T
S_WINDOW = 512  # the short window at T = 2048 (SPEC §1)
ORDER = ("eager", "compile", "liger", "sdpa_gathered", "triton")  # baselines first: triton's ratios see them all


@dataclass
class Case:
    family: str
    label: str
    make: Callable  # (kbench) -> tuple of arguments
    impls: dict[str, Callable]  # name -> factory(timing) -> callable(*args), or None when unavailable (skip)
    work: Callable[[str], tuple[str, float]]  # mode -> ("bytes" | "flops", amount)
    formula: str
    diff: tuple[int, ...] = ()  # arguments differentiated in fwd+bwd; () means forward only
    tol: float = BF16_TOL

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd", "fwd+bwd") if self.diff else ("fwd",)


# A factory takes `timing` (GPU run or CPU smoke) and returns the callable, or None when it is unavailable
# (an op that has not landed, Liger not importable): that implementation's cases are then skipped.
def _triton(module: str, name: str, **kw):
    op = optional_attr(module, name)
    return lambda timing: None if op is None else (lambda *a: op(*a, impl="triton", **kw))


def _ref(module: str, name: str, **kw):
    op = optional_attr(module, name)
    return lambda timing: None if op is None else (lambda *a: op(*a, **kw))


def _compiled(module: str, name: str, **kw):
    def factory(timing: bool):
        op = optional_attr(module, name)
        if op is None:
            return None
        # Inductor is what a GPU run measures; the CPU smoke only traces (a C++ build per graph is too slow).
        fn = torch.compile(op, dynamic=False, backend="inductor" if timing else "eager")
        return lambda *a: fn(*a, **kw)

    return factory


def _family(module: str, ref: str, op: str, liger=None, **kw) -> dict:
    """eager reference, torch.compile(reference), Liger's nearest op (where it has one) and our Triton op."""
    impls = {"eager": _ref(module, ref, **kw), "compile": _compiled(module, ref, **kw),
             "triton": _triton(module, op, **kw)}
    if liger is not None:
        impls["liger"] = lambda timing: liger()
    return impls


def _randn(kb, *shape, seed, scale=1.0):
    return (torch.randn(*shape, device=kb.device, generator=kb.generator(seed)) * scale).to(kb.dtype)


# ---- inputs --------------------------------------------------------------------------------------------------
def _rows(n, c):
    return lambda kb: (_randn(kb, n, c, seed=1, scale=2.0),)


def _mix(n, c):
    return lambda kb: (_randn(kb, n, c, seed=1), _randn(kb, n, c, seed=2),
                       torch.tensor(1.1, device=kb.device), torch.tensor(0.15, device=kb.device))


def _rope(b, t, h, d):
    def make(kb):
        j = torch.arange(0, d, 2, dtype=torch.float32, device=kb.device)
        angle = torch.outer(torch.arange(t, dtype=torch.float32, device=kb.device), 100_000.0 ** (-j / d))
        return (_randn(kb, b, t, h, d, seed=1), _randn(kb, b, t, h, d, seed=2),
                angle.cos()[None, :, None, :], angle.sin()[None, :, None, :])

    return make


def _targets(kb, n, v, seed):
    t = torch.randint(0, v, (n,), device=kb.device, generator=kb.generator(seed))
    return t.masked_fill(torch.arange(n, device=kb.device) % 17 == 0, -1)  # a few ignored positions


def _ce(n, v):
    return lambda kb: (_randn(kb, n, v, seed=1, scale=8.0), _targets(kb, n, v, 2))


def _linear_ce(n, c, v):
    def make(kb):
        w = torch.randn(v, c, device=kb.device, generator=kb.generator(2)) * c**-0.5  # fp32 master, as lm_head
        return _randn(kb, n, c, seed=1), w, _targets(kb, n, v, 3)

    return make


def _mlp(n, c):
    def make(kb):
        g, hd = kb.generator(2), 4 * c
        w_fc = (torch.rand(hd, c, device=kb.device, generator=g) * 2 - 1) * (0.4 * 3**0.5 / c**0.5)
        w_proj = torch.randn(c, hd, device=kb.device, generator=g) / hd**0.5
        return _randn(kb, n, c, seed=1), w_fc, w_proj

    return make


def _stack(k, m, n):
    return lambda kb: (_randn(kb, k, m, n, seed=1),)


def _sym(k, m):
    def make(kb):
        a = _randn(kb, k, m, m, seed=1).float()
        return (((a + a.mT) / (2 * m**0.5)).to(kb.dtype),)  # symmetric, as the Gram matrices it stands for

    return make


def _attn(b, t, h, d):
    return lambda kb: tuple(_randn(kb, b, t, h, d, seed=s) for s in (1, 2, 3))


def _paged(b, ctx, h, d, page):
    def make(kb):
        per = -(-ctx // page)
        pages = torch.randperm(b * per + 3, device=kb.device, generator=kb.generator(4))  # shuffled pool
        k_pages = _randn(kb, b * per + 3, page, h, d, seed=2)
        v_pages = _randn(kb, b * per + 3, page, h, d, seed=3)
        table = pages[: b * per].view(b, per).to(torch.int32)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=kb.device)
        return _randn(kb, b, 1, h, d, seed=1), k_pages, v_pages, table, lens

    return make


def _sdpa_gathered(window, ctx: int, compiled: bool):
    """Gather every sequence's pages into a dense cache, then one SDPA call (all sequences have ctx tokens)."""
    def factory(timing: bool):
        ref = optional_attr("kernels.attention", "flash_attention_ref")
        if ref is None:
            return None

        def fn(q, k_pages, v_pages, table, lens):
            k = k_pages[table.long()].flatten(1, 2)[:, :ctx]
            v = v_pages[table.long()].flatten(1, 2)[:, :ctx]
            return ref(q, k, v, causal=True, window=window)

        if compiled:
            fn = torch.compile(fn, dynamic=False, backend="inductor" if timing else "eager")
        return fn

    return factory


def _pairs(t, window):
    """Visible (query, key) pairs of causal attention over t positions with the given window (None: all)."""
    w = t if window is None else window
    return sum(min(i, w) + 1 for i in range(t))


# ---- the cases -----------------------------------------------------------------------------------------------
def build_cases(full: bool) -> list[Case]:
    s = 2  # bytes per bf16 element; the smoke's numbers are not reported, so one formula serves both
    if full:
        n, c, b, t, h, d, v, k_stacks = N, C, B, T, H, D, V, [(96, C, C), (24, 4 * C, C), (24, C, 4 * C), (12, 12, 12)]
        windows, paged = [S_WINDOW, None], (32, 2048, H, D, 16)
    else:  # odd sizes where the op allows, a few hundred rows at most
        n, c, b, t, h, d, v, k_stacks = 37, 96, 1, 24, 3, 32, 300, [(3, 32, 48), (2, 48, 32)]
        windows, paged = [16, None], (2, 40, 2, 32, 16)
    hd = 4 * c
    cases = [
        Case("rms_norm", f"N{n}xC{c}", _rows(n, c), _family("kernels.rms_norm", "rms_norm_ref", "rms_norm",
                                                              liger_rms_norm),
             lambda m: ("bytes", (2 if m == "fwd" else 5) * n * c * s),
             "fwd reads x, writes y: 2*N*C*s; bwd reads dy, y, writes dx: +3*N*C*s", diff=(0,)),
        Case("mix_rms_norm", f"N{n}xC{c}", _mix(n, c),
             _family("kernels.rms_norm", "mix_rms_norm_ref", "mix_rms_norm", liger_mix_rms_norm),
             lambda m: ("bytes", (4 if m == "fwd" else 10) * n * c * s),
             "fwd reads x, x0, writes h, y: 4*N*C*s; bwd reads dy, dh, x, x0, writes dx, dx0: +6*N*C*s", diff=(0, 1)),
        Case("rope_qk_norm", f"B{b}xT{t}xH{h}xD{d}", _rope(b, t, h, d),
             _family("kernels.rope", "rope_qk_norm_ref", "rope_qk_norm", liger_rope_qk_norm),
             lambda m: ("bytes", (2 if m == "fwd" else 5) * 2 * b * t * h * d * s),
             "fwd reads q, k, writes both: 2*(H+Hkv)*B*T*D*s; bwd reads do, o, writes dq/dk: +3*(H+Hkv)*B*T*D*s",
             diff=(0, 1)),
        Case("softcap_ce", f"N{n}xV{v}", _ce(n, v),
             _family("kernels.cross_entropy", "softcap_cross_entropy_ref", "softcap_cross_entropy", liger_softcap_ce),
             lambda m: ("bytes", (1 if m == "fwd" else 2) * n * v * s),
             "fwd reads the logits: N*V*s; fwd+bwd also writes their gradient: 2*N*V*s", diff=(0,), tol=1e-2),
        Case("linear_softcap_ce", f"N{n}xC{c}xV{v}", _linear_ce(n, c, v),
             _family("kernels.linear_cross_entropy", "linear_softcap_cross_entropy_ref", "linear_softcap_cross_entropy",
                     liger_linear_softcap_ce),
             lambda m: ("flops", (2 if m == "fwd" else 6) * n * c * v),
             "fwd logits 2*N*V*C; bwd grad_x and grad_W +4*N*V*C", diff=(0, 1)),
        Case("relu2_mlp", f"N{n}xC{c}xHd{hd}", _mlp(n, c),
             _family("kernels.mlp", "relu2_mlp_ref", "relu2_mlp", liger_relu2_mlp),
             lambda m: ("flops", (4 if m == "fwd" else 12) * n * c * hd),
             "2 GEMMs forward 4*N*C*Hd; 4 more backward +8*N*C*Hd", diff=(0, 1, 2)),
    ]
    for k, rows, cols in k_stacks:
        lo, hi = min(rows, cols), max(rows, cols)
        flops = 5 * k * (4 * lo * lo * hi + 2 * lo**3)
        cases.append(Case("polar_express", f"K{k}x{rows}x{cols}", _stack(k, rows, cols),
                          _family("kernels.polar_express", "polar_express_ref", "polar_express"),
                          lambda m, f=flops: ("flops", f),
                          "5 steps of K*(4*m^2*n + 2*m^3), m the short side, counted as full (unsymmetric) GEMMs",
                          tol=5e-2))
    k, m_, n_ = k_stacks[0]
    cases.append(Case("gram", f"K{k}x{m_}x{n_}", _stack(k, m_, n_), _family("kernels.gram", "gram_ref", "gram"),
                      lambda m: ("flops", 2 * k * m_ * m_ * n_), "X X^T as a full GEMM: 2*K*m^2*n"))
    cases.append(Case("sym_update", f"K{k}x{m_}x{m_}", _sym(k, m_),
                      _family("kernels.gram", "sym_update_ref", "sym_update", b=-2.8, c=0.5),
                      lambda m: ("flops", 2 * k * m_**3), "b A + c A A as a full GEMM: 2*K*m^3"))
    for w in windows:
        fwd = 4 * b * h * d * _pairs(t, w)
        cases.append(Case("flash_attention", f"B{b}xT{t}xH{h}xD{d}-w{w or 'full'}", _attn(b, t, h, d),
                          _family("kernels.attention", "flash_attention_ref", "flash_attention", causal=True, window=w),
                          lambda m, f=fwd: ("flops", f if m == "fwd" else 3.5 * f),
                          "fwd 4*B*H*D*pairs (visible query-key pairs); bwd 2.5x that", diff=(0, 1, 2)))
    pb, ctx, ph, pd, page = paged
    for w in windows:
        kv = 2 * pb * min(ctx, (w if w is not None else ctx) + 1) * ph * pd * s
        impls = _family("kernels.paged_attention", "paged_attention_ref", "paged_attention", window=w)
        impls.update(sdpa_gathered=_sdpa_gathered(w, ctx, False), compile=_sdpa_gathered(w, ctx, True))
        cases.append(Case("paged_attention", f"decode-B{pb}xctx{ctx}xH{ph}xD{pd}-p{page}-w{w or 'full'}",
                          _paged(pb, ctx, ph, pd, page), impls,
                          lambda m, kv=kv, q=2 * pb * ph * pd * s: ("bytes", kv + q),
                          "K and V read once: 2*B*min(ctx, window+1)*Hkv*D*s, plus q read and out written: 2*B*H*D*s",
                          tol=1e-2))
    return cases


def _params(full: bool):
    out = []
    for case in build_cases(full):
        for mode in case.modes:
            for impl in sorted(case.impls, key=ORDER.index):
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


# ---- running -------------------------------------------------------------------------------------------------
def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]


def _prepare(case: Case, mode: str, fn, args, upstream):
    """The step to time; it returns what the check compares: [outputs...] or [outputs..., gradients...]."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return _outputs(fn(*args))

        return step
    leaves = [args[i] for i in case.diff]

    def step():
        outs = _outputs(fn(*args))
        return outs + list(torch.autograd.grad(outs, leaves, upstream))

    return step


def _args(case: Case, mode: str, kb):
    args = case.make(kb)
    if mode == "fwd+bwd":
        args = tuple(a.requires_grad_() if i in case.diff else a for i, a in enumerate(args))
    return args


# ---- ceilings: measured in the same run as the cases (KERNELS.md), first so that every case can use them -----
@pytest.mark.parametrize("what", ["copy", "matmul"])
def test_ceiling(what, kbench):
    if what == "copy":  # 1 GiB of bf16 read and written
        x = _randn(kbench, 2**29 if kbench.timing else 4096, seed=1)
        y = torch.empty_like(x)
        step, work = (lambda: y.copy_(x)), ("bytes", 2 * x.numel() * x.element_size())
        torch.testing.assert_close(step(), x, rtol=0, atol=0)
    else:  # cuBLAS bf16 at a square shape big enough to reach its peak
        m = 8192 if kbench.timing else 64
        a, b_ = _randn(kbench, m, m, seed=1), _randn(kbench, m, m, seed=2)
        step, work = (lambda: a @ b_), ("flops", 2 * m**3)
        assert rel_err(step(), (a.double() @ b_.double())) < (1e-2 if kbench.timing else 1e-5)
    formula = "copy: read + write 2*numel*s" if what == "copy" else "2*M*N*K"
    median = kbench.run(step, group=f"ceiling {what}", impl="torch", work=work, formula=formula,
                        dtype=str(kbench.dtype))
    if median is not None:
        kbench.ceiling("copy_gbps" if what == "copy" else "matmul_tflops",
                       work[1] / median / (1e9 if what == "copy" else 1e12))


def test_kernel(case: Case, mode: str, impl: str, kbench):
    fn = case.impls[impl](kbench.timing)
    if fn is None:
        what = "liger_kernel is not importable (or lacks this op)" if impl == "liger" else "the op has not landed"
        pytest.skip(f"{case.family} {impl}: {what}")
    ref = case.impls["eager"](kbench.timing)
    # Fresh inputs for the reference and for the implementation: some ops (Liger's CE) overwrite theirs.
    ref_args = _args(case, mode, kbench)
    with torch.no_grad():
        outs = _outputs(ref(*ref_args))
    g = kbench.generator(7)
    upstream = [torch.randn(o.shape, device=kbench.device, generator=g).to(o.dtype) for o in outs]
    args = _args(case, mode, kbench)
    step = _prepare(case, mode, fn, args, upstream)
    got = step()  # the smoke's one run
    errs = []
    if impl != "eager":
        expect = _prepare(case, mode, ref, ref_args, upstream)() if mode == "fwd+bwd" else outs
        assert len(got) == len(expect), f"{impl} returned {len(got)} tensors, the reference {len(expect)}"
        errs = [rel_err(a, e) for a, e in zip(got, expect)]
        del expect
    del ref_args, outs, got
    kbench.run(step, group=f"{case.family} {case.label} {mode}", impl=impl, work=case.work(mode),
               formula=case.formula, family=case.family, shape=case.label, mode=mode, dtype=str(kbench.dtype),
               max_rel_err=max(errs, default=0.0))
    # Checked after timing so that a GPU run keeps the numbers of an implementation that is off (and says so).
    tol = case.tol if kbench.dtype == torch.bfloat16 else FP32_TOL
    assert max(errs, default=0.0) < tol, f"{impl} vs eager: relative errors {errs} (tol {tol})"


def test_cases_cover_every_family():
    """The suite benchmarks each kernel family, each with its eager and compiled baselines, at both sizes."""
    for full in (False, True):
        cases = build_cases(full)
        assert {c.family for c in cases} >= {"rms_norm", "mix_rms_norm", "rope_qk_norm", "softcap_ce",
                                               "linear_softcap_ce", "relu2_mlp", "polar_express", "flash_attention",
                                               "paged_attention"}
        for c in cases:
            assert {"eager", "compile", "triton"} <= set(c.impls), c.family
            kind, amount = c.work(c.modes[-1])
            assert kind in ("bytes", "flops") and amount > 0 and math.isfinite(amount)
    assert _pairs(4, None) == 10 and _pairs(4, 1) == 7  # 1+2+3+4; 1+2+2+2


class _FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: calls the target a few times and reports a fixed median."""

    def __init__(self, median_s: float) -> None:
        self.group, self.extra_info, self.calls, self._median = None, {}, 0, median_s

    def __call__(self, fn):
        for _ in range(3):
            fn()
            self.calls += 1
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=self._median))


def test_timing_records_rates_ceiling_fractions_ratios_and_telemetry():
    """The GPU-only bookkeeping, driven on CPU by a stand-in timer: rates from the work and the median, the
    fraction of the measured ceiling, speedups in both directions, and the environment in the saved JSON."""
    state = BenchState(timing=True)
    fakes = [_FakeBenchmark(s) for s in (0.004, 0.001, 0.25)]
    kb = KernelBench(state, iter(fakes).__next__, device="cpu")
    calls = []
    kb.ceiling("copy_gbps", 8.0)
    group = "rms_norm N1xC1 fwd"
    t_eager = kb.run(lambda: calls.append("e"), group=group, impl="eager", work=("bytes", 16e6), formula="2*N*C*s")
    t_triton = kb.run(lambda: calls.append("t"), group=group, impl="triton", work=("bytes", 16e6), formula="2*N*C*s")
    kb.run(lambda: None, group="mlp fwd", impl="triton", work=("flops", 1e9), formula="4*N*C*Hd")
    assert (t_eager, t_triton) == (0.004, 0.001)
    assert calls.count("e") == 2 + 3 and calls.count("t") == 2 + 3  # two warm-up calls, then the timer's
    eager, triton = fakes[0].extra_info, fakes[1].extra_info
    assert fakes[1].group == group and triton["impl"] == "triton" and triton["formula"] == "2*N*C*s"
    assert eager["gbps"] == pytest.approx(16e6 / 0.004 / 1e9) and triton["gbps"] == pytest.approx(16.0)
    assert triton["ceiling_fraction"] == pytest.approx(16.0 / 8.0) and triton["median_ms"] == pytest.approx(1.0)
    assert triton["speedup_vs_eager"] == pytest.approx(4.0) and "speedup_vs_triton" not in eager
    assert fakes[2].extra_info["tflops"] == pytest.approx(1e9 / 0.25 / 1e12)
    assert "ceiling_fraction" not in fakes[2].extra_info  # no matmul ceiling was measured
    saved = {"benchmarks": [{"group": group, "extra_info": dict(eager)}, {"group": group, "extra_info": dict(triton)}]}
    state.complete_json(saved, {"device": "NVIDIA H100", "gpu": {"sm_clock_mhz": 1980}})
    assert saved["benchmarks"][0]["extra_info"]["speedup_vs_triton"] == pytest.approx(0.25)
    assert saved["tritonchat"]["env"]["gpu"] == {"sm_clock_mhz": 1980}
    assert saved["tritonchat"]["ceilings"] == {"copy_gbps": 8.0}
    lines = state.summary_lines()
    assert any("triton" in ln and "x4.00 vs eager" in ln and "200.0% of ceiling" in ln for ln in lines)


def test_smoke_mode_runs_nothing_more():
    kb = KernelBench(BenchState(timing=False), lambda: pytest.fail("no timer in the smoke"))
    calls = []
    assert kb.run(lambda: calls.append(1), group="g", impl="triton", work=("bytes", 1.0), formula="f") is None
    assert calls == [] and kb.dtype == torch.float32 and kb.device.type == "cpu"
