"""Compile every kernel config the launchers can pick at the speedrun shapes for a GPU architecture, on any machine.

    python -m bench.compile_report                  # sm_90, bf16, launcher picks + every autotune candidate
    python -m bench.compile_report --dtype fp32     # the other dtype the kernels accept
    python -m bench.compile_report --picks-only     # only what the launchers pick themselves (no autotune candidates)
    python -m bench.compile_report --arch 80        # Ampere (A100): the same plans less the TMA ones
    python -m bench.compile_report --family flash_attention --out ''   # one op's plans, no record written

No GPU is needed: Triton compiles for `GPUTarget("cuda", arch, 32)` on the CPU, and the cuobjdump bundled in the
Triton wheel reads the cubin's registers and stack (spill) bytes. Each plan below is derived from the project's own
launch code: the meta-parameter functions of the launchers (`_meta`, `_tile`, `_syrk_config`, ...) and the
autotune spaces (`kernels.attention.autotune_space`, `kernels.matmul.tune_configs`), at the shapes of KERNELS.md
(depth 24: C = 1536, 12 heads of 128; depth 12/26 widths; V = 32768; the Muon stacks; decode at batch 32, context
2048), specialized as a real launch is (16-byte aligned pointers, integers equal to 1 or divisible by 16).

Recorded per plan: compile success and seconds, shared memory (bytes) against the architecture's per-block limit,
registers, stack bytes (> 0: registers spilled to local memory), and for kernels with a `tl.dot` whether the PTX
holds warpgroup MMA (`wgmma`, sm_90) or `mma.sync`. Each compile is stopped after --timeout seconds (default 60).
Violations: a failed compile or one stopped by the timeout, shared memory over the limit, a bf16 dot kernel
with tiles of 64 rows or more that does not use `wgmma` on sm_90, and with --fail-on-spill
(what CI runs) any spilled register. Writes bench/results/compile_report_sm{arch}_{dtype}.json and .md; exits 1 on a
violation. A plan that asks for TMA (the persistent GEMM's host-side descriptors) must show cp.async.bulk.tensor.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tritonchat.bench.common import RESULTS_DIR

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)
SLOW_COMPILE_S = 60.0  # a plan that has not finished compiling by then is stopped and counted as a violation
# An integer argument the plan does not name takes this value: the speedrun shapes' sizes and strides are multiples
# of 16 (C = 1536, D = 128, T = 2048, N = 32768, V = 32768), which Triton specializes as 16-divisible.
DEFAULT_INT = 4096


@dataclass
class Plan:
    family: str  # the op, as KERNELS.md names it
    module: str  # kernels.<module>
    kernel: str  # the @triton.jit function's name in that module
    label: str  # what the launcher launches it for (shape, config name)
    consts: dict  # constexpr values
    ptrs: dict  # pointer argument -> element type ("bf16", "fp32", "i32", "i64")
    floats: tuple = ()  # float scalar arguments (all other scalars are i32)
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = False  # the kernel calls tl.dot
    rows: int = 0  # the dot tile's row count (wgmma needs >= 64)
    autotune: bool = False  # a candidate of an autotune space, rather than the launcher's own pick
    tma: bool = False  # host-side TMA descriptors: the PTX must hold TMA copies
    ints: dict = field(default_factory=dict)  # integer arguments' values at the shape (others: DEFAULT_INT)


def _tl(dtype: str):
    import triton.language as tl

    return {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]


def plans(dtype: str = "bf16", picks_only: bool = False, families: tuple[str, ...] = (), arch: int = 90) -> list[Plan]:
    """Every launch the kernels/ launchers make at the speedrun shapes in `dtype` (activations) on sm_`arch`, as
    plans; only the plans of `families` (Plan.family names) when given."""
    import torch
    import triton

    att = importlib.import_module("tritonchat.kernels.attention")
    mm = importlib.import_module("tritonchat.kernels.matmul")
    gr = importlib.import_module("tritonchat.kernels.gram")
    pa = importlib.import_module("tritonchat.kernels.paged_attention")
    mu = importlib.import_module("tritonchat.kernels.muon")
    rms = importlib.import_module("tritonchat.kernels.rms_norm")
    rope = importlib.import_module("tritonchat.kernels.rope")
    from tritonchat.kernels._launch import num_warps_for

    out: list[Plan] = []
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    dot_consts = {"DOT_DTYPE": _tl(dtype), "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    n_tok = 32768  # 16 x 2048 tokens

    # RMSNorm and the mixed residual entry (kernels/rms_norm.py: _meta)
    for c in (768, 1536, 1664):
        _, meta = rms._meta(n_tok, c)
        warps = meta.pop("num_warps")
        for mix in (False, True):
            ptrs = {"X": dtype, "X0": dtype, "A": "fp32", "B": "fp32", "H": dtype, "Y": dtype, "RSTD": "fp32"}
            out.append(Plan("rms_norm", "kernels.rms_norm", "_rms_norm_fwd_kernel", f"C={c} mix={mix}",
                            {"MIX": mix, **meta}, ptrs, ("eps",), warps))
            ptrs = {"DY": dtype, "DH": dtype, "Y": dtype, "X": dtype, "X0": dtype, "A": "fp32", "B": "fp32",
                    "RSTD": "fp32", "DX": dtype, "DX0": dtype, "PART": "fp32"}
            out.append(Plan("rms_norm", "kernels.rms_norm", "_rms_norm_bwd_kernel", f"C={c} mix={mix}",
                            {"MIX": mix, **meta}, ptrs, (), warps))

    # RoPE + QK-norm (kernels/rope.py: _meta), heads of 128
    for h in (6, 12, 13):
        meta = rope._meta(h, h, 64)
        warps = meta.pop("num_warps")
        for norm, has_k, transpose in ((True, True, False), (False, False, False), (False, False, True)):
            ptrs = {n: dtype for n in ("Q", "K", "QO", "KO")}
            ptrs.update(COS=dtype, SIN=dtype, QRSTD="fp32", KRSTD="fp32")
            out.append(Plan("rope_qk_norm", "kernels.rope", "_rope_fwd_kernel",
                            f"H={h} norm={norm} transpose={transpose}",
                            {"HALF": 64, "HAS_K": has_k, "NORM": norm, "TRANSPOSE": transpose, **meta}, ptrs,
                            ("scale", "eps"), warps, ints={"H": h, "HKV": h, "sc_b": 0, "ss_b": 0}))
        ptrs = {n: dtype for n in ("DQO", "DKO", "QO", "KO", "COS", "SIN", "DQ", "DK")}
        ptrs.update(QRSTD="fp32", KRSTD="fp32")
        out.append(Plan("rope_qk_norm", "kernels.rope", "_rope_qk_norm_bwd_kernel", f"H={h}",
                        {"HALF": 64, **meta}, ptrs, ("scale",), warps, ints={"H": h, "HKV": h, "sc_b": 0, "ss_b": 0}))

    # softcapped cross-entropy rows (kernels/cross_entropy.py: ce_rows), V = 32768
    block_v = min(triton.next_power_of_2(32768), 4096)
    for grad in (False, True):
        out.append(Plan("linear_softcap_ce", "kernels.cross_entropy", "_softcap_ce_kernel", f"V=32768 grad={grad}",
                        {"HAS_SOFTCAP": True, "COMPUTE_GRAD": grad, "ROW_SCALE": False, "BLOCK_V": block_v},
                        {"LOGITS": dtype, "GRAD": dtype, "TARGETS": "i64", "LOSS": "fp32", "SCALE": "fp32"},
                        ("softcap",), num_warps_for(block_v, lo=4, hi=8), ints={"ignore_index": -1}))

    # the ReLU^2 GEMM (kernels/matmul.py): every autotune candidate, every epilogue and layout the MLP uses
    for name in mm.tune_configs(torch_dtype, arch // 10):
        cfg = mm.GEMM_CONFIGS[name]
        for epilogue, trans_b, label in ((1, True, "fwd relu2 x W_fc^T"), (2, False, "bwd relu2_grad dy W_proj")):
            consts = {"EPILOGUE": epilogue, **dot_consts, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
            if cfg.tma:  # host-side descriptors: their block shapes are part of the kernel's signature
                bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
                cn = bn // 2 if epilogue == 2 else bn  # the AUX epilogue's C/AUX blocks are column halves
                desc = {"a_desc": f"tensordesc<{dtype}[{bm}, {bk}]>",
                        "b_desc": f"tensordesc<{dtype}[{bn}, {bk}]>" if trans_b else f"tensordesc<{dtype}[{bk}, {bn}]>",
                        "c_desc": f"tensordesc<{dtype}[{bm}, {cn}]>", "aux_desc": f"tensordesc<{dtype}[{bm}, {cn}]>"}
                out.append(Plan("relu2_mlp", "kernels.matmul", "_gemm_tma_kernel", f"{name} {label}",
                                {**consts, "TRANS_B": trans_b}, desc, (), cfg.num_warps, cfg.num_stages, True,
                                cfg.block_m, True, True, ints={"num_programs": 132}))
                continue
            unit = {"stride_bk": 1} if trans_b else {"stride_bn": 1}  # b = W_fc (N, K) read as b^T, or W_proj
            out.append(Plan("relu2_mlp", "kernels.matmul", "_gemm_kernel", f"{name} {label}",
                            {**consts, "EVEN_K": True}, {"A": dtype, "B": dtype, "C": dtype, "AUX": dtype}, (),
                            cfg.num_warps, cfg.num_stages, True, cfg.block_m, True, ints=unit))

    # flash attention (kernels/attention.py): every candidate of the autotune space, D = 128, causal + window
    for kind, kernel, held_is_m in (("fwd", "attn_fwd_kernel", True), ("dq", "attn_bwd_dq_kernel", True),
                                    ("dkdv", "attn_bwd_dkdv_kernel", False)):
        for name in att.autotune_space(kind, torch_dtype, arch // 10):
            _, _, warps, stages = att.ATTENTION_CONFIGS[name]
            blocks = att._blocks(name, held_is_m)
            consts = {"GROUP": 1, "CAUSAL": True, "WINDOWED": True, "HEAD_DIM": 128, "BLOCK_D": 128, **blocks,
                      **dot_consts}
            ptrs = {n: dtype for n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")}
            ptrs.update(LSE="fp32", DELTA="fp32")
            out.append(Plan("flash_attention", "kernels.flash_attention_kernels", kernel, f"{kind} {name}", consts,
                            ptrs, ("qk_scale", "sm_scale"), warps, stages, True, blocks["BLOCK_M"], True,
                            ints={"H": 12, "Hkv": 12, "window": 512}))
    out.append(Plan("flash_attention", "kernels.flash_attention_kernels", "attn_bwd_delta_kernel", "delta",
                    {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": att._DELTA_BLOCK},
                    {"Out": dtype, "DO": dtype, "DELTA": "fp32"}, ints={"H": 12}))

    # Polar Express: the symmetric products (kernels/gram.py: _syrk_config) on the Muon stacks
    for m, kd in ((1536, 1536), (1536, 6144), (12, 12)):
        bm, bk, warps, stages = gr._syrk_config(m, kd, torch_dtype, True)
        for has_d in (False, True):
            out.append(Plan("polar_express", "kernels.gram", "_syrk_kernel", f"m={m} k={kd} has_d={has_d}",
                            {"HAS_D": has_d, **dot_consts, "BLOCK_M": bm, "BLOCK_K": bk},
                            {"x_ptr": dtype, "d_ptr": dtype, "c_ptr": dtype}, ("alpha", "beta"), warps, stages,
                            True, bm, ints={"m": m, "kd": kd, "stride_xn": 1, "stride_dn": 1, "stride_xm": kd,
                                            "stride_dm": m}))
    # its Frobenius normalization (kernels/polar_express.py) and the Muon steps around it (kernels/muon.py)
    chunk = 1 << 14
    out.append(Plan("polar_express", "kernels.polar_express", "_sumsq_partial_kernel", "frob partials",
                    {"CHUNK": chunk, "BLOCK": 1024}, {"x_ptr": dtype, "part_ptr": "fp32"},
                    ints={"numel": 1536 * 1536, "n_parts": 144}))
    out.append(Plan("polar_express", "kernels.polar_express", "_frob_scale_kernel", "frob scale",
                    {"CHUNK": chunk, "BLOCK": 1024, "BLOCK_P": 1024}, {"x_ptr": dtype, "part_ptr": "fp32",
                                                                       "y_ptr": dtype},
                    ints={"numel": 1536 * 1536, "n_parts": 144}))
    for m, n in ((1536, 1536), (6144, 1536), (1536, 6144)):
        bc, br = mu._tile(n, m, True)
        pre = {"g_ptr": "fp32", "buf_ptr": "fp32", "rowsq_ptr": "fp32", "part_ptr": "fp32"}
        mn = {"m": m, "n": n, "n_parts": triton.cdiv(m, br)}
        out.append(Plan("muon", "kernels.muon", "_nesterov_kernel", f"{m}x{n}", {"BLOCK_R": br, "BLOCK_C": bc}, pre,
                        ("w_buf", "w_g"), mu._TILE_WARPS, ints=mn))
        out.append(Plan("muon", "kernels.muon", "_equilibrate_kernel", f"{m}x{n}",
                        {"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_P": triton.next_power_of_2(triton.cdiv(m, br))},
                        {**pre, "x_ptr": dtype}, ("w_g", "sqrt_m"), mu._TILE_WARPS, ints=mn))
        row_lines = m >= n
        L, R = (m, n) if row_lines else (n, m)
        bc2, bo = mu._tile(R if row_lines else L, L if row_lines else R, True)
        bl, br2 = (bo, bc2) if row_lines else (bc2, bo)
        lines = {"L": L, "R": R, "stride_l": n if row_lines else 1, "stride_r": 1 if row_lines else n}
        out.append(Plan("muon", "kernels.muon", "_line_sumsq_kernel", f"{m}x{n}", {"BLOCK_L": bl, "BLOCK_R": br2},
                        {"x_ptr": dtype, "q_ptr": "fp32", "lmax_ptr": "fp32"}, ints=lines))
        out.append(Plan("muon", "kernels.muon", "_normuon_kernel", f"{m}x{n}",
                        {"BLOCK": min(1024, triton.next_power_of_2(L))},
                        {n_: "fp32" for n_ in ("q_ptr", "lmax_ptr", "buf2_ptr", "coef_ptr", "ratio_ptr")},
                        ("sqrt_min", "w2"), ints=lines))
        out.append(Plan("muon", "kernels.muon", "_cautious_update_kernel", f"{m}x{n}",
                        {"ROW_LINES": row_lines, "BLOCK": mu._elementwise_block(m * n, True)},
                        {"x_ptr": dtype, "p_ptr": "fp32", "coef_ptr": "fp32", "ratio_ptr": "fp32"},
                        ("lr_eff", "lr_wd"), ints={"numel": m * n, "n": n, "L": L}))
    out.append(Plan("muon", "kernels.muon", "_adamw_kernel", "adamw", {"BLOCK": mu._elementwise_block(1 << 20, True)},
                    {"p_ptr": "fp32", "g_ptr": "fp32", "m_ptr": "fp32", "v_ptr": "fp32"},
                    ("decay", "w1", "w2", "bc2", "step_size", "eps")))

    # paged decode attention (kernels/paged_attention.py: _paged_attention_triton) at batch 32, context 2048
    for group, tq, splits in ((1, 1, 4), (1, 1, 1), (4, 1, 4), (1, 16, 1)):
        block_m, block_n = pa.decode_tiles(tq * group, 128, torch_dtype, arch // 10)
        ptrs = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "BT": "i32", "SEQ": "i32", "QLEN": "i32",
                "OP": "fp32", "LP": "fp32"}
        out.append(Plan("paged_attention", "kernels.paged_attention", "_paged_attention_kernel",
                        f"group={group} Tq={tq} splits={splits}",
                        {"GROUP": group, "HEAD_DIM": 128, "BLOCK_D": 128, "PAGE_SIZE": 16, "BLOCK_M": block_m,
                         "BLOCK_N": block_n, "NUM_SPLITS": splits, **dot_consts}, ptrs, ("qk_scale",), 4, 3, True,
                        block_m,
                        ints={"window": 1 << 30, "n_kv_heads": 12 // group, "Tq": tq, "stride_qt": 12 * 128,
                              "stride_ot": 12 * 128}))
    out.append(Plan("paged_attention", "kernels.paged_attention", "_combine_kernel", "splits=4",
                    {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 4, "BLOCK_S": 4},
                    {"OP": "fp32", "LP": "fp32", "Out": dtype, "QLEN": "i32"}, ints={"Tq": 1, "n_q_heads": 12}))
    out.append(Plan("paged_attention", "kernels.paged_attention", "_append_kernel", "Hkv*D=1536",
                    {"ROW": 1536, "BLOCK": 2048}, {"KN": dtype, "VN": dtype, "KP": dtype, "VP": dtype,
                                                   "SLOTS": "i64"}))
    return [p for p in out if not (picks_only and p.autotune) and (not families or p.family in families)]


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


class CompileTimeout(Exception):
    """A plan did not finish compiling in time."""


def _alarm(seconds: float):
    """A context that raises CompileTimeout in this (main) thread after ``seconds``; the ptxas child that Triton
    waits for is killed by subprocess.run as the exception passes. A no-op off the main thread or off POSIX."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def ctx():
        if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            yield
            return

        def fire(signum, frame):
            raise CompileTimeout(f"did not finish compiling within {seconds:g} s")

        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return ctx()


def compile_plan(plan: Plan, arch: int = 90, timeout: float = SLOW_COMPILE_S) -> dict:
    """Compile one plan, stopping it after ``timeout`` seconds; returns its record (see the module docstring)."""
    rec = {**asdict(plan), "consts": {k: str(v) for k, v in plan.consts.items()}, "arch": arch}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"tritonchat.{plan.module}"), plan.kernel)
    # Specialize as a real launch would: pointers from torch are 16-byte aligned; an int equal to 1 becomes a
    # constexpr, one divisible by 16 gets that hint (what lets Triton vectorize loads and pipeline them).
    sig, consts, attrs = {}, dict(plan.consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in plan.consts:
            sig[name] = "constexpr"
        elif name in plan.ptrs and plan.ptrs[name].startswith("tensordesc"):
            sig[name] = plan.ptrs[name]  # a host-side TMA descriptor
        elif name in plan.ptrs:
            sig[name] = "*" + plan.ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in plan.floats:
            sig[name] = "fp32"
        else:
            value = plan.ints.get(name, DEFAULT_INT)
            if value == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    try:
        with _alarm(timeout):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})
    except CompileTimeout as e:
        rec.update(ok=False, timed_out=True, error=str(e), seconds=round(time.perf_counter() - start, 2))
        return rec
    except Exception as e:  # noqa: BLE001 - a compile failure is a finding, recorded with its message
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}", seconds=time.perf_counter() - start)
        return rec
    rec["seconds"] = round(time.perf_counter() - start, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ptx = k.asm["ptx"]
    rec.update(ok=True, error=None, shared=k.metadata.shared, regs=int(regs.group(1)) if regs else None,
               spill_bytes=int(stack.group(1)) if stack else None, wgmma="wgmma.mma_async" in ptx,
               mma="mma.sync" in ptx or "wgmma.mma_async" in ptx, tma_used="cp.async.bulk.tensor" in ptx)
    return rec


def violations(rec: dict, fail_on_spill: bool = False) -> list[str]:
    """What is wrong with one compiled plan (empty: nothing)."""
    if rec.get("ok") is None:
        return []
    if not rec["ok"]:
        return [rec["error"] if rec.get("timed_out") else "compile failed"]
    bad = []
    if rec["seconds"] > SLOW_COMPILE_S:  # (a timeout below this limit stops a compile before it gets here)
        bad.append(f"compile took {rec['seconds']:.0f} s")
    limit = SHARED_LIMIT.get(rec["arch"])
    if limit and rec["shared"] > limit:
        bad.append(f"shared memory {rec['shared']} > {limit}")
    dtype_bf16 = "bfloat16" in rec["consts"].get("DOT_DTYPE", "")
    if rec["dot"] and rec["arch"] >= 90 and dtype_bf16 and rec["rows"] >= 64 and not rec["wgmma"]:
        bad.append("bf16 dot with >= 64-row tiles without wgmma")
    if rec["tma"] and not rec["tma_used"]:
        bad.append("asks for TMA but the PTX has no cp.async.bulk.tensor")
    if fail_on_spill and rec["spill_bytes"]:
        bad.append(f"spills {rec['spill_bytes']} bytes")
    return bad


def reachable(todo: list[Plan], arch: int) -> list[Plan]:
    """The plans a launcher can pick on ``arch``: no TMA config below sm_90 (kernels.matmul checks the capability)."""
    return [p for p in todo if arch >= 90 or not p.tma]


def run(dtype: str = "bf16", arch: int = 90, picks_only: bool = False, workers: int | None = None,
        families: tuple[str, ...] = (), timeout: float = SLOW_COMPILE_S) -> list[dict]:
    """Compile every reachable plan (in worker processes: ptxas and the MLIR passes are CPU-bound)."""
    todo = reachable(plans(dtype, picks_only, families, arch), arch)
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    # Fresh processes with the interpreter off: Triton decides when a kernel module is imported whether its kernels
    # are interpreted, and this process may have imported kernels/ under TRITON_INTERPRET=1 (the test suite does).
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # for the workers, which start as tasks arrive
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(compile_plan, todo, [arch] * len(todo), [timeout] * len(todo)))
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def table(records: list[dict], fail_on_spill: bool = False) -> str:
    lines = ["| family | kernel | launch | warps/stages | ok | s | shared KiB | regs | spill B | wgmma | issues |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cfg = f"{r['num_warps']}/{r['num_stages']}"
        if r.get("ok") is None:
            lines.append(f"| {r['family']} | {r['kernel']} | {r['label']} | {cfg} | - | | | | | | {r['error']} |")
            continue
        issues = "; ".join(violations(r, fail_on_spill)) or ("spills" if r.get("spill_bytes") else "")
        if not r["ok"]:
            lines.append(f"| {r['family']} | {r['kernel']} | {r['label']} | {cfg} | no | | | | | | {issues} |")
            continue
        wg = ("yes" if r["wgmma"] else "mma.sync" if r["mma"] else "no") if r["dot"] else ""
        wg += " + TMA" if r.get("tma_used") else ""
        lines.append(f"| {r['family']} | {r['kernel']} | {r['label']} | {cfg} | yes | {r['seconds']:.1f} | "
                     f"{r['shared'] / 1024:.1f} | {r['regs']} | {r['spill_bytes']} | {wg} | {issues} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                   help="compute capability (90: Hopper, 80: Ampere)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="activation dtype of the plans")
    p.add_argument("--picks-only", action="store_true", help="skip the autotune candidates")
    p.add_argument("--family", action="append", default=[],
                   help="only this op's plans (a Plan.family such as flash_attention; repeatable)")
    p.add_argument("--fail-on-spill", action="store_true", help="count register spills as violations")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and markdown record ('' : none)")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--timeout", type=float, default=SLOW_COMPILE_S,
                   help="seconds after which a plan's compile is stopped (a violation)")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        p.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    start = time.perf_counter()
    records = run(args.dtype, args.arch, args.picks_only, args.workers, tuple(args.family), args.timeout)
    wall = time.perf_counter() - start
    bad = {f"{r['kernel']} [{r['label']}]": v for r in records if (v := violations(r, args.fail_on_spill))}
    spills = [r for r in records if r.get("spill_bytes")]
    summary = {"arch": args.arch, "dtype": args.dtype, "plans": len(records), "wall_s": round(wall, 1),
               "compiled": sum(1 for r in records if r.get("ok")),
               "failed": sum(1 for r in records if r.get("ok") is False),
               "timed_out": sum(1 for r in records if r.get("timed_out")),
               "not_compiled": sum(1 for r in records if r.get("ok") is None), "spilling": len(spills),
               "violations": bad}
    if args.out:
        from tritonchat.bench.common import environment

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = (f"compile_report_sm{args.arch}_{args.dtype}" + ("_picks" if args.picks_only else "")
                + "".join(f"_{f}" for f in args.family))
        (out / f"{stem}.json").write_text(json.dumps({"summary": summary, "environment": environment(),
                                                       "records": records}, indent=1, default=str))
        (out / f"{stem}.md").write_text(f"# Compile report: sm_{args.arch}, {args.dtype}\n\n"
                                        f"{json.dumps({k: v for k, v in summary.items() if k != 'violations'})}\n\n"
                                        f"{table(records, args.fail_on_spill)}\n")
    print(table(records, args.fail_on_spill))
    print(f"\n{summary['plans']} plans, {summary['compiled']} compiled, {summary['failed']} failed, "
          f"{summary['not_compiled']} not compiled here, {summary['spilling']} spilling, "
          f"{len(bad)} with violations, {wall:.0f} s")
    for name, v in bad.items():
        print(f"VIOLATION {name}: {'; '.join(v)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

