"""Checkpoint save/load: round trip, atomicity, validation and old-format patching."""

import json
import os

import pytest
import torch
from tritonchat.engine.checkpoint import (
    CheckpointError,
    find_last_step,
    find_latest_checkpoint,
    is_complete,
    load_checkpoint,
    load_model,
    meta_path,
    model_path,
    save_checkpoint,
)
from tritonchat.engine.gpt import GPTConfig, build_model

from tests.tolerances import EXACT


def make(depth=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_depth(depth, vocab_size=200, sequence_len=32)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save(model, d, step=5, **meta):
    save_checkpoint(d, step, model.state_dict(), {"x": torch.ones(3)},
                    {"step": step, "model_config": model.config.to_dict(), **meta})


def test_save_load_identical_logits(tmp_path):
    model = make()
    save(model, tmp_path)
    loaded, meta = load_model(tmp_path)
    idx = torch.randint(0, 200, (2, 20))
    torch.testing.assert_close(loaded(idx), model(idx), **EXACT)
    assert meta["step"] == 5 and find_last_step(tmp_path) == 5
    _, optim, _ = load_checkpoint(tmp_path, 5, load_optimizer=True)
    assert torch.equal(optim["x"], torch.ones(3))


def test_truncated_model_file(tmp_path):
    save(make(), tmp_path)
    p = model_path(tmp_path, 5)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path, 5)


def test_mismatched_checkpoint(tmp_path):
    model = make(depth=2)
    other = make(depth=3)
    save_checkpoint(tmp_path, 1, other.state_dict(), None, {"step": 1, "model_config": model.config.to_dict()})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model(tmp_path, 1)


def test_bad_meta(tmp_path):
    save(make(), tmp_path)
    meta_path(tmp_path, 5).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path, 5)
    meta_path(tmp_path, 5).write_text(json.dumps({"step": 5, "model_config": {"n_layer": 2, "bogus": 1}}))
    with pytest.raises(CheckpointError, match="unknown fields"):
        load_model(tmp_path, 5)
    with pytest.raises(FileNotFoundError):
        find_last_step(tmp_path / "nope")


def test_compiled_prefix_and_old_config(tmp_path):
    """`_orig_mod.` prefixes are stripped; a missing window_pattern means all-long; missing lambdas get 1 and 0."""
    model = make()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items() if "lambdas" not in k}
    cfg = model.config.to_dict()
    del cfg["window_pattern"]
    save_checkpoint(tmp_path, 7, state, None, {"step": 7, "model_config": cfg})
    loaded, _ = load_model(tmp_path)
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas, torch.ones(2)) and torch.equal(loaded.x0_lambdas, torch.zeros(2))
    torch.testing.assert_close(loaded.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    model = make()
    save(model, tmp_path, step=5)
    before = model_path(tmp_path, 5).read_bytes()

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path, step=5)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path, step=6)
    monkeypatch.undo()
    assert model_path(tmp_path, 5).read_bytes() == before
    assert not model_path(tmp_path, 6).exists() and find_last_step(tmp_path) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_last_step_passes_over_incomplete_checkpoints(tmp_path):
    """An aborted save or a damaged file leaves a later step that cannot load: the last complete one is taken."""
    model = make()
    for step in (5, 6, 7, 8, 9):
        save(model, tmp_path, step=step)
    p = model_path(tmp_path, 6)
    p.write_bytes(p.read_bytes()[:-100])  # truncated: no zip directory at the end
    model_path(tmp_path, 7).unlink()  # meta without model
    meta_path(tmp_path, 8).write_text('{"step": 8, "model_')  # half a meta file
    model_path(tmp_path, 9).write_bytes(b"")
    assert [is_complete(tmp_path, s) for s in (5, 6, 7, 8, 9)] == [True, False, False, False, False]
    assert find_last_step(tmp_path) == 5
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 5
    for step in (5, 6, 8, 9):
        meta_path(tmp_path, step).unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_last_step(tmp_path)


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    """An empty or partial d4/ left by an aborted run does not hide a complete d2/; the newest complete wins."""
    root = tmp_path / "base_checkpoints"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_latest_checkpoint(root)  # no folder at all
    model = make()
    save(model, root / "d2", step=3)
    (root / "d4").mkdir()
    save_checkpoint(root / "d3", 10, model.state_dict(), None, None)  # model written, meta never
    (root / "notes.txt").write_text("not a folder")
    assert find_latest_checkpoint(root) == (root / "d2", 3)
    save(model, root / "d1", step=2)
    t = os.stat(meta_path(root / "d2", 3)).st_mtime
    os.utime(meta_path(root / "d1", 2), (t + 10, t + 10))
    assert find_latest_checkpoint(root) == (root / "d1", 2)  # newer, though shallower
    os.utime(meta_path(root / "d2", 3), (t + 20, t + 20))
    assert find_latest_checkpoint(root) == (root / "d2", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_not_a_corrupt_file(tmp_path):
    save(make(), tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available") as e:
        load_model(tmp_path, device="cuda")
    assert not isinstance(e.value, CheckpointError)
