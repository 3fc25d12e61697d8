"""The model against SPEC §1–5: names and shapes, counts, FLOPs, init, loss, input checks."""

import math

import pytest
import torch
from tritonchat.engine.gpt import GPT, GPTConfig, build_model, window_sizes

from tests.tolerances import tol


def spec_state_dict_shapes(depth: int, vocab: int = 32768) -> dict[str, tuple]:
    """SPEC §2, restated independently of the model code."""
    C = math.ceil(depth * 64 / 128) * 128
    H = C // 128
    Vp = math.ceil(vocab / 64) * 64
    shapes = {"transformer.wte.weight": (Vp, C), "lm_head.weight": (Vp, C), "resid_lambdas": (depth,),
              "x0_lambdas": (depth,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(depth):
        p = f"transformer.h.{i}."
        shapes.update({p + "attn.c_q.weight": (H * 128, C), p + "attn.c_k.weight": (H * 128, C),
                       p + "attn.c_v.weight": (H * 128, C), p + "attn.c_proj.weight": (C, C),
                       p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)})
        if i % 2 == (depth - 1) % 2:
            shapes[p + "attn.ve_gate.weight"] = (H, 12)
            shapes[f"value_embeds.{i}.weight"] = (Vp, H * 128)
    return shapes


def meta_model(depth: int, **kw) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig.from_depth(depth, **kw))


@pytest.mark.parametrize("depth", [4, 12, 24])
def test_state_dict_matches_spec(depth):
    sd = meta_model(depth).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_state_dict_shapes(depth)


@pytest.mark.parametrize("depth,C", [(12, 768), (20, 1280), (24, 1536), (26, 1664), (1, 128), (3, 256)])
def test_width_from_depth(depth, C):
    cfg = GPTConfig.from_depth(depth)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (C, C // 128, C // 128)


def test_depth24_scaling_params_and_flops():
    model = meta_model(24)
    assert model.num_params()["scaling"] == 729_810_624
    assert model.flops_per_token() == pytest.approx(4.775e9, rel=1e-3)


def test_window_pattern():
    cfg = GPTConfig.from_depth(8, sequence_len=2048)
    assert window_sizes(cfg) == [512, 512, 512, 2048, 512, 512, 512, 2048]
    cfg = GPTConfig.from_depth(3, sequence_len=2048, window_pattern="SL")
    assert window_sizes(cfg) == [512, 2048, 2048]  # last layer always long
    assert window_sizes(GPTConfig.from_depth(2, sequence_len=100)) == [100, 100]  # S capped at T
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig.from_depth(2, window_pattern="SXL")


def test_bad_config():
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0)
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig.from_depth(4, n_kv_head=3)


def test_init_values():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(4, vocab_size=512, sequence_len=64))
    L = 4
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15 - 0.10 * i / (L - 1) for i in range(L)]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20 - 0.15 * i / (L - 1) for i in range(L)]))
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0
    s = math.sqrt(3) / math.sqrt(256)
    h0 = model.transformer.h[0]
    assert h0.attn.c_q.weight.abs().max() <= s and h0.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert h0.attn.c_proj.weight.count_nonzero() == 0 and h0.mlp.c_proj.weight.count_nonzero() == 0
    assert 0.7 < model.transformer.wte.weight.std().item() < 0.9
    assert model.lm_head.weight.std().item() < 0.002


def test_initial_loss_near_log_vocab():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, vocab_size=32768, sequence_len=64))
    idx = torch.randint(0, 32768, (2, 64))
    loss = model(idx, torch.randint(0, 32768, (2, 64)))
    assert abs(loss.item() - math.log(32768)) < 0.05


def test_logits_shape_and_softcap():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32))  # padded to 320
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 10.0)  # large logits: softcap must bound them
    logits = model(torch.randint(0, 300, (3, 17)))
    assert logits.shape == (3, 17, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0


def test_loss_none_matches_mean():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32))
    idx, tgt = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    tgt[0, :5] = -1
    per_tok = model(idx, tgt, loss_reduction="none")
    assert per_tok.shape == (2, 32) and (per_tok[0, :5] == 0).all()
    torch.testing.assert_close(model(idx, tgt), per_tok.sum() / (tgt >= 0).sum())


def test_causality():
    """Changing a future token must not change earlier logits (smear and windows included)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(4, vocab_size=256, sequence_len=32))
    with torch.no_grad():  # make every path non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 256, (1, 24))
    idx2 = idx.clone()
    idx2[0, 15] = (idx[0, 15] + 1) % 256
    a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_overfits_one_batch():
    from tritonchat.train.optim import MuonAdamW, build_param_groups

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, vocab_size=128, sequence_len=32))
    opt = MuonAdamW(build_param_groups(model, 0.008, 0.3, 0.02, 0.5, 0.0))
    idx = torch.randint(0, 128, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(60):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert first > 4.5 and loss.item() < 0.5, (first, loss.item())


def test_bad_inputs():
    model = build_model(GPTConfig.from_depth(1, vocab_size=100, sequence_len=16))
    with pytest.raises(ValueError, match="token id 100 out of range"):
        model(torch.tensor([[1, 2, 100]]))
    with pytest.raises(ValueError, match="token id -3 out of range"):
        model(torch.tensor([[1, -3]]))
    with pytest.raises(ValueError, match="rotary cache"):
        model(torch.zeros(1, 161, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="impl"):
        GPT(GPTConfig.from_depth(1), impl="cuda")


def test_triton_impl_matches_torch_under_interpreter():
    """Every op the model routes to Triton (norms, fused residual entry, rope+qk-norm, attention, MLP, loss) runs
    in the interpreter here (tests/conftest.py); loss and every gradient must match the reference path."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(2, vocab_size=128, sequence_len=16)
    ref = build_model(cfg, impl="torch")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make zero-initialized projections matter
    tri = build_model(cfg, impl="triton", init=False)
    tri.load_state_dict(ref.state_dict())
    idx, tgt = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    tgt[0, 3] = -1
    losses = []
    for model in (ref, tri):
        loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **tol("model_loss", torch.float32))
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol("model_grad", torch.float32),
                                   msg=lambda m, n=name: f"{n}: {m}")


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn() runs (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_bf16_tables_with_fp32_activations():
    """Tables stored in bf16, activations in fp32: the forward is exactly the fp32 model's whose tables hold the same
    (bf16-rounded) values; the logits are fp32, the Linear masters stay fp32."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(2, vocab_size=64, sequence_len=16)
    a = build_model(cfg, compute_dtype=torch.float32, embedding_dtype=torch.bfloat16)
    assert a.compute_dtype == torch.float32 and a.transformer.wte.weight.dtype == torch.bfloat16
    assert all(e.weight.dtype == torch.bfloat16 for e in a.value_embeds.values())
    assert a.lm_head.weight.dtype == torch.float32
    b = build_model(cfg, compute_dtype=torch.float32)
    b.load_state_dict(a.state_dict())  # copies the bf16 values into fp32 tables
    idx = torch.randint(0, 64, (2, 16))
    la, lb = a(idx), b(idx)
    assert la.dtype == torch.float32
    assert torch.equal(la, lb)
    a(idx, idx).backward()
    assert a.transformer.wte.weight.grad.dtype == torch.bfloat16


def test_recompute_gives_the_same_loss_and_gradients_and_keeps_less():
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(2, vocab_size=64, sequence_len=64)
    model = build_model(cfg)
    idx = torch.randint(0, 64, (2, 65))
    results = []
    for recompute in (False, True):
        model.recompute = recompute
        loss, saved = _saved_bytes(lambda: model(idx[:, :-1], idx[:, 1:]))
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = sum(n for ptr, n in saved.items() if ptr not in weights)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept))
        model.zero_grad(set_to_none=True)
    (l0, g0, k0), (l1, g1, k1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-7, rtol=1e-6, msg=n)
    assert k1 < 0.5 * k0, (k0, k1)  # each block's input instead of its activations
    with torch.no_grad():  # inference never recomputes
        model.recompute = True
        assert torch.equal(model(idx[:, :-1]), model(idx[:, :-1]))


def test_compile_reference_same_loss_grads_and_greedy_tokens(monkeypatch):
    """GPT.compile_reference (torch.compile through a backend that counts the graphs and runs them as captured):
    the training loss and gradients and the evaluation losses equal the eager model's; the engine's cached
    forwards stay eager, so greedy generations are token for token the same and capture nothing."""
    from tritonchat.engine.engine import Engine, SamplingParams

    real, graphs = torch.compile, []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counting, **kw))
    config = GPTConfig.from_depth(2, vocab_size=300, sequence_len=64)
    torch.manual_seed(0)
    eager = build_model(config)
    comp = build_model(config)
    comp.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 64), generator=g), torch.randint(0, 300, (2, 64), generator=g)
    y[0, :5] = -1
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=[])
    prompts = [[1, 2, 3, 4], [7, 8, 9]]
    want = [r.tokens for r in Engine(eager, None, max_batch_size=2).generate(prompts, params)]
    torch._dynamo.reset()
    try:
        comp.compile_reference()
        got = [r.tokens for r in Engine(comp, None, max_batch_size=2).generate(prompts, params)]
        assert got == want and not graphs
        for model in (eager, comp):
            model(x, y).backward()
        with torch.no_grad():
            ev = [m(x, y, loss_reduction="none") for m in (eager, comp)]
        assert graphs
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(ev[1], ev[0], **tol("linear_cross_entropy_chunked", torch.float32))
    for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
