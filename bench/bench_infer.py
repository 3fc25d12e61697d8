"""Decode throughput of the paged KV cache: the paged attention kernel, and the whole engine, against the
reference (a dense cache + SDPA).

    python -m bench.bench_infer                     # kernel: B 1 8 32 128 x context 512 1024 2048; engine: depth 24
    python -m bench.bench_infer --depth 12 --engine-batch 1 32 --engine-context 2048 --no-compile
    python -m bench.bench_infer --dry-run           # CPU: tiny shapes, Triton through the interpreter, no file

Kernel: one decode step of one layer (B queries of H heads over a context of T tokens, bf16, the d24 heads
H = Hkv = 12, D = 128 by default), pages of 16 tokens in shuffled order:
    triton          paged_attention (split-KV chosen from the batch and the device)
    triton_nosplit  paged_attention with num_splits=1 (what split-KV buys at small batch)
    gather_sdpa     the pages gathered into a dense (B, T, Hkv, D) cache, then SDPA (eager)
    compile         torch.compile(gather_sdpa)
    dense_sdpa      SDPA over a contiguous dense (B, Hkv, T, D) cache: the reference engine's attention
    (Liger-Kernel has no paged or decode attention op.)
KV bytes, the least one step must read: 2 (k and v) x B x T x Hkv x D x 2 bytes (q and the output are
B x H x D, noise). GB/s = KV bytes / time; figure of merit: GB/s over the measured copy bandwidth.

Engine: decode tokens/s at batch B after prefilling B random prompts of T tokens (greedy, no stop tokens):
    paged  engine.Engine with the paged kernel (impl="triton") and the model on its kernels (impl="triton")
    dense  the reference: one dense (B, T_max, Hkv, D) cache per layer with every row at the same position,
           attention by flash_attention_ref (SDPA with the window mask), the model on its references
tokens/s = B x steps / (host time of the steps, device synchronized before and after).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.nn.functional as F

from bench.common import bench_ms, cpu_ms, gbps, rel_err, write_result

BF16_TOL = 1e-2  # ||out - ref|| / ||ref|| allowed for bf16 against the fp32 reference
KERNEL_TARGET = {"shape": (32, 2048), "vs": "gather_sdpa", "speedup": 2.0, "frac_copy": 0.8}
ENGINE_TARGET = {"shape": (32, 2048), "speedup": 2.0}






def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- kernel ------------------------------------------------------------------------------------------------------
def _paged_case(B, lens, H, Hkv, D, page_size, dtype, device, seed=0):
    """Random q and pages (never zeros), pages of each sequence in shuffled order."""
    g = torch.Generator(device=device).manual_seed(seed)
    max_pages = -(-max(lens) // page_size)
    num_pages = B * max_pages
    k_pages = torch.randn(num_pages, page_size, Hkv, D, device=device, dtype=dtype, generator=g)
    v_pages = torch.randn(num_pages, page_size, Hkv, D, device=device, dtype=dtype, generator=g)
    block_table = torch.randperm(num_pages, device=device, generator=g).view(B, max_pages).to(torch.int32)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype, generator=g)
    return q, k_pages, v_pages, block_table, seq_lens


def _sdpa_decode(q, k, v):
    """One query per sequence over all of k, v: q (B, 1, H, D), k, v (B, Hkv, T, D) -> (B, 1, H, D)."""
    group = q.size(2) // k.size(1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)


def _gather_sdpa(q, k_pages, v_pages, block_table, T):
    """The reference on a paged cache: gather every sequence's pages into dense tensors, then SDPA."""
    k = k_pages[block_table.long()].flatten(1, 2)[:, :T].transpose(1, 2)  # (B, Hkv, T, D)
    v = v_pages[block_table.long()].flatten(1, 2)[:, :T].transpose(1, 2)
    return _sdpa_decode(q, k, v)


def _check_kernel(paged_attention, paged_attention_ref, dtype, device) -> float:
    """bf16 (fp32 on CPU) paged kernel against the fp32 reference: mixed lengths, chunk + decode rows, window, GQA."""
    g = torch.Generator(device=device).manual_seed(1)
    worst = 0.0
    for lens, q_lens, window, splits in (([300, 17, 1000], [1, 1, 1], None, None), ([300, 17, 100], [5, 1, 9], 64, 3)):
        q, kp, vp, bt, sl = _paged_case(len(lens), lens, 8, 2, 128 if device.type == "cuda" else 16, 16, dtype, device)
        q = torch.randn(len(lens), max(q_lens), 8, kp.size(3), device=device, dtype=dtype, generator=g)
        ql = torch.tensor(q_lens, device=device, dtype=torch.int32)
        out = paged_attention(q, kp, vp, bt, sl, ql, window=window, num_splits=splits, impl="triton")
        ref = paged_attention_ref(q.float(), kp.float(), vp.float(), bt, sl, ql, window=window)
        worst = max(worst, rel_err(out, ref))
    return worst


def _kernel_variants(paged_attention, compiled, q, kp, vp, bt, sl, T) -> dict:
    dense_k = kp[bt.long()].flatten(1, 2)[:, :T].transpose(1, 2).contiguous()  # (B, Hkv, T, D)
    dense_v = vp[bt.long()].flatten(1, 2)[:, :T].transpose(1, 2).contiguous()
    variants = {
        "triton": lambda: paged_attention(q, kp, vp, bt, sl, impl="triton"),
        "triton_nosplit": lambda: paged_attention(q, kp, vp, bt, sl, num_splits=1, impl="triton"),
        "gather_sdpa": lambda: _gather_sdpa(q, kp, vp, bt, T),
        "dense_sdpa": lambda: _sdpa_decode(q, dense_k, dense_v),
    }
    if compiled is not None:
        variants["compile"] = lambda: compiled(q, kp, vp, bt, T)
    return variants


def _kernel_rows(args, device, dtype, timer, copy_gbps):
    from kernels.paged_attention import paged_attention

    rows = []
    compiled = None if args.no_compile else torch.compile(_gather_sdpa, dynamic=False)
    H, Hkv, D = args.heads
    for B in args.batch:
        for T in args.context:
            q, kp, vp, bt, sl = _paged_case(B, [T] * B, H, Hkv, D, args.page_size, dtype, device, seed=B + T)
            variants = _kernel_variants(paged_attention, compiled, q, kp, vp, bt, sl, T)
            ref = variants["dense_sdpa"]()
            err = rel_err(variants["triton"](), ref)
            if err >= BF16_TOL:
                raise RuntimeError(f"paged kernel wrong at B={B}, T={T}: rel err {err:.2e}")
            kv_bytes = 2 * B * T * Hkv * D * kp.element_size()
            times = {}
            for name, fn in variants.items():
                try:
                    times[name] = timer(fn)
                except Exception as e:  # e.g. torch.compile unavailable: record and go on
                    if name.startswith("triton"):
                        raise
                    print(f"kernel B={B} T={T} {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            for name, ms in times.items():
                bw = gbps(kv_bytes, ms)
                rows.append({"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D, "variant": name, "ms": ms,
                             "kv_bytes": kv_bytes, "gbps": bw, "frac_copy": bw / copy_gbps if copy_gbps else None,
                             "triton_speedup": ms / times["triton"], "rel_err_vs_dense": err})
            del q, kp, vp, bt, sl, variants
    return rows


# ---- engine ------------------------------------------------------------------------------------------------------
class DenseCache:
    """The reference engine's cache: dense (n_layer, B, T_max, Hkv, D) k and v, every row at the same position.
    Duck-types the `cache` argument of GPT.forward (positions, prev_tokens, attend)."""

    def __init__(self, n_layer, B, t_max, n_kv_head, head_dim, dtype, device):
        self.k = torch.zeros(n_layer, B, t_max, n_kv_head, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0
        self.rows = slice(0, B)

    def begin(self, idx: torch.Tensor, prev_tokens: torch.Tensor, rows: slice) -> None:
        B, T = idx.shape
        self.rows, self.T = rows, T
        self.positions = (self.pos + torch.arange(T, device=idx.device)).expand(B, T)
        self.prev_tokens = prev_tokens

    def attend(self, layer, q, k, v, window):
        from kernels.attention import flash_attention_ref

        end = self.pos + q.size(1)
        self.k[layer, self.rows, self.pos : end] = k
        self.v[layer, self.rows, self.pos : end] = v
        return flash_attention_ref(q, self.k[layer, self.rows, :end], self.v[layer, self.rows, :end], window=window)


@torch.no_grad()
def _dense_engine_tps(model, prompts: torch.Tensor, steps: int, warmup: int, prefill_rows: int) -> float:
    from engine.gpt import HEAD_DIM

    B, T = prompts.shape
    cfg, device = model.config, prompts.device
    cache = DenseCache(cfg.n_layer, B, T + steps + warmup + 1, cfg.n_kv_head, HEAD_DIM, model.compute_dtype, device)
    nxt = torch.empty(B, dtype=torch.long, device=device)
    none = torch.full((B,), -1, dtype=torch.long, device=device)
    for a in range(0, B, prefill_rows):  # prefill in groups of rows (the logits of a whole batch would not fit)
        rows = slice(a, min(B, a + prefill_rows))
        cache.begin(prompts[rows], none[rows], rows)
        nxt[rows] = model(prompts[rows], cache=cache)[:, -1].argmax(-1)
    cache.pos, prev = T, prompts[:, -1]

    def decode_step():
        nonlocal prev
        cache.begin(nxt[:, None], prev, slice(0, B))
        logits = model(nxt[:, None], cache=cache)[:, -1]
        cache.pos += 1
        prev = nxt.clone()
        nxt.copy_(logits.argmax(-1))
        nxt.tolist()  # the reference engine reads its tokens on the host every step

    for _ in range(warmup):
        decode_step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        decode_step()
    _sync(device)
    return B * steps / (time.perf_counter() - t)


@torch.no_grad()
def _paged_engine_tps(model, prompts: torch.Tensor, steps: int, warmup: int, impl: str) -> float:
    from engine.engine import Engine, SamplingParams

    B, T = prompts.shape
    total = T + steps + warmup + 1
    engine = Engine(model, None, page_size=16, num_pages=B * -(-total // 16), max_batch_size=B, max_seq_len=total,
                    prefill_chunk=max(4096, T), impl=impl)
    params = SamplingParams(max_tokens=steps + warmup + 1, temperature=0.0, stop_tokens=())
    for p in prompts.tolist():
        engine.add_request(p, params)
    while engine.stats["sampled_tokens"] < B:  # prefill: until every request has its first token
        engine.step()
    for _ in range(warmup):
        engine.step()
    _sync(prompts.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(prompts.device)
    return B * steps / (time.perf_counter() - t)


def _engine_rows(args, device, dtype):
    from engine.gpt import GPTConfig, build_model

    if args.dry_run:
        cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=256)
    else:
        cfg = GPTConfig.from_depth(args.depth)
    rows = []
    for variant, model_impl in (("paged", args.model_impl), ("dense", "torch")):
        torch.manual_seed(0)
        model = build_model(cfg, device=device, impl=model_impl, compute_dtype=dtype).eval()
        for B in args.engine_batch:
            for T in args.engine_context:
                prompts = torch.tensor([[random.Random(B * T + i).randrange(cfg.vocab_size) for _ in range(T)]
                                        for i in range(B)], device=device)
                try:
                    if variant == "paged":
                        tps = _paged_engine_tps(model, prompts, args.steps, args.warmup, args.paged_impl)
                    else:
                        tps = _dense_engine_tps(model, prompts, args.steps, args.warmup, max(1, 4096 // T))
                except torch.cuda.OutOfMemoryError as e:
                    print(f"engine {variant} B={B} T={T}: out of memory ({str(e).splitlines()[0][:100]})")
                    tps = None
                rows.append({"variant": variant, "model_impl": model_impl, "depth": cfg.n_layer, "B": B, "T": T,
                             "steps": args.steps, "tokens_per_s": tps,
                             "ms_per_step": 1e3 * B / tps if tps else None})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
    for r in rows:
        base = next((d for d in rows if d["variant"] == "dense" and (d["B"], d["T"]) == (r["B"], r["T"])), None)
        ok = r["tokens_per_s"] and base and base["tokens_per_s"]
        r["speedup_vs_dense"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
    return rows


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128], help="kernel batch sizes")
    p.add_argument("--context", type=int, nargs="+", default=[512, 1024, 2048], help="kernel context lengths")
    p.add_argument("--heads", type=int, nargs=3, default=[12, 12, 128], metavar=("H", "HKV", "D"))
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=24, help="model depth for the engine comparison")
    p.add_argument("--engine-batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--engine-context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per engine case")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--model-impl", default="triton", choices=["torch", "triton"], help="the paged engine's model")
    p.add_argument("--no-engine", action="store_true", help="kernel only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in the interpreter, no file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_infer: no CUDA device here; nothing timed (use --dry-run to exercise the script on CPU)")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
        args.batch, args.context, args.heads, args.no_compile = [1, 3], [40, 70], [4, 2, 16], True
        args.engine_batch, args.engine_context, args.steps, args.warmup = [2], [20], 2, 1
        args.model_impl = "torch"
        device, dtype, timer = torch.device("cpu"), torch.float32, cpu_ms
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        timer = lambda fn: bench_ms(fn, rep=args.rep)  # noqa: E731
    args.paged_impl = "triton"
    from kernels.paged_attention import paged_attention, paged_attention_ref

    err = _check_kernel(paged_attention, paged_attention_ref, dtype, device)
    if err >= BF16_TOL:
        print(f"bench_infer: paged kernel check failed (rel err {err:.2e}); nothing timed")
        return 1
    copy_gbps = None
    if not args.dry_run:
        src = torch.randn(2**29, device=device, dtype=dtype)  # 1 GiB
        dst = torch.empty_like(src)
        copy_gbps = gbps(2 * src.numel() * src.element_size(), bench_ms(lambda: dst.copy_(src), rep=args.rep))
        del src, dst
    kernel_rows = _kernel_rows(args, device, dtype, timer, copy_gbps)
    engine_rows = [] if args.no_engine else _engine_rows(args, device, dtype)

    targets = []
    kb, kt = KERNEL_TARGET["shape"]
    for r in kernel_rows:
        if (r["B"], r["T"]) == (kb, kt) and r["variant"] == KERNEL_TARGET["vs"]:
            targets.append({"what": f"kernel B={kb} T={kt} vs {r['variant']}", "need": KERNEL_TARGET["speedup"],
                            "got": r["triton_speedup"]})
        if (r["B"], r["T"]) == (kb, kt) and r["variant"] == "triton" and r["frac_copy"] is not None:
            targets.append({"what": f"kernel B={kb} T={kt} of copy bandwidth", "need": KERNEL_TARGET["frac_copy"],
                            "got": r["frac_copy"]})
    for r in engine_rows:
        if r["variant"] == "paged" and (r["B"], r["T"]) == ENGINE_TARGET["shape"] and r["speedup_vs_dense"]:
            targets.append({"what": f"engine B={r['B']} T={r['T']} tokens/s vs dense", "need": ENGINE_TARGET["speedup"],
                            "got": r["speedup_vs_dense"]})
    for t in targets:
        t["met"] = t["got"] >= t["need"]
    if not args.dry_run:
        path = write_result("infer", {
            "dtype": str(dtype), "copy_gbps": copy_gbps, "check_rel_err": err, "page_size": args.page_size,
            "kernel": kernel_rows, "engine": engine_rows, "targets": targets,
            "bytes_formula": "KV bytes per decode step = 2 * B * T * Hkv * D * 2 (bf16)",
        })
        print(f"wrote {path}")
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else "\n(dry run: CPU, Triton in the interpreter: "
          "the timings mean nothing)")
    print(f"{'B':>4s} {'T':>5s} {'variant':15s} {'ms':>8s} {'GB/s':>7s} {'%copy':>6s} {'ours x':>7s}")
    for r in kernel_rows:
        frac = f"{100 * r['frac_copy']:5.1f}%" if r["frac_copy"] else "     -"
        print(f"{r['B']:4d} {r['T']:5d} {r['variant']:15s} {r['ms']:8.4f} {r['gbps']:7.0f} {frac} "
              f"{r['triton_speedup']:7.2f}")
    if engine_rows:
        print(f"\n{'engine':7s} {'B':>4s} {'T':>5s} {'tok/s':>10s} {'ms/step':>8s} {'x dense':>8s}")
        for r in engine_rows:
            tps = f"{r['tokens_per_s']:10.0f}" if r["tokens_per_s"] else "       OOM"
            ms = f"{r['ms_per_step']:8.2f}" if r["ms_per_step"] else "       -"
            sp = f"{r['speedup_vs_dense']:8.2f}" if r["speedup_vs_dense"] else "       -"
            print(f"{r['variant']:7s} {r['B']:4d} {r['T']:5d} {tps} {ms} {sp}")
    for t in targets:
        print(f"target {t['what']:40s} need {t['need']:.2f} got {t['got']:.2f} {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
