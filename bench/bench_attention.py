"""Benchmark training attention: the Triton flash-attention kernel against SDPA and flash-attn.

    python -m bench.bench_attention                    # B=16, T=2048, H=Hkv=12, D=128, windows 512 and full; bf16
    python -m bench.bench_attention --kv-heads 4       # GQA
    TRITON_INTERPRET=1 python -m bench.bench_attention --dry-run   # CPU: tiny shapes, fp32, no result file

Variants, each timed forward (under no_grad) and forward+backward (torch.autograd.grad of the output against a
fixed random output gradient, w.r.t. q, k and v):
    triton       flash_attention(impl="triton"), autotuned over ATTENTION_CONFIGS
    sdpa_mask    SDPA (default backends) given the layer's boolean mask: the window mask, or the causal mask
                 as a tensor on full layers. This is the reference's path for window layers.
    sdpa_causal  SDPA is_causal=True (default backends: flash or cuDNN on Hopper). The reference's path on full
                 layers; on window layers it computes the whole causal triangle, more than the layer needs.
    sdpa_flash   as sdpa_causal, pinned to the flash backend (skipped where it is unavailable)
    compile      torch.compile(flash_attention_ref)
    flash_attn   flash_attn_func(causal=True, window_size=(window, 0)) when the package imports (never required)
Liger-Kernel has no attention op, so none is compared.

FLOPs, counting only the unmasked work of the layer (the same count for every variant, so TFLOP/s compare like
times; sdpa_causal on a window layer is credited only with the window's pairs):
    pairs   = sum over query i < T of (min(i, window) + 1)      (window None: T (T + 1) / 2)
    forward = 4 * B * H * D * pairs       (S = Q K^T and O = P V, 2 FLOPs per multiply-add)
    fwd+bwd = 3.5 * forward               (backward: S recomputed, dV, dP, dQ, dK: 5 matmuls against 2)
Figure of merit: forward TFLOP/s over the bf16 dense peak (SPEC §5: 989e12 on H100/H200 SXM).
On a GPU, bf16 correctness (outputs and gradients) is checked first against the fp32 reference.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import bench_ms, cpu_ms, rel_err, tflops, write_result
from kernels.attention import attention_mask, flash_attention, flash_attention_ref

BF16_TOL = 2e-2  # ||out - ref|| / ||ref|| allowed for bf16 inputs against the fp32 reference, per tensor
PEAK_BF16 = 989e12
TARGETS = {  # KERNELS.md: fwd+bwd speedups of triton over the comparator; forward at >= 60% of the bf16 peak
    "window": {"sdpa_mask": 3.0},
    "full": {"sdpa_causal": 0.9, "sdpa_flash": 0.9},
}


def visible_pairs(t: int, window: int | None) -> int:
    """Number of (query, key) pairs a causal layer of length t with this window computes."""
    if window is None or window >= t - 1:
        return t * (t + 1) // 2
    w = window
    return (w + 1) * (w + 2) // 2 + (t - w - 1) * (w + 1)  # rows 0..w see i + 1 keys, later rows w + 1






def _sdpa(mask=None, causal=False, backend=None):
    """SDPA on (B, T, H, D) inputs, GQA by repeating k/v heads (as the reference does)."""
    def run(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kt.size(1) != qt.size(1):
            kt = kt.repeat_interleave(qt.size(1) // kt.size(1), dim=1)
            vt = vt.repeat_interleave(qt.size(1) // vt.size(1), dim=1)
        if backend is None:
            y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)
        else:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backend):
                y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)
        return y.transpose(1, 2)

    return run


def _variants(t: int, window: int | None, device, dry_run: bool, compile_ref: bool) -> dict:
    variants = {}
    if not dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        variants["triton"] = lambda q, k, v: flash_attention(q, k, v, window=window, impl="triton")
    variants["sdpa_mask"] = _sdpa(mask=attention_mask(t, t, window, device=device))
    variants["sdpa_causal"] = _sdpa(causal=True)
    if not dry_run:
        from torch.nn.attention import SDPBackend

        variants["sdpa_flash"] = _sdpa(causal=True, backend=SDPBackend.FLASH_ATTENTION)
    if compile_ref and not dry_run:
        compiled = torch.compile(flash_attention_ref)
        variants["compile"] = lambda q, k, v: compiled(q, k, v, window=window)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None and not dry_run:
        size = (-1, -1) if window is None else (window, 0)
        variants["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=size)
    return variants


def _inputs(b, t, h, hkv, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(b, t, hkv, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(b, t, hkv, d, generator=g, device=device, dtype=dtype)
    dy = torch.randn(b, t, h, d, generator=g, device=device, dtype=dtype)
    return q, k, v, dy


def check_correctness(h: int, hkv: int, d: int, windows, dtype, device) -> dict:
    """Triton (in dtype) against the fp32 reference on the same rounded inputs: relative errors of y, dq, dk, dv."""
    b, t = (2, 1024) if device.type == "cuda" else (1, 80)
    q, k, v, dy = _inputs(b, t, h, hkv, d, dtype, device, seed=1)
    report = {}
    for window in windows:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        y = flash_attention(*leaves, window=window, impl="triton")
        got = (y, *torch.autograd.grad(y, leaves, dy))
        ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
        y_ref = flash_attention_ref(*ref_leaves, window=window)
        want = (y_ref, *torch.autograd.grad(y_ref, ref_leaves, dy.float()))
        errs = {name: rel_err(g_, w_) for name, g_, w_ in zip(("y", "dq", "dk", "dv"), got, want)}
        errs["ok"] = all(e <= BF16_TOL for e in errs.values())
        report[_label(window)] = errs
    return report


def _label(window: int | None) -> str:
    return "full" if window is None else f"window{window}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--windows", default="512,full", help="comma list of ints and 'full'")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) variant")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32; writes no result")
    args = p.parse_args(argv)

    if args.dry_run:
        device, dtype, timer = torch.device("cpu"), torch.float32, cpu_ms
        b, t, h, hkv, d = 1, 80, 4, 2, 16
        windows = [16, None]
    else:
        if not torch.cuda.is_available():
            print("bench_attention: no CUDA device; nothing measured (use --dry-run to exercise the script on CPU)")
            return 0
        device, dtype, timer = torch.device("cuda"), torch.bfloat16, bench_ms
        b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
        hkv = args.kv_heads or h
        windows = [None if w.strip() == "full" else int(w) for w in args.windows.split(",")]

    correctness = None
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        correctness = check_correctness(h, hkv, d, windows, dtype, device)
        for name, errs in correctness.items():
            print(f"correctness {name}: " + ", ".join(f"{k} {v:.2e}" if k != "ok" else f"ok={v}"
                                                     for k, v in errs.items()))

    q, k, v, dy = _inputs(b, t, h, hkv, d, dtype, device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rows, results = [], {}
    for window in windows:
        fwd_flops = 4 * b * h * d * visible_pairs(t, window)
        label = _label(window)
        results[label] = {"window": window, "pairs": visible_pairs(t, window), "fwd_flops": fwd_flops}
        for name, fn in _variants(t, window, device, args.dry_run, not args.no_compile).items():
            try:
                with torch.no_grad():
                    fwd_ms = timer(lambda fn=fn: fn(q, k, v))
                both_ms = timer(lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, dy))
            except Exception as e:  # a backend that refuses the shape or dtype: record it and go on
                results[label][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                rows.append((label, name, None, None, None, None))
                continue
            entry = {"fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "fwd_tflops": tflops(fwd_flops, fwd_ms),
                     "fwd_bwd_tflops": tflops(3.5 * fwd_flops, both_ms)}
            entry["fwd_peak_fraction"] = entry["fwd_tflops"] * 1e12 / PEAK_BF16
            results[label][name] = entry
            rows.append((label, name, fwd_ms, both_ms, entry["fwd_tflops"], entry["fwd_bwd_tflops"]))
        mine = results[label].get("triton", {})
        if "fwd_ms" in mine:
            for name, other in results[label].items():
                if isinstance(other, dict) and "fwd_ms" in other and name != "triton":
                    other["triton_speedup_fwd"] = other["fwd_ms"] / mine["fwd_ms"]
                    other["triton_speedup_fwd_bwd"] = other["fwd_bwd_ms"] / mine["fwd_bwd_ms"]

    if device.type == "cuda":
        from kernels import tuned_configs

        tuned = {str(key): name for key, name in tuned_configs().items() if key[0] == "attention"}
        payload = {"shape": {"B": b, "T": t, "H": h, "Hkv": hkv, "D": d, "dtype": str(dtype)},
                   "flops_formula": "fwd = 4*B*H*D*pairs, pairs = sum_i (min(i, window) + 1); fwd+bwd = 3.5*fwd",
                   "peak_bf16_flops": PEAK_BF16, "targets": TARGETS, "correctness": correctness,
                   "autotuned_configs": tuned, "results": results, "liger": "no attention op"}
        print(f"wrote {write_result('attention', payload)}")

    print(f"\nattention B={b} T={t} H={h} Hkv={hkv} D={d} {dtype}; TFLOP/s count only the unmasked pairs")
    print(f"{'layer':<11}{'variant':<13}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd TF/s':>10}{'f+b TF/s':>10}"
          f"{'triton x':>10}")
    for label, name, fwd_ms, both_ms, tf_f, tf_b in rows:
        if fwd_ms is None:
            print(f"{label:<11}{name:<13}{'error':>9}")
            continue
        speed = results[label][name].get("triton_speedup_fwd_bwd")
        print(f"{label:<11}{name:<13}{fwd_ms:9.3f}{both_ms:12.3f}{tf_f:10.1f}{tf_b:10.1f}"
              f"{(f'{speed:.2f}' if speed else '-'):>10}")
    if correctness is not None and not all(e["ok"] for e in correctness.values()):
        print("bench_attention: bf16 correctness check FAILED")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
