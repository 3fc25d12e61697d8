"""The budgeted GPU run: every figure the project needs from a few minutes of GPU time, in priority order.

    python -m bench.suite --budget 420          # on a CUDA GPU: all four parts within 420 s
    python -m bench.suite --parts check,kernels # some parts only
    python -m bench.suite --estimate            # how long each part would take on a GPU (from the compile report)
    python -m bench.suite --dry-run --out DIR   # the whole run on CPU: tiny shapes, fp32, Triton in the interpreter

Parts, in this order, each writing its result file under bench/results/ as soon as it finishes:
    check     every kernel case of bench/cases.py (fwd and fwd+bwd) against its eager reference at the speedrun
              shapes in bf16: relative errors against the case's tolerance (result `kernel_check`)
    kernels   the ceilings (copy bandwidth, cuBLAS bf16), then every case timed for every implementation: eager,
              torch.compile, Liger-Kernel when importable, ours (result `kernels`, as `pytest bench/ --benchmark`)
    train     full depth-24 training steps, ours against the compiled reference: tok/s, MFU, projected time to
              GPT-2 (result `train_step`, as `python -m bench.train_step`; the leaderboard takes it)
    infer     the engine's prefill and decode, ours against the reference paths (result `infer`)
Before each unit of work (one case, one part) the suite compares its estimated cost with the time left and skips
what does not fit, saying so; a hard stop a few seconds before the budget ends the unit in progress, and the
files of the finished parts stay. It prints the ratios and the KERNELS.md targets met, missed or not measured
last. Exit status: 0 when everything that ran was correct, 1 when a check failed or a part raised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tritonchat.bench.common import RESULTS_DIR, write_result

PARTS = ("check", "kernels", "train", "infer")
# Estimated GPU seconds per unit (H100-class, the GPU machine's CPUs compiling): a first torch.compile of a case
# with inductor, a case's other implementations (warm-up + ~0.1 s of do_bench + a peak-memory call), a training
# variant (model build, 2 warm-up + 3 timed depth-24 steps; the compiled one adds its inductor compile), an engine
# variant (build, prefill, 64 decode steps at batch 32).
COST = {"compile": 25.0, "impl": 2.0, "check": 2.0, "train_variant": 45.0, "train_compile": 60.0, "infer_variant": 30.0}
DRY_COST = 5.0  # a dry run's training or engine part (depth 1, interpreter)
RESERVE_S = 10.0  # kept back from the budget for the last result file and the table


class BudgetExceeded(Exception):
    """The budget's hard stop fired while a unit was running."""


class Budget:
    """Time left, with a hard stop (SIGALRM, main thread, POSIX) RESERVE_S before the end."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds - min(RESERVE_S, 0.1 * seconds)
        self.armed = True  # off while a result file is written: the stop never interrupts a write

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, cost: float) -> bool:
        return self.left() >= cost

    @contextlib.contextmanager
    def hard_stop(self):
        if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            yield  # no hard stop there: the per-unit estimates alone keep to the budget
            return

        def fire(signum, frame):
            if self.armed:
                raise BudgetExceeded(f"the budget ran out after {time.monotonic() - self.start:.0f} s")

        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# ---- the parts -------------------------------------------------------------------------------------------------
def part_check(ctx) -> dict:
    from tritonchat.bench import cases as bc

    rows, skipped = [], []
    kb = bc.KernelBench(bc.BenchState(timing=False), device=ctx.device)
    for case in bc.build_cases(kb.full):
        for mode in case.modes:
            label = f"{case.family} {case.label} {mode}"
            if not ctx.budget.fits(COST["check"]):
                skipped.append(f"{label}: budget")
                continue
            row = {"family": case.family, "shape": case.label, "mode": mode, "tol": bc.tolerance(case, kb.dtype)}
            try:
                _, errs = bc.check(case, mode, "triton", kb)
                row.update(errs=errs, max_rel_err=max(errs, default=0.0), ok=max(errs, default=0.0) < row["tol"])
            except bc.Unavailable as e:
                skipped.append(str(e))
                continue
            except BudgetExceeded:
                raise
            except Exception as e:  # one failing kernel must not hide the others' results
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            ctx.say(f"check {label}: " + ("ok" if row["ok"] else "FAILED") +
                    (f" (max rel err {row['max_rel_err']:.2e}, tol {row['tol']:g})" if "max_rel_err" in row else
                     f" ({row.get('error')})"))
            _free(ctx.device)
    return {"dtype": str(kb.dtype), "rows": rows, "skipped": skipped,
            "failed": [f"{r['family']} {r['shape']} {r['mode']}" for r in rows if not r["ok"]]}


def part_kernels(ctx) -> dict:
    from tritonchat.bench import cases as bc

    state = bc.BenchState(timing=True)
    kb = bc.KernelBench(state, device=ctx.device, warmup=0 if ctx.dry_run else 2)
    skipped, errors = [], []
    for what in ("copy", "matmul"):
        step, work, formula = bc.ceiling_case(what, kb)
        median = kb.run(step, group=f"ceiling {what}", impl="torch", work=work, formula=formula, dtype=str(kb.dtype))
        kb.ceiling("copy_gbps" if what == "copy" else "matmul_tflops",
                   work[1] / median / (1e9 if what == "copy" else 1e12))
        del step
    for case in bc.build_cases(kb.full):
        for mode in case.modes:
            group = f"{case.family} {case.label} {mode}"
            for impl in sorted(case.impls, key=bc.ORDER.index):
                if impl == "compile" and ctx.no_compile:
                    skipped.append(f"{group} {impl}: --no-compile")
                    continue
                cost = COST["compile"] if impl == "compile" and kb.full else COST["impl"]
                if not ctx.budget.fits(cost):
                    skipped.append(f"{group} {impl}: budget")
                    continue
                try:
                    step, errs = bc.check(case, mode, impl, kb)
                    median = kb.run(step, group=group, impl=impl, work=case.work(mode), formula=case.formula,
                                    family=case.family, shape=case.label, mode=mode, dtype=str(kb.dtype),
                                    max_rel_err=max(errs, default=0.0))
                    del step
                except bc.Unavailable as e:
                    skipped.append(str(e))
                    continue
                except BudgetExceeded:
                    raise
                except Exception as e:
                    errors.append(f"{group} {impl}: {type(e).__name__}: {e}"[:300])
                    ctx.say(f"kernels {group} {impl}: {errors[-1]}")
                    continue
                finally:
                    _free(ctx.device)
                ctx.say(f"kernels {group} {impl}: {median * 1e3:.3f} ms")
    payload = state.payload()
    payload.update(skipped=skipped, errors=errors)
    if kb.full:  # the targets are about the speedrun shapes on a GPU; a dry run's tiny CPU figures say nothing
        payload["targets"] = bc.evaluate_targets(payload["rows"], ctx.peak_tflops)
    return payload


def part_train(ctx) -> dict:
    from tritonchat.bench import train_step

    variants = ["triton", "eager" if ctx.no_compile else "compile"]
    argv = ["--dry-run", "--warmup=0"] if ctx.dry_run else ["--depth=24", "--batch-sizes=16", "--steps=3", "--warmup=2"]
    args = train_step.parse_args([*argv, f"--variants={','.join(variants)}"])
    cost = COST["train_variant"] * 2 + (COST["train_compile"] if "compile" in variants else 0)
    cost = DRY_COST if ctx.dry_run else cost
    if not ctx.budget.fits(cost):
        return {"skipped": [f"train: budget ({ctx.budget.left():.0f} s left, about {cost:.0f} s needed)"]}
    payload, errors = train_step.run(args)
    payload["errors"] = errors
    train_step.print_table(payload)
    return payload


def part_infer(ctx) -> dict:
    from tritonchat.bench import infer

    argv = ["--dry-run"] if ctx.dry_run else ["--batch=32", "--prompt-len=512", "--gen=64"]
    args = infer.parse_args(argv)
    cost = DRY_COST if ctx.dry_run else COST["infer_variant"] * len(args.variants)
    if not ctx.budget.fits(cost):
        return {"skipped": [f"infer: budget ({ctx.budget.left():.0f} s left, about {cost:.0f} s needed)"]}
    payload = infer.run(args, ctx.device)
    infer.print_table(payload)
    return payload


RUNNERS = {"check": (part_check, "kernel_check"), "kernels": (part_kernels, "kernels"),
           "train": (part_train, "train_step"), "infer": (part_infer, "infer")}


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the estimate (no GPU needed) ------------------------------------------------------------------------------
def estimate(report: dict | None, no_compile: bool = False) -> dict[str, float]:
    """Seconds each part would take on a GPU: the kernels' compile times from the compile report (every autotune
    candidate is compiled once, in the check), plus the per-unit costs of COST for the speedrun-shape cases."""
    from tritonchat.bench import cases as bc

    compile_s = sum(float(r.get("seconds") or 0.0) for r in (report or {}).get("records", []))
    units = [(c, m, i) for c in bc.build_cases(True) for m in c.modes for i in c.impls]
    checks = sum(len(c.modes) for c in bc.build_cases(True))
    n_compile = 0 if no_compile else sum(i == "compile" for _, _, i in units)
    return {
        "check": compile_s + checks * COST["check"],
        "kernels": 2 * COST["impl"] + n_compile * COST["compile"] + (len(units) - n_compile) * COST["impl"],
        "train": 2 * COST["train_variant"] + (0 if no_compile else COST["train_compile"]),
        "infer": 2 * COST["infer_variant"],
    }


# ---- the run -----------------------------------------------------------------------------------------------------
class _Context:
    def __init__(self, args, device, budget: Budget, peak_tflops) -> None:
        self.dry_run, self.no_compile, self.device, self.budget = args.dry_run, args.no_compile, device, budget
        self.peak_tflops = peak_tflops
        self.quiet = args.quiet

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.budget.start:6.1f} s] {line}", flush=True)


def _summary(results: dict[str, dict]) -> list[str]:
    lines = []
    check = results.get("check")
    if check:
        ok = sum(r["ok"] for r in check.get("rows", []))
        lines.append(f"check: {ok}/{len(check.get('rows', []))} cases within tolerance"
                     + (f"; FAILED: {', '.join(check['failed'])}" if check.get("failed") else ""))
    kern = results.get("kernels")
    if kern:
        lines.append("kernels: triton against each baseline (ratio of medians, > 1: ours is faster)")
        for r in kern.get("rows", []):
            if r.get("impl") == "triton":
                vs = "  ".join(f"{k[len('speedup_vs_'):]} x{v:.2f}" for k, v in sorted(r.items())
                               if k.startswith("speedup_vs_"))
                lines.append(f"  {r['group']:58s} {r['median_ms']:9.3f} ms  {vs}")
    train = results.get("train")
    if train and train.get("runs"):
        for r in train["runs"]:
            if "tok_s_per_gpu" in r:
                mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
                lines.append(f"train d{train['depth']} {r['variant']:8s} B={r['batch']}: {r['tok_s_per_gpu']:,.0f} "
                             f"tok/s/GPU, MFU {mfu}, GPT-2 in {r['projected_hours']:.2f} h on {train['gpus']} GPUs")
            else:
                lines.append(f"train d{train['depth']} {r['variant']:8s} B={r['batch']}: {r.get('error')}")
    infer = results.get("infer")
    if infer and infer.get("runs"):
        for r in infer["runs"]:
            dec = "n/a" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:,.0f}"
            lines.append(f"infer d{infer['depth']} {r['variant']:8s}: prefill {r['prefill_tok_s']:,.0f} tok/s, "
                         f"decode {dec} tok/s ({r['decode_ms_per_step']:.2f} ms/step)")
    if kern and "rows" in kern and "targets" not in kern:
        lines.append("KERNELS.md targets: judged on a GPU at the speedrun shapes only (not in a dry run)")
    if kern and kern.get("targets"):
        lines.append("KERNELS.md targets (ours on the speedrun shapes):")
        for t in kern["targets"]:
            verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
            got = "" if t["got"] is None else f" got {t['got']:.3g}"
            op = "<=" if t["what"] == "memory" else ">="
            lines.append(f"  {t['family']:18s} {t['shape']:34s} {t['mode']:8s} {t['what']:18s} {op} {t['need']:.3g}"
                         f"{got}: {verdict}")
    for name, r in results.items():
        for s in r.get("skipped", []) if name != "kernels" else []:
            lines.append(f"{name} skipped: {s}")
        if kern is r and r.get("skipped"):
            lines.append(f"kernels: {len(r['skipped'])} units skipped (see the result file)")
        if r.get("stopped"):
            lines.append(f"{name}: stopped: {r['stopped']}")
        if r.get("error"):
            lines.append(f"{name}: error: {r['error']}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    # Nothing that imports the kernels before main() has chosen the interpreter (--dry-run): Triton decides when
    # a kernel module is imported whether its kernels are interpreted.
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = script if script.startswith("tritonchat-") else "python -m bench.suite"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run, stop included")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, of {', '.join(PARTS)}, run in that order")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (the slowest units)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results; with --dry-run nothing is written unless given)")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, fp32, Triton in the interpreter")
    p.add_argument("--estimate", action="store_true", help="print each part's estimated GPU seconds and exit")
    p.add_argument("--report", type=Path, default=RESULTS_DIR / "compile_report_sm90_bf16.json",
                   help="the compile report --estimate reads")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}; got {bad or 'nothing'}")
    args.parts = [s for s in PARTS if s in parts]
    if not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:
        report = None
        if args.report.exists():
            report = json.loads(args.report.read_text())
        else:
            print(f"bench.suite: no compile report at {args.report}; kernel compile times count as 0")
        est = estimate(report, args.no_compile)
        for name in args.parts:
            print(f"{name:8s} ~{est[name]:6.0f} s")
        print(f"{'total':8s} ~{sum(est[n] for n in args.parts):6.0f} s (budget {args.budget:.0f} s)")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench.suite: no CUDA device here, so nothing was timed; --dry-run exercises the whole run on CPU, "
              "--estimate says how long each part would take on a GPU")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    from tritonchat.train.loop import peak_flops

    peak = peak_flops(device)
    budget = Budget(args.budget)
    ctx = _Context(args, device, budget, None if peak is None else peak / 1e12)
    write = (not args.dry_run) or args.out is not None
    results: dict[str, dict] = {}
    status = 0
    with budget.hard_stop():
        for name in args.parts:
            runner, result_name = RUNNERS[name]
            ctx.say(f"{name}: start ({budget.left():.0f} s left)")
            try:
                results[name] = runner(ctx)
            except BudgetExceeded as e:
                results[name] = {"stopped": str(e)}
                status = 1
            except Exception as e:  # a part that raises must not cost the others their turn
                results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                status = 1
            r = results[name]
            if r.get("failed") or r.get("errors"):
                status = 1
            r["budget_s"], r["elapsed_s"] = args.budget, time.monotonic() - budget.start
            budget.armed = False
            if write:
                path = write_result(result_name, r, args.out)
                ctx.say(f"{name}: wrote {path}")
            budget.armed = True
            if "stopped" in r or budget.left() <= 0:
                break
    print()
    for line in _summary(results):
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
