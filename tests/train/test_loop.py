"""The training loop end to end on CPU: three steps, evaluation, checkpoints, exact resume, bad input."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.train.__main__ import main as train_main
from tritonchat.train.config import TrainConfig
from tritonchat.train.loop import train

WORDS = "the model reads tokens and predicts the next one with attention over a window of previous text".split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    data = base / "data"
    data.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": make_docs(200, i)}), data / f"shard_{i:05d}.parquet", row_group_size=50)
    tok = Tokenizer.train_from_iterator(iter(make_docs(300, 99)), vocab_size=320)
    tok.save(base / "tokenizer")
    return base


def config(workspace, run_dir, **kw) -> TrainConfig:
    defaults = dict(impl="torch", depth=1, max_seq_len=32, device_batch_size=2, total_batch_size=128, num_iterations=6,
                    eval_every=3, eval_tokens=128, save_every=3, data=str(workspace / "data"),
                    base_dir=str(workspace), run_dir=str(run_dir), quiet=True, device="cpu")
    defaults.update(kw)
    return TrainConfig(**defaults)


def test_three_steps(workspace, tmp_path):
    result = train(config(workspace, tmp_path, num_iterations=3, eval_every=0, save_every=-1))
    assert sorted(result["losses"]) == [0, 1, 2]
    assert result["plan"]["grad_accum_steps"] == 2
    assert list(result["val_bpb"]) == [3] and result["val_bpb"][3] > 0
    assert len(result["samples"]) > 0
    assert (tmp_path / "model_000003.pt").exists() and (tmp_path / "optim_000003_rank0.pt").exists()
    meta = json.loads((tmp_path / "meta_000003.json").read_text())
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 1 and meta["dataloader_state_dict"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_resume_reproduces_losses(workspace, tmp_path):
    full = train(config(workspace, tmp_path / "full"))
    part = train(config(workspace, tmp_path / "part"), stop_after=3)
    assert sorted(part["losses"]) == [0, 1, 2]
    rest = train(config(workspace, tmp_path / "part", resume_from_step=3))
    assert sorted(rest["losses"]) == [3, 4, 5]
    for s in range(3):
        assert part["losses"][s] == full["losses"][s]
    for s in range(3, 6):
        assert rest["losses"][s] == full["losses"][s], (s, rest["losses"][s], full["losses"][s])
    assert rest["val_bpb"][6] == full["val_bpb"][6]


def test_bad_flags_and_missing_inputs(workspace, tmp_path, capsys):
    assert train_main(["--depth=1", f"--data={tmp_path / 'nope'}", f"--base-dir={workspace}", "--device=cpu",
                       "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128", "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err
    assert train_main(["--depth=1", f"--base-dir={tmp_path}", "--device=cpu", "--quiet"]) == 2
    assert "tok_train" in capsys.readouterr().err
    assert train_main(["--depth=1", f"--data={workspace / 'data'}", f"--base-dir={workspace}", "--device=cpu",
                       "--max-seq-len=32", "--device-batch-size=3", "--total-batch-size=128", "--quiet"]) == 2
    assert "not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--depth=0"])


def test_bits_per_byte_by_hand():
    """Per-token losses 1, 2, 3, 4 nats on targets of byte lengths 2, 0 (special), 3, ignored (-1):
    bpb = (1 + 3) / (ln 2 * (2 + 3))."""
    import math

    import torch
    from tritonchat.train.loop import evaluate_bpb

    class Fixed(torch.nn.Module):
        def forward(self, x, y, loss_reduction="mean"):
            assert loss_reduction == "none"
            return torch.tensor([[1.0, 2.0, 3.0, 4.0]])

    token_bytes = torch.tensor([2, 0, 3, 5])
    batches = iter([(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 2, -1]]))])
    assert evaluate_bpb(Fixed(), batches, 1, token_bytes) == pytest.approx(4 / (math.log(2) * 5))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_does_not_duplicate_metrics(workspace, tmp_path):
    """A run stopped after 3 steps, then resumed from the checkpoint of step 3 twice over (the first resume
    killed after one more step): metrics.jsonl has each step once, and a header per invocation naming the run."""
    train(config(workspace, tmp_path, run="first"), stop_after=3)
    train(config(workspace, tmp_path, resume_from_step=3, save_every=-1, run="first"), stop_after=1)
    train(config(workspace, tmp_path, resume_from_step=3, run="first"))
    records = _records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 3, 6]
    headers = [r for r in records if "run" in r]
    assert [(h["run"], h["step"], h["resumed"]) for h in headers] == [("first", 0, False), ("first", 3, True)]
    assert json.loads((tmp_path / "meta_000006.json").read_text())["run"] == "first"
    train(config(workspace, tmp_path, num_iterations=1, run="second"))  # a fresh run starts a new file
    assert [r.get("run") for r in _records(tmp_path)][0] == "second"


def test_zero_iterations_only_evaluates(workspace, tmp_path):
    result = train(config(workspace, tmp_path, num_iterations=0))
    assert result["losses"] == {} and list(result["val_bpb"]) == [0] and result["final_step"] == 0
    assert not list(tmp_path.glob("model_*.pt"))


def test_fail_at_is_a_parameter(workspace, tmp_path):
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train(config(workspace, tmp_path), fail_at=4)
    assert (tmp_path / "meta_000003.json").exists() and not (tmp_path / "meta_000004.json").exists()


def test_interrupt_saves_the_last_whole_step_and_resumes_exactly(workspace, tmp_path, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt) in the forward of step 4 (0-based 4): the checkpoint of step 4 is written
    (the loader as it was after step 4), and resuming from it reproduces the uninterrupted run."""
    import tritonchat.train.loop as loop

    full = train(config(workspace, tmp_path / "full", save_every=-1))
    calls, step = [], loop.train_step

    def interrupted_step(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*a, **kw)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    with pytest.raises(loop.Interrupted, match="--resume-from-step=4") as e:
        train(config(workspace, tmp_path / "part", save_every=-1))
    assert e.value.step == 4 and e.value.saved and (tmp_path / "part" / "meta_000004.json").exists()
    monkeypatch.setattr(loop, "train_step", step)
    rest = train(config(workspace, tmp_path / "part", resume_from_step=4, save_every=-1))
    assert [rest["losses"][s] for s in (4, 5)] == [full["losses"][s] for s in (4, 5)]
    assert rest["val_bpb"][6] == full["val_bpb"][6]


def test_ctrl_c_inside_the_optimizer_step_waits_for_its_end():
    import os
    import signal

    from tritonchat.train.progress import InterruptGuard

    with InterruptGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.pending  # remembered, not raised: the step finishes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_main_reports_interrupt_in_one_line(workspace, tmp_path, monkeypatch, capsys):
    import tritonchat.train.loop as loop

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", ctrl_c)
    code = train_main(["--depth=1", f"--data={workspace / 'data'}", f"--base-dir={workspace}", f"--run-dir={tmp_path}",
                       "--device=cpu", "--impl=torch", "--max-seq-len=32", "--device-batch-size=2",
                       "--total-batch-size=128", "--eval-tokens=128", "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and err == "interrupted after step 0; no checkpoint written\n"


def test_user_mistakes_are_one_line_exit_2(workspace, tmp_path, monkeypatch, capsys):
    common = [f"--data={workspace / 'data'}", f"--base-dir={workspace}", f"--run-dir={tmp_path}", "--quiet",
              "--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert train_main([*common, "--device=cpu", "--impl=triton"]) == 2
    err = capsys.readouterr().err
    assert "--impl=triton" in err and "TRITON_INTERPRET=1" in err and err.count("\n") == 1
    assert train_main([*common, "--device=tpu"]) == 2 and "--device" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert train_main([*common, "--device=cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device=cuda" in err and "no CUDA" in err and err.count("\n") == 1


def test_cpu_contention_warning(monkeypatch):
    import os

    from tritonchat.train.loop import cpu_contention

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert cpu_contention(2) is None
    assert "4 threads on 2 available cores" in cpu_contention(4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.5, 1.0))
    assert "load average is 1.9 on 2 cores" in cpu_contention(2)
    assert cpu_contention(1) is not None and "\n" not in cpu_contention(1)


def test_epochs_warning_and_token_estimate(workspace):
    from tritonchat.train import data
    from tritonchat.train.loop import epochs_warning

    tok = Tokenizer.from_directory(workspace / "tokenizer")
    files = data.split_files(data.list_data_files(workspace / "data"), "train")
    counted = sum(len(ids) for f in files for rg in range(data.num_units([f]))
                  for ids in tok.encode(data._read_unit(f, rg), prepend=tok.get_bos_token_id()))
    estimate = data.estimate_tokens(files, tok)
    assert 0.8 * counted < estimate < 1.5 * counted, (estimate, counted)
    assert epochs_warning(4 * counted, counted) is None
    assert "about 10 passes" in epochs_warning(10 * counted, counted)


def test_heartbeat_prints_while_silent():
    import time

    from tritonchat.train.progress import Heartbeat

    lines = []
    with Heartbeat(lines.append, every=0.05) as hb:
        hb.doing("validation", "batch 1/4")
        time.sleep(0.3)
        hb.doing(None)
        n = len(lines)
        time.sleep(0.2)
    assert n >= 2 and all(line.startswith("  validation: batch 1/4 (") for line in lines)
    assert len(lines) == n  # nothing while no activity is named
    with Heartbeat(None) as hb:  # quiet: no thread, no output
        hb.say("x")


def test_evaluation_never_holds_full_logits(workspace, monkeypatch):
    """The validation forward goes through the chunked lm_head + cross-entropy: with N = 512 tokens per batch
    and 256-row chunks, no (.., V) tensor holds more than one chunk of logits."""
    import torch
    import tritonchat.kernels.linear_cross_entropy as lce
    from tritonchat.engine.gpt import GPTConfig, build_model
    from tritonchat.train import data
    from tritonchat.train.loop import evaluate_bpb

    from tests.helpers import LargestTensor

    monkeypatch.setattr(lce, "_REF_CHUNK_LOGITS", 1)  # the minimum chunk, 256 rows
    tok = Tokenizer.from_directory(workspace / "tokenizer")
    V = tok.get_vocab_size()
    model = build_model(GPTConfig.from_depth(1, vocab_size=V, sequence_len=256), impl="torch")
    val = data.PackedLoader(tok, data.split_files(data.list_data_files(workspace / "data"), "val"), 2, 256)
    token_bytes = torch.ones(V, dtype=torch.long)
    with LargestTensor(last_dim=(V, model.config.padded_vocab_size)) as seen:
        bpb = evaluate_bpb(model.eval(), val, 2, token_bytes)
    assert bpb > 0 and seen.numel <= 256 * model.config.padded_vocab_size < 512 * V, seen.shape


def test_compile_on_matches_eager(workspace, tmp_path, monkeypatch):
    """--compile=on: the model body, the loss chunks and the optimizer math go through torch.compile (here a
    backend that counts the graphs and runs them as captured, so no C++ is built), the losses follow the eager
    run's within fp32 rounding, the banner says so, and no step after the first compiles anything."""
    import torch

    real, graphs = torch.compile, []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counting, **kw))
    torch._dynamo.reset()
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        kw = dict(num_iterations=3, eval_every=0, save_every=-1, sample_every=-1, quiet=False)
        eager = train(config(workspace, tmp_path / "eager", compile="off", **kw))
        assert not graphs
        train(config(workspace, tmp_path / "one", compile="on", **{**kw, "num_iterations": 1}))
        one_step = len(graphs)
        torch._dynamo.reset()
        comp = train(config(workspace, tmp_path / "comp", compile="on", **kw))
    finally:
        torch._dynamo.reset()
    assert one_step > 0 and len(graphs) == 2 * one_step  # three steps compile what one step does, nothing more
    for s, loss in comp["losses"].items():
        assert abs(loss - eager["losses"][s]) < 1e-4 * abs(eager["losses"][s]), s
    assert abs(comp["val_bpb"][3] - eager["val_bpb"][3]) < 1e-4
    assert any("torch.compile of the reference path (set" in line for line in lines)
    assert any("torch.compile included" in line for line in lines)


def test_compile_auto_resolution():
    import torch
    from tritonchat.train.setup import COMPILE_MIN_STEPS, resolve_compile

    cpu = torch.device("cpu")
    assert resolve_compile("auto", "torch", cpu, COMPILE_MIN_STEPS)[0]
    assert not resolve_compile("auto", "torch", cpu, COMPILE_MIN_STEPS - 1)[0]  # too short to pay back
    assert not resolve_compile("auto", "torch", torch.device("cuda"), 10_000)[0]
    assert resolve_compile("on", "torch", cpu, 1)[0] and not resolve_compile("off", "torch", cpu, 10_000)[0]
    on, note = resolve_compile("on", "triton", cpu, 10_000)
    assert not on and "Triton" in note
    assert resolve_compile("auto", "triton", cpu, 10_000) == (False, None)
    with pytest.raises(ValueError, match="--compile"):
        TrainConfig(compile="yes")


def test_compile_without_a_cxx_compiler(monkeypatch):
    """torch.compile on a CPU emits C++: without a compiler, auto runs uncompiled and says why; on is one line."""
    import torch
    from tritonchat.train import setup

    monkeypatch.setattr(setup, "cxx_compiler", lambda: None)
    cpu = torch.device("cpu")
    on, note = setup.resolve_compile("auto", "torch", cpu, 10_000)
    assert not on and "C++ compiler" in note
    with pytest.raises(ValueError, match="--compile=on needs a C\\+\\+ compiler"):
        setup.resolve_compile("on", "torch", cpu, 10)
    monkeypatch.undo()
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert setup.cxx_compiler() is None
    monkeypatch.setenv("CXX", "/opt/cc/bin/g++")
    assert setup.cxx_compiler() == "/opt/cc/bin/g++"
