"""Benchmark the Muon optimizer's kernels (kernels/gram.py, polar_express.py, muon.py) on the model's stacks.

    python -m bench.bench_muon                 # depth 24 (C=1536): every stack, then the whole optimizer step
    python -m bench.bench_muon --depth 12 --no-compile
    python -m bench.bench_muon --dry-run       # CPU: tiny stacks, Triton through the interpreter, no file

Stacks (SPEC §6: every transformer.h matrix, grouped by shape): C x C (c_q, c_k, c_v, attn.c_proj: 4 per layer),
4C x C (mlp.c_fc), C x 4C (mlp.c_proj), Hkv x 12 (ve_gate, on the value-embedding layers). AdamW tensors: lm_head,
wte and value_embeds (Vp x C each), resid/x0 lambdas, smear_gate, smear_lambda, backout_lambda.
With s = min(m, n), l = max(m, n) of a (K, m, n) stack (Polar Express always works on the s x s Gram side):
    gram        full-product FLOPs 2 K s^2 l   (the kernel computes the upper tiles only: ~half)
    sym_update  full-product FLOPs 2 K s^3     (likewise)
    polar_express, 5 steps: 5 (4 K s^2 l + 2 K s^3) full-product FLOPs
TFLOP/s are reported on those full-product counts, so a symmetric kernel at 2x the cuBLAS figure does the work of
cuBLAS's full product in half the time. Variants:
    triton   gram / sym_update / polar_express / muon_step_ + adamw_step_ (impl="triton")
    cublas   torch.bmm(X, X^T) and torch.baddbmm(A, A, A) (gram and sym_update only: the full products)
    eager    the *_ref functions (the optimizer's PyTorch reference math, train/optim.py)
    compile  torch.compile of the same *_ref functions (dynamic=False), the reference project's choice
The optimizer step runs with fp32 parameters, gradients and state and bf16 Polar Express (the GPU default);
AdamW's step count is held fixed so that torch.compile does not recompile on it. On a GPU every variant is first
checked against the reference: fp32 (tight) and bf16 (loose: bf16 Polar Express is ~5% off exact in either path).
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import bench_ms, cpu_ms, tflops, write_result

MUON_HP = dict(lr=0.02, mu=0.95, beta2=0.9, wd=0.2)
ADAMW_HP = dict(lr=0.004, beta1=0.8, beta2=0.995, eps=1e-10, wd=0.01)
ADAMW_STEP = 10


def model_shapes(depth: int, width: int | None = None, vocab: int = 32768) -> tuple[dict, list]:
    """({stack name: (K, m, n)}, [AdamW tensor shapes]) of the model at `depth` (SPEC §1-2, n_kv_head = n_head)."""
    C = width or -(-depth * 64 // 128) * 128
    hkv = max(1, C // 128)
    n_ve = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2)
    vp = -(-vocab // 64) * 64
    stacks = {"CxC": (4 * depth, C, C), "4CxC": (depth, 4 * C, C), "Cx4C": (depth, C, 4 * C),
              "Hkvx12": (n_ve, hkv, 12)}
    adamw = [(vp, C), (vp, C)] + [(vp, hkv * 128)] * n_ve + [(depth,), (depth,), (1, 24), (1,), (1,)]
    return stacks, adamw


def _flops(K: int, m: int, n: int, steps: int = 5) -> dict:
    s, lng = min(m, n), max(m, n)
    return {"gram": 2 * K * s * s * lng, "sym": 2 * K * s**3, "pe": steps * (4 * K * s * s * lng + 2 * K * s**3)}




def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class _MuonState:
    """One stack's optimizer inputs: gradients, fp32 parameters and state (fresh seeded random, never zeros)."""

    def __init__(self, K, m, n, device, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        self.G = torch.randn(K, m, n, device=device, generator=g) * 1e-2
        self.P = torch.randn(K, m, n, device=device, generator=g) * (3 / max(m, n)) ** 0.5
        self.buf = torch.randn(K, m, n, device=device, generator=g) * 1e-2
        self.buf2 = torch.rand((K, m, 1) if m >= n else (K, 1, n), device=device, generator=g) * 1e-3 + 1e-4

    def clone(self):
        other = object.__new__(_MuonState)
        other.G, other.P, other.buf, other.buf2 = self.G, self.P.clone(), self.buf.clone(), self.buf2.clone()
        return other

    def args(self):
        return self.G, self.P, self.buf, self.buf2


def _adamw_tensors(shapes, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [[torch.randn(s, device=device, generator=g) * 0.1, torch.randn(s, device=device, generator=g) * 1e-2,
             torch.randn(s, device=device, generator=g) * 1e-3, torch.rand(s, device=device, generator=g) * 1e-5]
            for s in shapes]


def _check(stacks, device, ns_dtype, K_check=2) -> dict:
    """Every kernel against its reference on the real shapes (K cut to K_check), fp32 and ns_dtype."""
    from kernels.gram import gram, gram_ref, sym_update, sym_update_ref
    from kernels.muon import adamw_step_, adamw_step_ref, muon_step_, muon_step_ref
    from kernels.polar_express import polar_express, polar_express_ref

    out, fails = {}, []
    for name, (K, m, n) in stacks.items():
        K = min(K, K_check)
        st = _MuonState(K, m, n, device, seed=1)
        x = st.G.mT if m > n else st.G  # the wide side, as Polar Express uses it
        for dt, tol in ((torch.float32, 1e-4), (ns_dtype, 2e-2)):
            xd = (x / x.norm(dim=(-2, -1), keepdim=True)).to(dt)
            a = gram(xd, impl="triton")
            r = {"gram": _rel(a, gram_ref(xd.float())), "gram_symmetric": bool(torch.equal(a, a.mT))}
            ad = (a.float() / 2).to(dt)
            s = sym_update(ad, -2.8, 0.5, impl="triton")
            r["sym"] = _rel(s, sym_update_ref(ad.float(), -2.8, 0.5))
            r["sym_symmetric"] = bool(torch.equal(s, s.mT))
            gd = st.G.to(dt)
            exact = polar_express_ref(gd.float() if dt != torch.float32 else gd.double())
            r["pe"] = _rel(polar_express(gd, impl="triton"), exact)
            r["pe_eager_same_dtype"] = _rel(polar_express_ref(gd), exact)
            fused, ref = st.clone(), st.clone()
            muon_step_(*fused.args(), **MUON_HP, ns_dtype=dt, impl="triton")
            muon_step_ref(*ref.args(), **MUON_HP, ns_dtype=dt)
            r["muon_update"] = _rel(fused.P - st.P, ref.P - st.P)
            r["muon_momentum"] = _rel(fused.buf, ref.buf)
            ok = (r["gram"] < tol and r["sym"] < tol and r["gram_symmetric"] and r["sym_symmetric"]
                  and r["muon_momentum"] < 1e-5)
            if dt == torch.float32:
                ok = ok and r["pe"] < 1e-3 and r["muon_update"] < 1e-3
            else:  # bf16 Polar Express: judged against the eager reference's own error in that dtype
                ok = ok and r["pe"] < 1.5 * r["pe_eager_same_dtype"] + 1e-2 and r["muon_update"] < 0.15
            out[f"{name} {str(dt).removeprefix('torch.')}"] = r
            if not ok:
                fails.append((name, str(dt), r))
    tens = _adamw_tensors([(4099, 129)], device, seed=2)[0]
    a, b = [t.clone() for t in tens], [t.clone() for t in tens]
    adamw_step_(*a, ADAMW_STEP, **ADAMW_HP, impl="triton")
    adamw_step_ref(*b, ADAMW_STEP, **ADAMW_HP)
    out["adamw"] = {"p": _rel(a[0], b[0]), "exp_avg": _rel(a[2], b[2]), "exp_avg_sq": _rel(a[3], b[3])}
    if not max(out["adamw"].values()) < 1e-6:
        fails.append(("adamw", "fp32", out["adamw"]))
    for k, r in out.items():
        print(f"check {k:22s} " + " ".join(f"{n}={v:.2e}" if isinstance(v, float) else f"{n}={v}"
                                              for n, v in r.items()))
    if fails:
        raise SystemExit(f"bench_muon: correctness check failed: {fails}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny stacks, Triton in the interpreter, no file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_muon: no CUDA device here; nothing timed (use --dry-run to exercise the script on CPU)")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    from kernels.gram import gram_ref, syrk
    from kernels.muon import adamw_step_, adamw_step_ref, muon_step_, muon_step_ref
    from kernels.polar_express import polar_express, polar_express_ref

    device = "cuda" if cuda else "cpu"
    ns_dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16 dot
    stacks, adamw_shapes = model_shapes(args.depth) if cuda else model_shapes(1, width=64, vocab=256)
    timer = bench_ms if cuda else cpu_ms
    checks = {} if args.no_check else _check(stacks, device, ns_dtype)
    use_compile = cuda and not args.no_compile
    comp = (lambda f: torch.compile(f, dynamic=False)) if use_compile else None

    pe_ref = comp(polar_express_ref) if comp else None
    step_ref = comp(muon_step_ref) if comp else None
    adamw_ref = comp(adamw_step_ref) if comp else None
    gram_full = lambda x, out: torch.bmm(x, x.mT, out=out)  # noqa: E731
    sym_full = lambda a, out: torch.baddbmm(a, a, a, beta=-2.8, alpha=0.5, out=out)  # noqa: E731

    rows = []

    def record(op, stack, variant, fn, flops=None):
        fn()  # compile and warm up outside the timed region
        if cuda:
            torch.cuda.synchronize()
        ms = timer(fn)
        rows.append({"op": op, "stack": stack, "variant": variant, "ms": ms,
                     "tflops": tflops(flops, ms) if flops else None})

    def bench_stack(name, K, m, n):
        f = _flops(K, m, n)
        st = _MuonState(K, m, n, device, seed=3)
        xw = (st.G.mT if m > n else st.G).to(ns_dtype)  # (K, s, l) view of the wide side
        s = xw.size(1)
        A, A2 = (torch.empty(K, s, s, device=device, dtype=ns_dtype) for _ in range(2))
        record("gram", name, "triton", lambda: syrk(xw, out=A), f["gram"])
        record("gram", name, "cublas", lambda: gram_full(xw, A2), f["gram"])
        a = (gram_ref(xw.float()) / xw.size(2)).to(ns_dtype)
        record("sym", name, "triton", lambda: syrk(a, 0.5, a, -2.8, out=A), f["sym"])
        record("sym", name, "cublas", lambda: sym_full(a, A2), f["sym"])
        g = st.G.to(ns_dtype)
        record("polar_express", name, "triton", lambda: polar_express(g, impl="triton"), f["pe"])
        record("polar_express", name, "eager", lambda: polar_express_ref(g), f["pe"])
        if pe_ref:
            record("polar_express", name, "compile", lambda: pe_ref(g), f["pe"])
        variants = {"triton": lambda *t: muon_step_(*t, **MUON_HP, ns_dtype=ns_dtype, impl="triton"),
                    "eager": lambda *t: muon_step_ref(*t, **MUON_HP, ns_dtype=ns_dtype)}
        if step_ref:
            variants["compile"] = lambda *t: step_ref(*t, **MUON_HP, ns_dtype=ns_dtype)
        for v, fn in variants.items():
            record("muon_step", name, v, lambda fn=fn: fn(*st.args()), f["pe"])
        return st

    states = {name: bench_stack(name, *shape) for name, shape in stacks.items()}
    # the whole optimizer step: every Muon stack, then AdamW on every other tensor
    adamw = _adamw_tensors(adamw_shapes, device, seed=4)
    whole = {"triton": (lambda *t: muon_step_(*t, **MUON_HP, ns_dtype=ns_dtype, impl="triton"),
                        lambda *t: adamw_step_(*t, ADAMW_STEP, **ADAMW_HP, impl="triton")),
             "eager": (lambda *t: muon_step_ref(*t, **MUON_HP, ns_dtype=ns_dtype),
                       lambda *t: adamw_step_ref(*t, ADAMW_STEP, **ADAMW_HP))}
    if use_compile:
        whole["compile"] = (lambda *t: step_ref(*t, **MUON_HP, ns_dtype=ns_dtype),
                            lambda *t: adamw_ref(*t, ADAMW_STEP, **ADAMW_HP))
    total_flops = sum(_flops(*shape)["pe"] for shape in stacks.values())
    for v, (mfn, afn) in whole.items():
        def step(mfn=mfn, afn=afn):
            for st in states.values():
                mfn(*st.args())
            for t in adamw:
                afn(*t)
        record("optimizer_step", f"depth {args.depth if cuda else 1}", v, step, total_flops)
        record("adamw_only", "all AdamW tensors", v, lambda afn=afn: [afn(*t) for t in adamw])

    times = {(r["op"], r["stack"], r["variant"]): r["ms"] for r in rows}
    ratios = {}
    for (op, stack, v), ms in times.items():
        if v == "triton":
            for other in ("cublas", "eager", "compile"):
                if (op, stack, other) in times:
                    ratios[f"{op} {stack}: triton vs {other}"] = times[(op, stack, other)] / ms
    if cuda:
        payload = {"depth": args.depth, "stacks": stacks, "adamw_shapes": adamw_shapes, "ns_dtype": str(ns_dtype),
                   "muon_hp": MUON_HP, "adamw_hp": ADAMW_HP,
                   "flops": "gram 2Ks^2l, sym 2Ks^3, polar_express 5(4Ks^2l + 2Ks^3) (full-product counts)",
                   "checks": checks, "rows": rows, "ratios": ratios}
        print(f"wrote {write_result('muon', payload)}")
    print(f"\nMuon optimizer, {ns_dtype} Polar Express: ms (full-product TFLOP/s)")
    print(f"{'op':15} {'stack':18} " + " ".join(f"{v:>17}" for v in ("triton", "cublas", "eager", "compile")))
    for op, stack in dict.fromkeys((r["op"], r["stack"]) for r in rows):
        cells = []
        for v in ("triton", "cublas", "eager", "compile"):
            r = next((r for r in rows if (r["op"], r["stack"], r["variant"]) == (op, stack, v)), None)
            cells.append("-" if r is None else f"{r['ms']:8.3f}" + (f" ({r['tflops']:5.0f})" if r["tflops"] else ""))
        print(f"{op:15} {stack:18} " + " ".join(f"{c:>17}" for c in cells))
    print("\n" + "\n".join(f"{k}: x{v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
