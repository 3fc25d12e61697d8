"""Benchmark lm_head + softcap 15 + cross-entropy (kernels/cross_entropy.py, linear_cross_entropy.py): time and
peak memory against eager PyTorch, torch.compile and Liger's fused linear cross-entropy.

    python -m bench.bench_cross_entropy                  # N in 8192, 32768, 65536; C=1536; V=32768; bf16
    python -m bench.bench_cross_entropy --ns 32768 --no-compile
    python -m bench.bench_cross_entropy --dry-run        # CPU: tiny shapes, Triton through the interpreter, no file

x (N, C) bf16 and the lm_head weight (V, C) as an fp32 master cast to bf16 inside every variant (as the model
does); targets random with 1/16 ignored (-1); reduction "mean".
FLOPs: forward = the logits GEMM = 2*N*V*C; forward+backward = three GEMMs (logits, grad_x, grad_W) = 6*N*V*C.
Variants:
    triton   linear_softcap_cross_entropy(impl="triton"): chunked cuBLAS GEMMs + the Triton CE kernel
    eager    linear_softcap_cross_entropy_ref(chunk_size=0), the unchunked expression (holds the N x V logits
             in bf16 and several fp32 copies)
    compile  torch.compile of that unchunked expression
    liger    LigerFusedLinearCrossEntropyLoss(softcap=15) on the bf16-cast weight, when liger_kernel imports
    cublas   the GEMMs alone on the full N x V logits (1 forward, 3 forward+backward): the time floor
"forward" is the evaluation call under torch.no_grad; "forward+backward" is torch.autograd.grad of the loss
w.r.t. x and the master weight. Peak memory is torch.cuda.max_memory_allocated() during one call, minus what
was allocated before it (inputs, weights), in MiB.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.common import bench_ms, cpu_ms, load_liger, rel_err, tflops, write_result

SOFTCAP, IGNORE = 15.0, -1
TOL = {"loss": 2e-3, "dx": 2e-2, "dw": 2e-2}  # ||got - ref|| / ||ref||, bf16 operands, vs the same-input eager ref






def _inputs(n, c, vp, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, c, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vp, c, device=device, generator=g) * 0.5 / c**0.5).requires_grad_()  # fp32 master
    t = torch.randint(0, vocab, (n,), device=device, generator=g)
    t[torch.rand(n, device=device, generator=g) < 1 / 16] = IGNORE
    return x, w, t


def _variants(cuda: bool, compile_ref: bool):
    from kernels.linear_cross_entropy import linear_softcap_cross_entropy, linear_softcap_cross_entropy_ref

    def ours(x, w, t, reduction="mean", vocab=None):
        return linear_softcap_cross_entropy(x, w, t, SOFTCAP, IGNORE, reduction, vocab, impl="triton")

    def eager(x, w, t, reduction="mean", vocab=None):
        return linear_softcap_cross_entropy_ref(x, w, t, SOFTCAP, IGNORE, reduction, vocab, chunk_size=0)

    variants, notes = {"triton": ours, "eager": eager}, {}
    if compile_ref:
        compiled = torch.compile(linear_softcap_cross_entropy_ref, dynamic=False)
        variants["compile"] = lambda x, w, t, reduction="mean", vocab=None: compiled(
            x, w, t, SOFTCAP, IGNORE, reduction, vocab, chunk_size=0)
    mod = load_liger("liger_kernel.transformers.fused_linear_cross_entropy") if cuda else None
    if mod is None:
        notes["liger"] = "liger_kernel not importable"
    else:
        try:
            loss_fn = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, softcap=SOFTCAP, reduction="mean")
        except TypeError as e:  # a version without the softcap argument computes another loss: no row
            notes["liger"] = f"LigerFusedLinearCrossEntropyLoss has no softcap: {e}"
        else:
            def liger(x, w, t, reduction="mean", vocab=None):
                out = loss_fn(w.to(x.dtype) if vocab is None else w[:vocab].to(x.dtype), x, t)
                return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

            variants["liger"] = liger
    return variants, notes


def _cublas_steps(x, w):
    """The GEMMs alone, on the whole N x V logits in x's dtype, with the same weight cast: forward
    logits = x W^T; forward+backward adds grad_x = G W and grad_W = G^T x (the logits stand in for G)."""

    def fwd():
        return torch.mm(x.detach(), w.detach().to(x.dtype).t())

    def fwd_bwd():
        xd, wb = x.detach(), w.detach().to(x.dtype)
        g = torch.mm(xd, wb.t())
        return torch.mm(g, wb), torch.mm(g.t(), xd)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _check(variants, n, c, vp, vocab, dtype, device) -> dict:
    """Loss and gradients of every variant against the eager reference on the same bf16 inputs, at an odd
    N and with vocab padding; plus reduction "none" under a random upstream gradient, and no-grad evaluation."""
    x, w, t = _inputs(n, c, vp, vocab, dtype, device, seed=1)
    ref = variants["eager"](x, w, t, vocab=vocab)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w))
    out = {}
    for name, fn in variants.items():
        loss = fn(x, w, t, vocab=vocab)
        dx, dw = torch.autograd.grad(loss, (x, w))
        out[name] = {"loss": rel_err(loss, ref), "dx": rel_err(dx, ref_dx), "dw": rel_err(dw, ref_dw)}
        if name == "triton":
            up = torch.randn(n, device=device)
            per = fn(x, w, t, reduction="none", vocab=vocab)
            per_ref = variants["eager"](x, w, t, reduction="none", vocab=vocab)
            gx, gw = torch.autograd.grad(per, (x, w), up)
            rx, rw = torch.autograd.grad(per_ref, (x, w), up)
            with torch.no_grad():
                ev = fn(x, w, t, reduction="none", vocab=vocab)
            out["triton none"] = {"loss": rel_err(per, per_ref), "dx": rel_err(gx, rx), "dw": rel_err(gw, rw),
                                  "no_grad": rel_err(ev, per_ref)}
            out[name]["padding_grad_zero"] = bool((dw[vocab:] == 0).all())
        print(f"check {name:12s} " + " ".join(f"{k}={v:.2e}" for k, v in out[name].items() if k != "padding_grad_zero"))
    print("check triton none  " + " ".join(f"{k}={v:.2e}" for k, v in out["triton none"].items()))
    bad = {k: e for k, e in out.items() if not all(e.get(q, 0.0) < TOL[q] for q in TOL)}
    if out["triton none"]["no_grad"] >= TOL["loss"]:
        bad["triton no_grad"] = out["triton none"]
    if not out["triton"]["padding_grad_zero"]:
        bad["triton padding"] = "non-zero gradient on padding rows"
    if bad:
        raise SystemExit(f"bench_cross_entropy: bf16 check failed: {bad}")
    return out


def _measure(step, cuda: bool, timer) -> tuple[float, float | None]:
    """(median ms, peak MiB above the memory allocated before the call)."""
    step()  # compile and warm up outside the timed region
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return timer(step), peak


def _rows(n, c, v, variants, dtype, device, timer) -> list[dict]:
    cuda = device == "cuda"
    x, w, t = _inputs(n, c, v, v, dtype, device)
    flops = {"fwd": 2 * n * v * c, "fwd+bwd": 6 * n * v * c}
    rows = []
    for name, fn in variants.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, w, t)

        steps = {"fwd": fwd, "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(x, w, t), (x, w))}
        if name == "cublas":
            steps = _cublas_steps(x, w)
        for mode, step in steps.items():
            try:
                ms, peak = _measure(step, cuda, timer)
            except torch.cuda.OutOfMemoryError:
                rows.append({"n": n, "variant": name, "mode": mode, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            rows.append({"n": n, "c": c, "v": v, "variant": name, "mode": mode, "ms": ms,
                         "tflops": tflops(flops[mode], ms), "peak_mib": peak})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", default="8192,32768,65536", help="comma-separated token counts N")
    p.add_argument("--c", type=int, default=1536, help="model width C")
    p.add_argument("--v", type=int, default=32768, help="vocabulary V (rows of the weight)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in the interpreter, no file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_cross_entropy: no CUDA device here; nothing timed (use --dry-run to exercise it on CPU)")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # interpreter: fp32 matmuls
    ns, c, v = ([int(s) for s in args.ns.split(",")], args.c, args.v) if cuda else ([40], 32, 128)
    timer = bench_ms if cuda else cpu_ms
    variants, notes = _variants(cuda, cuda and not args.no_compile)
    checks = _check(variants, 1823 if cuda else 37, c, v, v - 68 if cuda else v - 28, dtype, device)
    variants["cublas"] = None  # timed through _cublas_steps
    rows = []
    for n in ns:
        rows += _rows(n, c, v, variants, dtype, device, timer)
    ok = {(r["n"], r["variant"], r["mode"]): r for r in rows if "ms" in r}
    ratios = {}
    for n in ns:
        for mode in ("fwd", "fwd+bwd"):
            ours = ok.get((n, "triton", mode))
            for other in variants:
                theirs = ok.get((n, other, mode))
                if other == "triton" or ours is None or theirs is None:
                    continue
                ratios[f"N={n} {mode} time {other}/triton"] = theirs["ms"] / ours["ms"]
                if cuda and other != "cublas" and ours["peak_mib"]:
                    ratios[f"N={n} {mode} memory triton/{other}"] = ours["peak_mib"] / theirs["peak_mib"]
    if cuda:
        from kernels.linear_cross_entropy import chunk_rows

        payload = {"dtype": str(dtype), "c": c, "v": v, "ns": ns, "softcap": SOFTCAP, "notes": notes,
                   "chunk_rows": {n: chunk_rows(n, v) for n in ns},
                   "flops": "fwd 2*N*V*C, fwd+bwd 6*N*V*C", "memory": "peak MiB above the pre-call allocation",
                   "checks": checks, "rows": rows, "ratios": ratios}
        print(f"wrote {write_result('cross_entropy', payload)}")
    for k, why in notes.items():
        print(f"{k}: {why}; no row")
    print(f"\nlinear + softcap + CE, C={c}, V={v}, {dtype}: ms (TFLOP/s) [peak MiB]")
    print(f"{'N':>6} {'mode':8} " + " ".join(f"{name:>24}" for name in variants))
    for n in ns:
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for name in variants:
                r = ok.get((n, name, mode))
                mem = "-" if r is None or r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                cells.append("oom" if r is None else f"{r['ms']:8.3f} ({r['tflops']:4.0f}) [{mem}]")
            print(f"{n:>6} {mode:8} " + " ".join(f"{s:>24}" for s in cells))
    print()
    for k, val in ratios.items():
        print(f"{k}: x{val:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
