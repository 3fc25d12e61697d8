"""scripts.chat_rl: RL on a checkable task (single-digit sums after a short SFT) raises the held-out reward;
resume is exact; user mistakes are one line."""

import json

import pytest
import torch
from tritonchat.engine.checkpoint import is_complete, load_meta, load_model
from tritonchat.scripts import chat_cli, chat_rl

from tests.scripts.sft_base import chat, make_sft_base, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_sft_base(tmp_path_factory.mktemp("rl"))


def argv(base, *extra) -> list[str]:
    return ["--data", str(base / "train.jsonl"), "--val-data", str(base / "val.jsonl"), "--base-dir", str(base),
            "--device", "cpu", "--impl", "torch", "--max-new-tokens", "4", "--prompts-per-step", "8",
            "--num-samples", "8", "--pass-k", "4", "--quiet", *extra]


def test_the_verifier_of_data():
    task = chat_rl.AnswerTask([chat("What is 2+3?", "5"), chat("Sum?", "so #### 12")])
    assert task.reward(task[0], " 5 ") == 1.0 and task.reward(task[0], "6") == 0.0
    assert task.reward(task[1], "well #### 12") == 1.0 and task.reward(task[1], "12") == 0.0


def test_rl_raises_the_held_out_reward(base):
    """150 steps of 8 prompts x 8 samples from the SFT model: the held-out mean reward (40 prompts x 4 samples
    at temperature 1, the same seeds before and after) rises. Seeds 0, 1, 2 gave 0.463 -> 0.569, 0.444 -> 0.531
    and 0.456 -> 0.619 when
    written; the margin 0.04 is under half the smallest gain (0.087)."""
    result = chat_rl.train_rl(chat_rl.parse_args(argv(
        base, "--num-iterations", "150", "--eval-every", "150", "--init-lr-frac", "0.1",
        "--normalize-advantages", "1", "--seed", "0")))
    before, after = result["eval"][0], result["eval"][150]
    print(f"held-out reward {before['reward']:.4f} -> {after['reward']:.4f}")
    assert after["reward"] >= before["reward"] + 0.04
    assert before["prompts"] == after["prompts"] == 40
    train = list(result["rewards"].values())
    assert sum(train[-30:]) / 30 > sum(train[:30]) / 30  # the training reward rises too
    ckpt = base / "chatrl_checkpoints" / "d1"
    assert is_complete(ckpt, 150)
    meta = load_meta(ckpt, 150)
    assert meta["rl"]["num_samples"] == 8 and meta["eval"]["reward"] == after["reward"]
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_reward" in r] == [0, 150]
    # chat_cli -i rl finds it
    rc = chat_cli.main(["--base-dir", str(base), "-i", "rl", "-p", "What is 2+3?", "--temperature", "0",
                        "--max-tokens", "4", "--impl", "torch", "--device", "cpu"])
    assert rc == 0


def test_resume_is_exact(base, tmp_path):
    flags = ["--num-iterations", "6", "--eval-every", "-1", "--init-lr-frac", "0.1", "--eval-examples", "8",
             "--device-batch-size", "5"]
    full = chat_rl.train_rl(chat_rl.parse_args(argv(base, *flags, "--out-dir", str(tmp_path / "a"))))
    out = str(tmp_path / "b")
    first = chat_rl.train_rl(chat_rl.parse_args(argv(base, *flags, "--out-dir", out, "--save-every", "3")),
                             stop_after=3)
    assert first["final_step"] == 3 and is_complete(out, 3)
    rest = chat_rl.train_rl(chat_rl.parse_args(argv(base, *flags, "--out-dir", out, "--resume-from-step", "3")))
    assert {**first["rewards"], **rest["rewards"]} == full["rewards"]
    assert {**first["losses"], **rest["losses"]} == full["losses"]
    assert rest["eval"][6] == full["eval"][6]
    a, _ = load_model(tmp_path / "a", 6)
    b, _ = load_model(out, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def exit_code(argv) -> int:
    try:
        return chat_rl.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flags, words", [
    (["--num-samples", "0"], "--num-samples"),
    (["--temperature", "x"], "--temperature"),
    (["--source-dir", "/nonexistent"], "--source-dir"),
    (["--step", "3"], "meta_000003.json"),
    (["--resume-from-step", "7"], "meta_000007.json"),
    (["--device", "cuda:99"], "--device"),
    (["--val-data", "/nonexistent.jsonl"], "--val-data"),
])
def test_mistakes_are_one_line(base, tmp_path, capsys, flags, words):
    assert exit_code(argv(base, "--out-dir", str(tmp_path), *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{chat_rl.PROG}: error: ") and err.count("\n") == 1 and words in err, err


def test_bad_data_is_one_line(base, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("1+1=?", "2")])
    with open(bad, "a") as f:
        f.write("not json\n")
    assert exit_code(argv(base, "--data", str(bad), "--out-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2" in err, err
    unanswered = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert exit_code(argv(base, "--data", str(unanswered), "--out-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "q.jsonl" in err and "answer" in err, err


def test_two_ranks_train_and_save_one_checkpoint(base, tmp_path):
    """torchrun with two gloo ranks on CPU: the prompts of a step are split over the ranks, the evaluation's
    counts summed, and one checkpoint (both optimizer shards, one model and meta) is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.chat_rl", *argv(base, "--num-iterations", "2", "--eval-every", "2", "--eval-examples", "6",
                                    "--prompts-per-step", "4", "--num-samples", "2", "--out-dir", str(out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert is_complete(out, 2)
    assert (out / "optim_000002_rank0.pt").exists() and (out / "optim_000002_rank1.pt").exists()
    meta = json.loads((out / "meta_000002.json").read_text())
    assert meta["world_size"] == 2 and meta["eval"]["prompts"] == 6


def test_ctrl_c_saves_the_last_step_and_says_so_in_one_line(base, tmp_path, monkeypatch, capsys):
    real, calls = chat_rl.policy_gradient_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat_rl, "policy_gradient_step", step)
    rc = chat_rl.main(argv(base, "--num-iterations", "5", "--eval-every", "-1", "--out-dir", str(tmp_path)))
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.count("\n") == 0 and "--resume-from-step=2" in err, err
    assert is_complete(tmp_path, 2)
