"""Resuming the reference trainer's checkpoints: its stacked, rank-sharded optimizer state in our layout.

The reference's optimizer layout is restated here independently of train/reference.py: AdamW state per parameter
(rows r*n/W .. of a parameter of >= 1024 elements on rank r of W, else whole), Muon state once per group on its
first parameter, stacked (c, m, n) / (c, m, 1) or (c, 1, n) for the c = ceil(K/W) matrices rank r owns."""

import json
import math
import shutil

import pytest
import torch
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.train import reference
from tritonchat.train.loop import train
from tritonchat.train.optim import MuonAdamW, build_param_groups

from tests.train.test_loop import config, workspace  # noqa: F401  (the module fixture)


def to_reference_shards(our_state: dict, opt, world: int) -> list[dict]:
    """Our whole (one-rank) optimizer state_dict as the reference's `world` rank files would hold it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    groups, i = [], 0
    for g in opt.param_groups:
        groups.append((g["kind"], list(range(i, i + len(g["params"])))))
        i += len(g["params"])
    shards = [{"state": {}, "param_groups": [{"kind": k, "params": idx} for k, idx in groups]} for _ in range(world)]
    for kind, idx in groups:
        if kind == "adamw":
            for j in idx:
                s = our_state["state"].get(j)
                if s is None:
                    continue
                cut = world > 1 and params[j].numel() >= 1024
                rows = params[j].shape[0] // world
                for r in range(world):
                    part = {k: (s[k][r * rows:(r + 1) * rows] if cut else s[k]).clone()
                            for k in ("exp_avg", "exp_avg_sq")}
                    shards[r]["state"][j] = {"step": s["step"], **part}
        else:
            K, c = len(idx), math.ceil(len(idx) / world)
            m, n = params[idx[0]].shape
            for r in range(world):
                buf = torch.zeros(c, m, n)
                buf2 = torch.zeros(c, m, 1) if m >= n else torch.zeros(c, 1, n)
                for k in range(c):
                    if r * c + k < K:
                        s = our_state["state"][idx[r * c + k]]
                        buf[k], buf2[k] = s["momentum_buffer"], s["second_momentum_buffer"]
                shards[r]["state"][idx[0]] = {"momentum_buffer": buf, "second_momentum_buffer": buf2}
    return shards


def _stepped_optimizer():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, sequence_len=16, vocab_size=64), device=torch.device("cpu"),
                        impl="torch")
    opt = MuonAdamW(build_param_groups(model, 0.008, 0.3, 0.02, 0.5, 0.28), impl="torch")
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


@pytest.mark.parametrize("world", [1, 2, 4])  # the reference needs the rows of a big parameter to divide
def test_reference_shards_convert_back_to_our_state(world):
    model, opt = _stepped_optimizer()
    ours = opt.state_dict()
    shards = to_reference_shards(ours, opt, world)
    assert reference.is_reference_optimizer_state(shards[0], opt)
    assert not reference.is_reference_optimizer_state(ours, opt)
    back = reference.convert_optimizer(shards, opt)
    assert set(back["state"]) == set(ours["state"])
    for i, s in ours["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(back["state"][i][k], v, rtol=0, atol=0)
            else:
                assert back["state"][i][k] == v
    opt.load_state_dict(back)  # loads as our own


def test_a_different_model_is_refused_in_one_line():
    _, opt = _stepped_optimizer()
    shards = to_reference_shards(opt.state_dict(), opt, 1)
    shards[0]["param_groups"] = shards[0]["param_groups"][:-1]
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        reference.convert_optimizer(shards, opt)


def test_a_reference_checkpoint_resumes_with_the_uninterrupted_losses(workspace, tmp_path):  # noqa: F811
    full = train(config(workspace, tmp_path / "full"))
    part_dir = tmp_path / "part"
    train(config(workspace, part_dir), stop_after=3)
    # Rewrite step 3 as the reference would have written it: stacked Muon state, its meta keys.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for name in ("model_000003.pt",):
        shutil.copy(part_dir / name, ref_dir / name)
    ours = torch.load(part_dir / "optim_000003_rank0.pt", weights_only=True)
    model = build_model(GPTConfig(**json.loads((part_dir / "meta_000003.json").read_text())["model_config"]),
                        device=torch.device("cpu"), impl="torch")
    opt = MuonAdamW(build_param_groups(model, 0.008, 0.3, 0.02, 0.5, 0.28), impl="torch")
    shards = to_reference_shards(ours, opt, 1)
    torch.save(shards[0], ref_dir / "optim_000003_rank0.pt")
    meta = json.loads((part_dir / "meta_000003.json").read_text())
    ref_meta = {"step": meta["step"], "val_bpb": meta["val_bpb"], "model_config": meta["model_config"],
                "user_config": {}, "device_batch_size": meta["device_batch_size"], "max_seq_len": 32,
                "total_batch_size": 128, "dataloader_state_dict": meta["dataloader_state_dict"],
                "loop_state": {"min_val_bpb": 1.0, "smooth_train_loss": 3.0, "total_training_time": 1.5}}
    (ref_dir / "meta_000003.json").write_text(json.dumps(ref_meta))
    rest = train(config(workspace, ref_dir, resume_from_step=3))
    assert sorted(rest["losses"]) == [3, 4, 5]
    for s in range(3, 6):
        assert rest["losses"][s] == full["losses"][s], (s, rest["losses"][s], full["losses"][s])


def test_each_of_our_ranks_gets_its_own_part():
    """Whole states cut for 2 of our ranks: the Muon matrices split between them (each once), a sharded AdamW
    parameter's rows split in two halves, the rest whole on both."""
    model, opt = _stepped_optimizer()
    params = [p for g in opt.param_groups for p in g["params"]]
    full = reference.assemble(to_reference_shards(opt.state_dict(), opt, 2), opt, params)
    parts = []
    for r in range(2):
        opt.rank, opt.world_size = r, 2  # the layout only: no process group is needed to cut the state
        parts.append(reference.for_rank(full, opt, params)["state"])
    opt.rank, opt.world_size = 0, 1
    muon = {i for i, s in full.items() if "momentum_buffer" in s}
    assert muon and set(parts[0]) & muon and set(parts[1]) & muon
    assert not set(parts[0]) & set(parts[1]) & muon and (set(parts[0]) | set(parts[1])) >= muon
    for i, s in full.items():
        if "exp_avg" in s:
            both = [parts[r][i]["exp_avg"] for r in range(2)]
            if both[0].shape == s["exp_avg"].shape:
                torch.testing.assert_close(both[0], s["exp_avg"], rtol=0, atol=0)
            else:
                torch.testing.assert_close(torch.cat(both), s["exp_avg"], rtol=0, atol=0)
