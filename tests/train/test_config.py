"""The one dial: the depth-24 speedrun numbers of SPEC §7/§12, schedules, and flag validation."""

import pytest
from tritonchat.train.config import (
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


def test_defaults_from_the_device():
    """-1 derives from the device: a GPU gets the recipe (32 x 2048 micro-batches, 80 x 2^19 validation tokens);
    a CPU about 2048 tokens per micro-batch, one micro-batch per step and four for validation."""
    gpu = configs_from_depth(TrainConfig(depth=4), vocab_size=32768, device_type="cuda")
    assert gpu.device_batch_size == 32 and gpu.eval_tokens == 80 * 2**19 and gpu.total_batch_size == 2**18
    cpu = configs_from_depth(TrainConfig(depth=4), vocab_size=32768, device_type="cpu")
    assert cpu.device_batch_size == 1 and cpu.total_batch_size == 2048 and cpu.grad_accum_steps == 1
    assert cpu.eval_tokens == 4 * 2048 and cpu.eval_one_pass
    assert any("--total-batch-size=262144" in n for n in cpu.notes)  # the recipe's batch, one flag away
    assert cpu.lr_scale == pytest.approx((2048 / 2**19) ** 0.5)  # the learning rates follow the batch
    short = configs_from_depth(TrainConfig(depth=4, max_seq_len=256), vocab_size=4096, world_size=2, device_type="cpu")
    assert short.device_batch_size == 8 and short.total_batch_size == 8 * 256 * 2
    set_ = configs_from_depth(TrainConfig(depth=4, device_batch_size=2, total_batch_size=8192, eval_tokens=10**6),
                              vocab_size=32768, device_type="cpu")
    assert (set_.device_batch_size, set_.total_batch_size, set_.grad_accum_steps) == (2, 8192, 2)
    assert set_.eval_tokens == 10**6 and not set_.eval_one_pass  # asked for: may repeat the split


def test_num_iterations_zero_means_no_steps():
    assert configs_from_depth(TrainConfig(depth=2, num_iterations=0), vocab_size=256).num_iterations == 0
    assert configs_from_depth(TrainConfig(depth=2, num_iterations=5), vocab_size=256).num_iterations == 5
    derived = configs_from_depth(TrainConfig(depth=2), vocab_size=256)
    assert derived.num_iterations == derived.target_tokens // derived.total_batch_size
    with pytest.raises(ValueError, match="--num-iterations"):
        TrainConfig(num_iterations=-2)


def test_short_run_momentum_follows_spec():
    """SPEC §7: below step 400 the warm-up wins even inside the warmdown; the warmdown starts from 0.97."""
    N, ratio = 20, 0.65  # warmdown: the last 13 steps, from step 7
    assert muon_momentum(10, N, ratio) == pytest.approx(0.85 + 0.12 * 10 / 400)
    N = 1000  # warmdown from step 350: step 399 still warms up, step 400 is 50 steps into it, from 0.97
    assert muon_momentum(399, N, ratio) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert muon_momentum(400, N, ratio) == pytest.approx(0.97 - 0.07 * 50 / 650)


def test_help_shows_defaults_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 2048)" in out and "(default: -1)" in out and "0: evaluate only" in out
    for bad, flag in ((["--depth=x"], "--depth"), (["--num-iterations=-2"], "--num-iterations"),
                      (["--eval-tokens=0"], "--eval-tokens"), (["--log-every=0"], "--log-every")):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and err.count("\n") == 1, err


def _reference_momentum(it: int, num_iterations: int, warmdown_ratio: float) -> float:
    """The reference trainer's Muon momentum rule, restated: warm-up over the first 400 steps from 0.85 to 0.97
    (taking precedence), then across the warmdown from 0.97 to 0.90, else 0.97."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


@pytest.mark.parametrize("steps", [50, 500, 5000])
@pytest.mark.parametrize("ratio", [0.65, 0.4])
def test_momentum_equals_the_reference_at_every_step(steps, ratio):
    got = [muon_momentum(s, steps, ratio) for s in range(steps + 1)]
    want = [_reference_momentum(s, steps, ratio) for s in range(steps + 1)]
    assert got == want  # exactly, not approximately


def test_recompute_follows_the_device_and_the_activations():
    """auto: a CPU recomputes when a micro-batch would keep over 1 GiB of activations (depth 12 at 2048 tokens: yes;
    depth 4: no); a GPU holds the recipe's micro-batch; on/off force it."""
    plan = lambda device, **kw: configs_from_depth(TrainConfig(**kw), vocab_size=32768, device_type=device)
    assert plan("cpu", depth=12).recompute and any("recomputing" in n for n in plan("cpu", depth=12).notes)
    assert not plan("cpu", depth=4).recompute
    assert not plan("cuda", depth=12).recompute
    assert plan("cpu", depth=4, recompute="on").recompute and not plan("cpu", depth=12, recompute="off").recompute
    with pytest.raises(SystemExit):
        parse_args(["--recompute=sometimes"])


def test_large_cpu_runs_return_freed_memory():
    """Depth 12 (286M parameters) passes the threshold from which a CPU run returns freed memory at once; depth 4
    at the README's 32768 vocabulary does not (the page faults would cost it time for nothing)."""
    from tritonchat.train.config import _meta_model, activation_bytes, model_config_for
    from tritonchat.train.setup import LARGE_CPU_RUN, cpu_footprint

    def footprint(depth):
        config = model_config_for(TrainConfig(depth=depth), 32768)
        return cpu_footprint(_meta_model(config), activation_bytes(config, 2048))

    assert footprint(12) > LARGE_CPU_RUN > footprint(4)
