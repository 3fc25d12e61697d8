"""Reinforcement learning on verifiable rewards: sample answers, score them with the task's verifier, reinforce.

    python -m scripts.chat_rl                               # GSM8K from the newest SFT checkpoint
    python -m scripts.chat_rl --data problems.jsonl         # your own problems with checkable answers
    torchrun --nproc_per_node=8 -m scripts.chat_rl

Each step takes --prompts-per-step training prompts (split over the ranks), samples --num-samples completions of
each with the batched engine (tool use on: calculator outputs are forced into the stream), rewards each with the
task's `reward` (GSM8K: the final '#### <number>' equals the reference's), and takes one policy-gradient step
(train.feedback): advantage = reward - the group's mean (over its std with --normalize-advantages 1), loss
-A * log p on the sampled tokens only (prompt and forced tool outputs carry no gradient), averaged over the
sampled tokens. On-policy: the engine samples from the very model being trained (no copy), which switches
between eval (sampling) and train (the update). The optimizer and learning rates are chat_sft's, times
--init-lr-frac, decayed linearly to 0.

--data: a JSONL file of conversations ({"messages": [...]}) whose last assistant message is the reference
answer; a completion scores 1 when its '#### <number>' equals the reference's (if the reference has one), else
when its text equals the reference's (stripped). The last --val-fraction is held out.

Every --eval-every steps (and at the end) --eval-examples held-out prompts get --pass-k samples each, with seeds
that do not depend on the step: the mean reward and pass@1..k are printed and written to metrics.jsonl.
Checkpoints go to `<base>/chatrl_checkpoints/d{depth}/`; --resume-from-step continues exactly (the prompts and
the sampling seeds of a step depend only on --seed and the step).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tritonchat.engine.cli import ArgumentParser, HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.engine import Engine, Generation, SamplingParams
from tritonchat.engine.gpt import GPT
from tritonchat.engine.report import update_report
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import tuning
from tritonchat.scripts.chat_sft import Shuffled, iter_conversations, lr_multiplier
from tritonchat.tasks.gsm8k import extract_answer
from tritonchat.train.dist import DistInfo, all_reduce_sum
from tritonchat.train.feedback import completion_batch, group_advantages, policy_gradient_loss, token_logprobs
from tritonchat.train.loop import MetricsLog
from tritonchat.train.optim import MuonAdamW
from tritonchat.train.progress import Heartbeat, InterruptGuard, format_duration, interrupt_after

PROG = command_name("scripts.chat_rl")
# --task: name -> (module, class, training kwargs, held-out kwargs)
RL_TASKS = {
    "GSM8K": ("tritonchat.tasks.gsm8k", "GSM8K", {"subset": "main", "split": "train"},
              {"subset": "main", "split": "test"}),
    "SpellingBee": ("tritonchat.tasks.spellingbee", "SpellingBee", {"size": 80_000, "split": "train"},
                    {"size": 256, "split": "test"}),
}


# ---- the verifier of --data ------------------------------------------------------------------------------
def reference_text(conversation: dict) -> str:
    """The text of a conversation's last (assistant) message, its parts joined."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


class AnswerTask(Sequence):
    """Conversations whose last assistant message is the answer to check (see the module docstring)."""

    def __init__(self, conversations: Sequence[dict]):
        self.items = list(conversations)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def reward(self, conversation: dict, completion: str) -> float:
        ref = reference_text(conversation)
        number = extract_answer(ref)
        if number is not None:
            return float(extract_answer(completion) == number)
        return float(completion.strip() == ref.strip())


def load_tasks(args: argparse.Namespace, base_dir: Path):
    """(training task, held-out task, a line saying where they come from); each has __len__, __getitem__ and
    reward(conversation, completion)."""
    if args.data is not None:
        convs = list(iter_conversations(args.data))
        for n, c in enumerate(convs, 1):
            if not c["messages"] or c["messages"][-1].get("role") != "assistant":
                raise UsageError(f"{args.data}: conversation {n} does not end with the assistant's answer")
        if args.val_data:
            val = list(iter_conversations(args.val_data))
        else:
            n_val = min(len(convs) - 1, max(1, round(args.val_fraction * len(convs)))) if len(convs) > 1 else 0
            convs, val = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
        if not convs:
            raise UsageError(f"--data {args.data}: no problems to train on")
        return AnswerTask(convs), AnswerTask(val), f"{len(convs):,} problems from {args.data}, {len(val):,} held out"
    import importlib
    import inspect

    module, cls, train_kw, val_kw = RL_TASKS[args.task]
    task_cls = getattr(importlib.import_module(module), cls)
    extra = {"base_dir": base_dir} if "base_dir" in inspect.signature(task_cls.__init__).parameters else {}
    train, val = task_cls(**train_kw, **extra), task_cls(**val_kw, **extra)
    return train, val, f"{args.task}: {len(train):,} training problems, {len(val):,} held out"


# ---- sampling and the update ---------------------------------------------------------------------------
@dataclass
class Settings:
    """What a run resolved; saved in meta["rl"] and reused on resume."""

    source_dir: str
    source_step: int
    num_iterations: int
    prompts_per_step: int
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int
    device_batch_size: int
    normalize_advantages: bool
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    init_lr_frac: float


def sample_groups(engine: Engine, tokenizer: Tokenizer, convs: Sequence[dict], n: int, params: SamplingParams,
                  seeds: Sequence[Sequence[int]]) -> list[list[tuple[list[int], list[int], list[bool], str]]]:
    """For each conversation, n completions (prompt, completion tokens, forced flags, text) sampled with
    seeds[i][j]. A completion that ended on <|assistant_end|> keeps it as its last (sampled) token."""
    end = tokenizer.encode_special("<|assistant_end|>")
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    flat = [(p, SamplingParams(**{**params.__dict__, "seed": seeds[i][j], "stop_tokens": [end]}))
            for i, p in enumerate(prompts) for j in range(n)]
    gens: list[Generation] = engine.generate([p for p, _ in flat], [sp for _, sp in flat])
    out = []
    for i, p in enumerate(prompts):
        group = []
        for g in gens[i * n:(i + 1) * n]:
            stop = g.finish_reason == "stop"
            group.append((p, g.tokens + [end] * stop, g.forced + [False] * stop, g.text))
        out.append(group)
    return out


def policy_gradient_step(model: GPT, opt: MuonAdamW, rows: list[tuple[list[int], list[int], list[bool]]],
                         advantages: torch.Tensor, pad: int, device_batch_size: int, info: DistInfo,
                         guard: InterruptGuard | None = None) -> float:
    """One optimizer step of `policy_gradient_loss` over `rows` in micro-batches; returns the loss."""
    model.train()
    device = next(model.parameters()).device
    sampled = sum(sum(not f for f in forced) for _, _, forced in rows)
    total = 0.0
    for lo in range(0, len(rows), device_batch_size):
        ids, targets = completion_batch(rows[lo:lo + device_batch_size], pad, device)
        logp = token_logprobs(model, ids, targets)
        loss = policy_gradient_loss(logp, targets, advantages[lo:lo + device_batch_size].to(device), sampled)
        loss.backward()
        total += loss.item()
    if guard is not None:
        with guard.deferred():
            opt.step()
    else:
        opt.step()
    model.zero_grad(set_to_none=True)
    return (all_reduce_sum(torch.tensor(total, device=device), info) / info.world_size).item()


@torch.no_grad()
def evaluate(engine: Engine, tokenizer: Tokenizer, task, indices: Sequence[int], k: int, params: SamplingParams,
             seed: int, info: DistInfo, batch: int = 16) -> dict:
    """Mean reward of k samples per held-out prompt and pass@1..k (a prompt passes when one of its first j
    samples earns reward > 0), summed over the ranks. The seeds depend on the prompt, not on the step."""
    engine.model.eval()
    sums = torch.zeros(k + 2, dtype=torch.float64)  # reward sum, pass@1..k counts, prompts
    for lo in range(0, len(indices), batch):
        chunk = list(indices[lo:lo + batch])
        convs = [task[i] for i in chunk]
        seeds = [[tuning.derived_seed(seed, "eval", i, j) for j in range(k)] for i in chunk]
        for conv, group in zip(convs, sample_groups(engine, tokenizer, convs, k, params, seeds)):
            rewards = [task.reward(conv, text) for _, _, _, text in group]
            sums[0] += sum(rewards)
            for j in range(1, k + 1):
                sums[j] += any(r > 0 for r in rewards[:j])
            sums[k + 1] += 1
    sums = all_reduce_sum(sums.to(engine.device), info).cpu()
    n = max(sums[k + 1].item(), 1.0)
    return {"reward": sums[0].item() / (n * k), **{f"pass@{j}": sums[j].item() / n for j in range(1, k + 1)},
            "prompts": int(sums[k + 1].item())}


# ---- the run ---------------------------------------------------------------------------------------------
def train_rl(args: argparse.Namespace, stop_after: int | None = None) -> dict:
    """Run RL per `args` (parse_args); returns {"rewards": {step: mean training reward}, "losses", "eval":
    {step: evaluate(...)}, "out_dir", "final_step", "settings"}. `stop_after` ends after that many steps of this
    invocation (a simulated interruption)."""
    with Heartbeat(None if args.quiet else print) as hb, InterruptGuard() as guard:
        st = tuning.setup(args)
        info = st.info
        if not info.is_main:
            hb = Heartbeat(None)
        tok = st.tokenizer
        train_task, val_task, where = load_tasks(args, st.base_dir)
        hb.say(f"chat_rl: {where}")
        if args.prompts_per_step % info.world_size:
            raise UsageError(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the "
                             f"{info.world_size} ranks")
        resuming = args.resume_from_step >= 0
        hb.doing("loading the model")
        src_dir, src_step = tuning.source_checkpoint(args, st.base_dir) if not resuming or args.out_dir is None \
            else (None, None)
        out_dir = Path(args.out_dir) if args.out_dir else tuning.default_out_dir(st.base_dir, "rl", src_dir, src_step)
        state, optim_state, meta = tuning.load_start(args, out_dir, st, (src_dir, src_step))
        model = tuning.build_policy(state, meta, st)
        tuning.check_vocab(model.config, tok, out_dir if resuming else src_dir)
        del state
        if resuming:
            s = Settings(**meta["rl"])
        else:
            lrs = tuning.inherited_lrs(args, meta)
            N = args.num_iterations if args.num_iterations > 0 else max(1, len(train_task) // args.prompts_per_step)
            s = Settings(str(src_dir), src_step, N, args.prompts_per_step, args.num_samples, args.max_new_tokens,
                         args.temperature, args.top_k, args.device_batch_size, bool(args.normalize_advantages),
                         lrs["embedding_lr"], lrs["unembedding_lr"], lrs["matrix_lr"], lrs["scalar_lr"],
                         args.init_lr_frac)
        opt = tuning.build_optimizer(model, {k: getattr(s, k) for k in tuning.LRS}, s.init_lr_frac, st)
        if optim_state is not None:
            opt.load_state_dict(optim_state)
            del optim_state
        per_rank = s.prompts_per_step // info.world_size
        engine = Engine(model, tok, max_batch_size=max(1, min(per_rank * s.num_samples, args.engine_batch_size)),
                        max_seq_len=args.max_seq_len, impl=model.impl)
        params = SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k or None)
        hb.doing(None)
        hb.say(f"  depth {model.config.n_layer}, {sum(p.numel() for p in model.parameters()):,} params | "
               f"{s.num_iterations} steps of {s.prompts_per_step} prompts x {s.num_samples} samples | "
               f"{info.world_size} rank(s) | device {st.device}, impl {model.impl}")
        hb.say(f"  from {s.source_dir} step {s.source_step}; output {out_dir}")
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        start = meta["step"] if resuming else 0
        metrics = MetricsLog(out_dir / "metrics.jsonl", info, args.run, start if resuming else None)
        order = Shuffled(range(len(train_task)), args.seed)
        val_idx = list(range(info.rank, min(len(val_task), args.eval_examples), info.world_size))
        result = {"rewards": {}, "losses": {}, "eval": {}, "out_dir": str(out_dir), "settings": asdict(s)}
        step, saved = start, start if resuming else -1
        pad = tok.get_bos_token_id()

        def save() -> int:
            nonlocal saved
            hb.doing(f"writing the checkpoint of step {step}")
            tuning.save(out_dir, step, model, opt, {"user_config": vars(args), "rl": asdict(s),
                                                     "eval": result["eval"].get(step)}, info)
            saved = step
            hb.doing(None)
            hb.say(f"saved checkpoint at step {step} to {out_dir}")
            return saved

        try:
            total_time, timed = 0.0, 0
            while True:
                last = step >= s.num_iterations
                if (last or (args.eval_every > 0 and step % args.eval_every == 0)) and val_idx \
                        and not (resuming and step == start):
                    hb.doing(f"evaluating {len(val_idx)} held-out prompts x {args.pass_k} samples")
                    ev = evaluate(engine, tok, val_task, val_idx, args.pass_k, params, args.seed, info)
                    hb.doing(None)
                    result["eval"][step] = ev
                    hb.say(f"step {step:05d} | held-out reward {ev['reward']:.4f} | "
                           + " | ".join(f"pass@{j} {ev[f'pass@{j}']:.4f}" for j in range(1, args.pass_k + 1)))
                    metrics.write({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
                if step > start and (last or (args.save_every > 0 and step % args.save_every == 0)):
                    save()
                if last or (stop_after is not None and step - start >= stop_after):
                    result["final_step"] = step
                    break
                t0 = time.perf_counter()
                lrm = lr_multiplier(step / s.num_iterations, 0.0, 1.0, 0.0)
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * lrm
                hb.doing(f"step {step + 1}/{s.num_iterations}: sampling")
                model.eval()
                positions = [step * s.prompts_per_step + i for i in range(info.rank, s.prompts_per_step,
                                                                         info.world_size)]
                idx = [order[p % len(order)] for p in positions]
                convs = [train_task[i] for i in idx]
                seeds = [[tuning.derived_seed(args.seed, "train", step, p, j) for j in range(s.num_samples)]
                         for p in positions]
                groups = sample_groups(engine, tok, convs, s.num_samples, params, seeds)
                rewards = torch.tensor([[train_task.reward(c, text) for _, _, _, text in g]
                                        for c, g in zip(convs, groups)], dtype=torch.float32)
                adv = group_advantages(rewards, s.normalize_advantages).flatten()
                rows = [(p, c, f) for g in groups for p, c, f, _ in g]
                hb.doing(f"step {step + 1}/{s.num_iterations}: policy-gradient update")
                loss = policy_gradient_step(model, opt, rows, adv, pad, s.device_batch_size, info, guard)
                hb.doing(None)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}")
                sums = all_reduce_sum(torch.tensor([rewards.sum().item(), rewards.numel(),
                                                    sum(len(c) for _, c, _ in rows)], dtype=torch.float64,
                                                   device=st.device), info).tolist()
                reward, length = sums[0] / sums[1], sums[2] / sums[1]
                dt = time.perf_counter() - t0
                step += 1
                result["rewards"][step - 1], result["losses"][step - 1] = reward, loss
                if step - start > 1:
                    total_time, timed = total_time + dt, timed + 1
                eta = (s.num_iterations - step) * total_time / timed if timed else float("nan")
                if step == start + 1 or step == s.num_iterations or (args.log_every > 0 and step % args.log_every == 0):
                    hb.say(f"step {step:05d}/{s.num_iterations:05d} | reward {reward:.4f} | loss {loss:+.5f} | "
                           f"answer {length:.1f} tokens | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
                           f"eta {format_duration(eta) if timed else '-'}")
                metrics.write({"step": step, "reward": reward, "loss": loss, "answer_tokens": length, "lrm": lrm,
                               "dt": dt})
                if guard.pending:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise interrupt_after(hb, step, saved, out_dir, save, info.enabled) from None
        if info.is_main:
            update_report(st.base_dir)
        return result


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--task", default="GSM8K", choices=sorted(RL_TASKS), help="the task to learn (without --data)")
    p.add_argument("--data", default=None, help="problems instead of --task: JSONL conversations ending with the "
                   "reference answer")
    p.add_argument("--val-data", default=None, help="held-out problems (default: the end of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out without --val-data")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one pass over the training prompts)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step, over all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--normalize-advantages", type=int, default=0, choices=[0, 1],
                   help="divide the advantages by the group's reward std")
    p.add_argument("--device-batch-size", type=int, default=8, help="completions per forward/backward")
    p.add_argument("--engine-batch-size", type=int, default=64, help="completions sampled at once at most")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion limit (default: the model's)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="every lr times this")
    p.add_argument("--eval-every", type=int, default=60, help="held-out evaluation every N steps (-1: end only)")
    p.add_argument("--eval-examples", type=int, default=400, help="held-out prompts per evaluation at most")
    p.add_argument("--pass-k", type=int, default=4, help="samples per held-out prompt (pass@1..k)")
    p.add_argument("--seed", type=int, default=42, help="prompt order and sampling seeds")
    tuning.add_common_flags(p)
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if args.val_data and not Path(args.val_data).is_file():
        p.error(f"--val-data {args.val_data}: no such file")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("prompts_per_step", "num_samples", "max_new_tokens", "device_batch_size", "engine_batch_size",
                 "pass_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.top_k < 0:
        p.error("--temperature and --top-k must be >= 0")
    return args


def _main(argv=None) -> int:
    result = train_rl(parse_args(argv))
    if len(result["eval"]) > 1:
        (s0, e0), (s1, e1) = min(result["eval"].items()), max(result["eval"].items())
        print(f"held-out reward {e0['reward']:.4f} at step {s0} -> {e1['reward']:.4f} at step {s1}")
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
