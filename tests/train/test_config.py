"""The one dial: the depth-24 speedrun numbers of SPEC §7/§12, schedules, and flag validation."""

import pytest

from train.config import (
    TrainConfig,
    configs_from_depth,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    parse_args,
)


def test_depth24_speedrun_plan():
    cfg = TrainConfig(depth=24, target_param_data_ratio=8, device_batch_size=16)
    plan = configs_from_depth(cfg, vocab_size=32768, world_size=8)
    assert plan.scaling_params == 729_810_624
    assert plan.total_batch_size == 2**20
    assert plan.num_iterations == 5568
    assert plan.target_tokens == 8 * 729_810_624
    assert plan.grad_accum_steps == 2**20 // (16 * 2048 * 8)
    assert plan.flops_per_token == pytest.approx(4.775e9, rel=1e-3)
    assert plan.lr_scale == pytest.approx(2**0.5)
    assert plan.model_config.n_embd == 1536 and plan.model_config.n_head == 12


def test_depth12_reference_batch_and_weight_decay():
    plan = configs_from_depth(TrainConfig(depth=12), vocab_size=32768)
    assert plan.total_batch_size == 2**19 and plan.lr_scale == 1.0
    assert plan.matrix_weight_decay == pytest.approx(0.28)


def test_batch_must_divide():
    cfg = TrainConfig(depth=2, max_seq_len=100, device_batch_size=3, total_batch_size=1000)
    with pytest.raises(ValueError, match="not divisible"):
        configs_from_depth(cfg, vocab_size=256)


def test_lr_schedule():
    kw = dict(num_iterations=100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.05)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(30, **kw) == 1.0 and lr_multiplier(50, **kw) == 1.0
    assert lr_multiplier(75, **kw) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(100, **kw) == pytest.approx(0.05)


def test_momentum_and_weight_decay_schedules():
    N = 2000
    assert muon_momentum(0, N, 0.65) == pytest.approx(0.85)
    assert muon_momentum(200, N, 0.65) == pytest.approx(0.91)
    assert muon_momentum(500, N, 0.65) == pytest.approx(0.97)
    assert muon_momentum(N, N, 0.65) == pytest.approx(0.90)
    assert muon_weight_decay(0, N, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(N, N, 0.2) == pytest.approx(0.0)


def test_flags():
    cfg = parse_args(["--depth=4", "--device-batch-size=2", "--max-seq-len=64", "--window-pattern=L", "--quiet"])
    assert (cfg.depth, cfg.device_batch_size, cfg.max_seq_len, cfg.window_pattern, cfg.quiet) == (4, 2, 64, "L", True)
    for bad in (["--depth=0"], ["--depth=-3"], ["--device-batch-size=0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
