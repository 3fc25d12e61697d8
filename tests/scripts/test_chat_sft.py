"""scripts.chat_sft: the packing and its loss mask, and a tiny base model fine-tuned on single-digit sums."""

import json
import random

import pytest
import torch
from tritonchat.engine.checkpoint import find_last_step, is_complete, load_meta, load_model, save_checkpoint
from tritonchat.engine.engine import Engine, SamplingParams
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import chat_cli, chat_sft

TEMPLATES = ["What is {a}+{b}?", "{a}+{b}=?", "Add {a} and {b}.", "Compute {a} plus {b}."]


def sums() -> list[dict]:
    """'What is 2+3?' -> '5' for every a + b <= 9 in four phrasings, in a fixed shuffled order."""
    items = [chat(t.format(a=a, b=b), str(a + b)) for a in range(10) for b in range(10 - a) for t in TEMPLATES]
    random.Random(0).shuffle(items)
    return items


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """<base>/tokenizer, <base>/base_checkpoints/d1 (a freshly initialized depth-1 model), train/val JSONL."""
    base = tmp_path_factory.mktemp("sft")
    items = sums()
    text = [" ".join(m["content"] for m in c["messages"]) for c in items]
    with pytest.warns(UserWarning):  # the corpus has fewer pieces than the vocabulary asks for
        tok = Tokenizer.train_from_iterator(text * 3, 300)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=64))
    save_checkpoint(base / "base_checkpoints" / "d1", 0, model.state_dict(), None,
                    {"step": 0, "model_config": model.config.to_dict()})
    write_jsonl(base / "val.jsonl", items[:40])
    write_jsonl(base / "train.jsonl", items[40:])
    return base


def tokenizer(base) -> Tokenizer:
    return Tokenizer.from_directory(base / "tokenizer")


def argv(base, *extra) -> list[str]:
    return ["--data", str(base / "train.jsonl"), "--val-data", str(base / "val.jsonl"), "--base-dir", str(base),
            "--device", "cpu", "--impl", "torch", "--max-seq-len", "64", "--device-batch-size", "8",
            "--quiet", *extra]


# ---- packing -----------------------------------------------------------------------------------------
def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("seq_len", [16, 31, 64])
def test_rows_start_at_conversations_and_supervise_exactly_the_assistant(base, seq_len):
    tok = tokenizer(base)
    rng = random.Random(seq_len)
    convs = [chat(" ".join(rng.choice(["What", "is", "1+2?", "Add", "3"]) for _ in range(rng.randint(1, 12))),
                  str(rng.randint(0, 999))) for _ in range(30)]
    loader = chat_sft.SFTBatches(tok, convs, 3, seq_len, loop=False, buffer_size=5)
    seen = []
    bos = tok.get_bos_token_id()
    for x, y in loader:
        assert x.shape == y.shape == (3, seq_len)
        for row_x, row_y, members in zip(x.tolist(), y.tolist(), loader.rows):
            # the row is whole rendered conversations (each cropped to the row) back to back, then padding
            ids, mask = [], []
            for i in members:
                a, m = tok.render_conversation(convs[i], max_tokens=seq_len + 1)
                ids, mask = ids + a, mask + m
            assert len(ids) <= seq_len + 1
            row = row_x + [None]
            assert not members or row[0] == bos
            assert row[:len(ids) - 1] == ids[:-1] if len(ids) > seq_len else row[:len(ids)] == ids
            assert all(t == bos for t in row_x[len(ids):])  # padding
            expected = [ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else -1 for t in range(seq_len)]
            assert row_y == expected
            seen += members
    assert sorted(seen) == list(range(len(convs)))  # one pass: every conversation exactly once


def test_a_long_conversation_is_cropped_to_one_row(base):
    tok = tokenizer(base)
    long = chat("What is 1+2? " * 20, "3 " * 20)
    short = chat("1+2=?", "3")
    loader = chat_sft.SFTBatches(tok, [long, short], 1, 16, loop=False)
    rows = [(x[0].tolist(), y[0].tolist(), loader.rows[0]) for x, y in loader]
    ids, mask = tok.render_conversation(long, max_tokens=None)
    assert len(ids) > 17 and len(rows) == 2
    (x0, y0, m0), (x1, y1, m1) = rows
    assert m0 == [0] and x0 == ids[:16] and y0 == [ids[t + 1] if mask[t + 1] else -1 for t in range(16)]
    assert m1 == [1] and x1[0] == tok.get_bos_token_id()


def test_mask_is_the_assistant_tokens(base):
    """Targets are kept exactly where render_conversation's mask supervises: the answer and <|assistant_end|>."""
    tok = tokenizer(base)
    conv = chat("What is 2+3?", "5")
    ids, mask = tok.render_conversation(conv)
    x, y = next(iter(chat_sft.SFTBatches(tok, [conv], 1, len(ids) - 1, loop=False)))
    kept = [t for t in y[0].tolist() if t >= 0]
    assert kept == [i for i, m in zip(ids, mask) if m] == tok.encode("5") + [tok.encode_special("<|assistant_end|>")]


def test_rows_per_epoch_matches_the_loader(base):
    tok = tokenizer(base)
    convs = sums()[:50]
    lengths = [len(tok.render_conversation(c, max_tokens=33)[0]) for c in convs]
    loader = chat_sft.SFTBatches(tok, convs, 1, 32, buffer_size=7)
    batches, rows = iter(loader), 0
    while loader.used < len(convs):
        next(batches)
        rows += 1
    assert chat_sft.rows_per_epoch(lengths, 33, 7) == rows


def test_schedules_follow_the_reference_sft():
    lrm = lambda p: chat_sft.lr_multiplier(p, 0.0, 0.5, 0.0)  # noqa: E731
    assert lrm(0.0) == lrm(0.5) == 1.0 and lrm(0.75) == pytest.approx(0.5) and lrm(1.0) == 0.0
    assert chat_sft.muon_momentum(0) == 0.85 and chat_sft.muon_momentum(150) == pytest.approx(0.90)
    assert chat_sft.muon_momentum(300) == chat_sft.muon_momentum(1000) == pytest.approx(0.95)


# ---- training -------------------------------------------------------------------------------------------
def accuracy(model, tok, conversations) -> float:
    """Exact match of greedy answers."""
    model.eval()
    engine = Engine(model, tok, max_batch_size=len(conversations), impl="torch")
    gens = engine.generate([tok.render_for_completion(c) for c in conversations],
                           SamplingParams(max_tokens=4, temperature=0.0))
    return sum(g.text.strip() == c["messages"][-1]["content"] for g, c in zip(gens, conversations)) / len(conversations)


def test_sft_learns_the_sums_and_chat_cli_loads_it(base, capsys):
    tok, val = tokenizer(base), sums()[:40]
    before, _ = load_model(base / "base_checkpoints" / "d1", device="cpu", impl="torch")
    result = chat_sft.train_sft(chat_sft.parse_args(argv(base, "--num-iterations", "60", "--eval-every", "30")))
    ckpt = base / "chatsft_checkpoints" / "d1"
    assert find_last_step(ckpt) == 60 and is_complete(ckpt, 60) and (ckpt / "optim_000060_rank0.pt").exists()
    meta = load_meta(ckpt, 60)
    assert meta["model_config"] == before.config.to_dict() and meta["val_loss"] == result["val_loss"][60]
    after, _ = load_model(ckpt, device="cpu", impl="torch")
    loss0, loss1 = result["val_loss"][0], result["val_loss"][60]
    acc0, acc1 = accuracy(before, tok, val), accuracy(after, tok, val)
    print(f"held-out loss {loss0:.3f} -> {loss1:.3f}, exact match {acc0:.3f} -> {acc1:.3f}")
    assert loss1 < 0.5 * loss0  # 5.65 -> 0.53 when written
    assert acc1 >= acc0 + 0.2  # 0.0 -> 0.53 when written
    capsys.readouterr()

    # chat_cli: -i sft loads it, and so does the default now that an SFT checkpoint exists
    for flags in (["-i", "sft"], []):
        rc = chat_cli.main(["--base-dir", str(base), *flags, "-p", "What is 2+3?", "--temperature", "0",
                            "--max-tokens", "4", "--impl", "torch", "--device", "cpu"])
        captured = capsys.readouterr()
        assert rc == 0 and "sft model " in captured.err and "chatsft_checkpoints" in captured.err
    rc = chat_cli.main(["--base-dir", str(base), "-i", "base", "-p", "hi", "--max-tokens", "2", "--impl", "torch",
                        "--device", "cpu"])
    assert rc == 0 and "base model " in capsys.readouterr().err
    rc = chat_cli.main(["--base-dir", str(base), "-i", "rl", "-p", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "chatrl_checkpoints" in err and err.count("\n") == 1


def test_resume_is_exact(base, tmp_path):
    flags = ["--num-iterations", "12", "--eval-every", "-1", "--buffer-size", "9"]
    full = chat_sft.train_sft(chat_sft.parse_args(argv(base, *flags, "--out-dir", str(tmp_path / "a"))))
    out = str(tmp_path / "b")
    first = chat_sft.train_sft(chat_sft.parse_args(argv(base, *flags, "--out-dir", out, "--save-every", "5")),
                               stop_after=5)
    assert first["final_step"] == 5 and is_complete(out, 5)
    rest = chat_sft.train_sft(chat_sft.parse_args(argv(base, *flags, "--out-dir", out, "--resume-from-step", "5")))
    assert {**first["losses"], **rest["losses"]} == full["losses"]
    assert rest["val_loss"][12] == full["val_loss"][12]
    a, _ = load_model(tmp_path / "a", 12)
    b, _ = load_model(out, 12)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def exit_code(argv) -> int:
    """chat_sft.main's exit code, also where argparse exits."""
    try:
        return chat_sft.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flags, words", [
    (["--max-seq-len", "x"], "--max-seq-len"),
    (["--warmdown-ratio", "2"], "--warmdown-ratio"),
    (["--total-batch-size", "100"], "--total-batch-size"),
    (["--source-dir", "/nonexistent"], "--source-dir"),
    (["--step", "3"], "meta_000003.json"),
    (["--device", "cuda:99"], "--device"),
    (["--resume-from-step", "7"], "meta_000007.json"),
])
def test_mistakes_are_one_line(base, tmp_path, capsys, flags, words):
    assert exit_code(argv(base, "--out-dir", str(tmp_path), *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{chat_sft.PROG}: error: ") and err.count("\n") == 1 and words in err, err


def test_bad_data_is_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    assert exit_code(argv(base, "--data", str(bad))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2" in err, err
    assert exit_code(["--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err, err


def test_a_task_mixture_trains_beside_the_users_conversations(base, tmp_path):
    """--tasks mixes named tasks (here a share of the generated spelling tasks) with --data's conversations; the
    held-out set is the tasks' test splits. The mixture is what the loader packs, in the seeded order."""
    args = chat_sft.parse_args(["--tasks", "SpellingBee:0.0005,SimpleSpelling:0.0002", "--data",
                                str(base / "train.jsonl"), "--base-dir", str(base), "--device", "cpu", "--impl",
                                "torch", "--max-seq-len", "64", "--device-batch-size", "8", "--quiet",
                                "--num-iterations", "3", "--eval-every", "-1", "--eval-tokens", "512",
                                "--out-dir", str(tmp_path)])
    assert args.tasks == [("SpellingBee", 0.0005), ("SimpleSpelling", 0.0002)]
    train, val, where = chat_sft.load_datasets(args)
    assert len(train) == 40 + 40 + len(sums()) - 40 and len(val) == 400 and "SpellingBee:0.0005" in where
    assert all(train[i]["messages"][-1]["role"] == "assistant" for i in range(len(train)))
    result = chat_sft.train_sft(args)
    assert result["final_step"] == 3 and is_complete(tmp_path, 3)


@pytest.mark.parametrize("spec, words", [("NoSuch", "unknown task"), ("SmolTalk:x", "a number"),
                                         ("GSM8K:0", "positive"), (",", "no tasks")])
def test_bad_task_specs_are_one_line(base, tmp_path, capsys, spec, words):
    assert exit_code(["--tasks", spec, "--base-dir", str(base), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{chat_sft.PROG}: error: --tasks") and err.count("\n") == 1 and words in err, err


def test_two_ranks_train_and_save_one_checkpoint(base, tmp_path):
    """torchrun with two gloo ranks on CPU: each rank trains on its share of the conversations, the gradients are
    averaged, and one checkpoint (every rank's optimizer shard, one model and meta) is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.chat_sft", *argv(base, "--num-iterations", "3", "--eval-every", "-1", "--eval-tokens", "256",
                                     "--total-batch-size", "1024", "--out-dir", str(out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert is_complete(out, 3)
    assert (out / "optim_000003_rank0.pt").exists() and (out / "optim_000003_rank1.pt").exists()
    meta = json.loads((out / "meta_000003.json").read_text())
    assert meta["world_size"] == 2 and len(meta["dataloader_states"]) == 2
