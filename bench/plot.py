"""PNG charts from the result files: kernel speedups, achieved vs ceiling, and training tok/s across depths.

    python -m bench.plot                          # reads bench/results/, writes bench/results/plots/*.png
    python -m bench.plot --kernels FILE.json      # a given kernels result instead of the newest one

    speedup.png   each kernel case's Triton speedup over every baseline (eager, torch.compile, Liger, ...), from
                  the newest kernels result (bench/results/kernels_*.json, written by `python -m bench.suite` and
                  by `pytest bench/ --benchmark`)
    ceiling.png   roofline-style: each implementation's achieved GB/s over the measured copy bandwidth
                  (memory-bound cases) or TFLOP/s over the measured cuBLAS bf16 rate (matmul-bound cases)
    depths.png    tokens/s per GPU of full training steps against depth, one line per device, variant and
                  micro-batch (the newest bench.train_step result for each depth)
matplotlib is imported only to draw (pip install matplotlib); the data extraction works without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonchat.bench.common import RESULTS_DIR, load_json


# ---- data (pure) ---------------------------------------------------------------------------------------------
def newest_kernel_run(results_dir: Path) -> Path | None:
    """The newest kernels result under results_dir (by its environment's time)."""
    found = []
    for path in Path(results_dir).glob("kernels_*.json"):
        try:
            r = load_json(path)
        except ValueError:
            continue
        if r.get("name") == "kernels":
            found.append((str(r.get("env", {}).get("time_utc", "")), path))
    return max(found)[1] if found else None


def _rows(kernel_run: dict | None) -> list[dict]:
    return [r for r in (kernel_run or {}).get("rows", []) if isinstance(r, dict)]


def speedups(kernel_run: dict | None) -> list[tuple[str, str, float]]:
    """(case, baseline, speedup of triton over it) from a kernels result."""
    out = []
    for r in _rows(kernel_run):
        if r.get("impl") == "triton":
            for key, v in sorted(r.items()):
                if key.startswith("speedup_vs_") and isinstance(v, (int, float)):
                    out.append((str(r.get("group", "?")), key[len("speedup_vs_"):], float(v)))
    return out


def ceiling_fractions(kernel_run: dict | None) -> list[tuple[str, str, float, str]]:
    """(case, impl, achieved / ceiling, "bytes" or "flops") for every timed case that had a ceiling."""
    out = []
    for r in _rows(kernel_run):
        if isinstance(r.get("ceiling_fraction"), (int, float)):
            kind = "bytes" if "gbps" in r else "flops"
            out.append((str(r.get("group", "?")), str(r.get("impl", "?")), float(r["ceiling_fraction"]), kind))
    return out


def depth_series(train_results: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """"device / variant B=b" -> [(depth, tok/s per GPU)] sorted by depth, the newest result per depth."""
    newest: dict[tuple, tuple[str, float]] = {}
    for r in train_results:
        env = r.get("env", {})
        for run in r.get("runs", []):
            if isinstance(run.get("tok_s_per_gpu"), (int, float)) and isinstance(r.get("depth"), int):
                key = (f"{env.get('device', '?')} / {run.get('variant')} B={run.get('batch')}", r["depth"])
                stamp = str(env.get("time_utc", ""))
                if key not in newest or stamp > newest[key][0]:
                    newest[key] = (stamp, float(run["tok_s_per_gpu"]))
    series: dict[str, list[tuple[int, float]]] = {}
    for (label, depth), (_, tok_s) in sorted(newest.items()):
        series.setdefault(label, []).append((depth, tok_s))
    return series


def load_results(results_dir: Path) -> list[dict]:
    """The train_step results under results_dir (not recursive)."""
    train = []
    for path in sorted(Path(results_dir).glob("train_step_*.json")):
        try:
            r = load_json(path)
        except ValueError:
            continue
        if r.get("name") == "train_step":
            train.append(r)
    return train


# ---- drawing -------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.plot needs matplotlib to draw: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw_speedups(rows, path: Path) -> None:
    plt = _pyplot()
    labels = [f"{case}  vs {base}" for case, base, _ in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [v for _, _, v in rows], color=["tab:green" if v >= 1 else "tab:red" for *_, v in rows])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the Triton kernel (baseline time / Triton time)")
    ax.set_title("Triton kernels against each baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_ceilings(rows, path: Path) -> None:
    plt = _pyplot()
    labels = [f"{case}  [{impl}]" for case, impl, _, _ in rows]
    colors = ["tab:blue" if kind == "bytes" else "tab:orange" for *_, kind in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [100 * f for _, _, f, _ in rows], color=colors)
    ax.axvline(100, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of ceiling (blue: GB/s over copy bandwidth; orange: TFLOP/s over cuBLAS bf16)")
    ax.set_title("Achieved vs ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_depths(series, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        ax.plot([d for d, _ in points], [t for _, t in points], marker="o", label=label)
    ax.set_xlabel("depth")
    ax.set_ylabel("training tokens/s per GPU")
    ax.set_title("Full training steps (forward, backward, MuonAdamW)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)")
    p.add_argument("--kernels", type=Path, default=None, help="a kernels result JSON (default: the newest)")
    p.add_argument("--out", type=Path, default=None, help="where the PNGs go (default <results>/plots)")
    args = p.parse_args(argv)
    out = args.out or args.results / "plots"
    kernel_path = args.kernels or newest_kernel_run(args.results)
    kernel_run = load_json(kernel_path) if kernel_path else None
    train = load_results(args.results)
    charts = [("speedup.png", speedups(kernel_run), draw_speedups, "kernel speedups"),
              ("ceiling.png", ceiling_fractions(kernel_run), draw_ceilings, "timed kernel cases with ceilings"),
              ("depths.png", depth_series(train), draw_depths, "train_step results")]
    if not any(rows for _, rows, _, _ in charts):
        print(f"bench.plot: no results to plot under {args.results} (run the benchmarks on a GPU first)")
        return 0
    _pyplot()  # fail early, with the install hint, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, draw, what in charts:
        if rows:
            draw(rows, out / name)
            print(f"wrote {out / name}")
        else:
            print(f"{name}: skipped, no {what} found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
