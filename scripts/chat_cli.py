"""Chat with a checkpoint from the terminal.

    python -m scripts.chat_cli                      # interactive; 'clear' starts over, 'quit' exits
    python -m scripts.chat_cli -p "What is 12*7?"   # one answer, then exit

In the REPL, `rate` (or `rate N`) samples more answers to the last question (N in all, the shown one first),
asks for their ranking best first ("2 1 3") and appends it to --ratings as a line
{"messages": [...], "answers": [...], "ranking": [...]}, which `python -m scripts.chat_pref --data` trains on.

Loads a checkpoint directory in the nanochat layout (ours or nanochat's: model_*.pt + meta_*.json; by default
the newest complete checkpoint in `<base>/chatsft_checkpoints/*` when there is one, else `<base>/base_checkpoints/*`;
`-i base|sft|rl|pref` chooses base_checkpoints, chatsft_checkpoints, chatrl_checkpoints or chatpref_checkpoints, see
`engine.checkpoint.find_latest_checkpoint`)
and the tokenizer from `<base>/tokenizer` (or --tokenizer-dir); the base directory is `engine.paths.get_base_dir`'s
unless --base-dir says otherwise. The loaded checkpoint is named on stderr.
The conversation is kept as tokens and every turn runs in one engine session, so each new turn prefills only
the new user message (the cache of the conversation so far is reused).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import sys
from pathlib import Path

from tritonchat.engine.checkpoint import (
    config_from_meta,
    find_last_step,
    find_latest_checkpoint,
    load_meta,
    load_model,
    meta_path,
    model_path,
)
from tritonchat.engine.cli import HelpFormatter, UsageError, check_impl, command_name, resolve_device, run_main
from tritonchat.engine.engine import Engine, SamplingParams, TokenEvent
from tritonchat.engine.paths import get_base_dir
from tritonchat.engine.tokenizer import Tokenizer

PROG = command_name("scripts.chat_cli")
# -i/--source: the folder under the base directory each training phase writes (the reference's names).
SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints",
           "pref": "chatpref_checkpoints"}
# How tool-use tokens are shown; the other special tokens are not printed.
SHOW_SPECIAL = {"<|python_start|>": "[calc: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "] "}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Which checkpoint to serve and how (`build_engine`'s flags): chat_cli's and chat_web's."""
    p.add_argument("-i", "--source", default=None, choices=sorted(SOURCES),
                   help="which checkpoints: base_checkpoints, chatsft_checkpoints, chatrl_checkpoints or "
                        "chatpref_checkpoints under <base> "
                        "(default: sft when a complete SFT checkpoint exists, else base)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="a checkpoint folder (default: the newest complete checkpoint of --source)")
    p.add_argument("--step", type=int, default=None, help="default: the last complete step in the folder")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    p.add_argument("--base-dir", default=None,
                   help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it exists, else ~/.cache/tritonchat")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"],
                   help="Triton kernels or PyTorch references (auto: kernels where they run)")
    p.add_argument("--max-seq-len", type=int, default=None, help="conversation length limit (default: trained)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit (default: a REPL)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 for greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens, 0 disables")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (turn n uses seed + n)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search over this many beams (1: sample, or greedy at temperature 0)")
    add_model_flags(p)
    p.add_argument("--ratings", default=None, help="where `rate` appends rankings (default: <base>/ratings.jsonl)")
    return p.parse_args(argv)


def resolve_source(args: argparse.Namespace, base_dir: Path) -> str:
    """--source, else "sft" when `<base>/chatsft_checkpoints` holds a complete checkpoint, else "base"."""
    if getattr(args, "source", None) is not None:
        return args.source
    try:
        find_latest_checkpoint(base_dir / SOURCES["sft"])
        return "sft"
    except FileNotFoundError:
        return "base"


def find_checkpoint(args: argparse.Namespace, base_dir: Path) -> tuple[Path, int]:
    """(folder, step) to load: the folder is --checkpoint-dir, else the newest complete checkpoint's in
    `<base>/{base,chatsft,chatrl}_checkpoints` (per `resolve_source`); the step is --step, else the folder's
    last complete one."""
    if args.checkpoint_dir is None:
        source = resolve_source(args, base_dir)
        try:
            ckpt_dir, step = find_latest_checkpoint(base_dir / SOURCES[source])
        except FileNotFoundError as e:
            how = {"base": "train one (`make demo`)", "sft": "fine-tune one (`python -m scripts.chat_sft`)",
                   "rl": "train one with RL (`python -m scripts.chat_rl`)",
                   "pref": "tune one on preferences (`python -m scripts.chat_pref`)"}[source]
            raise FileNotFoundError(f"{e}: {how}, or pass --base-dir, -i or --checkpoint-dir") from None
    else:
        ckpt_dir = Path(args.checkpoint_dir)
        if not ckpt_dir.is_dir():
            raise UsageError(f"--checkpoint-dir {ckpt_dir}: no such folder")
        step = find_last_step(ckpt_dir) if args.step is None else args.step
    if args.step is not None:
        step = args.step
        if not meta_path(ckpt_dir, step).exists():
            raise UsageError(f"--step {step}: no {meta_path(ckpt_dir, step).name} in {ckpt_dir}")
    return ckpt_dir, step


def checkpoint_and_tokenizer(args: argparse.Namespace, base_dir: Path) -> tuple[Path, int, Tokenizer]:
    """The checkpoint to load (`find_checkpoint`) and the tokenizer (--tokenizer-dir, else <base>/tokenizer),
    refusing in one line a tokenizer whose vocabulary is not the checkpoint's."""
    ckpt_dir, step = find_checkpoint(args, base_dir)
    tokenizer_dir = Path(getattr(args, "tokenizer_dir", None) or base_dir / "tokenizer")
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    vocab = config_from_meta(load_meta(ckpt_dir, step)["model_config"]).vocab_size
    if tokenizer.get_vocab_size() != vocab:
        raise UsageError(f"vocabulary mismatch: the tokenizer in {tokenizer_dir} has {tokenizer.get_vocab_size()} "
                         f"tokens, the checkpoint {meta_path(ckpt_dir, step)} was trained with {vocab}: pass the "
                         f"matching --tokenizer-dir or --checkpoint-dir")
    return ckpt_dir, step, tokenizer


def build_engine(args: argparse.Namespace, max_batch_size: int = 1) -> tuple[Engine, Tokenizer, str]:
    """The engine (decoding up to max_batch_size sequences at once), the tokenizer, and a line that says what was
    loaded. Raises UsageError, CheckpointError or FileNotFoundError (each naming the flag or the file) for what
    the user can fix."""
    device = resolve_device(args.device)
    check_impl(args.impl, device)
    base_dir = Path(args.base_dir or get_base_dir())
    ckpt_dir, step, tokenizer = checkpoint_and_tokenizer(args, base_dir)
    model, meta = load_model(ckpt_dir, step, device=device, impl=args.impl)
    num_beams = getattr(args, "num_beams", 1)
    if num_beams > 1:  # beams fork the conversation's pages: a pool of 2 * num_beams sequences holds any search
        max_batch_size = max(max_batch_size, 2 * num_beams)
    model.eval()
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=args.max_seq_len,
                    impl=model.impl)
    source = "" if args.checkpoint_dir else f"{resolve_source(args, base_dir)} model "
    where = f"{source}{model_path(ckpt_dir, step)} (step {meta.get('step', step)}) on {device}, impl {model.impl}"
    return engine, tokenizer, where


def answer_content(tokenizer: Tokenizer, tokens: list[int]) -> str | list[dict]:
    """The assistant content of generated tokens: their text, or where they call the calculator, the parts
    (text, python, python_output) that render back to the same tokens (tasks.common)."""
    sp = tokenizer.encode_special
    kinds = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "python_output"}
    ends = {sp("<|python_end|>"), sp("<|output_end|>")}
    parts: list[dict] = []
    kind, run = "text", []

    def flush() -> None:
        if run or kind != "text":
            parts.append({"type": kind, "text": tokenizer.decode(run)})

    for t in tokens:
        if t in kinds:
            flush()
            kind, run = kinds[t], []
        elif t in ends:
            flush()
            kind, run = "text", []
        else:
            run.append(t)
    flush()
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return [p for p in parts if p["type"] != "text" or p["text"]]


class Chat:
    """A conversation held as tokens, answered through one engine session."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams, out=None,
                 num_beams: int = 1) -> None:
        self.engine, self.tok, self.params, self.num_beams = engine, tokenizer, params, num_beams
        self.out = out or sys.stdout
        self.show = {tokenizer.encode_special(k): v for k, v in SHOW_SPECIAL.items()}
        self.turns = 0
        self.clear()

    def clear(self) -> None:
        if getattr(self, "session", None) is not None:
            self.engine.close_session(self.session)
        self.session = self.engine.new_session()
        self.tokens = [self.tok.get_bos_token_id()]
        self.messages: list[dict] = []  # the conversation as text, for `rate`
        self.last_prompt: list[int] | None = None

    def _events(self, prompt: list[int], params: SamplingParams):
        """The answer's TokenEvents: streamed from the session, or with --num-beams the best beam's tokens once
        the search ends (beams do not run the calculator)."""
        if self.num_beams == 1:
            yield from self.engine.stream(prompt, params, self.session)
            return
        best = self.engine.beam_search(prompt, num_beams=self.num_beams, max_tokens=params.max_tokens)[0]
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for t in best.tokens:
            special = t in self.engine.special.values()
            yield TokenEvent(0, t, "" if special else decoder.decode(self.tok.enc.decode_single_token_bytes(t)))
        yield TokenEvent(0, None, decoder.decode(b"", final=True), finish_reason=best.finish_reason)

    def ask(self, text: str) -> str:
        sp = self.tok.encode_special
        prompt = self.tokens + [sp("<|user_start|>"), *self.tok.encode(text), sp("<|user_end|>"),
                                sp("<|assistant_start|>")]
        params = SamplingParams(**{**self.params.__dict__, "seed": (self.params.seed or 0) + self.turns})
        pieces, answer = [], []
        with contextlib.closing(self._events(prompt, params)) as events:
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
        self.last_prompt = prompt
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": answer_content(self.tok, answer)}]
        return "".join(pieces)

    def rate(self, n: int, path: Path, read=None) -> bool:
        """Sample n - 1 more answers to the last question, show all n, read a ranking (best first) and append
        it to `path`. Returns whether a ranking was written."""
        if self.last_prompt is None:
            self.out.write("(ask something first, then rate the answers)\n")
            return False
        read = read or input
        answers = [self.messages[-1]["content"]]
        base = (self.params.seed or 0) + 1000 * self.turns
        for j in range(1, n):  # in the conversation's session: each prefills only what the cache lacks
            params = SamplingParams(**{**self.params.__dict__, "seed": base + j})
            with contextlib.closing(self.engine.stream(self.last_prompt, params, self.session)) as events:
                answers.append(answer_content(self.tok, [ev.token for ev in events if ev.token is not None]))
        for j, a in enumerate(answers, 1):
            shown = a if isinstance(a, str) else "".join(
                {"python": "[calc: {}", "python_output": " = {}] "}.get(p["type"], "{}").format(p["text"]) for p in a)
            self.out.write(f"[{j}] {shown}\n")
        while True:
            line = read(f"Rank best first (e.g. {' '.join(str(j) for j in range(1, n + 1))}; empty skips): ").strip()
            if not line:
                self.out.write("(not rated)\n")
                return False
            try:
                ranking = [int(x) - 1 for x in line.replace(",", " ").split()]
            except ValueError:
                ranking = []
            if sorted(ranking) == list(range(n)):
                break
            self.out.write(f"(give each of 1..{n} once, best first)\n")
        record = {"messages": self.messages[:-1], "answers": answers, "ranking": ranking}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.out.write(f"(ranking saved to {path})\n")
        return True


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    engine, tokenizer, where = build_engine(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    chat = Chat(engine, tokenizer, params, num_beams=args.num_beams)
    print(f"tritonchat: {where}", file=sys.stderr)  # stderr: with -p, stdout is the answer alone
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    ratings = Path(args.ratings) if args.ratings else Path(args.base_dir or get_base_dir()) / "ratings.jsonl"
    print("Type 'clear' to start over, 'rate [N]' to rank N answers to the last question, 'quit' to exit.")
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
        words = line.split()
        if words[0].lower() == "rate" and len(words) <= 2:
            n = int(words[1]) if len(words) == 2 and words[1].isdigit() else 3 if len(words) == 1 else 0
            if n < 2:
                print("(rate N: N >= 2 answers)")
                continue
            try:
                chat.rate(n, ratings)
            except (EOFError, KeyboardInterrupt):
                print("\n(not rated)")
            continue
        print("Assistant: ", end="", flush=True)
        try:
            chat.ask(line)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except ValueError as e:  # e.g. the conversation outgrew max_seq_len
            print(f"\n({e}; type 'clear' to start over)")


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
