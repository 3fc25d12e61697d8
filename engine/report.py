"""The report card: `<base>/report.md`, what each stage left in the base directory, rewritten after each stage.

    python -m engine.report                 # write it now (train, base_eval, chat_sft and chat_eval do at their end)

For the newest complete checkpoint of each stage (base_checkpoints, chatsft_checkpoints, chatrl_checkpoints): the
model, the data and batch, the steps and training time, the last validation figure, and the evaluations written
beside it (`core_{step}.json` of scripts.base_eval, `chat_eval_{step}.json` of scripts.chat_eval). With matplotlib
installed, the validation curves of metrics.jsonl are drawn next to it (`report_curves.png`). Everything is read
from files; a stage that has not run is left out.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

STAGES = (("Base model", "base_checkpoints"), ("SFT", "chatsft_checkpoints"), ("RL", "chatrl_checkpoints"))
REPORT = "report.md"
CURVES = "report_curves.png"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics(folder: Path) -> list[dict]:
    out = []
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _stage(title: str, root: Path) -> tuple[list[str], list[tuple[str, list[tuple[int, float]]]]]:
    """Markdown lines for one stage's newest checkpoint, and its validation curve for the chart."""
    from tritonchat.engine.checkpoint import find_latest_checkpoint

    try:
        folder, step = find_latest_checkpoint(root)
    except FileNotFoundError:
        return [], []
    meta = _json(folder / f"meta_{step:06d}.json") or {}
    cfg = meta.get("model_config", {})
    lines = [f"## {title}", "", f"`{folder}`, step {step}", ""]
    rows = [("depth / width / heads", f"{cfg.get('n_layer')} / {cfg.get('n_embd')} / {cfg.get('n_head')}"),
            ("vocabulary / context", f"{cfg.get('vocab_size')} / {cfg.get('sequence_len')}"),
            ("batch", f"{meta.get('total_batch_size')} tokens per step, {meta.get('device_batch_size')} rows of "
                      f"{meta.get('max_seq_len')} per micro-batch, {meta.get('world_size', 1)} rank(s)")]
    if meta.get("run"):
        rows.append(("run", str(meta["run"])))
    user = meta.get("user_config") or {}
    if user.get("data") or user.get("tasks"):
        rows.append(("data", str(user.get("tasks") or user.get("data"))))
    loop = meta.get("loop_state") or {}
    if loop.get("total_time"):
        rows.append(("training time", f"{loop['total_time'] / 60:.1f} min over {loop.get('timed_steps', '?')} "
                                      f"timed steps"))
    for key, name in (("val_bpb", "validation bits per byte"), ("val_loss", "held-out loss")):
        if isinstance(meta.get(key), (int, float)):
            rows.append((name, f"{meta[key]:.4f}"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    core = _json(folder / f"core_{step:06d}.json")
    if core and isinstance(core.get("core_metric"), (int, float)):
        lines += [f"**CORE {core['core_metric']:.4f}**", ""]
        results, cen = core.get("results") or {}, core.get("centered_results") or {}
        if isinstance(results, dict) and results:
            lines += ["| task | accuracy | centered |", "|---|---|---|"]
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            lines += [f"| {name} | {fmt(acc)} | {fmt(cen.get(name))} |" for name, acc in results.items()]
            lines.append("")
    chat = _json(folder / f"chat_eval_{step:06d}.json")
    if chat and isinstance(chat.get("chatcore"), (int, float)):
        lines += [f"**ChatCORE {chat['chatcore']:.4f}**", "", "| task | accuracy | correct |", "|---|---|---|"]
        for name, r in (chat.get("tasks") or {}).items():
            lines.append(f"| {name} | {r.get('accuracy', 0):.4f} | {r.get('correct')}/{r.get('total')} |")
        lines.append("")
    curve = [(int(r["step"]), float(r.get("val_bpb", r.get("val_loss"))))
             for r in _metrics(folder) if "step" in r and ("val_bpb" in r or "val_loss" in r) and "loss" not in r]
    return lines, ([(title, curve)] if len(curve) > 1 else [])


def _draw(curves, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for title, points in curves:
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=title)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bpb (base) / held-out bpb (SFT, RL)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(base_dir) -> Path:
    """Write `<base_dir>/report.md` (atomically) from what the stages left there; returns its path."""
    from tritonchat.engine.paths import atomic_write

    base = Path(base_dir)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# tritonchat report", "", f"{base}, written {stamp}", ""]
    curves = []
    for title, folder in STAGES:
        stage_lines, stage_curves = _stage(title, base / folder)
        lines += stage_lines
        curves += stage_curves
    if len(lines) == 4:
        lines.append("No complete checkpoint yet: train one (`python -m train`).")
    if curves and _draw(curves, base / CURVES):
        lines += ["## Validation", "", f"![validation curves]({CURVES})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write(base / REPORT, lambda f: f.write(text.encode()))
    return base / REPORT


def update_report(base_dir) -> None:
    """`write_report` at the end of a stage: a failure to write it is a warning, never the stage's failure."""
    try:
        path = write_report(base_dir)
    except Exception as e:  # noqa: BLE001 - the report is a convenience; the stage's own results are written
        print(f"warning: could not write the report in {base_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    print(f"report: {path}", file=sys.stderr)


def main(argv=None) -> int:
    import argparse

    from tritonchat.engine.paths import get_base_dir

    p = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__.split("\n")[0])
    p.add_argument("--base-dir", default=None, help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it "
                   "exists, else ~/.cache/tritonchat")
    args = p.parse_args(argv)
    print(write_report(Path(args.base_dir) if args.base_dir else Path(get_base_dir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
