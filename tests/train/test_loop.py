"""The training loop end to end on CPU: three steps, evaluation, checkpoints, exact resume, bad input."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.tokenizer import Tokenizer
from train.__main__ import main as train_main
from train.config import TrainConfig
from train.loop import train

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

    from train.loop import evaluate_bpb

    class Fixed(torch.nn.Module):
        def forward(self, x, y, loss_reduction="mean"):
            assert loss_reduction == "none"
            return torch.tensor([[1.0, 2.0, 3.0, 4.0]])

    token_bytes = torch.tensor([2, 0, 3, 5])
    batches = iter([(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 2, -1]]))])
    assert evaluate_bpb(Fixed(), batches, 1, token_bytes) == pytest.approx(4 / (math.log(2) * 5))
