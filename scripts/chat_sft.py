"""Supervised fine-tuning: teach a base checkpoint the chat format on conversations.

    python -m scripts.chat_sft --data chats.jsonl                  # one pass over the conversations
    torchrun --nproc_per_node=8 -m scripts.chat_sft --data chats.jsonl

Loads the newest complete checkpoint in `<base>/base_checkpoints/*` (or --source-dir / --step), its optimizer
shard (momentum buffers; the learning rates are set afresh) and the tokenizer, then trains on conversations
({"messages": [...]}, one per line of --data) with the loss on the assistant's tokens only (SPEC §11: the
tokenizer's `render_conversation` mask; every other target is the model's ignore index, -1). Conversations are
packed into rows of --max-seq-len + 1 tokens, best fit first: a row starts at a conversation's <|bos|>, holds
only whole conversations (a longer one is cropped to the row) and is padded at its end with ignored targets.

The recipe is the reference's SFT: batch sizes and learning rates inherited from the base checkpoint, each
learning rate times --init-lr-frac (0.8), no warmup, a linear warm-down over the last half to 0, Muon momentum
0.85 -> 0.95 over 300 steps, no weight decay, and one pass over the training conversations unless
--num-iterations says otherwise. The held-out loss (nats per supervised token) and bits per byte are evaluated
every --eval-every steps and at the end. Checkpoints go to `<base>/chatsft_checkpoints/d{depth}/` in the base
layout (model_*.pt, meta_*.json, optim_*_rank{r}.pt), written atomically; --resume-from-step continues exactly.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import (
    config_from_meta,
    load_checkpoint,
    load_meta,
    optim_path,
    patch_state_dict,
    save_checkpoint,
)
from tritonchat.engine.cli import (
    ArgumentParser,
    HelpFormatter,
    UsageError,
    add_training_runtime_flags,
    command_name,
    run_main,
)
from tritonchat.engine.gpt import GPT, build_model
from tritonchat.engine.paths import get_base_dir
from tritonchat.engine.report import update_report
from tritonchat.engine.tokenizer import Tokenizer, load_token_bytes
from tritonchat.scripts.chat_cli import SOURCES
from tritonchat.scripts.tuning import FALLBACKS, check_vocab, setup, source_checkpoint
from tritonchat.tasks.datafiles import iter_jsonl
from tritonchat.train import reference
from tritonchat.train.config import activation_bytes, recompute_choice
from tritonchat.train.dist import DistInfo, all_gather_objects, all_reduce_sum, barrier
from tritonchat.train.loop import MetricsLog, reference_optimizer_shards
from tritonchat.train.optim import MuonAdamW, build_param_groups
from tritonchat.train.progress import Heartbeat, InterruptGuard, format_duration, interrupt_after
from tritonchat.train.setup import (
    release_freed_memory_if_large,
)

PROG = command_name("scripts.chat_sft")
SINGLE = DistInfo()


# ---- conversations ----------------------------------------------------------------------------------
def iter_conversations(path: str | Path) -> Iterator[dict]:
    """The conversations of a JSONL file, one {"messages": [...]} per non-empty line; ValueError naming the
    line for anything else."""
    for n, conv in iter_jsonl(path):
        if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
            raise ValueError(f'{path}:{n}: each line must be an object {{"messages": [...]}}')
        yield conv


# The tasks --tasks can mix: name -> (module, class, training kwargs, held-out kwargs or None). The reference's
# SFT mixture is SmolTalk, MMLU:1 (auxiliary_train), GSM8K, SimpleSpelling and SpellingBee, plus identity
# conversations (--data); its held-out set SmolTalk, MMLU and GSM8K test.
SFT_TASKS = {
    "SmolTalk": ("tritonchat.tasks.smoltalk", "SmolTalk", {"split": "train"}, {"split": "test"}),
    "MMLU": ("tritonchat.tasks.mmlu", "MMLU", {"split": "auxiliary_train"}, {"split": "test"}),
    "ARC-Easy": ("tritonchat.tasks.arc", "ARC", {"subset": "ARC-Easy", "split": "train"},
                 {"subset": "ARC-Easy", "split": "test"}),
    "ARC-Challenge": ("tritonchat.tasks.arc", "ARC", {"subset": "ARC-Challenge", "split": "train"},
                      {"subset": "ARC-Challenge", "split": "test"}),
    "GSM8K": ("tritonchat.tasks.gsm8k", "GSM8K", {"subset": "main", "split": "train"},
              {"subset": "main", "split": "test"}),
    "SpellingBee": ("tritonchat.tasks.spellingbee", "SpellingBee", {"size": 80_000, "split": "train"},
                    {"size": 200, "split": "test"}),
    "SimpleSpelling": ("tritonchat.tasks.spellingbee", "SimpleSpelling", {"size": 200_000, "split": "train"},
                       {"size": 200, "split": "test"}),
}


def parse_tasks(spec: str) -> list[tuple[str, float]]:
    """"SmolTalk,GSM8K:2,SpellingBee:0.5" -> [(name, epochs), ...]; ValueError naming what is wrong."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, epochs = item.partition(":")
        if name not in SFT_TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(SFT_TASKS)}")
        try:
            value = float(epochs) if epochs else 1.0
        except ValueError:
            raise ValueError(f"{item!r}: the epochs after ':' must be a number") from None
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"{item!r}: the epochs must be positive")
        out.append((name, value))
    if not out:
        raise ValueError("no tasks named")
    return out


def _task(name: str, kwargs: dict, base_dir):
    import importlib
    import inspect

    module, cls = SFT_TASKS[name][:2]
    task_cls = getattr(importlib.import_module(module), cls)
    if "base_dir" in inspect.signature(task_cls.__init__).parameters:  # generated tasks read no files
        kwargs = {**kwargs, "base_dir": base_dir}
    return task_cls(**kwargs)


def task_datasets(tasks: list[tuple[str, float]], base_dir, seed: int) -> tuple[Sequence[dict], Sequence[dict]]:
    """(training mixture, held-out mixture of the tasks' test splits) for `--tasks`."""
    from tritonchat.tasks.common import TaskMixture

    train = TaskMixture([_task(n, SFT_TASKS[n][2], base_dir) for n, _ in tasks], [e for _, e in tasks], seed=seed)
    held = [_task(n, SFT_TASKS[n][3], base_dir) for n, _ in tasks if SFT_TASKS[n][3] is not None]
    return train, (TaskMixture(held, seed=seed) if held else [])


def load_datasets(args: argparse.Namespace) -> tuple[Sequence[dict], Sequence[dict], str]:
    """(train, validation, a line saying where they came from). Any sequence of conversations works here (a
    list, or a task mixture with __len__ and __getitem__). Without --val-data, the last --val-fraction of
    --data is held out; --tasks brings its own held-out set (the tasks' test splits)."""
    if args.tasks is not None:
        base_dir = Path(args.base_dir) if args.base_dir else Path(get_base_dir())
        train, val = task_datasets(args.tasks, base_dir, args.seed)
        names = ", ".join(f"{n}:{e:g}" for n, e in args.tasks)
        if args.data is not None:  # the user's own conversations beside the mixture, e.g. identity ones
            from tritonchat.tasks.common import TaskSequence
            from tritonchat.tasks.customjson import CustomJSON

            train = TaskSequence([train, CustomJSON(args.data)])
            names += f" and {args.data}"
        if args.val_data:
            val = list(iter_conversations(args.val_data))
        if len(train) == 0:
            raise UsageError(f"--tasks {names}: no conversations to train on")
        return train, val, f"{len(train):,} conversations from {names}, {len(val):,} held out"
    train = list(iter_conversations(args.data))
    if args.val_data:
        val = list(iter_conversations(args.val_data))
        where = f"{len(train):,} conversations from {args.data}, {len(val):,} held out from {args.val_data}"
    else:
        n_val = min(len(train) - 1, max(1, round(args.val_fraction * len(train)))) if len(train) > 1 else 0
        train, val = train[:len(train) - n_val], train[len(train) - n_val:]
        where = f"{len(train):,} conversations from {args.data}, its last {len(val):,} held out"
    if not train:
        raise UsageError(f"--data {args.data}: no conversations to train on")
    return train, val, where


class Shuffled(Sequence):
    """`items` in a fixed pseudo-random order (the same for every rank and every resume)."""

    def __init__(self, items: Sequence, seed: int):
        self.items = items
        self.order = list(range(len(items)))
        random.Random(seed).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.items[self.order[i]]


# ---- packing ------------------------------------------------------------------------------------------
def best_fit(lengths: Sequence[int], remaining: int) -> int:
    """Index of the longest length <= remaining (the first of equals), -1 when none fits."""
    best, best_len = -1, 0
    for i, n in enumerate(lengths):
        if best_len < n <= remaining:
            best, best_len = i, n
    return best


def rows_per_epoch(lengths: Sequence[int], capacity: int, buffer_size: int) -> int:
    """How many rows `SFTBatches` fills before it has used every conversation of `lengths` once (the same
    best-fit over the same buffer, on lengths alone)."""
    buf: list[int] = []
    cursor = used = rows = 0
    while used < len(lengths):
        rows += 1
        filled = 0
        while True:
            while len(buf) < buffer_size:
                buf.append(lengths[cursor % len(lengths)])
                cursor += 1
            i = best_fit(buf, capacity - filled)
            if i < 0:
                break
            filled += buf.pop(i)
            used += 1
            if filled == capacity:
                break
    return rows


class SFTBatches:
    """(inputs, targets) micro-batches of `batch_size` rows x `seq_len` tokens from this rank's share of
    `dataset` (items rank, rank + world_size, ...). Each row is seq_len + 1 tokens of whole conversations
    (rendered and cropped to the row) chosen best fit first from a buffer of `buffer_size`; the rest of a row
    is <|bos|> padding. targets[t] = row[t + 1] where its mask is 1, else -1 (user turns, <|bos|>,
    <|assistant_start|>, tool outputs, padding). With loop=False (validation) one pass, the last batch padded
    with empty rows; else epochs repeat. `state_dict()` is the position after the last batch yielded;
    `rows` holds, per row of that batch, the dataset indices it packs."""

    def __init__(self, tokenizer: Tokenizer, dataset: Sequence[dict], batch_size: int, seq_len: int, device="cpu",
                 rank: int = 0, world_size: int = 1, loop: bool = True, buffer_size: int = 100,
                 state: dict | None = None):
        self.tok, self.dataset, self.B, self.T = tokenizer, dataset, batch_size, seq_len
        self.device, self.loop, self.buffer_size = torch.device(device), loop, buffer_size
        self.shard = range(rank, len(dataset), world_size)
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.used, self.buffer = 0, 0, []  # buffer: [(position, ids, mask)]
        self.rows: list[list[int]] = []
        if state is not None:
            self.cursor, self.used = int(state["cursor"]), int(state["used"])
            self.buffer = [(p, *self.render(p)) for p in state["buffer"]]

    def render(self, position: int) -> tuple[list[int], list[int]]:
        conv = self.dataset[self.shard[position % len(self.shard)]]
        return self.tok.render_conversation(conv, max_tokens=self.T + 1)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "used": self.used, "buffer": [p for p, _, _ in self.buffer]}

    @property
    def epoch(self) -> float:
        """Passes over this rank's share so far (fractional)."""
        return self.used / max(len(self.shard), 1)

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size and (self.loop or self.cursor < len(self.shard)):
            self.buffer.append((self.cursor, *self.render(self.cursor)))
            self.cursor += 1

    def _row(self) -> tuple[list[int], list[int], list[int]]:
        """(ids, mask, dataset indices) of one row of T + 1 tokens."""
        cap = self.T + 1
        ids, mask, members = [], [], []
        while len(ids) < cap:
            self._refill()
            i = best_fit([len(c) for _, c, _ in self.buffer], cap - len(ids))
            if i < 0:
                break
            p, c, m = self.buffer.pop(i)
            ids += c
            mask += m
            members.append(self.shard[p % len(self.shard)])
            self.used += 1
        pad = cap - len(ids)
        return ids + [self.bos] * pad, mask + [0] * pad, members

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not len(self.shard):
            return
        while True:
            self._refill()
            if not self.buffer:
                return
            rows = [self._row() for _ in range(self.B)]
            self.rows = [members for _, _, members in rows]
            ids = torch.tensor([r for r, _, _ in rows], dtype=torch.long)
            mask = torch.tensor([m for _, m, _ in rows], dtype=torch.bool)
            x = ids[:, :-1].contiguous()
            y = torch.where(mask[:, 1:], ids[:, 1:], -1)  # -1: the model's ignore index
            yield x.to(self.device), y.to(self.device)


# ---- schedules (the reference's SFT) -------------------------------------------------------------------------
def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Of the learning rates at progress 0..1 through the run: linear warmup, flat, linear warm-down."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 over the first 300 steps, then 0.95."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# ---- settings ------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What a run resolved from its flags and the base checkpoint; saved in meta["sft"], reused on resume."""

    source_dir: str
    source_step: int
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    grad_accum_steps: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    init_lr_frac: float
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    num_iterations: int


def _inherit(args: argparse.Namespace, meta: dict, device: torch.device, say) -> dict:
    """Batch sizes from the base checkpoint's meta, learning rates from its user_config (a flag wins). Where the
    checkpoint does not say: the reference's values, except the model's own context for --max-seq-len and, on
    a CPU, one micro-batch per step of 2048 tokens' worth of rows (as the trainer does there)."""
    user = meta.get("user_config") or {}
    fallbacks = {**FALLBACKS, "max_seq_len": meta["model_config"].get("sequence_len", FALLBACKS["max_seq_len"])}
    if device.type == "cpu":
        T = args.max_seq_len or meta.get("max_seq_len") or fallbacks["max_seq_len"]
        fallbacks["device_batch_size"] = max(1, 2048 // T)
        fallbacks["total_batch_size"] = 0  # resolved by _batch_plan: one micro-batch per rank
    out = {}
    for name, fallback in fallbacks.items():
        saved = (meta if name in ("max_seq_len", "device_batch_size", "total_batch_size") else user).get(name)
        flag = getattr(args, name)
        out[name] = flag if flag is not None else saved if isinstance(saved, (int, float)) and saved > 0 else fallback
        if flag is None and out[name] == 0:
            say(f"  {name}: one micro-batch per rank per step (on a CPU, as the trainer does)")
        elif flag is None:
            say(f"  {name} = {out[name]} ({'from the base checkpoint' if saved == out[name] else 'default'})")
    return out


def _batch_plan(v: dict, args: argparse.Namespace, info: DistInfo, say) -> int:
    for name in ("max_seq_len", "device_batch_size"):
        if v[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v[name]}")
    per_step = v["device_batch_size"] * v["max_seq_len"] * info.world_size
    if v["total_batch_size"] == 0:
        v["total_batch_size"] = per_step
    if v["total_batch_size"] % per_step:
        if args.total_batch_size is not None:
            raise UsageError(f"--total-batch-size {v['total_batch_size']} is not a multiple of --device-batch-size x "
                             f"--max-seq-len x ranks = {per_step}")
        say(f"  the inherited total batch {v['total_batch_size']:,} is not a multiple of {per_step:,} tokens per "
            f"micro-batch: using {max(1, v['total_batch_size'] // per_step)} micro-batch(es) per step")
        v["total_batch_size"] = max(1, v["total_batch_size"] // per_step) * per_step
    return v["total_batch_size"] // per_step


# ---- steps ---------------------------------------------------------------------------------------------
def set_schedules(opt: MuonAdamW, step: int, s: Settings) -> float:
    lrm = lr_multiplier(step / s.num_iterations, s.warmup_ratio, s.warmdown_ratio, s.final_lr_frac)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * lrm
        if g["kind"] == "muon":
            g["momentum"] = muon_momentum(step)
    return lrm


def masked_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss over the supervised targets (0 for a batch without any, rather than nan)."""
    return model(x, y, loss_reduction="sum") / (y >= 0).sum().clamp_min(1)


def train_step(model: GPT, opt: MuonAdamW, batches, grad_accum_steps: int, info: DistInfo = SINGLE,
               guard: InterruptGuard | None = None) -> float:
    total = torch.zeros(())
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        loss = masked_loss(model, x, y)
        (loss / grad_accum_steps).backward()
        total = total.to(loss.device) + loss.detach().float()
    if guard is not None:
        with guard.deferred():
            opt.step()
    else:
        opt.step()
    model.zero_grad(set_to_none=True)
    return (all_reduce_sum(total / grad_accum_steps, info) / info.world_size).item()


@torch.no_grad()
def evaluate(model: GPT, batches, max_batches: int, token_bytes: torch.Tensor,
             info: DistInfo = SINGLE) -> tuple[float, float]:
    """(nats per supervised target, bits per byte of the supervised targets that have bytes) over up to
    `max_batches` batches (-1: all), summed over ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=token_bytes.device)  # nats, targets, bytes
    bytes_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for i, (x, y) in enumerate(batches):
        if 0 <= max_batches <= i:
            break
        loss = model(x, y, loss_reduction="none").double()
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp_min(0)], 0).double()
        sums += torch.stack([(loss * valid).sum(), valid.sum().double(), b.sum()])
        bytes_nats += (loss * (b > 0)).sum()
    all_reduce_sum(sums, info)
    all_reduce_sum(bytes_nats, info)
    nats, count, nbytes = sums.tolist()
    if count == 0:
        raise ValueError("the held-out conversations have no assistant tokens to score")
    return nats / count, bytes_nats.item() / (math.log(2) * max(nbytes, 1.0))


# ---- the run ---------------------------------------------------------------------------------------------
def _load_base_optimizer(opt: MuonAdamW, src: Path, step: int, meta: dict, info: DistInfo, device, say) -> None:
    """The base run's optimizer state (momentum buffers), when it was written by as many ranks as this run has
    (or by the reference trainer, converted); the learning rates are kept as this run set them."""
    path = optim_path(src, step, info.rank)
    if not path.exists():
        say(f"  no optimizer state in {src} at step {step}: starting with a fresh optimizer")
        return
    state = torch.load(path, map_location=device, weights_only=True)
    if reference.is_reference_optimizer_state(state, opt):
        state = reference.convert_optimizer([torch.load(p, map_location=device, weights_only=True)
                                             for p in reference_optimizer_shards(src, step)], opt)
    elif meta.get("world_size", 1) != info.world_size:
        say(f"  the base optimizer state is {meta.get('world_size', 1)} rank(s)' shards, this run has "
            f"{info.world_size}: starting with a fresh optimizer")
        return
    fresh = [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, (lr, initial, wd) in zip(opt.param_groups, fresh):
        g["lr"], g["initial_lr"], g["weight_decay"] = lr, initial, wd
    say("  loaded the base optimizer state (momentum buffers; learning rates set afresh)")


def train_sft(args: argparse.Namespace, stop_after: int | None = None) -> dict:
    """Run SFT per `args` (parse_args); returns {"losses": {step: loss}, "val_loss": {step: ...},
    "val_bpb": {...}, "out_dir", "final_step", "settings"}. `stop_after` ends after that many steps of this
    invocation (a simulated interruption; a checkpoint only where --save-every puts one)."""
    with Heartbeat(None if args.quiet else print) as hb, InterruptGuard() as guard:
        st = setup(args)
        device, info, dtype, emb_dtype, impl, base_dir = st.device, st.info, st.dtype, st.embedding_dtype, st.impl, \
            st.base_dir
        if not info.is_main:
            hb = Heartbeat(None)
        tokenizer, token_bytes = st.tokenizer, load_token_bytes(st.tokenizer_dir, device)

        resuming = args.resume_from_step >= 0
        src, src_step = source_checkpoint(args, base_dir, "base",
                                          missing="pretrain one (`python -m train`), or pass --source-dir")
        src_meta = load_meta(src, src_step)
        config = config_from_meta(src_meta["model_config"])
        check_vocab(config, tokenizer, src, st.tokenizer_dir)
        out_dir = Path(args.out_dir) if args.out_dir else base_dir / SOURCES["sft"] / f"d{config.n_layer}"

        train_set, val_set, where = load_datasets(args)
        train_set = Shuffled(train_set, args.seed)
        hb.say(f"chat_sft: {where}")
        hb.say(f"  base checkpoint {src} step {src_step}; output {out_dir}")
        v = _inherit(args, src_meta, device, hb.say)
        accum = _batch_plan(v, args, info, hb.say)
        B, T = v["device_batch_size"], v["max_seq_len"]
        if args.num_iterations > 0:
            N = args.num_iterations
        else:  # one pass: the shortest rank's epoch, so every rank stops at the same step
            hb.doing("measuring one pass over the training conversations")
            share = range(info.rank, len(train_set), info.world_size)
            lengths = [len(tokenizer.render_conversation(train_set[i], max_tokens=T + 1)[0]) for i in share]
            rows = rows_per_epoch(lengths, T + 1, args.buffer_size) if lengths else 0
            N = max(1, min(all_gather_objects(-(-rows // (B * accum)), info)))
            hb.doing(None)
        s = Settings(str(src), src_step, T, B, v["total_batch_size"], accum, v["embedding_lr"], v["unembedding_lr"],
                     v["matrix_lr"], v["scalar_lr"], args.init_lr_frac, args.warmup_ratio, args.warmdown_ratio,
                     args.final_lr_frac, N)

        hb.doing("loading the model")
        meta = None
        if resuming:
            model_state, optim_state, meta = load_checkpoint(out_dir, args.resume_from_step, device=device,
                                                             load_optimizer=True, rank=info.rank)
            s = Settings(**meta["sft"])
            if meta.get("world_size", 1) != info.world_size:
                raise UsageError(f"--resume-from-step {args.resume_from_step}: written by {meta.get('world_size', 1)}"
                                 f" rank(s), this job has {info.world_size}")
        else:
            model_state, _, _ = load_checkpoint(src, src_step, device=device)
        model = build_model(config, device=device, impl=impl, compute_dtype=dtype, init=False,
                            embedding_dtype=emb_dtype)
        model.load_state_dict(patch_state_dict(model_state, model), strict=True)
        act_bytes = activation_bytes(config, B * T)
        model.recompute, note = recompute_choice(args.recompute, device.type == "cpu", act_bytes)
        release_freed_memory_if_large(model, device, 0 if model.recompute else act_bytes)
        if note:
            hb.say("  " + note)
        model.check_ids = device.type != "cuda"
        del model_state
        groups = build_param_groups(model, s.unembedding_lr, s.embedding_lr, s.matrix_lr, s.scalar_lr, 0.0, 1.0)
        for g in groups:
            g["lr"] = g["initial_lr"] = g["lr"] * s.init_lr_frac
        opt = MuonAdamW(groups, impl=impl, rank=info.rank, world_size=info.world_size)
        if resuming:
            opt.load_state_dict(optim_state)
            del optim_state
        elif args.load_optimizer:
            _load_base_optimizer(opt, src, src_step, src_meta, info, device, hb.say)
        hb.doing(None)

        step = meta["step"] if resuming else 0
        loader_state = (meta.get("dataloader_states") or [None] * info.world_size)[info.rank] if resuming else None
        loader = SFTBatches(tokenizer, train_set, B, T, device, info.rank, info.world_size,
                            buffer_size=args.buffer_size, state=loader_state)
        hb.say(f"  depth {config.n_layer}, {sum(p.numel() for p in model.parameters()):,} params | {N} steps of "
               f"{accum} x {B} x {T} tokens x {info.world_size} rank(s) | lr x {s.init_lr_frac} | device {device}, "
               f"{dtype}, impl={impl}")
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        barrier(info)
        metrics = MetricsLog(out_dir / "metrics.jsonl", info, args.run, step if resuming else None)
        result = {"losses": {}, "val_loss": {}, "val_bpb": {}, "out_dir": str(out_dir), "settings": asdict(s)}
        run = _Run(args, s, info, model, opt, loader, tokenizer, token_bytes, val_set, out_dir, hb, metrics, result)
        try:
            run.loop(step, guard, stop_after)
        except KeyboardInterrupt:
            raise run.interrupted() from None
        if info.is_main:
            update_report(base_dir)
        return result


@dataclass
class _Run:
    args: argparse.Namespace
    s: Settings
    info: DistInfo
    model: GPT
    opt: MuonAdamW
    loader: SFTBatches
    tokenizer: Tokenizer
    token_bytes: torch.Tensor
    val_set: Sequence[dict]
    out_dir: Path
    hb: Heartbeat
    metrics: MetricsLog
    result: dict
    step: int = 0
    saved_step: int = -1
    loader_state: dict | None = None

    def validate(self) -> tuple[float, float]:
        s, info = self.s, self.info
        self.hb.doing("evaluating the held-out conversations")
        self.model.eval()
        try:
            val = SFTBatches(self.tokenizer, self.val_set, s.device_batch_size, s.max_seq_len, self.token_bytes.device,
                             info.rank, info.world_size, loop=False, buffer_size=self.args.buffer_size)
            per_batch = s.device_batch_size * s.max_seq_len * info.world_size
            max_batches = -1 if self.args.eval_tokens < 0 else max(1, self.args.eval_tokens // per_batch)
            return evaluate(self.model, val, max_batches, self.token_bytes, info)
        finally:
            self.model.train()
            self.hb.doing(None)

    def save(self, val: tuple[float, float] | None) -> None:
        info = self.info
        self.hb.doing(f"writing the checkpoint of step {self.step}")
        states = all_gather_objects(self.loader_state, info)
        save_checkpoint(self.out_dir, self.step, None, self.opt.state_dict(), None, rank=info.rank)
        barrier(info)  # every optimizer shard is on disk before meta marks the checkpoint complete
        if info.is_main:
            meta = {"step": self.step, "val_loss": val and val[0], "val_bpb": val and val[1],
                    "model_config": self.model.config.to_dict(), "user_config": vars(self.args),
                    "device_batch_size": self.s.device_batch_size, "max_seq_len": self.s.max_seq_len,
                    "total_batch_size": self.s.total_batch_size, "world_size": info.world_size,
                    "dataloader_states": states, "sft": asdict(self.s)}
            save_checkpoint(self.out_dir, self.step, self.model.state_dict(), None, meta)
        barrier(info)
        self.saved_step = self.step
        self.hb.doing(None)
        self.hb.say(f"saved checkpoint at step {self.step} to {self.out_dir}")

    def loop(self, start: int, guard: InterruptGuard, stop_after: int | None) -> None:
        args, s, N = self.args, self.s, self.s.num_iterations
        self.step, resumed = start, args.resume_from_step >= 0
        self.saved_step = start if resumed else -1
        self.loader_state = self.loader.state_dict()
        batches = iter(self.loader)
        total_time, timed = 0.0, 0
        while True:
            last = self.step >= N
            val = None
            due = last or (args.eval_every > 0 and self.step % args.eval_every == 0)
            if due and len(self.val_set) and not (resumed and self.step == start):
                val = self.validate()
                self.result["val_loss"][self.step], self.result["val_bpb"][self.step] = val
                self.hb.say(f"step {self.step:05d} | held-out loss {val[0]:.4f} | bpb {val[1]:.4f}")
                self.metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1]})
            if self.step > start and (last or (args.save_every > 0 and self.step % args.save_every == 0)):
                self.save(val)
            if last or (stop_after is not None and self.step - start >= stop_after):
                self.result["final_step"] = self.step
                return
            lrm = set_schedules(self.opt, self.step, s)
            self.hb.doing(f"step {self.step + 1}/{N}")
            t0 = time.perf_counter()
            loss = train_step(self.model, self.opt, batches, s.grad_accum_steps, self.info, guard)
            if self.token_bytes.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.hb.doing(None)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}")
            self.step += 1
            self.loader_state = self.loader.state_dict()
            self.result["losses"][self.step - 1] = loss
            if self.step - start > 1:
                total_time, timed = total_time + dt, timed + 1
            eta = (N - self.step) * total_time / timed if timed else float("nan")
            if self.step == start + 1 or self.step == N or (args.log_every > 0 and self.step % args.log_every == 0):
                self.hb.say(f"step {self.step:05d}/{N:05d} ({100 * self.step / N:5.1f}%) | loss {loss:.4f} | "
                            f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {s.total_batch_size / dt:,.0f} | "
                            f"epoch {self.loader.epoch:.2f} | eta {format_duration(eta) if timed else '-'}")
            self.metrics.write({"step": self.step, "loss": loss, "lrm": lrm, "dt": dt})
            if guard.pending:
                raise KeyboardInterrupt

    def interrupted(self) -> KeyboardInterrupt:
        """After Ctrl-C: the checkpoint of the last completed step (single process), and the line saying so."""
        return interrupt_after(self.hb, self.step, self.saved_step, self.out_dir, self._save_last, self.info.enabled)

    def _save_last(self) -> int:
        self.save(None)
        return self.saved_step


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help='training conversations: a JSONL file, one {"messages": [...]} a line')
    p.add_argument("--tasks", default=None,
                   help="a task mixture instead of (or beside) --data: NAME[:EPOCHS],... of " + ", ".join(SFT_TASKS)
                   + "; the held-out set is their test splits")
    p.add_argument("--val-data", default=None, help="held-out conversations (default: the end of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out without --val-data")
    p.add_argument("--source-dir", default=None,
                   help="base checkpoint folder (default: the newest complete one in <base>/base_checkpoints/*)")
    p.add_argument("--step", type=int, default=None, help="its step (default: the last complete one)")
    p.add_argument("--load-optimizer", type=int, default=1, choices=[0, 1],
                   help="start from the base optimizer's momentum buffers (1) or a fresh optimizer (0)")
    p.add_argument("--out-dir", default=None, help="default: <base>/chatsft_checkpoints/d{depth}")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over --data)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: the base run's)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per micro-batch (default: the base run's)")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step (default: the base run's)")
    for name in ("embedding", "unembedding", "matrix", "scalar"):
        p.add_argument(f"--{name}-lr", type=float, default=None, help=f"{name} lr (default: the base run's)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="every lr times this")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of steps warming up the lr")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="share of steps warming the lr down")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction")
    p.add_argument("--eval-every", type=int, default=200, help="held-out evaluation every N steps (-1: end only)")
    p.add_argument("--eval-tokens", type=int, default=-1, help="held-out tokens per evaluation (-1: all of them)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: at the end only)")
    p.add_argument("--resume-from-step", type=int, default=-1, help="continue from this SFT checkpoint")
    p.add_argument("--log-every", type=int, default=10, help="a step line every N steps")
    p.add_argument("--buffer-size", type=int, default=100, help="conversations the packer picks rows from")
    p.add_argument("--seed", type=int, default=42, help="the order of the training conversations")
    p.add_argument("--run", default="dummy", help="run name in metrics.jsonl")
    add_training_runtime_flags(p)
    p.add_argument("--recompute", default="auto", choices=["auto", "on", "off"],
                   help="recompute each block's activations in backward (auto: on a CPU when a micro-batch would "
                        "keep over 1 GiB of them)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.data is None and args.tasks is None:
        p.error("give --data (a JSONL file of conversations), --tasks (a task mixture), or both")
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if args.tasks is not None:
        try:
            args.tasks = parse_tasks(args.tasks)
        except ValueError as e:
            p.error(f"--tasks: {e}")
    if args.val_data and not Path(args.val_data).is_file():
        p.error(f"--val-data {args.val_data}: no such file")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("warmup_ratio", "warmdown_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.buffer_size < 1:
        p.error(f"--buffer-size must be >= 1, got {args.buffer_size}")
    return args


def _main(argv=None) -> int:
    result = train_sft(parse_args(argv))
    if len(result["val_loss"]) > 1:
        (s0, l0), (s1, l1) = min(result["val_loss"].items()), max(result["val_loss"].items())
        print(f"held-out loss {l0:.4f} at step {s0} -> {l1:.4f} at step {s1}")
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
