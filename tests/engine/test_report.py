"""engine.report: the report card from what the stages left in the base directory."""

import json

import torch
from tritonchat.engine.checkpoint import save_checkpoint
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.report import REPORT, update_report, write_report


def _checkpoint(folder, step, **meta):
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16))
    save_checkpoint(folder, step, model.state_dict(), None,
                    {"step": step, "model_config": model.config.to_dict(), "total_batch_size": 128,
                     "device_batch_size": 2, "max_seq_len": 16, **meta})


def test_every_stage_and_its_evaluations(tmp_path):
    base_ck = tmp_path / "base_checkpoints" / "d1"
    _checkpoint(base_ck, 6, val_bpb=1.25, run="demo", loop_state={"total_time": 120.0, "timed_steps": 5})
    (base_ck / "core_000006.json").write_text(json.dumps(
        {"core_metric": 0.125, "results": {"hellaswag": 0.5}, "centered_results": {"hellaswag": 0.3333}}))
    (base_ck / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"run": "demo", "step": 0, "resumed": False}, {"step": 0, "val_bpb": 3.0}, {"step": 1, "loss": 4.0},
        {"step": 6, "val_bpb": 1.25})) + "\n")
    sft_ck = tmp_path / "chatsft_checkpoints" / "d1"
    _checkpoint(sft_ck, 3, val_loss=0.5, val_bpb=0.4)
    (sft_ck / "chat_eval_000003.json").write_text(json.dumps(
        {"chatcore": 0.2, "tasks": {"SpellingBee": {"accuracy": 0.2, "correct": 2, "total": 10}}}))
    text = write_report(tmp_path).read_text()
    assert text.startswith("# tritonchat report")
    assert "## Base model" in text and "## SFT" in text and "## RL" not in text
    assert "| validation bits per byte | 1.2500 |" in text and "| run | demo |" in text
    assert "2.0 min over 5 timed steps" in text
    assert "**CORE 0.1250**" in text and "| hellaswag | 0.5000 | 0.3333 |" in text
    assert "**ChatCORE 0.2000**" in text and "| SpellingBee | 0.2000 | 2/10 |" in text
    assert "| held-out loss | 0.5000 |" in text


def test_an_empty_base_dir_says_what_to_do(tmp_path):
    assert "No complete checkpoint yet" in write_report(tmp_path).read_text()


def test_a_report_that_cannot_be_written_is_a_warning(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    update_report(blocker)  # a file where the base folder should be: never raises
    assert "warning: could not write the report" in capsys.readouterr().err
    assert not (tmp_path / REPORT).exists()
