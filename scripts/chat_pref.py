"""Preference tuning from ranked answers: direct preference optimization (DPO) against a frozen reference.

    python -m scripts.chat_pref --data pairs.jsonl                   # from the newest SFT checkpoint
    python -m scripts.chat_pref --data problems.jsonl --sample-out ranked.jsonl   # make pairs with a verifier

--data is JSONL, one item a line, in any of these shapes (the prompt is a conversation ending with a user
message; an answer is the assistant's content, a str or a list of parts as in tasks.common):
  {"messages": [...], "chosen": ANSWER, "rejected": ANSWER}
  {"prompt": "text" or [...messages], "chosen": ANSWER, "rejected": ANSWER}
  {"chosen": [...messages ending with the answer], "rejected": [...]}      (the prompt is their shared start)
  {"messages": [...], "answers": [ANSWER, ...], "ranking": [best index, ..., worst index]}
  {"messages": [...], "answers": [ANSWER, ...], "scores": [number per answer, higher is better]}
A ranking or scores give every (better, worse) pair (--pairs all) or those of neighbouring ranks (adjacent);
equal scores make no pair. chat_cli's `rate` command appends ranking lines; --sample-out writes scores lines.

Each step takes --batch-size pairs (split over the ranks) and minimizes -log sigmoid(beta * ((log pi(chosen) -
log ref(chosen)) - (log pi(rejected) - log ref(rejected)))) (train.feedback.dpo_loss), the sequence
log-probabilities summed over the answer's supervised tokens from the fused linear + softcap cross-entropy;
the reference is the starting checkpoint, frozen, its log-probabilities computed once per batch. Every
--eval-every steps (and at the end) the held-out pairs give the preference accuracy (chosen's implicit reward
above the rejected's), the mean reward margin, the loss, and the KL(policy || reference) per answer token.
Checkpoints go to `<base>/chatpref_checkpoints/d{depth}/`; --resume-from-step continues exactly.

--sample-out FILE: instead of training, sample --num-samples answers to each conversation of --data with the
engine, score each with the verifier of scripts.chat_rl (the conversation's last assistant message is the
reference answer) and write a scores line for every prompt whose answers differ in score.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tritonchat.engine.cli import ArgumentParser, HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.gpt import GPT
from tritonchat.engine.paths import atomic_write
from tritonchat.engine.report import update_report
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import tuning
from tritonchat.scripts.chat_sft import lr_multiplier
from tritonchat.tasks.common import validate_conversation
from tritonchat.tasks.datafiles import iter_jsonl
from tritonchat.train.dist import DistInfo, all_reduce_sum
from tritonchat.train.feedback import dpo_loss, pairs_from_scores, token_logprobs
from tritonchat.train.loop import MetricsLog
from tritonchat.train.progress import Heartbeat, InterruptGuard, format_duration, interrupt_after

PROG = command_name("scripts.chat_pref")


# ---- data -----------------------------------------------------------------------------------------------
@dataclass
class Ranked:
    """A prompt (messages ending with a user message), its answers and one score each (higher is better)."""

    messages: list
    answers: list
    scores: list[float]


def _hh_turns(text: str) -> list[dict]:
    """An Anthropic-HH style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    import re

    out = []
    for role, body in re.findall(r"\n\n(Human|Assistant): (.*?)(?=\n\n(?:Human|Assistant): |\Z)", text, re.S):
        out.append({"role": "user" if role == "Human" else "assistant", "content": body.strip()})
    return out


def _split_answer(conv) -> tuple[list, object]:
    messages = _hh_turns(conv) if isinstance(conv, str) else list(conv)
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chosen/rejected conversation must end with the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def parse_item(obj) -> Ranked:
    """One line of --data (see the module docstring) as a Ranked; ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be an object")
    if "answers" in obj:
        messages, answers = obj.get("messages"), obj["answers"]
        if not isinstance(answers, list) or len(answers) < 2:
            raise ValueError('"answers" must be a list of two or more answers')
        if "ranking" in obj:
            ranking = obj["ranking"]
            if not isinstance(ranking, list) or sorted(ranking) != list(range(len(answers))):
                raise ValueError(f'"ranking" must order every answer index 0..{len(answers) - 1} once, best first')
            scores = [0.0] * len(answers)
            for pos, i in enumerate(ranking):
                scores[i] = float(len(answers) - pos)
        elif "scores" in obj:
            scores = obj["scores"]
            if not isinstance(scores, list) or len(scores) != len(answers) or \
                    not all(isinstance(x, (int, float)) for x in scores):
                raise ValueError('"scores" must be one number per answer')
            scores = [float(x) for x in scores]
        else:
            raise ValueError('"answers" needs a "ranking" or "scores"')
    elif "chosen" in obj and "rejected" in obj:
        chosen, rejected = obj["chosen"], obj["rejected"]
        messages = obj.get("messages", obj.get("prompt"))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if messages is None or isinstance(chosen, list):
            (m1, chosen), (m2, rejected) = _split_answer(chosen), _split_answer(rejected)
            if messages is None:
                if m1 != m2:
                    raise ValueError("chosen and rejected conversations must share their prompt")
                messages = m1
        answers, scores = [chosen, rejected], [1.0, 0.0]
    else:
        raise ValueError('expected "chosen" and "rejected", or "answers" with a "ranking" or "scores"')
    if not isinstance(messages, list):
        raise ValueError('the prompt ("messages" or "prompt") must be a list of messages or a str')
    for a in answers:
        validate_conversation({"messages": [*messages, {"role": "assistant", "content": a}]}, min_messages=2)
    return Ranked(list(messages), list(answers), scores)


def load_ranked(path) -> list[Ranked]:
    out = []
    for n, obj in iter_jsonl(path):
        try:
            out.append(parse_item(obj))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    return out


def make_pairs(items: Sequence[Ranked], adjacent: bool) -> list[tuple[list, object, object]]:
    """(prompt messages, chosen answer, rejected answer) for every pair of every item."""
    return [(it.messages, it.answers[i], it.answers[j]) for it in items
            for i, j in pairs_from_scores(it.scores, adjacent)]


def pair_batch(tokenizer: Tokenizer, pairs: Sequence[tuple[list, object, object]], max_len: int,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets) (2P, T): rows 0..P-1 the chosen answers, P..2P-1 the rejected ones; targets are the
    answer's supervised tokens (its text, calculator calls and <|assistant_end|>; not the prompt nor forced tool
    outputs), -1 elsewhere. Each conversation is cropped to max_len + 1 tokens."""
    rows = []
    for which in (1, 2):
        for pair in pairs:
            messages, answer = pair[0], pair[which]
            prompt_len = len(tokenizer.render_for_completion({"messages": messages}))
            ids, mask = tokenizer.render_conversation(
                {"messages": [*messages, {"role": "assistant", "content": answer}]}, max_tokens=max_len + 1)
            rows.append((ids, [m if t >= prompt_len else 0 for t, m in enumerate(mask)]))
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), tokenizer.get_bos_token_id(), dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, :len(ids) - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), torch.tensor(ids[1:]), -1)
    return x.to(device), y.to(device)


def sequence_logprobs(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(2P,) summed log-probabilities of each row's targets."""
    return token_logprobs(model, x, y).sum(dim=1)


# ---- steps ----------------------------------------------------------------------------------------------
@dataclass
class Settings:
    source_dir: str
    source_step: int
    num_iterations: int
    batch_size: int
    beta: float
    adjacent: bool
    max_seq_len: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    init_lr_frac: float


def dpo_step_loss(model: GPT, ref: GPT, x: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    P = x.shape[0] // 2
    with torch.no_grad():
        ref_lp = sequence_logprobs(ref, x, y)
    lp = sequence_logprobs(model, x, y)
    return dpo_loss(lp[:P], lp[P:], ref_lp[:P], ref_lp[P:], beta)


@torch.no_grad()
def evaluate(model: GPT, ref: GPT, tokenizer: Tokenizer, pairs: Sequence, s: Settings, info: DistInfo,
             batch: int = 16) -> dict:
    """Held-out preference accuracy (a tie counts half: the starting policy, equal to the reference, scores
    0.5), mean reward margin, loss and KL(policy || reference) per answer token (over the full vocabulary, at
    the answers' supervised positions: the one place logits are materialized, a row at a time), summed over
    the ranks."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # right, margin, loss, kl, tokens
    mine = list(pairs)[info.rank::info.world_size]
    for lo in range(0, len(mine), batch):
        x, y = pair_batch(tokenizer, mine[lo:lo + batch], s.max_seq_len, device)
        P = x.shape[0] // 2
        loss, h = dpo_step_loss(model, ref, x, y, s.beta)
        valid = y >= 0
        kl = torch.zeros((), dtype=torch.float64, device=device)
        for b in range(x.shape[0]):  # one row's logits at a time: (T, V) twice, not (2P, T, V)
            lp = F.log_softmax(model(x[b:b + 1])[0][valid[b]], dim=-1)
            lq = F.log_softmax(ref(x[b:b + 1])[0][valid[b]], dim=-1)
            kl += (lp.exp() * (lp - lq)).sum().double()
        right = ((h > 0).double() + 0.5 * (h == 0).double()).sum()
        sums += torch.stack([right, h.sum().double(), loss.double() * P, kl.double(), valid.sum().double()])
    all_reduce_sum(sums, info)
    right, margin, loss, kl, tokens = sums.tolist()
    n = len(pairs)
    model.train()
    return {"accuracy": right / max(n, 1), "margin": margin / max(n, 1), "loss": loss / max(n, 1),
            "kl": kl / max(tokens, 1.0), "pairs": n}


def step_pairs(pairs: Sequence, step: int, batch_size: int, seed: int, info: DistInfo) -> list:
    """This rank's pairs of `step`: positions step*B .. step*B + B - 1 of the epochs' seeded shuffles."""
    out, orders = [], {}
    for pos in range(step * batch_size + info.rank, (step + 1) * batch_size, info.world_size):
        epoch, i = divmod(pos, len(pairs))
        if epoch not in orders:
            orders[epoch] = list(range(len(pairs)))
            random.Random(tuning.derived_seed(seed, epoch)).shuffle(orders[epoch])
        out.append(pairs[orders[epoch][i]])
    return out


# ---- the run -------------------------------------------------------------------------------------------
def split_data(args: argparse.Namespace) -> tuple[list, list, str]:
    items = load_ranked(args.data)
    if args.val_data:
        val_items = load_ranked(args.val_data)
    else:
        n_val = min(len(items) - 1, round(args.val_fraction * len(items))) if len(items) > 1 else 0
        items, val_items = items[:len(items) - n_val], items[len(items) - n_val:]
    adjacent = args.pairs == "adjacent"
    train, val = make_pairs(items, adjacent), make_pairs(val_items, adjacent)
    if not train:
        raise UsageError(f"--data {args.data}: no preference pairs to train on")
    return train, val, f"{len(train):,} pairs from {len(items):,} items of {args.data}, {len(val):,} held out"


def train_pref(args: argparse.Namespace, stop_after: int | None = None) -> dict:
    """Run DPO per `args`; returns {"losses", "eval": {step: evaluate(...)}, "out_dir", "final_step",
    "settings"}. `stop_after` ends after that many steps of this invocation (a simulated interruption)."""
    with Heartbeat(None if args.quiet else print) as hb, InterruptGuard() as guard:
        st = tuning.setup(args)
        info, tok = st.info, st.tokenizer
        if not info.is_main:
            hb = Heartbeat(None)
        train, val, where = split_data(args)
        hb.say(f"chat_pref: {where}")
        resuming = args.resume_from_step >= 0
        hb.doing("loading the model and the reference")
        src_dir, src_step = tuning.source_checkpoint(args, st.base_dir) if not resuming or args.out_dir is None \
            else (None, None)
        out_dir = Path(args.out_dir) if args.out_dir else tuning.default_out_dir(st.base_dir, "pref", src_dir,
                                                                                 src_step)
        state, optim_state, meta = tuning.load_start(args, out_dir, st, (src_dir, src_step))
        model = tuning.build_policy(state, meta, st)
        tuning.check_vocab(model.config, tok, out_dir if resuming else src_dir)
        if resuming:
            s = Settings(**meta["pref"])
            from tritonchat.engine.checkpoint import load_checkpoint

            ref_state, _, ref_meta = load_checkpoint(s.source_dir, s.source_step, device=st.device)
        else:
            lrs = tuning.inherited_lrs(args, meta)
            N = args.num_iterations if args.num_iterations > 0 else max(1, len(train) // args.batch_size)
            s = Settings(str(src_dir), src_step, N, args.batch_size, args.beta, args.pairs == "adjacent",
                         args.max_seq_len or model.config.sequence_len, lrs["embedding_lr"], lrs["unembedding_lr"],
                         lrs["matrix_lr"], lrs["scalar_lr"], args.init_lr_frac)
            ref_state, ref_meta = state, meta
        ref = tuning.build_policy(ref_state, ref_meta, st, trainable=False)
        del state, ref_state
        opt = tuning.build_optimizer(model, {k: getattr(s, k) for k in tuning.LRS}, s.init_lr_frac, st)
        if optim_state is not None:
            opt.load_state_dict(optim_state)
            del optim_state
        hb.doing(None)
        hb.say(f"  depth {model.config.n_layer} | {s.num_iterations} steps of {s.batch_size} pairs | beta {s.beta} "
               f"| {info.world_size} rank(s) | device {st.device}, impl {model.impl}")
        hb.say(f"  from {s.source_dir} step {s.source_step} (also the reference); output {out_dir}")
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        start = meta["step"] if resuming else 0
        metrics = MetricsLog(out_dir / "metrics.jsonl", info, args.run, start if resuming else None)
        result = {"losses": {}, "eval": {}, "out_dir": str(out_dir), "settings": asdict(s)}
        step, saved = start, start if resuming else -1

        def save() -> int:
            nonlocal saved
            hb.doing(f"writing the checkpoint of step {step}")
            tuning.save(out_dir, step, model, opt, {"user_config": vars(args), "pref": asdict(s),
                                                     "eval": result["eval"].get(step)}, info)
            saved = step
            hb.doing(None)
            hb.say(f"saved checkpoint at step {step} to {out_dir}")
            return saved

        model.train()
        try:
            total_time, timed = 0.0, 0
            while True:
                last = step >= s.num_iterations
                if (last or (args.eval_every > 0 and step % args.eval_every == 0)) and val \
                        and not (resuming and step == start):
                    hb.doing(f"evaluating {len(val)} held-out pairs")
                    ev = evaluate(model, ref, tok, val, s, info)
                    hb.doing(None)
                    result["eval"][step] = ev
                    hb.say(f"step {step:05d} | held-out accuracy {ev['accuracy']:.4f} | margin {ev['margin']:+.4f} "
                           f"| loss {ev['loss']:.4f} | kl {ev['kl']:.5f}")
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
                hb.doing(f"step {step + 1}/{s.num_iterations}")
                x, y = pair_batch(tok, step_pairs(train, step, s.batch_size, args.seed, info), s.max_seq_len,
                                  st.device)
                loss, h = dpo_step_loss(model, ref, x, y, s.beta)
                loss.backward()
                with guard.deferred():
                    opt.step()
                model.zero_grad(set_to_none=True)
                hb.doing(None)
                right = ((h > 0).float() + 0.5 * (h == 0).float()).mean().item()  # a tie counts half
                sums = all_reduce_sum(torch.tensor([loss.item(), right, h.mean().item()],
                                                   dtype=torch.float64, device=st.device), info) / info.world_size
                loss_v, acc, margin = sums.tolist()
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"loss is {loss_v} at step {step}")
                dt = time.perf_counter() - t0
                step += 1
                result["losses"][step - 1] = loss_v
                if step - start > 1:
                    total_time, timed = total_time + dt, timed + 1
                eta = (s.num_iterations - step) * total_time / timed if timed else float("nan")
                if step == start + 1 or step == s.num_iterations or (args.log_every > 0 and step % args.log_every == 0):
                    hb.say(f"step {step:05d}/{s.num_iterations:05d} | loss {loss_v:.4f} | accuracy {acc:.3f} | "
                           f"margin {margin:+.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
                           f"eta {format_duration(eta) if timed else '-'}")
                metrics.write({"step": step, "loss": loss_v, "accuracy": acc, "margin": margin, "lrm": lrm, "dt": dt})
                if guard.pending:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise interrupt_after(hb, step, saved, out_dir, save, info.enabled) from None
        if info.is_main:
            update_report(st.base_dir)
        return result


# ---- pairs from the model and a verifier ------------------------------------------------------------------
def sample_ranked(args: argparse.Namespace) -> int:
    """--sample-out: answers sampled with the engine, scored by chat_rl's verifier, written as scores lines."""
    from tritonchat.engine.checkpoint import load_checkpoint
    from tritonchat.engine.engine import Engine, SamplingParams
    from tritonchat.scripts.chat_cli import answer_content
    from tritonchat.scripts.chat_rl import AnswerTask, sample_groups
    from tritonchat.scripts.chat_sft import iter_conversations

    st = tuning.setup(args)
    src, step = tuning.source_checkpoint(args, st.base_dir)
    state, _, meta = load_checkpoint(src, step, device=st.device)
    model = tuning.build_policy(state, meta, st, trainable=False)
    tuning.check_vocab(model.config, st.tokenizer, src)
    task = AnswerTask(list(iter_conversations(args.data)))
    engine = Engine(model, st.tokenizer, max_batch_size=args.num_samples, impl=model.impl)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature)
    lines = []
    for i in range(len(task)):
        conv = task[i]
        seeds = [[tuning.derived_seed(args.seed, "pairs", i, j) for j in range(args.num_samples)]]
        group = sample_groups(engine, st.tokenizer, [conv], args.num_samples, params, seeds)[0]
        end = st.tokenizer.encode_special("<|assistant_end|>")
        answers = [answer_content(st.tokenizer, [t for t in c if t != end]) for _, c, _, _ in group]
        scores = [task.reward(conv, text) for _, _, _, text in group]
        if len(set(scores)) > 1:
            lines.append(json.dumps({"messages": conv["messages"][:-1], "answers": answers, "scores": scores}))
    data = "".join(line + "\n" for line in lines).encode()
    atomic_write(Path(args.sample_out), lambda f: f.write(data))
    print(f"wrote {len(lines)} ranked prompts of {len(task)} to {args.sample_out}")
    return 0


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="ranked answers (JSONL, see above); with --sample-out, problems")
    p.add_argument("--val-data", default=None, help="held-out ranked answers (default: the end of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --data's items held out")
    p.add_argument("--pairs", default="all", choices=["all", "adjacent"], help="which pairs a ranking gives")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (strength of the tie to the reference)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step, over all ranks")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one pass over the pairs)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per conversation (default: the model's)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="every lr times this")
    p.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps (-1: end only)")
    p.add_argument("--seed", type=int, default=42, help="the order of the pairs, the sampling seeds")
    p.add_argument("--sample-out", default=None, help="write verifier-ranked samples here instead of training")
    p.add_argument("--num-samples", type=int, default=4, help="answers sampled per prompt (--sample-out)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per sampled answer (--sample-out)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--sample-out)")
    tuning.add_common_flags(p)
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if args.val_data and not Path(args.val_data).is_file():
        p.error(f"--val-data {args.val_data}: no such file")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not args.beta > 0:
        p.error(f"--beta must be > 0, got {args.beta}")
    for name in ("batch_size", "num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.sample_out:
        return sample_ranked(args)
    result = train_pref(args)
    if len(result["eval"]) > 1:
        (s0, e0), (s1, e1) = min(result["eval"].items()), max(result["eval"].items())
        print(f"held-out preference accuracy {e0['accuracy']:.4f} at step {s0} -> {e1['accuracy']:.4f} at step {s1}")
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
