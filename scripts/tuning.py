"""What the finetuning commands (chat_sft, chat_rl, chat_pref) share: the run's devices and tokenizer, the
checkpoint they start from, the reference's fallback settings; for chat_rl and chat_pref also the policy and its
optimizer (chat_sft's recipe: MuonAdamW over `build_param_groups`, the learning rates inherited
from the source checkpoint times an --init-lr-frac), checkpoints in the base layout written atomically, and the
one line Ctrl-C ends with."""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import (
    config_from_meta,
    find_last_step,
    find_latest_checkpoint,
    load_checkpoint,
    load_meta,
    patch_state_dict,
    save_checkpoint,
)
from tritonchat.engine.cli import UsageError, add_training_runtime_flags, resolve_device
from tritonchat.engine.gpt import GPT, build_model
from tritonchat.engine.paths import get_base_dir
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts.chat_cli import SOURCES
from tritonchat.train.dist import DistInfo, barrier, init_distributed
from tritonchat.train.optim import MuonAdamW, build_param_groups
from tritonchat.train.setup import check_impl, release_freed_memory_if_large, resolve_dtype, resolve_embedding_dtype

LRS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
# What the reference falls back to when the base checkpoint does not say.
FALLBACKS = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02, "scalar_lr": 0.5}


def add_common_flags(p: argparse.ArgumentParser, source_default: str = "sft") -> None:
    """The flags both commands take: where the checkpoint comes from and goes, the device, the lrs."""
    p.add_argument("-i", "--source", default=source_default, choices=sorted(SOURCES),
                   help="start from the newest complete checkpoint of this phase under <base>")
    p.add_argument("--source-dir", default=None, help="a checkpoint folder instead of --source")
    p.add_argument("--step", type=int, default=None, help="its step (default: the last complete one)")
    p.add_argument("--out-dir", default=None, help="default: <base>/<phase>_checkpoints/d{depth}")
    for name in ("embedding", "unembedding", "matrix", "scalar"):
        p.add_argument(f"--{name}-lr", type=float, default=None, help=f"{name} lr (default: the source run's)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: at the end only)")
    p.add_argument("--resume-from-step", type=int, default=-1, help="continue exactly from this checkpoint")
    p.add_argument("--log-every", type=int, default=1, help="a step line every N steps")
    p.add_argument("--run", default="dummy", help="run name in metrics.jsonl")
    add_training_runtime_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def derived_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (the same on every machine and every resume)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class Setup:
    device: torch.device
    info: DistInfo
    dtype: torch.dtype
    embedding_dtype: torch.dtype
    impl: str
    base_dir: Path
    tokenizer_dir: Path
    tokenizer: Tokenizer


def setup(args: argparse.Namespace) -> Setup:
    device = resolve_device(args.device)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    dtype = resolve_dtype(args.dtype, device)
    emb_dtype = resolve_embedding_dtype(args.embedding_dtype)
    impl = check_impl(args.impl, device)
    base_dir = Path(args.base_dir or get_base_dir())
    tok_dir = Path(args.tokenizer_dir or base_dir / "tokenizer")
    if not (tok_dir / "tokenizer.pkl").exists():
        raise FileNotFoundError(f"no tokenizer in {tok_dir}: train one with `python -m scripts.tok_train`")
    return Setup(device, info, dtype, emb_dtype, impl, base_dir, tok_dir, Tokenizer.from_directory(tok_dir))


def source_checkpoint(args: argparse.Namespace, base_dir: Path, phase: str | None = None,
                      missing: str = "train one first, or pass -i or --source-dir") -> tuple[Path, int]:
    """(folder, step) to start from: --source-dir (and --step), else the newest complete checkpoint of `phase`
    (default --source) under <base>; `missing` says what to do when there is none."""
    if args.source_dir:
        d = Path(args.source_dir)
        if not d.is_dir():
            raise UsageError(f"--source-dir {d}: no such folder")
        step = find_last_step(d) if args.step is None else args.step
    else:
        try:
            d, step = find_latest_checkpoint(base_dir / SOURCES[phase or args.source])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}: {missing}") from None
        step = step if args.step is None else args.step
    load_meta(d, step)  # a clear error for a missing or broken --step
    return d, step


def check_vocab(config, tokenizer: Tokenizer, where, tokenizer_dir: Path | None = None) -> None:
    if config.vocab_size != tokenizer.get_vocab_size():
        tok = "the tokenizer" if tokenizer_dir is None else f"the tokenizer in {tokenizer_dir}"
        raise UsageError(f"vocabulary mismatch: {tok} has {tokenizer.get_vocab_size()} tokens, the "
                         f"checkpoint in {where} {config.vocab_size}")


def build_policy(state: dict, meta: dict, st: Setup, trainable: bool = True) -> GPT:
    """The model of a checkpoint's state and meta on the run's device (in eval mode when not `trainable`)."""
    config = config_from_meta(meta["model_config"])
    model = build_model(config, device=st.device, impl=st.impl, compute_dtype=st.dtype, init=False,
                        embedding_dtype=st.embedding_dtype)
    model.load_state_dict(patch_state_dict(state, model), strict=True)
    model.check_ids = st.device.type != "cuda"
    release_freed_memory_if_large(model, st.device)
    if not trainable:  # only ever run under no_grad; its parameters keep requires_grad so that its forward takes
        model.eval()   # the policy's code path and gives the policy's log-probabilities bit for bit at the start
    return model


def inherited_lrs(args: argparse.Namespace, meta: dict) -> dict[str, float]:
    """Each lr: the flag, else what the source run used (an SFT run's resolved settings, else its user_config),
    else the reference's default."""
    resolved = meta.get("sft") or {}
    user = meta.get("user_config") or {}
    out = {}
    for name in LRS:
        flag = getattr(args, name)
        saved = resolved.get(name, user.get(name))
        out[name] = flag if flag is not None else saved if isinstance(saved, (int, float)) and saved > 0 \
            else FALLBACKS[name]
    return out


def build_optimizer(model: GPT, lrs: dict[str, float], init_lr_frac: float, st: Setup) -> MuonAdamW:
    groups = build_param_groups(model, lrs["unembedding_lr"], lrs["embedding_lr"], lrs["matrix_lr"],
                                lrs["scalar_lr"], 0.0, 1.0)
    for g in groups:
        g["lr"] = g["initial_lr"] = g["lr"] * init_lr_frac
    return MuonAdamW(groups, impl=st.impl, rank=st.info.rank, world_size=st.info.world_size)


def default_out_dir(base_dir: Path, phase: str, src: Path, step: int) -> Path:
    """<base>/<phase's folder>/d{depth of the source checkpoint}."""
    return base_dir / SOURCES[phase] / f"d{load_meta(src, step)['model_config']['n_layer']}"


def load_start(args: argparse.Namespace, out_dir: Path, st: Setup, source: tuple[Path | None, int | None]):
    """(model state, optimizer state or None, meta) to start from: the --resume-from-step checkpoint in
    `out_dir`, else the source checkpoint's model."""
    if args.resume_from_step >= 0:
        state, optim, meta = load_checkpoint(out_dir, args.resume_from_step, device=st.device, load_optimizer=True,
                                             rank=st.info.rank)
        if meta.get("world_size", 1) != st.info.world_size:
            raise UsageError(f"--resume-from-step {args.resume_from_step}: written by {meta.get('world_size', 1)} "
                             f"rank(s), this job has {st.info.world_size}")
        return state, optim, meta
    src, step = source if source[0] is not None else source_checkpoint(args, st.base_dir)
    state, _, meta = load_checkpoint(src, step, device=st.device)
    return state, None, meta


def save(out_dir: Path, step: int, model: GPT, opt: MuonAdamW, meta: dict, info: DistInfo) -> None:
    """Every rank's optimizer shard, then (rank 0) the model and the meta that marks the checkpoint complete."""
    save_checkpoint(out_dir, step, None, opt.state_dict(), None, rank=info.rank)
    barrier(info)
    if info.is_main:
        save_checkpoint(out_dir, step, model.state_dict(), None,
                        {"step": step, "model_config": model.config.to_dict(), "world_size": info.world_size, **meta})
    barrier(info)
