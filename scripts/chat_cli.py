"""Chat with a checkpoint from the terminal.

    python -m scripts.chat_cli                      # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "What is 12*7?"   # one answer, then exit

Loads a checkpoint directory in the nanochat layout (ours or nanochat's: model_*.pt + meta_*.json; by default
the deepest `<base>/base_checkpoints/d*`) and the tokenizer from `<base>/tokenizer` (or --tokenizer-dir).
The conversation is kept as tokens and every turn runs in one engine session, so each new turn prefills only
the new user message (the cache of the conversation so far is reused).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.engine import Engine, SamplingParams
from engine.paths import get_base_dir
from engine.tokenizer import Tokenizer

# How tool-use tokens are shown; the other special tokens are not printed.
SHOW_SPECIAL = {"<|python_start|>": "[calc: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "] "}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_cli", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50, help="0 disables")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most")
    p.add_argument("--checkpoint-dir", default=None, help="default: the deepest <base>/base_checkpoints/d*")
    p.add_argument("--step", type=int, default=None, help="default: the last step in the directory")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    p.add_argument("--base-dir", default=None, help="default: $TRITONCHAT_BASE_DIR or ~/.cache/tritonchat")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"], help="kernels or references")
    p.add_argument("--max-seq-len", type=int, default=None, help="conversation length limit (default: trained)")
    return p.parse_args(argv)


def default_checkpoint_dir(base_dir: Path) -> Path:
    root = base_dir / "base_checkpoints"
    dirs = [d for d in root.glob("d*") if d.is_dir() and re.fullmatch(r"d\d+", d.name)] if root.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"no checkpoint directory under {root}: train one (`make demo`) or pass "
                                f"--checkpoint-dir")
    return max(dirs, key=lambda d: int(d.name[1:]))


def build_engine(args: argparse.Namespace) -> tuple[Engine, Tokenizer, str]:
    base_dir = Path(args.base_dir or get_base_dir())
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(base_dir)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model, meta = load_model(ckpt_dir, args.step, device=device, impl=args.impl)
    model.eval()
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir or base_dir / "tokenizer")
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects "
                         f"{model.config.vocab_size}: pass the matching --tokenizer-dir")
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=args.max_seq_len,
                    impl=model.impl)
    return engine, tokenizer, f"{ckpt_dir} step {meta.get('step')} on {device}"


class Chat:
    """A conversation held as tokens, answered through one engine session."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams, out=None) -> None:
        self.engine, self.tok, self.params = engine, tokenizer, params
        self.out = out or sys.stdout
        self.show = {tokenizer.encode_special(k): v for k, v in SHOW_SPECIAL.items()}
        self.turns = 0
        self.clear()

    def clear(self) -> None:
        if getattr(self, "session", None) is not None:
            self.engine.close_session(self.session)
        self.session = self.engine.new_session()
        self.tokens = [self.tok.get_bos_token_id()]

    def ask(self, text: str) -> str:
        sp = self.tok.encode_special
        prompt = self.tokens + [sp("<|user_start|>"), *self.tok.encode(text), sp("<|user_end|>"),
                                sp("<|assistant_start|>")]
        params = SamplingParams(**{**self.params.__dict__, "seed": (self.params.seed or 0) + self.turns})
        pieces, answer = [], []
        with contextlib.closing(self.engine.stream(prompt, params, self.session)) as events:
            for ev in events:
                if ev.token is not None:
                    answer.append(ev.token)
                piece = self.show.get(ev.token, ev.text)
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        self.tokens = prompt + answer + [sp("<|assistant_end|>")]
        self.turns += 1
        return "".join(pieces)


def main(argv=None) -> int:
    args = parse_args(argv)
    engine, tokenizer, where = build_engine(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    chat = Chat(engine, tokenizer, params)
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    print(f"tritonchat: {where}. Type 'clear' to start over, 'quit' to exit.")
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.lower() in ("quit", "exit"):
            return 0
        if line.lower() == "clear":
            chat.clear()
            print("(conversation cleared)")
            continue
        if not line:
            continue
        print("Assistant: ", end="", flush=True)
        try:
            chat.ask(line)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except ValueError as e:  # e.g. the conversation outgrew max_seq_len
            print(f"\n({e}; type 'clear' to start over)")


if __name__ == "__main__":
    sys.exit(main())
