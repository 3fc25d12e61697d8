"""The kernel cases: every fused op against its eager reference, torch.compile(reference) and Liger-Kernel.

One definition serves both runners: `pytest bench/` (`bench/test_bench_kernels.py`: each case once at a tiny size,
fp32, Triton in the interpreter; with `--benchmark`, timed on a GPU by pytest-benchmark) and `python -m bench.suite`
(the budgeted GPU run: correctness at the speedrun shapes, then timing). A case is one kernel family at one shape;
its implementations are factories (None when unavailable: Liger not importable, an op not landed); `check` runs
one (case, mode, implementation) against the eager reference, and `KernelBench.run` times it.

Every case checks each implementation against the eager reference (outputs, and gradients in fwd+bwd; relative
Frobenius error under the case's bf16 tolerance on a GPU, under FP32_TOL in the smoke). "fwd" runs under
torch.no_grad(); "fwd+bwd" is the forward plus torch.autograd.grad of the outputs against fixed random upstream
gradients. Figures of merit (KERNELS.md): bytes moved (each input read once, each output written once) for
memory-bound ops, FLOPs for matmul-bound ones; the formula is written next to each case and stored with the
result. The two ceilings (copy bandwidth, cuBLAS bf16 rate) are measured in the same run, first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tritonchat.bench.common import load_liger, median_seconds, optional_attr, rel_err


# ---- Liger-Kernel's nearest ops, adapted to our signatures (None when liger_kernel is not importable) ---------
def _liger_functional():
    return load_liger("liger_kernel.transformers.functional")


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # some versions also return z-loss or their input


def liger_rms_norm():
    """Liger's RMSNorm with a weight of ones (ours has none; the extra read of C weights is noise)."""
    lf = _liger_functional()
    if lf is None or not hasattr(lf, "liger_rms_norm"):
        return None
    import torch

    def fn(x):
        w = torch.ones(x.size(-1), device=x.device, dtype=x.dtype)
        return lf.liger_rms_norm(x, w, torch.finfo(torch.float32).eps)

    return fn


def liger_mix_rms_norm():
    """h = a*x + b*x0 in PyTorch, then Liger's RMSNorm: Liger has no fused residual mix."""
    norm = liger_rms_norm()
    if norm is None:
        return None

    def fn(x, x0, a, b):
        h = a.to(x.dtype) * x + b.to(x.dtype) * x0
        return h, norm(h)

    return fn


def liger_rope_qk_norm():
    """Liger's RoPE (rotate-half convention, (B, H, T, D) views) then its RMSNorm with weight = scale.

    Our rotation is by -theta: y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin, which is the rotate-half form
    x cos + rotate_half(x) sin' with sin' = -sin, so the tables are passed as (cos, cos) and (-sin, -sin)."""
    lf = _liger_functional()
    if lf is None or not (hasattr(lf, "liger_rotary_pos_emb") and hasattr(lf, "liger_rms_norm")):
        return None
    import torch

    def fn(q, k, cos, sin, scale=1.2):
        c = torch.cat([cos, cos], dim=-1)[:, :, 0].to(q.dtype)  # (1, T, D)
        s = torch.cat([-sin, -sin], dim=-1)[:, :, 0].to(q.dtype)
        qr, kr = lf.liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
        w = torch.full((q.size(-1),), scale, device=q.device, dtype=q.dtype)
        eps = torch.finfo(torch.float32).eps
        return (lf.liger_rms_norm(qr.transpose(1, 2), w, eps), lf.liger_rms_norm(kr.transpose(1, 2), w, eps))

    return fn


def liger_softcap_ce():
    """Liger's cross-entropy with its softcap; like ours, it computes the gradient during the forward."""
    lf = _liger_functional()
    if lf is None or not hasattr(lf, "liger_cross_entropy"):
        return None

    def fn(logits, targets, softcap=15.0):
        return _first(lf.liger_cross_entropy(logits, targets, ignore_index=-1, softcap=softcap))

    return fn


def liger_linear_softcap_ce():
    """Liger's fused linear cross-entropy (FLCE) with its softcap, weight cast to x's dtype like ours."""
    lf = _liger_functional()
    if lf is None or not hasattr(lf, "liger_fused_linear_cross_entropy"):
        return None

    def fn(x, weight, targets, softcap=15.0):
        loss = lf.liger_fused_linear_cross_entropy(x, weight.to(x.dtype), targets, ignore_index=-1, softcap=softcap)
        return _first(loss)

    return fn


def liger_relu2_mlp():
    """cuBLAS + Liger's ReLU^2 elementwise op + cuBLAS, when this liger_kernel has one."""
    mod = load_liger("liger_kernel.ops.relu_squared")
    op = getattr(mod, "LigerReLUSquaredFunction", None) if mod is not None else None
    if op is None:
        return None
    import torch.nn.functional as F

    def fn(x, w_fc, w_proj):
        h = _first(op.apply(F.linear(x, w_fc.to(x.dtype))))
        return F.linear(h, w_proj.to(x.dtype))

    return fn




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
    impls: dict[str, Callable]  # name -> factory(full) -> callable(*args), or None when unavailable (skip)
    work: Callable[[str], tuple[str, float]]  # mode -> ("bytes" | "flops", amount)
    formula: str
    diff: tuple[int, ...] = ()  # arguments differentiated in fwd+bwd; () means forward only
    tol: float = BF16_TOL

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd", "fwd+bwd") if self.diff else ("fwd",)


# A factory takes `full` (a GPU run at the speedrun shapes, or the CPU smoke) and returns the callable, or None
# when it is unavailable (an op that has not landed, Liger not importable): those cases are then skipped.
def _triton(module: str, name: str, **kw):
    op = optional_attr(module, name)
    return lambda full: None if op is None else (lambda *a: op(*a, impl="triton", **kw))


def _ref(module: str, name: str, **kw):
    op = optional_attr(module, name)
    return lambda full: None if op is None else (lambda *a: op(*a, **kw))


def _compiled(module: str, name: str, **kw):
    def factory(full: bool):
        op = optional_attr(module, name)
        if op is None:
            return None
        # Inductor is what a GPU run measures; the CPU smoke only traces (a C++ build per graph is too slow).
        fn = torch.compile(op, dynamic=False, backend="inductor" if full else "eager")
        return lambda *a: fn(*a, **kw)

    return factory


def _family(module: str, ref: str, op: str, liger=None, **kw) -> dict:
    """eager reference, torch.compile(reference), Liger's nearest op (where it has one) and our Triton op;
    `module` is named within the package ("kernels.rms_norm")."""
    module = f"tritonchat.{module}"
    impls = {"eager": _ref(module, ref, **kw), "compile": _compiled(module, ref, **kw),
             "triton": _triton(module, op, **kw)}
    if liger is not None:
        impls["liger"] = lambda full: liger()
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
    def factory(full: bool):
        ref = optional_attr("tritonchat.kernels.attention", "flash_attention_ref")
        if ref is None:
            return None

        def fn(q, k_pages, v_pages, table, lens):
            k = k_pages[table.long()].flatten(1, 2)[:, :ctx]
            v = v_pages[table.long()].flatten(1, 2)[:, :ctx]
            return ref(q, k, v, causal=True, window=window)

        if compiled:
            fn = torch.compile(fn, dynamic=False, backend="inductor" if full else "eager")
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




class Unavailable(Exception):
    """This implementation of this case cannot run here (Liger not importable, an op not landed)."""


def check(case: Case, mode: str, impl: str, kb) -> tuple[Callable, list[float]]:
    """Run ``impl`` of ``case`` once against the eager reference on fresh inputs; return the step to time (which
    returns outputs, and gradients in fwd+bwd) and the relative errors of each returned tensor (empty for eager).
    Raises Unavailable when the implementation does not exist here."""
    fn = case.impls[impl](kb.full)
    if fn is None:
        what = "liger_kernel is not importable (or lacks this op)" if impl == "liger" else "the op has not landed"
        raise Unavailable(f"{case.family} {impl}: {what}")
    ref = case.impls["eager"](kb.full)
    # Fresh inputs for the reference and for the implementation: some ops (Liger's CE) overwrite theirs.
    ref_args = _args(case, mode, kb)
    with torch.no_grad():
        outs = _outputs(ref(*ref_args))
    g = kb.generator(7)
    upstream = [torch.randn(o.shape, device=kb.device, generator=g).to(o.dtype) for o in outs]
    args = _args(case, mode, kb)
    step = _prepare(case, mode, fn, args, upstream)
    got = step()
    errs = []
    if impl != "eager":
        expect = _prepare(case, mode, ref, ref_args, upstream)() if mode == "fwd+bwd" else outs
        if len(got) != len(expect):
            raise AssertionError(f"{impl} returned {len(got)} tensors, the reference {len(expect)}")
        errs = [rel_err(a, e) for a, e in zip(got, expect)]
    return step, errs


def tolerance(case: Case, dtype: torch.dtype) -> float:
    return case.tol if dtype == torch.bfloat16 else FP32_TOL


def ceiling_case(what: str, kb) -> tuple[Callable, tuple[str, float], str]:
    """The two denominators (KERNELS.md): a 1 GiB bf16 copy and cuBLAS bf16 at 8192^3 (tiny in the smoke).
    Checks the result once; returns (step, work, formula)."""
    if what == "copy":
        x = _randn(kb, 2**29 if kb.full else 4096, seed=1)
        y = torch.empty_like(x)
        step = lambda: y.copy_(x)
        torch.testing.assert_close(step(), x, rtol=0, atol=0)
        return step, ("bytes", 2 * x.numel() * x.element_size()), "copy: read + write 2*numel*s"
    if what != "matmul":
        raise ValueError(f"unknown ceiling {what!r}: copy or matmul")
    m = 8192 if kb.full else 64
    a, b = _randn(kb, m, m, seed=1), _randn(kb, m, m, seed=2)
    step = lambda: a @ b
    err = rel_err(step(), a.double() @ b.double())
    if err >= (1e-2 if kb.full else 1e-5):
        raise AssertionError(f"matmul ceiling: relative error {err:.2e}")
    return step, ("flops", 2 * m**3), "2*M*N*K"


# ---- timing: one harness for pytest-benchmark and the suite -----------------------------------------------------
class BenchState:
    """What one run measured: medians per (group, impl), the ceilings, and one row per timed case."""

    def __init__(self, timing: bool) -> None:
        self.timing = timing
        self.medians: dict[str, dict[str, float]] = {}  # group -> impl -> median seconds
        self.ceilings: dict[str, float] = {}  # "copy_gbps", "matmul_tflops"
        self.rows: list[dict] = []
        self.skip_reason: str | None = None

    def complete_json(self, output_json: dict, env: dict) -> None:
        """Add the environment and the ceilings to a pytest-benchmark JSON, and give every benchmark of it its
        speedup over each other implementation of its group (ratios of medians; > 1: this one is faster)."""
        output_json["tritonchat"] = {"env": env, "ceilings": dict(self.ceilings)}
        for b in output_json.get("benchmarks", []):
            info = b.setdefault("extra_info", {})
            mine = self.medians.get(b.get("group"), {})
            if info.get("impl") in mine:
                info.update(self.speedups(b.get("group"), info["impl"]))

    def speedups(self, group: str, impl: str) -> dict[str, float]:
        mine = self.medians.get(group, {})
        return {f"speedup_vs_{o}": t / mine[impl] for o, t in mine.items() if o != impl and impl in mine}

    def payload(self) -> dict:
        """The measurements as a result file holds them, every row with its speedups over all the others."""
        rows = [{**r, **self.speedups(r["group"], r["impl"])} for r in self.rows]
        return {"ceilings": dict(self.ceilings), "rows": rows}

    def summary_lines(self) -> list[str]:
        lines = []
        if self.ceilings:
            lines.append("ceilings: " + ", ".join(f"{k} {v:,.0f}" for k, v in self.ceilings.items()))
        for r in self.payload()["rows"]:
            rate = f"{r['gbps']:8.0f} GB/s" if "gbps" in r else f"{r['tflops']:6.1f} TFLOP/s"
            frac = f" {100 * r['ceiling_fraction']:5.1f}% of ceiling" if "ceiling_fraction" in r else ""
            vs = " ".join(f"x{v:.2f} vs {k[len('speedup_vs_'):]}" for k, v in r.items() if k.startswith("speedup_vs_"))
            lines.append(f"{r['group']:48s} {r['impl']:14s} {r['median_ms']:9.3f} ms {rate}{frac}  {vs}")
        return lines


class KernelBench:
    """One case's handle: where to run (device, dtype; the speedrun shapes on a GPU) and ``run`` to time a callable.

    clock(step, group) -> median seconds of one call, or None when nothing was timed; a clock with a
    ``record(extra)`` method also gets each case's figures. pytest gives a clock on its benchmark fixture
    (bench/conftest.py); the suite the default, ``bench.common.median_seconds``."""

    def __init__(self, state: BenchState, clock=None, device=None, dtype=None, warmup: int = 2) -> None:
        self._state, self._warmup = state, warmup
        self.timing = state.timing
        self.device = torch.device(device or ("cuda" if self.timing else "cpu"))
        self.full = self.device.type == "cuda"  # the speedrun shapes and inductor (else tiny shapes, traced only)
        # The interpreter multiplies bf16 bit patterns in tl.dot, so the CPU runs in fp32.
        self.dtype = dtype or (torch.bfloat16 if self.full else torch.float32)
        reps = 3 if warmup else 1  # a CPU dry run without warm-up times one call
        self._clock = clock or (lambda step, group: median_seconds(step, self.device, warmup=0, cpu_reps=reps))

    def generator(self, seed: int):
        return torch.Generator(device=self.device).manual_seed(seed)

    def ceiling(self, name: str, value: float) -> None:
        self._state.ceilings[name] = value

    def run(self, step, *, group: str, impl: str, work: tuple[str, float], formula: str, **info) -> float | None:
        """Timing: warm up, measure the extra peak memory of one call, then time ``step`` with the clock and
        record rate, fraction of ceiling and ratios; returns the median seconds. Smoke: nothing (the caller has
        run ``step`` once, checking its result); returns None."""
        if not self.timing:
            return None
        from tritonchat.bench.common import sync

        for _ in range(self._warmup):  # compile, autotune and fill caches outside the timed region
            step()
        sync(self.device)
        extra = {"impl": impl}
        if self.device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(self.device)
            extra["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        median = self._clock(step, group)
        if median is None:  # pytest-benchmark with --benchmark-disable: run once, untimed
            return None
        kind, amount = work
        rate = amount / median / (1e9 if kind == "bytes" else 1e12)
        extra.update({"median_ms": median * 1e3, kind: amount, "formula": formula,
                      ("gbps" if kind == "bytes" else "tflops"): rate, **info})
        ceiling = self._state.ceilings.get("copy_gbps" if kind == "bytes" else "matmul_tflops")
        if ceiling:
            extra["ceiling_fraction"] = rate / ceiling
        seen = self._state.medians.setdefault(group, {})
        for other, t in seen.items():  # implementations timed earlier in this group (the baselines come first)
            extra[f"speedup_vs_{other}"] = t / median
        seen[impl] = median
        self._state.rows.append({"group": group, **extra})
        record = getattr(self._clock, "record", None)  # pytest-benchmark keeps them in the benchmark's extra_info
        if record is not None:
            record(extra)
        return median


# ---- the KERNELS.md targets, checked against measured rows ------------------------------------------------------
@dataclass(frozen=True)
class Target:
    family: str
    what: str  # "vs <impl>", "ceiling" (fraction of the measured ceiling), "peak" (of the bf16 peak), "memory"
    need: float  # speedup at least, fraction at least, or (memory) at most this fraction of eager's peak
    mode: str = "fwd+bwd"
    shape: str = ""  # a substring the case's label must contain ("" for every shape)


def _speed(family, mode="fwd+bwd", shape="", **vs) -> list[Target]:
    return [Target(family, f"vs {impl}", x, mode, shape) for impl, x in vs.items()]


TARGETS: tuple[Target, ...] = (
    *_speed("rms_norm", eager=3.0, compile=1.2, liger=1.2), Target("rms_norm", "ceiling", 0.85),
    *_speed("mix_rms_norm", eager=3.0, compile=1.2, liger=1.2), Target("mix_rms_norm", "ceiling", 0.85),
    *_speed("rope_qk_norm", eager=4.0, compile=1.3, liger=1.5), Target("rope_qk_norm", "ceiling", 0.85),
    *_speed("linear_softcap_ce", eager=1.3, compile=1.1, liger=1.5), Target("linear_softcap_ce", "memory", 1 / 8),
    *_speed("relu2_mlp", eager=1.15, compile=1.05), Target("relu2_mlp", "ceiling", 0.9),
    *_speed("polar_express", mode="fwd", compile=1.5),
    *_speed("flash_attention", shape=f"-w{S_WINDOW}", eager=3.0), *_speed("flash_attention", shape="-wfull", eager=0.9),
    Target("flash_attention", "peak", 0.6, mode="fwd"),
    *_speed("paged_attention", mode="fwd", shape="B32xctx2048", sdpa_gathered=2.0),
    Target("paged_attention", "ceiling", 0.8, mode="fwd", shape="B32xctx2048"),
)


def evaluate_targets(rows: list[dict], peak_tflops: float | None, targets=TARGETS) -> list[dict]:
    """One line per (target, matching case): what was needed, what was measured (None: not measured) and met."""
    out = []
    for t in targets:
        cases = {}
        for r in rows:
            if r.get("family") == t.family and r.get("mode") == t.mode and t.shape in r.get("shape", ""):
                cases.setdefault(r["shape"], {})[r["impl"]] = r
        if not cases:
            out.append({"family": t.family, "shape": t.shape or "*", "mode": t.mode, "what": t.what, "need": t.need,
                        "got": None, "met": None})
        for shape, impls in cases.items():
            mine, got = impls.get("triton"), None
            if mine is not None:
                if t.what.startswith("vs "):
                    other = impls.get(t.what[3:])
                    got = other["median_ms"] / mine["median_ms"] if other else None
                elif t.what == "ceiling":
                    got = mine.get("ceiling_fraction")
                elif t.what == "peak":
                    got = mine["tflops"] / peak_tflops if peak_tflops and "tflops" in mine else None
                elif t.what == "memory":
                    eager = impls.get("eager", {}).get("peak_mem_mb")
                    got = mine["peak_mem_mb"] / eager if eager and "peak_mem_mb" in mine else None
            met = None if got is None else (got <= t.need if t.what == "memory" else got >= t.need)
            out.append({"family": t.family, "shape": shape, "mode": t.mode, "what": t.what, "need": t.need,
                        "got": got, "met": met})
    return out
