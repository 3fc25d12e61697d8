"""scripts.chat_cli against a tiny checkpoint and tokenizer saved in tmp_path."""

import io
import random
import shutil

import pytest
import torch
from tritonchat.engine.checkpoint import save_checkpoint
from tritonchat.engine.engine import SamplingParams
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import chat_cli


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


def one_line_error(capsys, rc) -> str:
    """The stderr of a command that failed on a user mistake: exit code 2 and one line (no traceback)."""
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"{chat_cli.PROG}: error: ") and err.count("\n") == 1, err
    return err


def test_missing_checkpoint_is_clear(tmp_path, capsys):
    err = one_line_error(capsys, chat_cli.main(["--base-dir", str(tmp_path), "-p", "hi"]))
    assert "no complete checkpoint" in err and str(tmp_path / "base_checkpoints") in err


def test_demo_folder_in_the_working_directory(base_dir, tmp_path, monkeypatch, capsys):
    """`make demo` writes ./.tritonchat; chat_cli run from that directory with no flags answers from it, and an
    empty or partial newer checkpoint folder left by an aborted run does not hide the complete one."""
    demo = tmp_path / ".tritonchat"
    shutil.copytree(base_dir, demo)
    (demo / "base_checkpoints" / "d4").mkdir()
    (demo / "base_checkpoints" / "d3").mkdir()
    (demo / "base_checkpoints" / "d3" / "meta_000010.json").write_text("{")
    monkeypatch.delenv("TRITONCHAT_BASE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert chat_cli.main(["-p", "hello", "--max-tokens", "3", "--impl", "torch"]) == 0
    err = capsys.readouterr().err
    assert f"{demo / 'base_checkpoints' / 'd1' / 'model_000007.pt'} (step 7) on cpu, impl torch" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda(base_dir, capsys):
    err = one_line_error(capsys, chat_cli.main(["--base-dir", str(base_dir), "-p", "hi", "--device", "cuda"]))
    assert "--device=cuda: CUDA is not available on this machine" in err


def test_bad_device_name(base_dir, capsys):
    err = one_line_error(capsys, chat_cli.main(["--base-dir", str(base_dir), "-p", "hi", "--device", "gpu0"]))
    assert "--device=gpu0: not a device name" in err


def test_triton_without_gpu_or_interpreter(base_dir, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = chat_cli.main(["--base-dir", str(base_dir), "-p", "hi", "--device", "cpu", "--impl", "triton"])
    err = one_line_error(capsys, rc)
    assert "--impl=triton: Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1" in err


def test_vocabulary_mismatch(base_dir, tmp_path, capsys):
    Tokenizer.train_from_iterator(["some other text entirely, with other words"] * 8, 280).save(tmp_path / "tok")
    rc = chat_cli.main(["--base-dir", str(base_dir), "-p", "hi", "--tokenizer-dir", str(tmp_path / "tok")])
    err = one_line_error(capsys, rc)
    assert "vocabulary mismatch" in err and "has 280 tokens" in err and "meta_000007.json" in err


def test_missing_tokenizer_and_corrupt_checkpoint_name_the_file(base_dir, tmp_path, capsys):
    err = one_line_error(capsys, chat_cli.main(["--base-dir", str(base_dir), "-p", "hi", "--tokenizer-dir",
                                                str(tmp_path)]))
    assert f"no tokenizer.pkl in '{tmp_path}'" in err
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_dir / "base_checkpoints" / "d1", ckpt)
    model = ckpt / "model_000007.pt"
    model.write_bytes(model.read_bytes()[:1000])
    argv = ["--base-dir", str(base_dir), "-p", "hi", "--checkpoint-dir", str(ckpt)]
    err = one_line_error(capsys, chat_cli.main(argv))
    assert f"no complete checkpoint (a readable meta_*.json with its model_*.pt) in {ckpt}" in err
    err = one_line_error(capsys, chat_cli.main(argv + ["--step", "7"]))
    assert f"cannot read checkpoint file {model} (truncated or corrupt?)" in err
    err = one_line_error(capsys, chat_cli.main(argv + ["--step", "8"]))
    assert "--step 8: no meta_000008.json in" in err
    err = one_line_error(capsys, chat_cli.main(["--checkpoint-dir", str(tmp_path / "nope"), "-p", "hi"]))
    assert "--checkpoint-dir" in err and "no such folder" in err


def test_ctrl_c_is_one_line(base_dir, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_cli, "build_engine", interrupted)
    assert chat_cli.main(["--base-dir", str(base_dir), "-p", "hi"]) == 130
    assert capsys.readouterr().err.strip() == f"{chat_cli.PROG}: interrupted"


def test_num_beams(base_dir, capsys):
    argv = ["-p", "hello there", "--base-dir", str(base_dir), "--max-tokens", "6", "--impl", "torch"]
    assert chat_cli.main([*argv, "--num-beams", "3"]) == 0
    beams = capsys.readouterr().out
    args = chat_cli.parse_args([*argv, "--num-beams", "3"])
    engine, tok, _ = chat_cli.build_engine(args)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hello there"}]})
    best = engine.beam_search(prompt, num_beams=3, max_tokens=6)[0]
    assert beams == tok.decode(best.tokens) + "\n"
    one_line_error(capsys, chat_cli.main([*argv, "--num-beams", "0"]))
