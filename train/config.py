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
from tritonchat.engine.cli import command_name
from tritonchat.engine.gpt import GPT, GPTConfig

B_REF = 2**19  # the reference batch (tokens) of the depth-12 model the scaling laws are anchored to
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # optimal batch grows as (tokens)^0.383
GPU_DEVICE_BATCH = 32  # rows of T tokens per micro-batch per GPU (SPEC §7)
CPU_MICRO_TOKENS = 2048  # tokens per micro-batch on a CPU: one 2048-token row, a step of seconds at depth 4
EVAL_TOKENS = 80 * B_REF  # the recipe's validation size (SPEC §7)
CPU_EVAL_MICRO_BATCHES = 4  # validation on a CPU: four micro-batches per rank
CPU_ACTIVATION_BYTES = 1 << 30  # a CPU micro-batch's activations above this: recompute them in backward
ACTIVATION_FLOATS = 22  # fp32 values autograd keeps per token, layer and channel (measured at depth 12, T=2048)
EVAL_EVERY = 250  # the recipe's validation cadence, in steps


@dataclass
class TrainConfig:
    """What the user sets; -1 means "derive" (from depth, or from the device, see `configs_from_depth`)."""

    depth: int = 20
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    n_kv_head: int = -1
    device_batch_size: int = -1
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
    eval_every: int = EVAL_EVERY
    eval_tokens: int = -1
    save_every: int = -1
    sample_every: int = -1
    resume_from_step: int = -1
    device: str = "auto"
    dtype: str = "auto"
    embedding_dtype: str = "auto"
    recompute: str = "auto"
    impl: str = "auto"
    compile: str = "auto"
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
        if self.max_seq_len < 1:
            raise ValueError(f"--max-seq-len must be >= 1, got {self.max_seq_len}")
        for name in ("device_batch_size", "total_batch_size", "eval_tokens"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or -1: derive), got {getattr(self, name)}")
        if self.num_iterations < -1:
            raise ValueError(f"--num-iterations must be >= 0 (or -1: derive), got {self.num_iterations}")
        if self.target_param_data_ratio <= 0:
            raise ValueError(f"--target-param-data-ratio must be > 0, got {self.target_param_data_ratio}")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ValueError(f"--warmdown-ratio must be in [0, 1], got {self.warmdown_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        if not self.run:
            raise ValueError("--run must name the run (a non-empty string)")
        if self.recompute not in ("auto", "on", "off"):
            raise ValueError(f"--recompute must be auto, on or off, got {self.recompute!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"--compile must be auto, on or off, got {self.compile!r}")


@dataclass
class TrainPlan:
    """The resolved plan: everything the loop needs, derived from a TrainConfig."""

    model_config: GPTConfig
    device_batch_size: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    lr_scale: float
    matrix_weight_decay: float
    scaling_params: int
    target_tokens: int
    flops_per_token: int
    eval_tokens: int
    eval_one_pass: bool  # stop the validation at the end of the split (one pass at most)
    recompute: bool = False  # recompute each block's activations in backward (see GPT.recompute)
    notes: list[str] = field(default_factory=list)

    @property
    def horizon_tokens(self) -> int:
        """Tokens this plan trains on: steps x batch."""
        return self.num_iterations * self.total_batch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_config"] = self.model_config.to_dict()
        return d


def model_config_for(cfg: TrainConfig, vocab_size: int, depth: int | None = None) -> GPTConfig:
    overrides = dict(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, window_pattern=cfg.window_pattern)
    if cfg.n_kv_head > 0:
        overrides["n_kv_head"] = cfg.n_kv_head
    return GPTConfig.from_depth(cfg.depth if depth is None else depth, **overrides)


def activation_bytes(config: GPTConfig, tokens: int) -> int:
    """About what autograd keeps for one forward of `tokens` tokens in fp32: ACTIVATION_FLOATS per token, layer
    and channel (attention inputs and output, the MLP's 4C hidden twice, the norms' inputs)."""
    return ACTIVATION_FLOATS * 4 * tokens * config.n_layer * config.n_embd


def recompute_choice(mode: str, cpu: bool, act_bytes: int) -> tuple[bool, str | None]:
    """--recompute=auto|on|off for a micro-batch keeping `act_bytes` of activations: (recompute?, a note when auto
    turned it on)."""
    if mode != "auto":
        return mode == "on", None
    if cpu and act_bytes > CPU_ACTIVATION_BYTES:
        return True, (f"recomputing activations in backward (a micro-batch would keep ~{act_bytes / 2**30:.1f} GiB "
                      f"of them; --recompute=off keeps them)")
    return False, None


def _meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def configs_from_depth(cfg: TrainConfig, vocab_size: int, world_size: int = 1, device_type: str = "cuda") -> TrainPlan:
    """The plan for `cfg` on `world_size` processes of `device_type` ("cuda" or "cpu"): every -1 of cfg resolved.

    From depth (SPEC §7): width and heads, the token horizon, the batch, the steps, the learning-rate scale and
    Muon's weight decay. From the device: the micro-batch, the validation size and, on a CPU, the total batch.
    """
    model_config = model_config_for(cfg, vocab_size)
    model = _meta_model(model_config)  # shapes only, nothing allocated
    P = model.num_params()["scaling"]
    ref_cfg = TrainConfig(**{**asdict(cfg), "depth": REF_DEPTH, "n_kv_head": -1})  # the reference d12, MHA
    P_ref = _meta_model(model_config_for(ref_cfg, vocab_size)).num_params()["scaling"]
    cpu = device_type == "cpu"
    notes = []
    # Data horizon: a fixed ratio of tokens to parameters, Chinchilla's compute-optimal rule (Hoffmann et al. 2022,
    # ~20 tokens per parameter). nanochat counts only the parameters that cost matmul FLOPs per token (transformer
    # blocks + lm_head; the embedding tables are lookups) and takes 12 of its tokens per such parameter (8 for the
    # speedrun: slightly under-trained, faster to the GPT-2 bar).
    D = int(cfg.target_param_data_ratio * P)
    D_ref = cfg.target_param_data_ratio * P_ref
    # Micro-batch: what one device holds and computes in one pass. A GPU: the recipe's 32 rows of T tokens. A CPU:
    # about 2048 tokens, so activations stay small and one micro-batch takes seconds, not minutes.
    B_micro = cfg.device_batch_size
    if B_micro == -1:
        B_micro = max(1, CPU_MICRO_TOKENS // cfg.max_seq_len) if cpu else GPU_DEVICE_BATCH
        notes.append(f"micro-batch {B_micro} x {cfg.max_seq_len} tokens (derived for {device_type})")
    tokens_per_micro = B_micro * cfg.max_seq_len * world_size
    # Activations: a CPU keeps a micro-batch's activations under ~1 GiB (a laptop's share) by recomputing each
    # block in backward, at the cost of one more forward (the trade of Chen et al. 2016, "Training Deep Nets with
    # Sublinear Memory Cost"); a GPU holds the recipe's micro-batch.
    recompute, note = recompute_choice(cfg.recompute, cpu, activation_bytes(model_config, B_micro * cfg.max_seq_len))
    if note:
        notes.append(note)
    # Batch: the optimal batch grows with the token horizon as a power law (nanochat's fit, D^0.383, anchored at
    # 2^19 tokens for d12; cf. the batch-size power laws of Kaplan et al. 2020 and DeepSeek LLM, Bi et al. 2024),
    # rounded to a power of two. On a CPU that batch (2^18+ tokens) would take minutes per step, so it is one
    # micro-batch per rank, no accumulation, unless set; the learning rates below follow whichever batch it is.
    if cfg.total_batch_size > 0:
        B = cfg.total_batch_size
        notes.append(f"total batch {B:,} tokens (set)")
    else:
        B_recipe = 2 ** round(math.log2(B_REF * (D / D_ref) ** BATCH_EXPONENT))
        if cpu:
            B = tokens_per_micro
            notes.append(f"total batch {B:,} tokens = one micro-batch per rank on CPU (the recipe's "
                         f"2^round(log2(2^19 * (D/D_ref)^0.383)) = {B_recipe:,}: --total-batch-size={B_recipe})")
        else:
            B = B_recipe
            notes.append(f"total batch {B:,} tokens = 2^round(log2(2^19 * (D/D_ref)^0.383))")
    if B % tokens_per_micro:
        raise ValueError(
            f"--total-batch-size {B} is not divisible by device_batch_size * max_seq_len * world_size "
            f"= {B_micro} * {cfg.max_seq_len} * {world_size} = {tokens_per_micro}"
        )
    grad_accum = B // tokens_per_micro
    # Steps: the token horizon divided by the batch, unless set (0 steps: only the evaluation of step 0).
    steps = cfg.num_iterations if cfg.num_iterations >= 0 else max(1, D // B)
    notes.append(f"{steps:,} steps" + (" (set)" if cfg.num_iterations >= 0 else f" = {D:,} tokens // batch"))
    # Learning rates: the square-root scaling rule for Adam-type optimizers (Malladi et al. 2022, "On the SDEs and
    # Scaling Rules for Adaptive Gradient Algorithms"): lr ~ sqrt(batch), relative to the d12 reference batch.
    lr_scale = math.sqrt(B / B_REF)
    # Muon weight decay: AdamW's decay acts as an average over the last ~1/(lr * wd) steps; keeping that window a
    # fixed fraction of the training tokens (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale
    # model and dataset size") gives wd ~ B / (lr * D) ~ sqrt(B) / D: 0.28 at the reference d12.
    wd = cfg.weight_decay * lr_scale * (D_ref / D)
    notes.append(f"lr scale sqrt(B/2^19) = {lr_scale:.4f}; muon weight decay 0.28 * sqrt(B/2^19) * D_ref/D = {wd:.5f}")
    # Validation: the recipe's 80 x 2^19 tokens on a GPU, four micro-batches per rank on a CPU (one is seconds to
    # a minute there); never more than one pass over the validation split unless --eval-tokens asks for it.
    eval_tokens = cfg.eval_tokens
    if eval_tokens == -1:
        eval_tokens = CPU_EVAL_MICRO_BATCHES * tokens_per_micro if cpu else EVAL_TOKENS
        notes.append(f"validation {eval_tokens:,} tokens every {cfg.eval_every} steps (at most one pass over the "
                     f"validation split)")
    return TrainPlan(model_config=model_config, device_batch_size=B_micro, total_batch_size=B,
                     grad_accum_steps=grad_accum, num_iterations=steps, lr_scale=lr_scale, matrix_weight_decay=wd,
                     scaling_params=P, target_tokens=D, flops_per_token=model.flops_per_token(),
                     eval_tokens=eval_tokens, eval_one_pass=cfg.eval_tokens == -1, recompute=recompute,
                     notes=notes)


# ---- schedules (pure functions of the step) ----------------------------------------------------
def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Warmup-stable-decay: linear warmup over `warmup_steps`, flat, then a linear warmdown over the last
    `warmdown_ratio` of the steps down to `final_lr_frac` (SPEC §7; the WSD schedule, whose cool-down at the
    end does the work of a cosine: Hägele et al. 2024)."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """Muon's momentum (SPEC §7): 0.85 -> 0.97 over the first 400 steps (the warm-up wins, even inside the
    warmdown of a short run); then 0.97, and across the warmdown from 0.97 down to 0.90."""
    # The same arithmetic as the reference's, operation for operation, so the values are equal bit for bit.
    warmdown_steps = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_steps
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start and warmdown_steps > 0:
        progress = (step - warmdown_start) / warmdown_steps
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, base: float) -> float:
    """Cosine from `base` at step 0 to 0 at the last step: base * 0.5 * (1 + cos(pi * step / steps))."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / max(num_iterations, 1)))


# ---- command line ---------------------------------------------------------------------------------
_HELP = {
    "depth": "number of layers; sets every other hyperparameter",
    "max_seq_len": "tokens per row (the model's context)",
    "window_pattern": "sliding-window pattern tiled over layers (S short, L long)",
    "n_kv_head": "key/value heads (-1: as many as query heads)",
    "device_batch_size": "rows per micro-batch per device (-1: 32 on a GPU, 2048 tokens' worth on a CPU)",
    "total_batch_size": "tokens per optimizer step (-1: derived from depth; one micro-batch per rank on a CPU)",
    "target_param_data_ratio": "training tokens per scaling parameter",
    "num_iterations": "optimizer steps (-1: derived from the token horizon; 0: evaluate only)",
    "embedding_lr": "AdamW lr of wte (value_embeds: half), before the batch and width scaling",
    "unembedding_lr": "AdamW lr of lm_head, before the batch and width scaling",
    "matrix_lr": "Muon lr of the transformer matrices, before the batch scaling",
    "scalar_lr": "AdamW lr of the residual/x0 lambdas, before the batch scaling",
    "weight_decay": "Muon weight decay at the reference d12 (scaled with batch and horizon)",
    "warmup_steps": "linear lr warmup steps",
    "warmdown_ratio": "fraction of the steps in the final linear lr warmdown",
    "final_lr_frac": "lr multiplier at the end of the warmdown",
    "eval_every": "validation bits per byte every N steps (<= 0: only at the start and the end)",
    "eval_tokens": "validation tokens (-1: 80 x 2^19 on a GPU, 4 micro-batches on a CPU, at most one pass over "
                   "the validation split; a set value may repeat it)",
    "save_every": "checkpoint every N steps (<= 0: only at the end)",
    "sample_every": "sample prompts every N steps (<= 0: only at the end)",
    "resume_from_step": "resume from the checkpoint at this step (-1: start fresh)",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto | bfloat16 | float32 (activation dtype; auto: bf16 on CUDA, fp32 on CPU)",
    "embedding_dtype": "auto | bfloat16 | float32: storage of wte and value_embeds and their AdamW moments (auto: "
                       "bf16 on every device, the recipe's GPU storage; float32 is the reference's CPU storage)",
    "recompute": "auto | on | off: recompute each block's activations in backward (auto: on a CPU when a "
                 "micro-batch would keep over 1 GiB of them)",
    "impl": "auto | torch | triton (op implementations; triton needs CUDA or TRITON_INTERPRET=1)",
    "compile": "auto | on | off: torch.compile the reference path (impl=torch): the model's training and "
               "validation forwards, the loss chunks, the optimizer math (auto: on a CPU for runs of at least "
               "50 steps, where the compile time is paid back; the Triton path is never compiled)",
    "seed": "seed of the weight initialization",
    "data": "folder of parquet or .txt files (empty: the embedded corpus)",
    "base_dir": "where the tokenizer, data and checkpoints live (empty: $TRITONCHAT_BASE_DIR, else ./.tritonchat "
                "when it exists, else ~/.cache/tritonchat)",
    "run_dir": "checkpoints and metrics (empty: <base_dir>/base_checkpoints/d<depth>)",
    "run": "the run's name (nanochat's wandb run name): shown in the banner, recorded in metrics.jsonl and meta",
    "log_every": "print a step line every N steps",
    "dist_timeout": "seconds a collective may wait before the job fails (multi-process runs)",
    "quiet": "print nothing but errors",
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line (`python -m train: error: ...`, exit code 2), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=command_name("train"), description="Pretrain a GPT; depth sets everything.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=_HELP[f.name])
    return p


def parse_args(argv=None) -> TrainConfig:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))
