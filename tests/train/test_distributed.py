"""Two gloo ranks on CPU through torchrun: the same parameters as one process on the same total batch,
really sharded optimizer state, exact resume after a failure, and a failing rank ending the job."""

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tritonchat.engine.gpt import build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.train import data
from tritonchat.train.config import TrainConfig, configs_from_depth
from tritonchat.train.loop import set_schedules
from tritonchat.train.optim import MuonAdamW, build_param_groups

from tests.tolerances import tol

ROOT = Path(__file__).resolve().parents[2]
WORDS = "ranks share the batch and each one owns half of the optimizer state for its matrices".split()
ARGS = dict(impl="torch", depth=3, max_seq_len=32, device_batch_size=2, total_batch_size=256, num_iterations=4,
            eval_every=2, eval_tokens=128, seed=3)


def make_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 50))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    (base / "data").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": make_docs(160, i)}), base / "data" / f"shard_{i:05d}.parquet",
                       row_group_size=40)
    Tokenizer.train_from_iterator(iter(make_docs(300, 7)), vocab_size=300).save(base / "tokenizer")
    return base


def torchrun(workspace, run_dir, extra=(), env_extra=None, timeout=240):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *flags, f"--data={workspace / 'data'}", f"--base-dir={workspace}", f"--run-dir={run_dir}",
           "--device=cpu", "--dist-timeout=60", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("TRITONCHAT_FAIL_AT", None) if not env_extra else None
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def state_numel(optim_state):
    return sum(t.numel() for s in optim_state["state"].values() for t in s.values() if torch.is_tensor(t))


@pytest.fixture(scope="module")
def full_run(workspace, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    proc = torchrun(workspace, run_dir, ["--save-every=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_two_ranks_match_one_process(workspace, full_run):
    run_dir, proc = full_run
    assert "ranks 2" in proc.stdout
    cfg = TrainConfig(**ARGS, data=str(workspace / "data"), base_dir=str(workspace), device="cpu")
    tok = Tokenizer.from_directory(workspace / "tokenizer")
    plan = configs_from_depth(cfg, tok.get_vocab_size(), world_size=2)
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model_config, embedding_dtype=torch.bfloat16)  # the trainer's default tables
    opt = MuonAdamW(build_param_groups(model, cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.scalar_lr,
                                       plan.matrix_weight_decay, plan.lr_scale))
    files = data.split_files(data.list_data_files(workspace / "data"), "train")
    loaders = [iter(data.PackedLoader(tok, files, 2, 32, rank=r, world_size=2)) for r in range(2)]
    accum = plan.grad_accum_steps
    for step in range(ARGS["num_iterations"]):
        set_schedules(opt, step, cfg, plan)
        for loader in loaders:  # one process, the same total batch: both ranks' micro-batches
            for _ in range(accum):
                x, y = next(loader)
                (model(x, y) / (accum * 2)).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        saved = torch.load(run_dir / f"model_{step + 1:06d}.pt", weights_only=True)
        for name, p in model.state_dict().items():
            # the same steps on gradients summed in another order (two ranks' halves, then the all-reduce)
            # bf16 tables: one rounding apart, and near 0 a bf16 rounding of the update (~1e-2) apart
            bound = tol("optimizer_normalized", p.dtype) if p.dtype == torch.float32 else dict(atol=1e-4, rtol=2**-7)
            torch.testing.assert_close(saved[name], p, **bound,
                                       msg=lambda m, s=step + 1, n=name: f"step {s}: {n} {m}")
    # optimizer state is sharded: each rank holds about half of the single-process state
    single = state_numel(copy.deepcopy(opt.state_dict()))
    shards = [state_numel(torch.load(run_dir / f"optim_000004_rank{r}.pt", weights_only=True)) for r in range(2)]
    for n in shards:
        assert 0.3 * single < n < 0.7 * single, (shards, single)
    meta = json.loads((run_dir / "meta_000004.json").read_text())
    assert meta["world_size"] == 2 and len(meta["dataloader_states"]) == 2


def test_failure_then_exact_resume(workspace, full_run, tmp_path):
    full_dir, _ = full_run
    t0 = time.time()
    proc = torchrun(workspace, tmp_path, ["--save-every=2"], env_extra={"TRITONCHAT_FAIL_AT": "1:2"})
    assert proc.returncode != 0 and time.time() - t0 < 200
    assert "injected failure at step 2" in proc.stderr and "rank 1 of 2" in proc.stderr
    assert (tmp_path / "meta_000002.json").exists() and not (tmp_path / "meta_000004.json").exists()
    proc = torchrun(workspace, tmp_path, ["--save-every=2", "--resume-from-step=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = losses(full_dir), losses(tmp_path)
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
    for name, p in torch.load(full_dir / "model_000004.pt", weights_only=True).items():
        assert torch.equal(p, torch.load(tmp_path / "model_000004.pt", weights_only=True)[name]), name


def test_resume_with_other_world_size_is_rejected(workspace, full_run, capsys):
    from tritonchat.train.__main__ import main

    run_dir, _ = full_run
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    code = main([*flags, f"--data={workspace / 'data'}", f"--base-dir={workspace}", f"--run-dir={run_dir}",
                 "--device=cpu", "--resume-from-step=2", "--quiet"])
    assert code == 2 and "same number of ranks" in capsys.readouterr().err
