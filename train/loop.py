"""The training loop as functions: `train(cfg)` runs it; `train_step`, `evaluate_bpb`, `sample` and the schedules
in train.config are usable alone. Nothing runs at import.

`train` reads top to bottom: `_setup` builds a `Run` (device, data, plan, model, optimizer, metrics log),
`resume` restores a checkpoint into it, `_loop` evaluates / samples / saves when due and trains one step at a
time, carrying a `LoopState`; `save` and `validate` are the loop's two big actions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import config_from_meta, load_checkpoint, patch_state_dict, save_checkpoint
from tritonchat.engine.engine import Engine, SamplingParams
from tritonchat.engine.gpt import GPT, build_model
from tritonchat.engine.paths import get_base_dir
from tritonchat.engine.report import update_report
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.train import data, reference
from tritonchat.train.config import (
    TrainConfig,
    TrainPlan,
    activation_bytes,
    configs_from_depth,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
)
from tritonchat.train.dist import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from tritonchat.train.optim import MuonAdamW, build_param_groups
from tritonchat.train.progress import Heartbeat, InterruptGuard, format_duration
from tritonchat.train.setup import (  # noqa: F401  (resolve_dtype, peak_flops: part of this module's interface)
    check_impl,
    cpu_contention,
    epochs_warning,
    load_tokenizer,
    peak_flops,
    release_freed_memory_if_large,
    resolve_compile,
    resolve_device,
    resolve_dtype,
    resolve_embedding_dtype,
)

SINGLE = DistInfo()  # a single process
SAMPLE_PROMPTS = ["Return the", "This module provides", "The default value is", "If the"]


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


def train_step(model: GPT, opt: MuonAdamW, batches, grad_accum_steps: int, info: DistInfo = SINGLE,
               guard: InterruptGuard | None = None) -> float:
    """Forward/backward over `grad_accum_steps` micro-batches, then one optimizer step (which averages the
    gradients over ranks); returns the loss averaged over micro-batches and ranks. With `guard`, Ctrl-C during
    the optimizer step is deferred to its end (guard.pending), so the parameters are never half updated."""
    total = None
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        loss = model(x, y)
        (loss / grad_accum_steps).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    with guard.deferred() if guard is not None else contextlib.nullcontext():
        opt.step()
    model.zero_grad(set_to_none=True)
    total = all_reduce_sum(total / grad_accum_steps, info) / info.world_size
    return total.item()


@torch.no_grad()
def evaluate_bpb(model: GPT, batches, num_steps: int, token_bytes: torch.Tensor,
                 info: DistInfo = SINGLE, progress=None) -> float:
    """Bits per byte over up to `num_steps` batches (fewer when `batches` ends first): summed loss in nats /
    (ln 2 * summed target byte lengths); special and ignored targets (byte length 0, or -1) are excluded. Sums
    are reduced over ranks. The per-token losses come from the model's chunked lm_head + cross-entropy, so no
    batch's full logits are held. `progress(i)` is called after batch i."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    batches = iter(batches)
    for i in range(num_steps):
        try:
            x, y = next(batches)
        except StopIteration:  # the end of a one-pass validation split
            break
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp_min(0)], torch.zeros_like(y)).double()
        nats += (loss * (b > 0)).sum()
        nbytes += b.sum()
        if progress is not None:
            progress(i + 1)
    all_reduce_sum(nats, info)
    all_reduce_sum(nbytes, info)
    if nbytes.item() == 0:
        raise ValueError("the validation batches contain no scorable bytes (is the validation split shorter than "
                         "one batch? lower --device-batch-size or --max-seq-len, or set --eval-tokens)")
    return (nats / (math.log(2) * nbytes)).item()


@torch.no_grad()
def sample(model: GPT, tokenizer: Tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 32, seed: int = 42) -> list[str]:
    """Continue each prompt (one batched run of the inference engine); stops at <|bos|>."""
    engine = Engine(model, tokenizer, max_batch_size=len(prompts), impl=model.impl)
    bos = tokenizer.get_bos_token_id()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_k=40, seed=seed)
    gens = engine.generate([tokenizer.encode(p, prepend=bos) for p in prompts], params)
    return [p + g.text for p, g in zip(prompts, gens)]


# ---- the loop's state, resume, logging ----------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop carries from step to step; saved in a checkpoint's meta["loop_state"] and restored with it."""

    step: int = 0  # optimizer steps completed
    total_time: float = 0.0  # seconds spent in timed steps (every step but the first of each process)
    timed_steps: int = 0
    smooth_loss: float | None = None  # exponential average of the training loss, weight 0.1 on the newest

    def record(self, loss: float, dt: float, timed: bool) -> None:
        self.step += 1
        if timed:
            self.total_time += dt
            self.timed_steps += 1
        self.smooth_loss = loss if self.smooth_loss is None else 0.9 * self.smooth_loss + 0.1 * loss

    def eta(self, num_iterations: int) -> float:
        """Seconds left at the mean timed step, nan before any timed step."""
        if not self.timed_steps:
            return float("nan")
        return (num_iterations - self.step) * self.total_time / self.timed_steps

    @classmethod
    def from_meta(cls, meta: dict) -> LoopState:
        saved = meta.get("loop_state") or {}
        known = {k: saved[k] for k in ("total_time", "timed_steps", "smooth_loss") if k in saved}
        return cls(step=int(meta["step"]), **known)


@dataclass
class Run:
    """Everything one invocation of `train` works with, built once by `_setup`."""

    cfg: TrainConfig
    plan: TrainPlan
    info: DistInfo
    device: torch.device
    model: GPT
    opt: MuonAdamW
    tokenizer: Tokenizer
    token_bytes: torch.Tensor
    train_files: list[Path]
    val_files: list[Path]
    val_sharded: bool  # every rank evaluates its own share of the validation split (else rank 0 alone)
    run_dir: Path
    hb: Heartbeat
    metrics: MetricsLog
    validated: bool = False  # a validation has run in this process (the first one compiles, under --compile)

    def say(self, text: str) -> None:
        self.hb.say(text)


class MetricsLog:
    """`<run_dir>/metrics.jsonl`, one JSON record per line, written by rank 0. A fresh run starts a new file; a
    resumed run keeps the records up to its step (those of the steps it replays are dropped, so no step appears
    twice). Each invocation first writes a header record {"run", "step" (where it starts), "resumed", "time"}
    (the header of an earlier resume from the same step is replaced)."""

    def __init__(self, path: Path, info: DistInfo, run: str, start_step: int | None):
        self.path, self.enabled = path, info.is_main
        if not self.enabled:
            return
        kept = []
        if start_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                step = record.get("step", 0)
                if step < start_step or (step == start_step and "run" not in record):  # an earlier resume's
                    kept.append(line)  # header at this step is superseded by this one's
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.write({"run": run, "step": start_step or 0, "resumed": start_step is not None,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---- setup ----------------------------------------------------------------------------------------------
def _data_files(cfg: TrainConfig, base_dir: Path, info: DistInfo, hb: Heartbeat) -> tuple[Path, list[Path]]:
    if cfg.data:
        data_dir = Path(cfg.data)
    else:  # rank 0 builds the embedded corpus once; the others wait and find it complete
        if info.is_main:
            hb.doing("building the embedded corpus")
            data.ensure_default_corpus(base_dir, verbose=False,
                                       progress=lambda done, total: hb.detail(f"{done:,}/{total:,} source files"))
            hb.doing(None)
        barrier(info)
        data_dir = data.ensure_default_corpus(base_dir, verbose=False)
    return data_dir, data.list_data_files(data_dir)


def _setup(cfg: TrainConfig, hb: Heartbeat) -> Run:
    device = resolve_device(cfg.device)
    info = init_distributed(device.type, cfg.dist_timeout)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    if not info.is_main:
        hb = Heartbeat(None)
    dtype = resolve_dtype(cfg.dtype, device)
    emb_dtype = resolve_embedding_dtype(cfg.embedding_dtype)
    impl = check_impl(cfg.impl, device)  # once, for the model and the optimizer alike
    if device.type == "cpu" and (warning := cpu_contention(torch.get_num_threads())):
        hb.say(warning)
    base_dir = Path(cfg.base_dir or get_base_dir())
    tokenizer, token_bytes = load_tokenizer(base_dir)
    data_dir, files = _data_files(cfg, base_dir, info, hb)
    plan = configs_from_depth(cfg, tokenizer.get_vocab_size(), world_size=info.world_size, device_type=device.type)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else base_dir / "base_checkpoints" / f"d{cfg.depth}"
    run_dir.mkdir(parents=True, exist_ok=True)

    hb.doing("building the model")
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model_config, device=device, impl=impl, compute_dtype=dtype, embedding_dtype=emb_dtype)
    model.recompute = plan.recompute
    compile_ref, compile_note = resolve_compile(cfg.compile, impl, device, plan.num_iterations)
    if compile_ref:  # the body stays eager under recompute (checkpointed blocks); the loss chunks compile either way
        model.compile_reference(body=not plan.recompute)
    release_freed_memory_if_large(model, device, 0 if plan.recompute else
                                  activation_bytes(plan.model_config, plan.device_batch_size * cfg.max_seq_len))
    # Batches come from this tokenizer, whose ids are < vocab_size: skip the per-forward host sync on CUDA.
    model.check_ids = device.type != "cuda"
    if info.enabled:  # identical starting weights on every rank
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    opt = MuonAdamW(build_param_groups(model, cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.scalar_lr,
                                       plan.matrix_weight_decay, plan.lr_scale),
                    impl=impl, rank=info.rank, world_size=info.world_size, compile=compile_ref)
    hb.doing(None)
    train_files, val_files = data.split_files(files, "train"), data.split_files(files, "val")
    counts = model.num_params()
    hb.say(f"run {cfg.run}: depth {cfg.depth}, {counts['total']:,} params ({counts['scaling']:,} scaling), "
           f"{plan.flops_per_token:.3e} FLOPs/token | device {device}, {dtype} (tables {emb_dtype}), impl={impl}, "
           f"ranks {info.world_size}")
    for note in plan.notes + ([compile_note] if compile_note else []):
        hb.say("  " + note)
    hb.say(f"  grad accumulation {plan.grad_accum_steps} x {plan.device_batch_size} x {cfg.max_seq_len} tokens x "
           f"{info.world_size} rank(s); data {data_dir}; run dir {run_dir}")
    if info.is_main and plan.horizon_tokens > 0:
        if warning := epochs_warning(plan.horizon_tokens, data.estimate_tokens(train_files, tokenizer)):
            hb.say(warning)
    metrics = MetricsLog(run_dir / "metrics.jsonl", info, cfg.run,
                         cfg.resume_from_step if cfg.resume_from_step >= 0 else None)
    return Run(cfg=cfg, plan=plan, info=info, device=device, model=model, opt=opt, tokenizer=tokenizer,
               token_bytes=token_bytes.to(device), train_files=train_files, val_files=val_files,
               val_sharded=data.num_units(val_files) >= info.world_size, run_dir=run_dir, hb=hb, metrics=metrics)


def resume(run: Run, step: int) -> tuple[LoopState, dict]:
    """Load the checkpoint at `step` into the model and the optimizer; returns the loop state and this rank's
    loader state. Refuses a checkpoint of another model or another number of ranks."""
    run.hb.doing(f"loading the checkpoint of step {step}")
    model_state, optim_state, meta = load_checkpoint(run.run_dir, step, device=run.device, load_optimizer=True,
                                                     rank=run.info.rank)
    if config_from_meta(meta["model_config"]) != run.plan.model_config:
        raise ValueError(f"checkpoint model_config {meta['model_config']} differs from this run's "
                         f"{run.plan.model_config.to_dict()}")
    if reference.is_reference_optimizer_state(optim_state, run.opt):
        # The reference trainer's checkpoint: its Muon state is stacked per group and sharded its own way, so
        # every rank reads every shard and keeps what it owns under our layout (any number of ranks).
        shards = [torch.load(p, map_location=run.device, weights_only=True)
                  for p in reference_optimizer_shards(run.run_dir, step)]
        optim_state = reference.convert_optimizer(shards, run.opt)
        meta = {**meta, "loop_state": {**reference.loop_state_from_reference(meta), **(meta.get("loop_state") or {})}}
        run.say(f"converting the reference's optimizer state ({len(shards)} rank shard(s)) to this run's layout")
    else:
        saved_world = meta.get("world_size", 1)
        if saved_world != run.info.world_size:
            raise ValueError(f"checkpoint at step {step} was written by {saved_world} rank(s); resume it with the "
                             f"same number of ranks (this job has {run.info.world_size})")
    run.model.load_state_dict(patch_state_dict(model_state, run.model), strict=True)
    run.opt.load_state_dict(optim_state)
    run.hb.doing(None)
    run.say(f"resumed from step {meta['step']} in {run.run_dir}")
    # Ours keeps every rank's loader state; the reference one (rank 0's position, which every rank resumes from).
    states = meta.get("dataloader_states") or [meta["dataloader_state_dict"]] * run.info.world_size
    return LoopState.from_meta(meta), states[run.info.rank]


def reference_optimizer_shards(run_dir: Path, step: int) -> list[Path]:
    """The optimizer files of `step`, rank 0 first; ValueError naming the folder when a rank's is missing."""
    found = {}
    for p in Path(run_dir).glob(f"optim_{step:06d}_rank*.pt"):
        r = p.stem.rsplit("rank", 1)[-1]
        if r.isdigit():
            found[int(r)] = p
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"{run_dir}: the optimizer shards of step {step} are incomplete (ranks {sorted(found)})")
    return [found[r] for r in range(len(found))]


def save(run: Run, state: LoopState, loader_state: dict, val_bpb: float | None) -> None:
    """The checkpoint of `state.step`: every rank its optimizer shard, then rank 0 the model and (last, it marks
    the checkpoint complete) the metadata with every rank's loader state."""
    info, plan, cfg = run.info, run.plan, run.cfg
    run.hb.doing(f"writing the checkpoint of step {state.step}")
    loader_states = all_gather_objects(loader_state, info)
    save_checkpoint(run.run_dir, state.step, None, run.opt.state_dict(), None, rank=info.rank)
    barrier(info)  # every optimizer shard is on disk before rank 0 writes meta (which marks completeness)
    if info.is_main:
        meta = {"step": state.step, "val_bpb": val_bpb, "model_config": plan.model_config.to_dict(),
                "user_config": asdict(cfg), "run": cfg.run, "device_batch_size": plan.device_batch_size,
                "max_seq_len": cfg.max_seq_len, "total_batch_size": plan.total_batch_size,
                "world_size": info.world_size, "dataloader_state_dict": loader_states[0],
                "dataloader_states": loader_states, "loop_state": asdict(state)}
        save_checkpoint(run.run_dir, state.step, run.model.state_dict(), None, meta)
    barrier(info)
    run.hb.doing(None)
    run.say(f"saved checkpoint at step {state.step} to {run.run_dir}")


def validate(run: Run) -> float:
    """Bits per byte over `plan.eval_tokens` validation tokens (at most one pass unless --eval-tokens is set)."""
    cfg, plan, info = run.cfg, run.plan, run.info
    B, T = plan.device_batch_size, cfg.max_seq_len
    ranks = info.world_size if run.val_sharded else 1
    steps = max(1, plan.eval_tokens // (B * T * ranks))
    first = run.opt.compile and not run.validated
    run.validated = True
    run.hb.doing("validation" + (" (compiling the forward first)" if first else ""),
                 f"{steps} batches of {B} x {T} tokens")
    progress = lambda i: run.hb.detail(f"batch {i}/{steps} done")  # noqa: E731
    run.model.eval()
    try:
        if run.val_sharded:
            val = data.PackedLoader(run.tokenizer, run.val_files, B, T, device=run.device, rank=info.rank,
                                    world_size=info.world_size, loop=not plan.eval_one_pass)
            return evaluate_bpb(run.model, val, steps, run.token_bytes, info, progress)
        bpb = torch.zeros((), dtype=torch.float64, device=run.device)
        if info.is_main:
            val = data.PackedLoader(run.tokenizer, run.val_files, B, T, device=run.device,
                                    loop=not plan.eval_one_pass)
            bpb += evaluate_bpb(run.model, val, steps, run.token_bytes, progress=progress)
        return all_reduce_sum(bpb, info).item()
    finally:
        run.model.train()
        run.hb.doing(None)


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


# ---- the loop -------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended training; `step` is the last completed step, `saved` whether its checkpoint is on disk."""

    def __init__(self, message: str, step: int, saved: bool):
        super().__init__(message)
        self.step, self.saved = step, saved


def train(cfg: TrainConfig, stop_after: int | None = None, fail_at: int | None = None) -> dict:
    """Train per `cfg`, as one process or as one rank of a torchrun job; returns
    {"losses": {step: loss}, "val_bpb": {step: bpb}, "samples": [...], "plan", "run_dir", "final_step"}.

    Each step s (from 0, or from the resumed step) first evaluates, samples and saves when due (and at the last
    step), then trains one optimizer step. `stop_after` ends the run after that many steps of this invocation,
    without the final evaluation (a simulated interruption); `fail_at` raises RuntimeError before step `fail_at`
    (a simulated crash, for the failure tests). Ctrl-C stops at once (inside an optimizer step: at its end) and,
    in a single-process run, saves the last completed step before raising `Interrupted`.
    """
    say = None if cfg.quiet else print
    with Heartbeat(say) as hb, InterruptGuard() as guard:
        run = _setup(cfg, hb)
        state, loader_state = LoopState(), None
        if cfg.resume_from_step >= 0:
            state, loader_state = resume(run, cfg.resume_from_step)
        loader = data.PackedLoader(run.tokenizer, run.train_files, run.plan.device_batch_size, cfg.max_seq_len,
                                   device=run.device, state=loader_state, rank=run.info.rank,
                                   world_size=run.info.world_size)
        result = {"losses": {}, "val_bpb": {}, "samples": [], "plan": run.plan.to_dict(), "run_dir": str(run.run_dir)}
        try:
            _loop(run, state, loader, result, guard, stop_after, fail_at)
        except KeyboardInterrupt:
            raise _interrupted(run, state, result) from None
        del result["loader_state"], result["saved"]  # the loop's bookkeeping for a checkpoint after Ctrl-C
        result["final_step"] = state.step
        if len(result["val_bpb"]) > 1:
            (s0, b0), (s1, b1) = min(result["val_bpb"].items()), max(result["val_bpb"].items())
            run.say(f"validation bpb {b0:.4f} at step {s0} -> {b1:.4f} at step {s1}")
        if run.info.is_main:
            update_report(cfg.base_dir or get_base_dir())
        return result


def _interrupted(run: Run, state: LoopState, result: dict) -> Interrupted:
    """After Ctrl-C: the checkpoint of the last completed step (single process; a torchrun job's ranks may be
    anywhere, so they only stop), and the one line that says what is on disk."""
    run.hb.doing(None)
    done = state.step
    on_disk = done in result.get("saved", ()) or done == run.cfg.resume_from_step
    if not on_disk and done > 0 and not run.info.enabled and "loader_state" in result:
        try:
            save(run, state, result["loader_state"], result["val_bpb"].get(done))
            on_disk = True
        except KeyboardInterrupt:  # a second Ctrl-C abandons the save; the atomic writes leave no partial file
            pass
    if on_disk:
        return Interrupted(f"interrupted after step {done}: its checkpoint is in {run.run_dir}; continue with "
                           f"--resume-from-step={done}", done, True)
    return Interrupted(f"interrupted after step {done}; no checkpoint written", done, False)


def _loop(run: Run, state: LoopState, loader, result: dict, guard: InterruptGuard, stop_after: int | None,
          fail_at: int | None) -> None:
    cfg, plan, info = run.cfg, run.plan, run.info
    batches = iter(loader)
    start_step, N = state.step, plan.num_iterations
    peak = peak_flops(run.device)
    tok_label = "tok/s/rank" if info.enabled else "tok/s"
    result["loader_state"] = loader.state_dict()  # the loader as of state.step, for a checkpoint after Ctrl-C
    result["saved"] = set()
    while True:
        step, last = state.step, state.step >= N
        resumed_here = step == start_step and cfg.resume_from_step >= 0  # evaluated and sampled before the save
        if (last or _every(cfg.eval_every, step)) and not resumed_here:
            bpb = validate(run)
            result["val_bpb"][step] = bpb
            run.say(f"step {step:05d} | validation bpb {bpb:.4f}")
            run.metrics.write({"step": step, "val_bpb": bpb})
        if (last or _every(cfg.sample_every, step)) and step > 0 and not resumed_here and info.is_main:
            run.hb.doing("sampling")
            result["samples"] = sample(run.model, run.tokenizer)
            run.hb.doing(None)
            for text in result["samples"]:
                run.say("  sample: " + text.replace("\n", "\\n"))
        if (last or _every(cfg.save_every, step)) and step > start_step:
            save(run, state, result["loader_state"], result["val_bpb"].get(step))
            result["saved"].add(step)
        if last or (stop_after is not None and step - start_step >= stop_after):
            return
        if fail_at == step:
            raise RuntimeError(f"rank {info.rank}: injected failure at step {step}")
        lrm = set_schedules(run.opt, step, cfg, plan)
        compiling = run.opt.compile and step == start_step
        run.hb.doing(f"step {step + 1}/{N}" + (" (compiling: model, loss, optimizer)" if compiling else ""))
        t0 = time.perf_counter()
        loss = train_step(run.model, run.opt, batches, plan.grad_accum_steps, info, guard)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        dt = time.perf_counter() - t0
        run.hb.doing(None)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if compiling:
            run.say(f"step {step + 1} took {format_duration(dt)}, torch.compile included (later steps reuse it)")
        state.record(loss, dt, timed=step > start_step)  # the first step of a process includes warm-up
        result["loader_state"] = loader.state_dict()
        result["losses"][step] = loss
        _log_step(run, state, loss, lrm, dt, peak, tok_label, first=step == start_step)
        if guard.pending:  # Ctrl-C during the optimizer step: stop now that the step is whole
            raise KeyboardInterrupt


def _log_step(run: Run, state: LoopState, loss: float, lrm: float, dt: float, peak: float | None, tok_label: str,
              first: bool) -> None:
    plan, N, done = run.plan, run.plan.num_iterations, state.step
    tok_s = plan.total_batch_size / dt / run.info.world_size  # per GPU
    mfu = plan.flops_per_token * tok_s / peak if peak else None
    if _every(run.cfg.log_every, done) or done == N or first:
        eta = state.eta(N)
        run.say(f"step {done:05d}/{N:05d} ({100 * done / N:5.1f}%) | loss {loss:.4f} | lrm {lrm:.3f} | "
                f"dt {dt * 1000:.0f}ms | {tok_label} {tok_s:,.0f} | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
                f" | eta {format_duration(eta) if math.isfinite(eta) else '-'}")
    run.metrics.write({"step": done, "loss": loss, "lrm": lrm, "dt": dt, "tok_per_s_per_rank": tok_s, "mfu": mfu})
