"""A tiny fine-tuned chat model for the tests of the commands that start from one (chat_rl, chat_pref): a
tokenizer and a depth-1 base trained from scratch by chat_sft on single-digit sums ('What is 2+3?' -> '5')."""

import json
import random
import warnings
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import save_checkpoint
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import chat_sft

TEMPLATES = ["What is {a}+{b}?", "{a}+{b}=?", "Add {a} and {b}.", "Compute {a} plus {b}."]


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def sums() -> list[dict]:
    """Every a + b <= 9 in four phrasings, in a fixed shuffled order."""
    items = [chat(t.format(a=a, b=b), str(a + b)) for a in range(10) for b in range(10 - a) for t in TEMPLATES]
    random.Random(0).shuffle(items)
    return items


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_sft_base(base: Path, sft_steps: int = 60) -> Path:
    """<base>/tokenizer, base_checkpoints/d1, chatsft_checkpoints/d1 (sft_steps of SFT on the sums),
    train.jsonl (the sums but the first 40) and val.jsonl (the first 40)."""
    items = sums()
    text = [" ".join(m["content"] for m in c["messages"]) for c in items]
    with warnings.catch_warnings():  # the corpus has fewer pieces than the vocabulary asks for
        warnings.simplefilter("ignore")
        tok = Tokenizer.train_from_iterator(text * 3, 300)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=64))
    save_checkpoint(base / "base_checkpoints" / "d1", 0, model.state_dict(), None,
                    {"step": 0, "model_config": model.config.to_dict()})
    write_jsonl(base / "val.jsonl", items[:40])
    write_jsonl(base / "train.jsonl", items[40:])
    chat_sft.train_sft(chat_sft.parse_args([
        "--data", str(base / "train.jsonl"), "--val-data", str(base / "val.jsonl"), "--base-dir", str(base),
        "--device", "cpu", "--impl", "torch", "--max-seq-len", "64", "--device-batch-size", "8", "--quiet",
        "--num-iterations", str(sft_steps), "--eval-every", "-1"]))
    return base
