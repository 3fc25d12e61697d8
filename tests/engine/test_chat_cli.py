"""scripts.chat_cli against a tiny checkpoint and tokenizer saved in tmp_path."""

import io
import random

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.engine import SamplingParams
from engine.gpt import GPTConfig, build_model
from engine.tokenizer import Tokenizer
from scripts import chat_cli


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """<base>/tokenizer and <base>/base_checkpoints/d1 (a random depth-1 model), as `make demo` lays them out."""
    base = tmp_path_factory.mktemp("base")
    rng = random.Random(1)
    words = ["hello", "there", "how", "are", "you", "fine", "thanks", "what", "is", "12", "*", "7"]
    tok = Tokenizer.train_from_iterator([" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)], 290)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(base / "base_checkpoints" / "d1", 7, model.state_dict(), None,
                    {"step": 7, "model_config": model.config.to_dict()})
    return base


def test_one_shot_prompt(base_dir, capsys):
    ckpt = base_dir / "base_checkpoints" / "d1"
    rc = chat_cli.main(["-p", "hello there", "--checkpoint-dir", str(ckpt), "--tokenizer-dir",
                        str(base_dir / "tokenizer"), "--max-tokens", "8", "--device", "cpu", "--temperature", "0.8",
                        "--top-p", "0.9", "--seed", "3"])
    assert rc == 0
    first = capsys.readouterr().out
    assert first.endswith("\n")
    rc = chat_cli.main(["-p", "hello there", "--base-dir", str(base_dir), "--step", "7", "--max-tokens", "8",
                        "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--impl", "torch"])  # default dirs
    # same seed, same answer: the first run's default impl ran the kernels (in the interpreter), this one the
    # references, so the two paths agree as well
    assert rc == 0 and capsys.readouterr().out == first


def test_repl_commands(base_dir, monkeypatch, capsys):
    lines = iter(["hello", "how are you", "clear", "", "what is 12 * 7", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    argv = ["--base-dir", str(base_dir), "--max-tokens", "5", "--temperature", "0", "--impl", "torch"]
    assert chat_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and out.count("Assistant: ") == 3


def test_chat_turns_reuse_the_cache(base_dir):
    args = chat_cli.parse_args(["--base-dir", str(base_dir), "--temperature", "0", "--max-tokens", "6",
                                "--impl", "torch"])
    engine, tok, _ = chat_cli.build_engine(args)
    chat = chat_cli.Chat(engine, tok, SamplingParams(max_tokens=6, temperature=0.0), out=io.StringIO())
    chat.ask("hello there")
    first_turn = len(chat.tokens)
    chat.ask("how are you")
    assert engine.stats["reused_tokens"] >= first_turn - 2  # the whole first turn but its last sampled token
    assert chat.session.cached_tokens == chat.tokens[: len(chat.session.cached_tokens)]
    chat.clear()
    assert engine.cache.allocator.num_used == 0 and chat.tokens == [tok.get_bos_token_id()]


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        chat_cli.main(["--base-dir", str(tmp_path), "-p", "hi"])
