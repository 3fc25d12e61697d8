"""One dial: `configs_from_depth(depth, **overrides)` derives every training setting (SPEC §7).

A pure function of its arguments: the user's settings (`TrainConfig`) go in, the resolved plan
(`TrainPlan`: model config, batch, steps, learning rates, weight decay) comes out, each derivation
with its reason.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from engine.gpt import GPT, GPTConfig

B_REF = 2**19  # the reference batch (tokens) of the depth-12 model the scaling laws are anchored to
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # optimal batch grows as (tokens)^0.383


@dataclass
class TrainConfig:
    """What the user sets; -1 means "derive from depth"."""

    depth: int = 20
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    n_kv_head: int = -1
    device_batch_size: int = 32
    total_batch_size: int = -1
    target_param_data_ratio: float = 12.0
    num_iterations: int = -1
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    eval_every: int = 250
    eval_tokens: int = 80 * 2**19
    save_every: int = -1
    sample_every: int = -1
    resume_from_step: int = -1
    device: str = "auto"
    dtype: str = "auto"
    impl: str = "auto"
    seed: int = 42
    data: str = ""
    base_dir: str = ""
    run_dir: str = ""
    run: str = "default"
    log_every: int = 1
    dist_timeout: float = 600.0
    quiet: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"--depth must be an integer >= 1, got {self.depth!r}")
        for name in ("max_seq_len", "device_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.target_param_data_ratio <= 0:
            raise ValueError("--target-param-data-ratio must be > 0")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ValueError("--warmdown-ratio must be in [0, 1]")


@dataclass
class TrainPlan:
    """The resolved plan: everything the loop needs, derived from a TrainConfig."""

    model_config: GPTConfig
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    lr_scale: float
    matrix_weight_decay: float
    scaling_params: int
    target_tokens: int
    flops_per_token: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_config"] = self.model_config.to_dict()
        return d


def model_config_for(cfg: TrainConfig, vocab_size: int, depth: int | None = None) -> GPTConfig:
    overrides = dict(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, window_pattern=cfg.window_pattern)
    if cfg.n_kv_head > 0:
        overrides["n_kv_head"] = cfg.n_kv_head
    return GPTConfig.from_depth(cfg.depth if depth is None else depth, **overrides)


def _meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def configs_from_depth(cfg: TrainConfig, vocab_size: int, world_size: int = 1) -> TrainPlan:
    model_config = model_config_for(cfg, vocab_size)
    model = _meta_model(model_config)  # shapes only, nothing allocated
    P = model.num_params()["scaling"]
    ref_cfg = TrainConfig(**{**asdict(cfg), "depth": REF_DEPTH, "n_kv_head": -1})  # the reference d12, MHA
    P_ref = _meta_model(model_config_for(ref_cfg, vocab_size)).num_params()["scaling"]
    notes = []
    # Data horizon: a fixed ratio of tokens to scaling parameters (transformer blocks + lm_head).
    D = int(cfg.target_param_data_ratio * P)
    D_ref = cfg.target_param_data_ratio * P_ref
    # Batch: the reference batch at depth 12, grown with the token horizon as D^0.383, a power of two.
    if cfg.total_batch_size > 0:
        B = cfg.total_batch_size
        notes.append(f"total batch {B:,} tokens (set)")
    else:
        B = 2 ** round(math.log2(B_REF * (D / D_ref) ** BATCH_EXPONENT))
        notes.append(f"total batch {B:,} tokens = 2^round(log2(2^19 * (D/D_ref)^0.383))")
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if B % tokens_per_micro:
        raise ValueError(
            f"total batch size {B} is not divisible by device_batch_size * max_seq_len * world_size "
            f"= {cfg.device_batch_size} * {cfg.max_seq_len} * {world_size} = {tokens_per_micro}"
        )
    grad_accum = B // tokens_per_micro
    # Steps: the token horizon divided by the batch, unless set.
    steps = cfg.num_iterations if cfg.num_iterations > 0 else max(1, D // B)
    notes.append(f"{steps:,} steps" + (" (set)" if cfg.num_iterations > 0 else f" = {D:,} tokens // batch"))
    # Learning rates scale with sqrt(batch / reference batch); Muon weight decay also with D_ref/D.
    lr_scale = math.sqrt(B / B_REF)
    wd = cfg.weight_decay * lr_scale * (D_ref / D)
    notes.append(f"lr scale sqrt(B/2^19) = {lr_scale:.4f}; muon weight decay {wd:.5f}")
    return TrainPlan(model_config=model_config, total_batch_size=B, grad_accum_steps=grad_accum,
                     num_iterations=steps, lr_scale=lr_scale, matrix_weight_decay=wd, scaling_params=P,
                     target_tokens=D, flops_per_token=model.flops_per_token(), notes=notes)


# ---- schedules (pure functions of the step) ----------------------------------------------------
def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup, flat, then linear warmdown over the last `warmdown_ratio` of training to final_lr_frac."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """0.85 -> 0.97 over the first 400 steps, then 0.97 -> 0.90 across the warmdown."""
    warmdown_start = num_iterations - round(warmdown_ratio * num_iterations)
    if step < 400 and step < warmdown_start:
        return 0.85 + (0.97 - 0.85) * step / 400
    if step < warmdown_start:
        return 0.97
    start_value = 0.85 + (0.97 - 0.85) * min(warmdown_start, 400) / 400
    frac = (step - warmdown_start) / max(1, num_iterations - warmdown_start)
    return start_value + (0.90 - start_value) * min(frac, 1.0)


def muon_weight_decay(step: int, num_iterations: int, base: float) -> float:
    """Cosine from full to 0 over training."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / num_iterations))


# ---- command line ---------------------------------------------------------------------------------
_HELP = {
    "depth": "number of layers; sets every other hyperparameter",
    "device_batch_size": "sequences per micro-batch per device",
    "total_batch_size": "tokens per optimizer step (-1: derived from depth)",
    "num_iterations": "optimizer steps (-1: derived from the token horizon)",
    "target_param_data_ratio": "training tokens per scaling parameter",
    "window_pattern": "sliding-window pattern tiled over layers (S short, L long)",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto | bfloat16 | float32 (activation dtype)",
    "impl": "auto | torch | triton (op implementations)",
    "data": "folder of parquet or .txt files (default: the embedded corpus)",
    "base_dir": "where the tokenizer, data and checkpoints live (default $TRITONCHAT_BASE_DIR or ~/.cache/tritonchat)",
    "run_dir": "checkpoints and metrics (default <base_dir>/base_checkpoints/d<depth>)",
    "eval_every": "validation bits per byte every N steps (-1: only at the end)",
    "save_every": "checkpoint every N steps (-1: only at the end)",
    "sample_every": "sample prompts every N steps (-1: only at the end)",
    "resume_from_step": "resume from the checkpoint at this step",
    "dist_timeout": "seconds a collective may wait before the job fails (multi-process runs)",
}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="Pretrain a GPT; depth sets everything.")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=_HELP.get(f.name))
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=_HELP.get(f.name, f"(default {f.default})"))
    return p


def parse_args(argv=None) -> TrainConfig:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))
