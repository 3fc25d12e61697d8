"""Pieces the pytest-benchmark suite, the end-to-end scripts and the leaderboard share beyond bench/common.py.

Importing this module loads nothing but the standard library; torch and the optional comparators are
imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# ---- the GPT-2 bar (SPEC §12): the reference speedrun's published figures, not measurements of ours ----------
RECORD_HOURS = 1.65  # nanochat d24, ratio 8, fp8 matmuls, 8xH100, March 2026 leaderboard
RECORD_GPUS = 8
RECORD_TOK_S_PER_GPU = 122.9e3
RECORD_CORE = 0.256525  # GPT-2 (1.5B) on DCLM CORE
RECORD_LABEL = "nanochat reference: d24, ratio 8, fp8 matmuls, 8xH100, March 2026"


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def optional_attr(module: str, name: str):
    """``module.name``, or None when that module or name does not exist (an op that has not landed yet).
    A module that exists but fails to import raises, rather than passing for a missing op."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise
    return getattr(mod, name, None)


def load_json(path: Path) -> dict:
    """A result file as a dict; ValueError with the path when it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


# ---- Liger-Kernel's nearest ops, adapted to our signatures (None when liger_kernel is not importable) ---------
def _liger_functional():
    from bench.common import load_liger

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
    from bench.common import load_liger

    mod = load_liger("liger_kernel.ops.relu_squared")
    op = getattr(mod, "LigerReLUSquaredFunction", None) if mod is not None else None
    if op is None:
        return None
    import torch.nn.functional as F

    def fn(x, w_fc, w_proj):
        h = _first(op.apply(F.linear(x, w_fc.to(x.dtype))))
        return F.linear(h, w_proj.to(x.dtype))

    return fn


# ---- the pytest-benchmark harness (bench/conftest.py wires it into pytest) -----------------------------------
class BenchState:
    """What one pytest run measured: medians per (group, impl), the ceilings, and the rows for the summary."""

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
                for other, t in mine.items():
                    if other != info["impl"]:
                        info[f"speedup_vs_{other}"] = t / mine[info["impl"]]

    def summary_lines(self) -> list[str]:
        lines = []
        if self.ceilings:
            lines.append("ceilings: " + ", ".join(f"{k} {v:,.0f}" for k, v in self.ceilings.items()))
        for r in self.rows:
            rate = f"{r['gbps']:8.0f} GB/s" if "gbps" in r else f"{r['tflops']:6.1f} TFLOP/s"
            frac = f" {100 * r['ceiling_fraction']:5.1f}% of ceiling" if "ceiling_fraction" in r else ""
            vs = " ".join(f"x{v:.2f} vs {k[len('speedup_vs_'):]}" for k, v in r.items() if k.startswith("speedup_vs_"))
            lines.append(f"{r['group']:48s} {r['impl']:14s} {r['median_ms']:9.3f} ms {rate}{frac}  {vs}")
        return lines


class KernelBench:
    """One test's handle: where to run (device, dtype; full shapes when timing) and ``run`` to time a callable.

    get_benchmark: returns the pytest-benchmark fixture (called only when timing)."""

    def __init__(self, state: BenchState, get_benchmark, device=None) -> None:
        import torch

        self._state, self._get_benchmark = state, get_benchmark
        self.timing = state.timing
        self.device = torch.device(device or ("cuda" if self.timing else "cpu"))
        # The interpreter multiplies bf16 bit patterns in tl.dot, so the smoke runs in fp32.
        self.dtype = torch.bfloat16 if self.timing else torch.float32

    def generator(self, seed: int):
        import torch

        return torch.Generator(device=self.device).manual_seed(seed)

    def ceiling(self, name: str, value: float) -> None:
        self._state.ceilings[name] = value

    def run(self, step, *, group: str, impl: str, work: tuple[str, float], formula: str, **info) -> float | None:
        """Timing: warm up, measure the extra peak memory of one call, then time ``step`` + synchronize with
        pytest-benchmark and record rate, fraction of ceiling and ratios in its extra_info; returns the median
        seconds. Smoke: nothing more (the caller has run ``step`` once, checking its result); returns None."""
        if not self.timing:
            return None
        import torch

        cuda = self.device.type == "cuda"
        for _ in range(2):  # compile, autotune and fill caches outside the timed region
            step()
        sync(self.device)
        extra = {"impl": impl}
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(self.device)
            extra["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        bench = self._get_benchmark()
        bench.group = group
        bench(lambda: (step(), sync(self.device)))
        if getattr(bench, "stats", None) is None:  # --benchmark-disable: pytest-benchmark ran it once, untimed
            return None
        median = float(bench.stats.stats.median)
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
        bench.extra_info.update(extra)
        self._state.rows.append({"group": group, **extra})
        return median
