"""Benchmark RMSNorm, the residual entry mix_rms_norm, apply_rope and the fused RoPE + QK-norm + scale.

    python -m bench.bench_norm_rope                 # N in 32768, 65536 x C=1536; q, k (16, 2048, 12, 128); bf16
    python -m bench.bench_norm_rope --rows 32768 --no-compile
    python -m bench.bench_norm_rope --dry-run       # CPU: tiny shapes, Triton through the interpreter, no file

Variants, each timed forward (under no_grad) and forward+backward (torch.autograd.grad of the outputs against
fixed random output gradients, w.r.t. every differentiable input):
    triton   our kernels (impl="triton")
    eager    the *_ref functions (what the model runs on CPU)
    compile  torch.compile(*_ref)
    liger    Liger-Kernel's nearest op when importable (it computes a weight gradient our ops do not have):
             rms_norm     LigerRMSNormFunction with a weight of ones
             mix_rms_norm LigerFusedAddRMSNormFunction: h = x + x0 (no scalars), then RMSNorm with weight ones
             rope         LigerRopeFunction on q and k (HF layout (B, H, T, D), full-width cos/sin)
             rope_qk_norm LigerRopeFunction, then LigerRMSNormFunction on q and on k (weight = 1.2)

Bytes, the least each op must move (s = bytes per element; rstd, cos/sin and the scalars are noise):
    rms_norm      N x C:   fwd 2*N*C*s (x -> y)               fwd+bwd 2 + 3 = 5*N*C*s (dy, y -> dx)
    mix_rms_norm  N x C:   fwd 4*N*C*s (x, x0 -> h, y)        fwd+bwd 4 + 6 = 10*N*C*s (dh, dy, x, x0 -> dx, dx0)
    rope          E = B*T*(H+Hkv)*D: fwd 2*E*s               fwd+bwd 4*E*s
    rope_qk_norm  E as above:         fwd 2*E*s               fwd+bwd 2 + 3 = 5*E*s (do, o -> dx)
Figure of merit: GB/s over the measured device copy bandwidth (a 1 GiB copy_, read + write bytes).
On a GPU, correctness is checked first in bf16 against the fp32 reference on the same rounded inputs.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import bench_ms, cpu_ms, gbps, load_liger, rel_err, write_result

BF16_TOL = 1e-2  # ||out - ref|| / ||ref|| allowed for bf16 inputs against the fp32 reference
TARGETS = {  # KERNELS.md: triton must be this many times faster (fwd+bwd), and reach 85% of copy bandwidth
    "rms_norm": {"eager": 3.0, "compile": 1.2, "liger": 1.2},
    "mix_rms_norm": {"eager": 3.0, "compile": 1.2, "liger": 1.2},
    "rope_qk_norm": {"eager": 4.0, "compile": 1.3, "liger": 1.5},
}






def _tables(t: int, d: int, device, offset: int = 0):
    """The model's fp32 rotary tables (1, T, 1, D/2) at positions offset..offset+T-1."""
    inv_freq = 100000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    ang = torch.outer(torch.arange(offset, offset + t, dtype=torch.float32, device=device), inv_freq)
    return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]


def _liger_fns():
    """Liger's autograd Functions by role, or {} (each entry only when its module and class import)."""
    found = {}
    for key, module, cls in (
        ("rms", "liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
        ("add_rms", "liger_kernel.ops.fused_add_rms_norm", "LigerFusedAddRMSNormFunction"),
        ("rope", "liger_kernel.ops.rope", "LigerRopeFunction"),
    ):
        mod = load_liger(module)
        fn = getattr(mod, cls, None) if mod is not None else None
        if fn is not None:
            found[key] = fn
    return found


def _cases(args, device, dtype, ops):
    """Yield (op, shape label, fwd bytes, fwd+bwd bytes, differentiable inputs, {variant: fn() -> outputs})."""
    rms_norm, rms_norm_ref, mix_rms_norm, mix_rms_norm_ref, apply_rope, apply_rope_ref, rqn, rqn_ref = ops
    s = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    liger = {} if args.no_liger else _liger_fns()
    compiled = {}

    def comp(name, fn):
        if args.no_compile:
            return None
        if name not in compiled:
            compiled[name] = torch.compile(fn)
        return compiled[name]

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_(grad)

    for n in args.rows:
        c = args.width
        x, x0 = rnd(n, c), rnd(n, c)
        a = torch.tensor(1.1, device=device, requires_grad=True)
        b = torch.tensor(0.2, device=device, requires_grad=True)
        w = torch.ones(c, device=device, dtype=dtype)
        eps = torch.finfo(torch.float32).eps
        v = {"triton": lambda x=x: (rms_norm(x, impl="triton"),), "eager": lambda x=x: (rms_norm_ref(x),)}
        if (f := comp("rms", rms_norm_ref)) is not None:
            v["compile"] = lambda x=x, f=f: (f(x),)
        if "rms" in liger:
            v["liger"] = lambda x=x, w=w, eps=eps: (liger["rms"].apply(x, w, eps, 0.0, "llama", False),)
        yield "rms_norm", f"{n}x{c}", 2 * n * c * s, 5 * n * c * s, [x], v
        v = {
            "triton": lambda x=x, x0=x0, a=a, b=b: mix_rms_norm(x, x0, a, b, impl="triton"),
            "eager": lambda x=x, x0=x0, a=a, b=b: mix_rms_norm_ref(x, x0, a, b),
        }
        if (f := comp("mix", mix_rms_norm_ref)) is not None:
            v["compile"] = lambda x=x, x0=x0, a=a, b=b, f=f: f(x, x0, a, b)
        if "add_rms" in liger:
            v["liger"] = lambda x=x, x0=x0, w=w, eps=eps: liger["add_rms"].apply(x, x0, w, eps, 0.0, "llama", False)
        yield "mix_rms_norm", f"{n}x{c}", 4 * n * c * s, 10 * n * c * s, [x, x0, a, b], v
        del x, x0

    bq, t, h, hkv, d = args.rope_shape
    q, k = rnd(bq, t, h, d), rnd(bq, t, hkv, d)
    cos, sin = _tables(t, d, device)
    e = bq * t * (h + hkv) * d
    label = f"q({bq},{t},{h},{d}) k({bq},{t},{hkv},{d})"
    cos_hf = torch.cat([cos, cos], dim=-1).view(1, t, d).to(dtype)  # Liger's layout: (1, T, D), halves repeated
    sin_hf = torch.cat([sin, sin], dim=-1).view(1, t, d).to(dtype)
    w12 = torch.full((d,), 1.2, device=device, dtype=dtype)

    def liger_rope(q, k):
        qr, kr = liger["rope"].apply(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
        return qr.transpose(1, 2), kr.transpose(1, 2)

    v = {
        "triton": lambda: (apply_rope(q, cos, sin, impl="triton"), apply_rope(k, cos, sin, impl="triton")),
        "eager": lambda: (apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)),
    }
    if (f := comp("rope", apply_rope_ref)) is not None:
        v["compile"] = lambda f=f: (f(q, cos, sin), f(k, cos, sin))
    if "rope" in liger:
        v["liger"] = lambda: liger_rope(q, k)
    yield "rope", label, 2 * e * s, 4 * e * s, [q, k], v
    v = {"triton": lambda: rqn(q, k, cos, sin, 1.2, impl="triton"), "eager": lambda: rqn_ref(q, k, cos, sin, 1.2)}
    if (f := comp("rqn", rqn_ref)) is not None:
        v["compile"] = lambda f=f: f(q, k, cos, sin, 1.2)
    if "rope" in liger and "rms" in liger:
        def liger_rqn():
            qr, kr = liger_rope(q, k)
            eps = torch.finfo(torch.float32).eps
            return liger["rms"].apply(qr, w12, eps, 0.0, "llama", False), liger["rms"].apply(kr, w12, eps, 0.0, "llama",
                                                                                             False)
        v["liger"] = liger_rqn
    yield "rope_qk_norm", label, 2 * e * s, 5 * e * s, [q, k], v


def _check(ops, device, dtype, small: bool = False) -> dict:
    """Our kernels against the fp32 reference on the same rounded inputs: outputs and every gradient.
    small: tiny shapes (the interpreter's dry run)."""
    rms_norm, rms_norm_ref, mix_rms_norm, mix_rms_norm_ref, apply_rope, apply_rope_ref, rqn, rqn_ref = ops
    gen = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    n, c, t = (13, 96, 3) if small else (1823, 1536, 9)
    cos, sin = _tables(t, 128, device, offset=1000)
    x, x0 = rnd(n, c), rnd(n, c)
    q, k = rnd(2, t, 12 if not small else 4, 128), rnd(2, t, 4 if not small else 2, 128)
    a, b = torch.tensor(1.1, device=device), torch.tensor(0.2, device=device)
    cases = {
        "rms_norm": (lambda x: (rms_norm(x, impl="triton"),), lambda x: (rms_norm_ref(x),), [x]),
        "rms_norm_tiny_rows": (lambda x: (rms_norm(x, impl="triton"),), lambda x: (rms_norm_ref(x),),
                               [rnd(n, c, scale=3e-4)]),  # mean(x^2) < eps: checks the eps convention
        "mix_rms_norm": (lambda x, x0, a, b: mix_rms_norm(x, x0, a, b, impl="triton"), mix_rms_norm_ref, [x, x0, a, b]),
        "apply_rope": (lambda q: (apply_rope(q, cos, sin, impl="triton"),), lambda q: (apply_rope_ref(q, cos, sin),),
                       [q]),
        "rope_qk_norm": (lambda q, k: rqn(q, k, cos, sin, impl="triton"), lambda q, k: rqn_ref(q, k, cos, sin), [q, k]),
    }
    errs = {}
    for name, (ours, ref, inputs) in cases.items():
        mine = [t.detach().clone().requires_grad_() for t in inputs]
        gold = [t.detach().float().requires_grad_() for t in inputs]
        out, want = ours(*mine), ref(*gold)
        dys = [torch.randn(o.shape, generator=gen, device=device).to(o.dtype) for o in out]
        g_ours = torch.autograd.grad(out, mine, dys)
        g_ref = torch.autograd.grad(want, gold, [d.float() for d in dys])
        worst = max(rel_err(o, w) for o, w in zip(out + g_ours, want + g_ref))
        errs[name] = worst
        print(f"check {name:20s} max rel err {worst:.2e} ({'ok' if worst < BF16_TOL else 'FAIL'})")
    return errs


def _time(fn, diff, backward: bool, timer) -> float:
    if not backward:
        with torch.no_grad():
            return timer(fn)
    outs = fn()
    grads = [torch.randn_like(o) for o in outs]
    # allow_unused: Liger's fused add has no scalars, so a and b take no part in its graph
    return timer(lambda: torch.autograd.grad(fn(), diff, grads, allow_unused=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[32768, 65536], help="N for the norms (rows of C)")
    p.add_argument("--width", type=int, default=1536, help="C for the norms")
    p.add_argument("--rope-shape", type=int, nargs=5, default=[16, 2048, 12, 12, 128],
                   metavar=("B", "T", "H", "HKV", "D"))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-liger", action="store_true", help="skip the Liger variant")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in the interpreter, no file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_norm_rope: no CUDA device here; nothing timed (use --dry-run to exercise the script on CPU)")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
        args.rows, args.width, args.rope_shape = [37], 96, [2, 5, 4, 2, 16]
        args.no_compile = True
        device, dtype, timer = torch.device("cpu"), torch.float32, cpu_ms
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        timer = lambda fn: bench_ms(fn, rep=args.rep)  # noqa: E731
    from kernels.rms_norm import mix_rms_norm, mix_rms_norm_ref, rms_norm, rms_norm_ref
    from kernels.rope import apply_rope, apply_rope_ref, rope_qk_norm, rope_qk_norm_ref

    ops = (rms_norm, rms_norm_ref, mix_rms_norm, mix_rms_norm_ref, apply_rope, apply_rope_ref, rope_qk_norm,
           rope_qk_norm_ref)
    errs = _check(ops, device, dtype, small=args.dry_run)
    if any(e >= BF16_TOL for e in errs.values()):
        print("bench_norm_rope: correctness check failed; nothing timed")
        return 1
    copy_gbps = None
    if not args.dry_run:
        src = torch.randn(2**29, device=device, dtype=dtype)  # 1 GiB
        dst = torch.empty_like(src)
        copy_gbps = gbps(2 * src.numel() * src.element_size(), bench_ms(lambda: dst.copy_(src), rep=args.rep))
        del src, dst
    rows = []
    for op, shape, fwd_bytes, fb_bytes, diff, variants in _cases(args, device, dtype, ops):
        for backward, nbytes in ((False, fwd_bytes), (True, fb_bytes)):
            times = {}
            for name, fn in variants.items():
                try:
                    times[name] = _time(fn, diff, backward, timer)
                except Exception as e:  # a third-party variant whose API moved: record and go on
                    if name == "triton":
                        raise
                    print(f"{op} {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            for name, ms in times.items():
                bw = gbps(nbytes, ms)
                rows.append({
                    "op": op, "shape": shape, "pass": "fwd+bwd" if backward else "fwd", "variant": name, "ms": ms,
                    "bytes": nbytes, "gbps": bw, "frac_copy": bw / copy_gbps if copy_gbps else None,
                    "triton_speedup": times[name] / times["triton"],
                })
    targets = []
    for r in rows:
        goal = TARGETS.get(r["op"], {}).get(r["variant"])
        if r["pass"] == "fwd+bwd" and goal is not None:
            targets.append({"op": r["op"], "shape": r["shape"], "vs": r["variant"], "need": goal,
                            "got": r["triton_speedup"], "met": r["triton_speedup"] >= goal})
        if r["pass"] == "fwd+bwd" and r["variant"] == "triton" and r["op"] in TARGETS and r["frac_copy"] is not None:
            targets.append({"op": r["op"], "shape": r["shape"], "vs": "copy bandwidth", "need": 0.85,
                            "got": r["frac_copy"], "met": r["frac_copy"] >= 0.85})
    if not args.dry_run:
        path = write_result("norm_rope", {
            "dtype": str(dtype), "copy_gbps": copy_gbps, "check_rel_err": errs, "rows": rows, "targets": targets,
            "bytes_formula": __doc__.split("Bytes,")[1].split("Figure")[0].strip(),
        })
        print(f"wrote {path}")
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else "\n(dry run: CPU, Triton in the interpreter: "
          "the timings mean nothing)")
    print(f"{'op':13s} {'shape':32s} {'pass':8s} {'variant':8s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s} {'ours x':>7s}")
    for r in rows:
        frac = f"{100 * r['frac_copy']:5.1f}%" if r["frac_copy"] else "     -"
        print(f"{r['op']:13s} {r['shape']:32s} {r['pass']:8s} {r['variant']:8s} {r['ms']:9.3f} {r['gbps']:7.0f} {frac} "
              f"{r['triton_speedup']:7.2f}")
    for t in targets if not args.dry_run else []:
        print(f"target {t['op']:13s} {t['shape']:32s} vs {t['vs']:15s} need {t['need']:.2f} got {t['got']:.2f} "
              f"{'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
