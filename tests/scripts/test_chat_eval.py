"""scripts.chat_eval: ChatCORE by hand, categorical scoring from the letters' logits, a run end to end."""

import json
import random

import pytest
import torch
from tritonchat.engine.checkpoint import save_checkpoint
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import chat_eval
from tritonchat.tasks.arc import ARC

QUESTIONS = [("What is 2+3?", ["4", "5", "6", "7"], "B"), ("Which is wet?", ["water", "sand", "salt", "dust"], "A"),
             ("What is 3+3?", ["6", "5", "4", "7"], "A"), ("Pick the even one", ["3", "5", "8", "9"], "C"),
             ("What is 9-8?", ["0", "1", "2", "3"], "B")]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("base")
    rng = random.Random(1)
    words = ["what", "is", "the", "answer", "A", "B", "C", "D", "water", "sand", "2+3", "count", "letters"]
    tok = Tokenizer.train_from_iterator([" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)], 300)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=128))
    save_checkpoint(base / "chatsft_checkpoints" / "d1", 5, model.state_dict(), None,
                    {"step": 5, "model_config": model.config.to_dict()})
    rows = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
            for i, (q, c, a) in enumerate(QUESTIONS)]
    folder = base / "tasks_data" / "arc-easy"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), folder / "test.parquet")
    return base


def test_chatcore_is_the_mean_of_centered_accuracies():
    assert chat_eval.chatcore({"ARC-Easy": 0.25}) == pytest.approx(0.0)
    assert chat_eval.chatcore({"ARC-Easy": 1.0, "GSM8K": 0.5}) == pytest.approx((1.0 + 0.5) / 2)
    assert chat_eval.chatcore({"MMLU": 0.625, "SpellingBee": 0.2}) == pytest.approx((0.5 + 0.2) / 2)
    with pytest.raises(ValueError):
        chat_eval.chatcore({})


def test_categorical_scoring_takes_the_letter_with_the_highest_logit(base_dir):
    """A stand-in model whose logits favour the letter B everywhere gets right exactly the items whose key is B."""
    tok = Tokenizer.from_directory(base_dir / "tokenizer")
    task = ARC("ARC-Easy", "test", base_dir=base_dir, shuffle_seed=None)
    b_id = tok.encode("B")[0]

    def model(ids):
        logits = torch.zeros(*ids.shape, tok.get_vocab_size())
        logits[..., b_id] = 1.0
        return logits

    ok = chat_eval.evaluate_categorical(model, tok, task, list(range(len(task))), 2, torch.device("cpu"))
    assert ok == [a == "B" for _, _, a in QUESTIONS]


def test_a_run_end_to_end_writes_its_result(base_dir, capsys):
    rc = chat_eval.main(["-a", "ARC-Easy,SpellingBee", "--max-problems", "3", "--max-new-tokens", "6",
                         "--base-dir", str(base_dir), "--device", "cpu", "--impl", "torch"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ARC-Easy:" in out and "SpellingBee:" in out and "ChatCORE:" in out
    result = json.loads((base_dir / "chatsft_checkpoints" / "d1" / "chat_eval_000005.json").read_text())
    tasks = result["tasks"]
    assert tasks["ARC-Easy"]["total"] == 3 and tasks["SpellingBee"]["total"] == 3
    assert tasks["ARC-Easy"]["eval_type"] == "categorical" and tasks["SpellingBee"]["eval_type"] == "generative"
    want = chat_eval.chatcore({k: v["accuracy"] for k, v in tasks.items()})
    assert result["chatcore"] == pytest.approx(want)


@pytest.mark.parametrize("argv", [["-a", "NoSuchTask"], ["--max-problems", "0"], ["-i", "rl"]])
def test_user_mistakes_are_one_line(base_dir, argv, capsys):
    rc = chat_eval.main([*argv, "--base-dir", str(base_dir), "--device", "cpu", "--impl", "torch"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error" in err, err


def test_the_base_dir_from_the_environment(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", str(base_dir))
    assert chat_eval.main(["-a", "ARC-Easy", "--max-problems", "2", "--device", "cpu", "--impl", "torch"]) == 0
    assert "ARC-Easy:" in capsys.readouterr().out


def test_two_ranks_score_what_one_process_scores(base_dir):
    """torchrun with two gloo ranks on CPU: the items are split between them and the summed counts are the single
    process's, for a categorical and a generative task."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = ["-a", "ARC-Easy,SpellingBee", "--max-problems", "5", "--max-new-tokens", "6", "--base-dir",
            str(base_dir), "--device", "cpu", "--impl", "torch"]
    result = base_dir / "chatsft_checkpoints" / "d1" / "chat_eval_000005.json"
    assert chat_eval.main(args) == 0
    one = json.loads(result.read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.chat_eval", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(result.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for name in ("ARC-Easy", "SpellingBee"):
        assert (two["tasks"][name]["correct"], two["tasks"][name]["total"]) == \
            (one["tasks"][name]["correct"], one["tasks"][name]["total"]) and two["tasks"][name]["total"] == 5
    assert two["chatcore"] == one["chatcore"]
