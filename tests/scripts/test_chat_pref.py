"""scripts.chat_pref: the preference data formats, the answer mask, DPO on synthetic pairs (prefer answers ending
in 'yes'), exact resume, and the loops that make pairs from the model: chat_cli's `rate` and --sample-out."""

import builtins
import json
import random

import pytest
import torch
from tritonchat.engine.checkpoint import is_complete, load_meta, load_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import chat_cli, chat_pref

from tests.scripts.sft_base import TEMPLATES, make_sft_base, write_jsonl

USER = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = make_sft_base(tmp_path_factory.mktemp("pref"), sft_steps=30)
    items = [(t.format(a=a, b=b), str(a + b)) for a in range(10) for b in range(10 - a) for t in TEMPLATES]
    random.Random(1).shuffle(items)
    lines = []
    for i, (q, a) in enumerate(items):  # two of the formats, alternating
        good, bad = f"{a} yes", f"{a} no"
        if i % 2:
            lines.append({"prompt": q, "chosen": good, "rejected": bad})
        else:
            lines.append({"messages": [{"role": "user", "content": q}], "answers": [bad, good], "ranking": [1, 0]})
    write_jsonl(base / "pairs.jsonl", lines)
    return base


def argv(base, *extra) -> list[str]:
    return ["--data", str(base / "pairs.jsonl"), "--val-fraction", "0.2", "--base-dir", str(base), "--device", "cpu",
            "--impl", "torch", "--quiet", *extra]


# ---- data -------------------------------------------------------------------------------------------------
def test_the_formats_read_to_the_same_ranked_items():
    want = chat_pref.Ranked(USER, ["5", "6"], [1.0, 0.0])
    assert chat_pref.parse_item({"messages": USER, "chosen": "5", "rejected": "6"}) == want
    assert chat_pref.parse_item({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}) == want
    full = lambda a: [*USER, {"role": "assistant", "content": a}]  # noqa: E731
    assert chat_pref.parse_item({"chosen": full("5"), "rejected": full("6")}) == want
    hh = {"chosen": "\n\nHuman: What is 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: What is 2+3?\n\nAssistant: 6"}
    assert chat_pref.parse_item(hh) == want
    ranked = chat_pref.parse_item({"messages": USER, "answers": ["6", "5", "4"], "ranking": [1, 2, 0]})
    assert ranked.scores == [1.0, 3.0, 2.0]
    pairs = chat_pref.make_pairs([ranked], adjacent=False)
    assert [(c, r) for _, c, r in pairs] == [("5", "6"), ("5", "4"), ("4", "6")]
    assert [(c, r) for _, c, r in chat_pref.make_pairs([ranked], adjacent=True)] == [("5", "4"), ("4", "6")]
    scored = chat_pref.parse_item({"messages": USER, "answers": ["5", "6", "7"], "scores": [1, 0, 0]})
    assert [(c, r) for _, c, r in chat_pref.make_pairs([scored], False)] == [("5", "6"), ("5", "7")]


@pytest.mark.parametrize("line, words", [
    ('{"messages": [], "chosen": "a"}', "expected"),
    ('{"messages": [{"role": "user", "content": "q"}], "answers": ["a", "b"], "ranking": [0, 0]}', "ranking"),
    ('{"messages": [{"role": "user", "content": "q"}], "answers": ["a"], "scores": [1]}', "two or more"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": []}', "end with the assistant"),
    ('[1, 2]', "object"),
    ('not json', "bad.jsonl:2"),
])
def test_a_bad_line_is_one_line_naming_the_file_and_line(base, tmp_path, capsys, line, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    assert chat_pref.main(argv(base, "--data", str(bad), "--out-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2" in err and words in err, err


def test_only_the_answer_is_scored(base):
    tok = Tokenizer.from_directory(base / "tokenizer")
    history = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}, *USER]
    x, y = chat_pref.pair_batch(tok, [(history, "5 yes", "6")], 64, "cpu")
    end = tok.encode_special("<|assistant_end|>")
    assert x.shape[0] == 2
    assert [t for t in y[0].tolist() if t >= 0] == tok.encode("5 yes") + [end]  # not the earlier answer "2"
    assert [t for t in y[1].tolist() if t >= 0] == tok.encode("6") + [end]


# ---- training -------------------------------------------------------------------------------------------
def test_dpo_learns_the_preference_on_held_out_pairs(base):
    """On held-out pairs (prompts not trained on), the preference accuracy goes from chance (the policy starts
    as the reference: every margin 0, a tie counting half) to 1; the loss falls from log 2."""
    result = chat_pref.train_pref(chat_pref.parse_args(argv(base, "--num-iterations", "30", "--eval-every", "30",
                                                            "--init-lr-frac", "0.1")))
    before, after = result["eval"][0], result["eval"][30]
    print(f"held-out preference accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, margin "
          f"{before['margin']:.3f} -> {after['margin']:.3f}, kl {after['kl']:.4f}")
    assert before["accuracy"] == 0.5 and before["margin"] == 0 and before["loss"] == pytest.approx(0.693147)
    assert abs(before["kl"]) < 1e-6
    assert after["accuracy"] >= 0.95 and after["margin"] > 1.0 and after["loss"] < 0.3 and after["kl"] > 0
    ckpt = base / "chatpref_checkpoints" / "d1"
    assert is_complete(ckpt, 30) and load_meta(ckpt, 30)["pref"]["beta"] == 0.1


def test_resume_is_exact(base, tmp_path):
    flags = ["--num-iterations", "6", "--eval-every", "3", "--init-lr-frac", "0.1", "--batch-size", "4"]
    full = chat_pref.train_pref(chat_pref.parse_args(argv(base, *flags, "--out-dir", str(tmp_path / "a"))))
    out = str(tmp_path / "b")
    first = chat_pref.train_pref(chat_pref.parse_args(argv(base, *flags, "--out-dir", out, "--save-every", "3")),
                                 stop_after=3)
    assert first["final_step"] == 3 and is_complete(out, 3)
    rest = chat_pref.train_pref(chat_pref.parse_args(argv(base, *flags, "--out-dir", out, "--resume-from-step",
                                                          "3")))
    assert {**first["losses"], **rest["losses"]} == full["losses"]
    assert rest["eval"][6] == full["eval"][6]
    a, _ = load_model(tmp_path / "a", 6)
    b, _ = load_model(out, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_rate_in_chat_cli_writes_a_ranking_that_chat_pref_trains_on(base, tmp_path, monkeypatch, capsys):
    ratings = tmp_path / "ratings.jsonl"
    typed = iter(["rate", "What is 2+3?", "rate 3", "0 1 2", "2 3 1", "4+1=?", "rate 2", "", "rate", "1 2 3",
                  "quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    rc = chat_cli.main(["--base-dir", str(base), "-i", "sft", "--ratings", str(ratings), "--max-tokens", "4",
                        "--impl", "torch", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "ask something first" in out and "give each of 1..3 once" in out and "(not rated)" in out
    lines = [json.loads(line) for line in ratings.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["messages"] == USER and len(lines[0]["answers"]) == 3 and lines[0]["ranking"] == [1, 2, 0]
    # the second rating has the whole conversation before its question
    assert [m["role"] for m in lines[1]["messages"]] == ["user", "assistant", "user"]
    assert lines[1]["messages"][-1]["content"] == "4+1=?" and lines[1]["ranking"] == [0, 1, 2]
    result = chat_pref.train_pref(chat_pref.parse_args(
        ["--data", str(ratings), "--val-fraction", "0", "--base-dir", str(base), "--device", "cpu", "--impl",
         "torch", "--quiet", "--num-iterations", "2", "--batch-size", "3", "--out-dir", str(tmp_path / "out")]))
    assert result["final_step"] == 2 and is_complete(tmp_path / "out", 2) and result["eval"] == {}


def test_sample_out_ranks_the_models_answers_with_the_verifier(base, tmp_path, capsys):
    out = tmp_path / "ranked.jsonl"
    rc = chat_pref.main(["--data", str(base / "val.jsonl"), "--sample-out", str(out), "--num-samples", "4",
                         "--max-new-tokens", "4", "--base-dir", str(base), "--device", "cpu", "--impl", "torch"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert items and all(len(set(it["scores"])) > 1 and len(it["answers"]) == 4 for it in items)
    val = [json.loads(line) for line in (base / "val.jsonl").read_text().splitlines()]
    truth = {v["messages"][0]["content"]: v["messages"][1]["content"] for v in val}
    for it in items:  # a score is 1 exactly when the answer is the sum
        assert it["scores"] == [float(a.strip() == truth[it["messages"][0]["content"]]) for a in it["answers"]]
    result = chat_pref.train_pref(chat_pref.parse_args(
        ["--data", str(out), "--base-dir", str(base), "--device", "cpu", "--impl", "torch", "--quiet",
         "--num-iterations", "2", "--out-dir", str(tmp_path / "o")]))
    assert result["final_step"] == 2


@pytest.mark.parametrize("flags, words", [
    (["--beta", "0"], "--beta"),
    (["--pairs", "some"], "--pairs"),
    (["--data", "/nonexistent.jsonl"], "--data"),
    (["--source-dir", "/nonexistent"], "--source-dir"),
    (["--resume-from-step", "7"], "meta_000007.json"),
])
def test_mistakes_are_one_line(base, tmp_path, capsys, flags, words):
    try:
        rc = chat_pref.main(argv(base, "--out-dir", str(tmp_path), *flags))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"{chat_pref.PROG}: error: ") and err.count("\n") == 1 and words in err, err


def test_two_ranks_train_and_save_one_checkpoint(base, tmp_path):
    """torchrun with two gloo ranks on CPU: the pairs of a step are split over the ranks, the held-out sums
    added, and one checkpoint with both optimizer shards is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.chat_pref", *argv(base, "--num-iterations", "2", "--eval-every", "2", "--batch-size", "4",
                                      "--out-dir", str(out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert is_complete(out, 2)
    assert (out / "optim_000002_rank0.pt").exists() and (out / "optim_000002_rank1.pt").exists()
    meta = json.loads((out / "meta_000002.json").read_text())
    assert meta["world_size"] == 2 and meta["eval"]["pairs"] == 44


def test_ctrl_c_saves_the_last_step_and_says_so_in_one_line(base, tmp_path, monkeypatch, capsys):
    real, calls = chat_pref.dpo_step_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat_pref, "dpo_step_loss", loss)
    rc = chat_pref.main(argv(base, "--num-iterations", "5", "--eval-every", "-1", "--val-fraction", "0",
                             "--out-dir", str(tmp_path)))
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.count("\n") == 0 and "--resume-from-step=2" in err, err
    assert is_complete(tmp_path, 2)


def test_answer_content_keeps_calculator_calls_as_parts(base):
    tok = Tokenizer.from_directory(base / "tokenizer")
    sp = tok.encode_special
    parts = [{"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"},
             {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5"}]
    ids, _ = tok.render_conversation({"messages": [*USER, {"role": "assistant", "content": parts}]}, max_tokens=None)
    answer = ids[ids.index(sp("<|assistant_start|>")) + 1:-1]  # between <|assistant_start|> and <|assistant_end|>
    assert chat_cli.answer_content(tok, answer) == parts
    assert chat_cli.answer_content(tok, tok.encode("5 yes")) == "5 yes"
