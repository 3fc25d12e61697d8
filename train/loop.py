"""The training loop as functions: `train(cfg)` runs it, `train_step`, `evaluate_bpb` and the schedules
in train.config are usable alone. Nothing runs at import."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine.checkpoint import load_checkpoint, patch_state_dict, save_checkpoint
from engine.engine import Engine, SamplingParams
from engine.gpt import GPT, build_model
from engine.paths import get_base_dir
from engine.tokenizer import Tokenizer, load_token_bytes
from kernels import resolve_impl
from train import data
from train.config import TrainConfig, TrainPlan, configs_from_depth, lr_multiplier, muon_momentum, muon_weight_decay
from train.dist import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from train.optim import MuonAdamW, build_param_groups

SINGLE = DistInfo()  # a single process
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SAMPLE_PROMPTS = ["Return the", "This module provides", "The default value is", "If the"]


# ---- setup -------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"--dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of one GPU (SPEC §5), or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def load_tokenizer(base_dir: Path) -> tuple[Tokenizer, torch.Tensor]:
    tok_dir = base_dir / "tokenizer"
    if not (tok_dir / "tokenizer.pkl").exists():
        raise FileNotFoundError(f"no tokenizer in {tok_dir}: train one first with `python -m scripts.tok_train`")
    return Tokenizer.from_directory(tok_dir), load_token_bytes(tok_dir)


# ---- steps -------------------------------------------------------------------------------------
def set_schedules(opt: MuonAdamW, step: int, cfg: TrainConfig, plan: TrainPlan) -> float:
    """Apply the lr multiplier, Muon momentum and Muon weight decay of `step`; returns the lr multiplier."""
    lrm = lr_multiplier(step, plan.num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * lrm
        if g["kind"] == "muon":
            g["momentum"] = muon_momentum(step, plan.num_iterations, cfg.warmdown_ratio)
            g["weight_decay"] = muon_weight_decay(step, plan.num_iterations, plan.matrix_weight_decay)
    return lrm


def train_step(model: GPT, opt: MuonAdamW, batches, grad_accum_steps: int, info: DistInfo = SINGLE) -> float:
    """Forward/backward over `grad_accum_steps` micro-batches, then one optimizer step (which averages the
    gradients over ranks); returns the loss averaged over micro-batches and ranks."""
    total = None
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        loss = model(x, y)
        (loss / grad_accum_steps).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    opt.step()
    model.zero_grad(set_to_none=True)
    total = all_reduce_sum(total / grad_accum_steps, info) / info.world_size
    return total.item()


@torch.no_grad()
def evaluate_bpb(model: GPT, batches, num_steps: int, token_bytes: torch.Tensor,
                 info: DistInfo = SINGLE) -> float:
    """Bits per byte: summed loss in nats / (ln 2 * summed target byte lengths); special and ignored
    targets (byte length 0, or -1) are excluded. Sums are reduced over ranks."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in range(num_steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp_min(0)], torch.zeros_like(y)).double()
        nats += (loss * (b > 0)).sum()
        nbytes += b.sum()
    all_reduce_sum(nats, info)
    all_reduce_sum(nbytes, info)
    if nbytes.item() == 0:
        raise ValueError("validation batches contain no scorable bytes")
    return (nats / (math.log(2) * nbytes)).item()


@torch.no_grad()
def sample(model: GPT, tokenizer: Tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 32, seed: int = 42) -> list[str]:
    """Continue each prompt (one batched run of the inference engine); stops at <|bos|>."""
    engine = Engine(model, tokenizer, max_batch_size=len(prompts), impl=model.impl)
    bos = tokenizer.get_bos_token_id()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_k=40, seed=seed)
    gens = engine.generate([tokenizer.encode(p, prepend=bos) for p in prompts], params)
    return [p + g.text for p, g in zip(prompts, gens)]


def _format_eta(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---- the loop ----------------------------------------------------------------------------------
def _fail_injection(info: DistInfo) -> int | None:
    """TRITONCHAT_FAIL_AT="rank:step" makes that rank raise at that step (to test failure handling)."""
    spec = os.environ.get("TRITONCHAT_FAIL_AT", "")
    if not spec:
        return None
    rank, at = (int(v) for v in spec.split(":"))
    return at if rank == info.rank else None


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Train per `cfg`, as one process or as one rank of a torchrun job. `stop_after` ends the run after that
    many steps of this invocation without the end-of-run evaluation (a simulated interruption).
    Returns {"losses": {step: loss}, "val_bpb": {...}, ...}."""
    device = resolve_device(cfg.device)
    info = init_distributed(device.type, cfg.dist_timeout)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    say = print if info.is_main and not cfg.quiet else (lambda *a, **k: None)
    dtype = resolve_dtype(cfg.dtype, device)
    impl = resolve_impl(cfg.impl, device)  # once, for the model and the optimizer alike
    base_dir = Path(cfg.base_dir or get_base_dir())
    tokenizer, token_bytes = load_tokenizer(base_dir)
    token_bytes = token_bytes.to(device)
    if cfg.data:
        data_dir = Path(cfg.data)
    else:  # rank 0 builds the embedded corpus once; the others wait and find it complete
        if info.is_main:
            data.ensure_default_corpus(base_dir)
        barrier(info)
        data_dir = data.ensure_default_corpus(base_dir)
    files = data.list_data_files(data_dir)
    plan = configs_from_depth(cfg, tokenizer.get_vocab_size(), world_size=info.world_size)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else base_dir / "base_checkpoints" / f"d{cfg.depth}"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    model = build_model(plan.model_config, device=device, impl=impl, compute_dtype=dtype)
    # Batches come from this tokenizer, whose ids are < vocab_size: skip the per-forward host sync on CUDA.
    model.check_ids = device.type != "cuda"
    if info.enabled:  # identical starting weights on every rank
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    opt = MuonAdamW(build_param_groups(model, cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.scalar_lr,
                                       plan.matrix_weight_decay, plan.lr_scale),
                    impl=impl, rank=info.rank, world_size=info.world_size)
    step, loader_state, loop_state = 0, None, {"total_time": 0.0, "smooth_loss": None}
    if cfg.resume_from_step >= 0:
        model_state, optim_state, meta = load_checkpoint(run_dir, cfg.resume_from_step, device=device,
                                                         load_optimizer=True, rank=info.rank)
        if meta["model_config"] != plan.model_config.to_dict():
            raise ValueError(f"checkpoint model_config {meta['model_config']} differs from this run's "
                             f"{plan.model_config.to_dict()}")
        saved_world = meta.get("world_size", 1)
        if saved_world != info.world_size:
            raise ValueError(f"checkpoint at step {cfg.resume_from_step} was written by {saved_world} rank(s); "
                             f"resume it with the same number of ranks (this job has {info.world_size})")
        model.load_state_dict(patch_state_dict(model_state, model), strict=True)
        opt.load_state_dict(optim_state)
        step = meta["step"]
        loader_state = meta.get("dataloader_states", [meta["dataloader_state_dict"]])[info.rank]
        loop_state = meta.get("loop_state", loop_state)
        say(f"resumed from step {step} in {run_dir}")

    T, B = cfg.max_seq_len, cfg.device_batch_size
    loader = data.PackedLoader(tokenizer, data.split_files(files, "train"), B, T, device=device, state=loader_state,
                               rank=info.rank, world_size=info.world_size)
    batches = iter(loader)
    val_files = data.split_files(files, "val")
    # Validation is sharded over ranks when the split has a unit for each; otherwise rank 0 evaluates alone.
    val_sharded = data.num_units(val_files) >= info.world_size
    eval_steps = max(1, cfg.eval_tokens // (B * T * (info.world_size if val_sharded else 1)))
    peak = peak_flops(device)
    counts = model.num_params()
    say(f"model: depth {cfg.depth}, {counts['total']:,} params ({counts['scaling']:,} scaling), "
        f"{plan.flops_per_token:.3e} FLOPs/token | device {device}, {dtype}, impl={impl}, ranks {info.world_size}")
    for note in plan.notes:
        say("  " + note)
    say(f"  grad accumulation {plan.grad_accum_steps} x {B} x {T} tokens x {info.world_size} rank(s); "
        f"data {data_dir}; run dir {run_dir}")

    metrics_path = run_dir / "metrics.jsonl"
    result = {"losses": {}, "val_bpb": {}, "samples": [], "plan": plan.to_dict(), "run_dir": str(run_dir)}

    def log(record: dict) -> None:
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate() -> float:
        if val_sharded:
            val = data.PackedLoader(tokenizer, val_files, B, T, device=device, rank=info.rank,
                                    world_size=info.world_size)
            return evaluate_bpb(model, iter(val), eval_steps, token_bytes, info)
        bpb = torch.zeros((), dtype=torch.float64, device=device)
        if info.is_main:
            val = data.PackedLoader(tokenizer, val_files, B, T, device=device)
            bpb += evaluate_bpb(model, iter(val), eval_steps, token_bytes)
        return all_reduce_sum(bpb, info).item()

    def save(at_step: int) -> None:
        loader_states = all_gather_objects(loader.state_dict(), info)
        save_checkpoint(run_dir, at_step, None, opt.state_dict(), None, rank=info.rank)
        barrier(info)  # every optimizer shard is on disk before rank 0 writes meta (which marks completeness)
        if info.is_main:
            meta = {"step": at_step, "val_bpb": result["val_bpb"].get(at_step),
                    "model_config": plan.model_config.to_dict(), "user_config": asdict(cfg),
                    "device_batch_size": B, "max_seq_len": T, "total_batch_size": plan.total_batch_size,
                    "world_size": info.world_size, "dataloader_state_dict": loader_states[0],
                    "dataloader_states": loader_states, "loop_state": loop_state}
            save_checkpoint(run_dir, at_step, model.state_dict(), None, meta)
        barrier(info)
        say(f"saved checkpoint at step {at_step} to {run_dir}")

    def every(n: int, s: int) -> bool:
        return n > 0 and s % n == 0

    fail_at = _fail_injection(info)
    tok_label = "tok/s/rank" if info.enabled else "tok/s"
    start_step, N = step, plan.num_iterations
    while True:
        last = step == N
        resumed_here = step == start_step and cfg.resume_from_step >= 0
        if (last or every(cfg.eval_every, step)) and not resumed_here:
            model.eval()
            bpb = evaluate()
            model.train()
            result["val_bpb"][step] = bpb
            say(f"step {step:05d} | validation bpb {bpb:.4f}")
            log({"step": step, "val_bpb": bpb})
        if (last or every(cfg.sample_every, step)) and step > 0 and not resumed_here and info.is_main:
            model.eval()
            result["samples"] = sample(model, tokenizer)
            model.train()
            for s in result["samples"]:
                say("  sample: " + s.replace("\n", "\\n"))
        if (last or every(cfg.save_every, step)) and step > start_step:
            save(step)
        if last or (stop_after is not None and step - start_step >= stop_after):
            break
        if fail_at == step:
            raise RuntimeError(f"rank {info.rank}: injected failure at step {step} (TRITONCHAT_FAIL_AT)")
        lrm = set_schedules(opt, step, cfg, plan)
        t0 = time.perf_counter()
        loss = train_step(model, opt, batches, plan.grad_accum_steps, info)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if step > start_step:  # the first step of a process includes warm-up/compilation
            loop_state["total_time"] += dt
            loop_state["timed_steps"] = loop_state.get("timed_steps", 0) + 1
        sl = loop_state["smooth_loss"]
        loop_state["smooth_loss"] = loss if sl is None else 0.9 * sl + 0.1 * loss
        result["losses"][step] = loss
        tok_s = plan.total_batch_size / dt / info.world_size  # per GPU
        mfu = f"{100 * plan.flops_per_token * tok_s / peak:.1f}%" if peak else "n/a"
        done = step + 1
        timed = loop_state.get("timed_steps", 0)
        eta = (N - done) * loop_state["total_time"] / timed if timed else float("nan")
        if every(cfg.log_every, done) or done == N or step == start_step:
            eta_s = _format_eta(eta) if math.isfinite(eta) else "-"
            say(f"step {done:05d}/{N:05d} ({100 * done / N:5.1f}%) | loss {loss:.4f} | lrm {lrm:.3f} | "
                f"dt {dt * 1000:.0f}ms | {tok_label} {tok_s:,.0f} | mfu {mfu} | eta {eta_s}")
        log({"step": done, "loss": loss, "lrm": lrm, "dt": dt, "tok_per_s_per_rank": tok_s,
             "mfu": None if not peak else plan.flops_per_token * tok_s / peak})
        step = done
    result["final_step"] = step
    if len(result["val_bpb"]) > 1:
        (s0, b0), (s1, b1) = min(result["val_bpb"].items()), max(result["val_bpb"].items())
        say(f"validation bpb {b0:.4f} at step {s0} -> {b1:.4f} at step {s1}")
    return result
