"""Benchmark the fused ReLU^2 MLP (kernels/mlp.py) against eager PyTorch, torch.compile and Liger.

    python -m bench.bench_mlp                      # N=32768, C in 768 (d12), 1536 (d24), 1664 (d26); bf16
    python -m bench.bench_mlp --widths 1536 --no-compile --configs
    python -m bench.bench_mlp --dry-run            # CPU: tiny shapes, Triton through the interpreter, no file

x (N, C) bf16, W_fc (4C, C) and W_proj (C, 4C) fp32 masters cast to bf16 inside every variant, Hd = 4C.
FLOPs: forward = two GEMMs = 4*N*C*Hd; forward+backward = six GEMMs = 12*N*C*Hd (the elementwise work is
noise in FLOPs but not in time: eager moves ~5 extra N*Hd passes forward and ~6 backward).
Variants, each timed forward and forward+backward (torch.autograd.grad of sum(y * dy) w.r.t. x and both masters):
    triton   relu2_mlp(impl="triton"): Triton GEMM + relu^2 epilogue, cuBLAS, Triton GEMM + derivative epilogue
    eager    relu2_mlp_ref (cuBLAS + elementwise kernels)
    compile  torch.compile(relu2_mlp_ref, mode="max-autotune")
    liger    cuBLAS + Liger's LigerReLUSquaredFunction + cuBLAS (when liger_kernel has that op)
    cublas   the same 2 (forward) or 6 (forward+backward) GEMMs through torch.matmul with no activation at all:
             the floor the fused MLP is measured against.
GEMM table: the forward GEMM x W_fc^T and the backward GEMM dy W_proj at (N, C, Hd), cuBLAS vs our Triton GEMM
(epilogue "none" and fused); with --configs also every named config, checked against cuBLAS first.
On a GPU, correctness is checked first in bf16 against an fp32 reference on the same rounded inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.common import bench_ms, cpu_ms, load_liger, rel_err, tflops, write_result

BF16_TOL = 2e-2  # ||out - ref|| / ||ref|| allowed for bf16 operands against the fp32 reference






def _liger_relu2(liger):
    fn = getattr(liger, "LigerReLUSquaredFunction", None) if liger is not None else None
    if fn is None:
        return None

    def mlp(x, w_fc, w_proj):
        h = fn.apply(torch.nn.functional.linear(x, w_fc.to(x.dtype)))
        h = h[0] if isinstance(h, tuple) else h  # some versions also return their input
        return torch.nn.functional.linear(h, w_proj.to(x.dtype))

    return mlp


def _cublas_mlp(x, w_fc, w_proj):
    """The GEMMs alone: y = (x W_fc^T) W_proj^T, with the same weight casts and no activation."""
    return torch.matmul(torch.matmul(x, w_fc.to(x.dtype).t()), w_proj.to(x.dtype).t())


def _check(name, fn, x, w_fc, w_proj, dy, ref) -> dict:
    """Relative errors of y, dx, dW_fc, dW_proj against the fp32 reference `ref` (a dict of the same)."""
    y = fn(x, w_fc, w_proj)
    grads = torch.autograd.grad(y, (x, w_fc, w_proj), dy)
    errs = {k: rel_err(v, ref[k]) for k, v in zip(("y", "dx", "dw_fc", "dw_proj"), (y, *grads))}
    print(f"check {name:8s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    return errs


def _mlp_rows(n, c, variants, dtype, device, timer, seed=0) -> tuple[list[dict], dict]:
    g = torch.Generator(device=device).manual_seed(seed)
    hd = 4 * c
    x = torch.randn(n, c, device=device, generator=g).to(dtype).requires_grad_()
    w_fc = (torch.rand(hd, c, device=device, generator=g) * 2 - 1).mul_(0.4 * 3**0.5 / c**0.5).requires_grad_()
    w_proj = (torch.randn(c, hd, device=device, generator=g) / hd**0.5).requires_grad_()
    dy = torch.randn(n, c, device=device, generator=g).to(dtype)
    # fp32 reference on the same rounded inputs (weights rounded to the activation dtype, as every variant does).
    xr, fr, pr = (t.detach().to(dtype).float().requires_grad_() for t in (x, w_fc, w_proj))
    yr = variants["eager"](xr, fr, pr)
    ref = dict(zip(("y", "dx", "dw_fc", "dw_proj"), (yr, *torch.autograd.grad(yr, (xr, fr, pr), dy.float()))))
    checks = {name: _check(name, fn, x, w_fc, w_proj, dy, ref) for name, fn in variants.items() if name != "cublas"}
    del ref, yr, xr, fr, pr
    bad = {name: e for name, e in checks.items() if not max(e.values()) < BF16_TOL}  # NaN fails too
    if bad:
        raise SystemExit(f"bench_mlp: bf16 check failed at N={n}, C={c}: {bad}")
    flops = {"fwd": 4 * n * c * hd, "fwd+bwd": 12 * n * c * hd}
    rows = []
    for name, fn in variants.items():
        steps = {"fwd": lambda fn=fn: fn(x, w_fc, w_proj),
                 "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(x, w_fc, w_proj), (x, w_fc, w_proj), dy)}
        for mode, step in steps.items():
            step()  # compile, autotune and warm up outside the timed region
            if device == "cuda":
                torch.cuda.synchronize()
            ms = timer(step)
            rows.append({"n": n, "c": c, "hd": hd, "variant": name, "mode": mode, "ms": ms,
                         "tflops": tflops(flops[mode], ms)})
    return rows, checks


def _gemm_rows(n, c, dtype, device, timer, all_configs: bool) -> list[dict]:
    """Forward GEMM x W_fc^T and backward GEMM dy W_proj at one width: cuBLAS vs the Triton GEMM."""
    from kernels.matmul import GEMM_CONFIGS, gemm

    g = torch.Generator(device=device).manual_seed(1)
    hd = 4 * c
    x = torch.randn(n, c, device=device, generator=g).to(dtype)
    w_fc = (torch.randn(hd, c, device=device, generator=g) / c**0.5).to(dtype)
    w_proj = (torch.randn(c, hd, device=device, generator=g) / hd**0.5).to(dtype)
    h = torch.relu(x @ w_fc.t()).square()
    cases = {  # name: (cuBLAS call, kwargs of our gemm)
        "fwd x@W_fc^T": (lambda: torch.matmul(x, w_fc.t()), dict(a=x, b=w_fc, trans_b=True)),
        "bwd dy@W_proj": (lambda: torch.matmul(x, w_proj), dict(a=x, b=w_proj, trans_b=False)),
    }
    flops = 2 * n * c * hd  # one GEMM; reads (N*C + C*Hd) * 2 bytes, writes N*Hd * 2 bytes (+ N*Hd read for aux)
    rows = []
    for case, (cublas, kw) in cases.items():
        fused = "relu2" if kw["trans_b"] else "relu2_grad"
        cublas()
        base_ms = timer(cublas)
        rows.append({"c": c, "case": case, "impl": "cublas", "ms": base_ms, "tflops": tflops(flops, base_ms)})
        runs = [("triton none", dict(epilogue="none", config=None)),
                ("triton " + fused, dict(epilogue=fused, config=None))]
        if all_configs:
            runs += [(f"{name} {fused}", dict(epilogue=fused, config=name)) for name in GEMM_CONFIGS]
        plain = torch.matmul(x, w_fc.t() if kw["trans_b"] else w_proj).float()
        wants = {"none": plain, "relu2": torch.relu(plain).square(), "relu2_grad": 2 * h.float().sqrt() * plain}
        for label, extra in runs:
            aux = h if extra["epilogue"] == "relu2_grad" else None
            call = lambda kw=kw, extra=extra, aux=aux: gemm(**kw, aux=aux, **extra)  # noqa: E731
            try:
                out = call()
            except Exception as e:  # a pinned config this GPU, this Triton or this shape cannot run: say so
                rows.append({"c": c, "case": case, "impl": label, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            err = rel_err(out, wants[extra["epilogue"]])
            ms = timer(call)
            rows.append({"c": c, "case": case, "impl": label, "ms": ms, "tflops": tflops(flops, ms),
                         "vs_cublas": base_ms / ms, "rel_err": err})
        del plain, wants
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768, help="tokens (rows of x)")
    p.add_argument("--widths", default="768,1536,1664", help="comma-separated C values (Hd = 4C)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile max-autotune (minutes per shape)")
    p.add_argument("--configs", action="store_true", help="also check and time every named GEMM config")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in the interpreter, no file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_mlp: no CUDA device here; nothing timed (use --dry-run to exercise the script on CPU)")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    from kernels import tuned_configs
    from kernels.mlp import relu2_mlp, relu2_mlp_ref

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # interpreter: no bf16 dot
    n, widths = (args.n, [int(w) for w in args.widths.split(",")]) if cuda else (48, [64])
    timer = bench_ms if cuda else cpu_ms
    variants = {"triton": lambda x, w_fc, w_proj: relu2_mlp(x, w_fc, w_proj, impl="triton"), "eager": relu2_mlp_ref}
    if cuda and not args.no_compile:
        variants["compile"] = torch.compile(relu2_mlp_ref, mode="max-autotune", dynamic=False)
    liger = _liger_relu2(load_liger("liger_kernel.ops.relu_squared")) if cuda else None
    if liger is not None:
        variants["liger"] = liger
    variants["cublas"] = _cublas_mlp
    rows, gemms, checks = [], [], {}
    for c in widths:
        r, chk = _mlp_rows(n, c, variants, dtype, device, timer)
        rows += r
        checks[c] = chk
        gemms += _gemm_rows(n, c, dtype, device, timer, args.configs)
    times = {(r["c"], r["variant"], r["mode"]): r["ms"] for r in rows}
    rates = {(r["c"], r["variant"], r["mode"]): r["tflops"] for r in rows}
    ratios = {f"C={c} {mode} triton vs {other}": times[(c, other, mode)] / times[(c, "triton", mode)]
              for c in widths for mode in ("fwd", "fwd+bwd") for other in variants if other != "triton"}
    if cuda:
        payload = {"dtype": str(dtype), "n": n, "widths": widths, "liger": liger is not None,
                   "flops": "fwd 4*N*C*Hd, fwd+bwd 12*N*C*Hd, one GEMM 2*N*C*Hd", "checks": checks, "mlp": rows,
                   "gemm": gemms, "ratios": ratios,
                   "tuned": {str(k): v for k, v in tuned_configs().items() if k[0] == "gemm"}}
        print(f"wrote {write_result('mlp', payload)}")
    if liger is None:
        print("liger: liger_kernel.ops.relu_squared not importable here; no Liger row")
    print(f"\nReLU^2 MLP, N={n}, {dtype}: ms (TFLOP/s)")
    print(f"{'C':>5} {'mode':8} " + " ".join(f"{v:>16}" for v in variants))
    for c in widths:
        for mode in ("fwd", "fwd+bwd"):
            cells = [f"{times[(c, v, mode)]:7.3f} ({rates[(c, v, mode)]:5.0f})" for v in variants]
            print(f"{c:>5} {mode:8} " + " ".join(f"{s:>16}" for s in cells))
    print("\nGEMMs: ms, TFLOP/s, fraction of cuBLAS")
    for g in gemms:
        tail = f"{g['ms']:8.3f} {g['tflops']:6.0f}" + (f" {g['vs_cublas']:5.2f}" if "vs_cublas" in g else "")
        if g.get("rel_err") is not None:
            tail += f"  err {g['rel_err']:.1e}"
        print(f"{g['c']:>5} {g['case']:15} {g['impl']:32} " + (g.get("error") or tail))
    print()
    for k, v in ratios.items():
        print(f"{k}: x{v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
