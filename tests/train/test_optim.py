"""The reference MuonAdamW against SPEC §6 on hand-checked cases, and its groups."""

import copy
import math

import pytest
import torch
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.train.optim import MuonAdamW, build_param_groups

from tests.tolerances import tol

F32 = torch.float32


def test_adamw_first_step_by_hand():
    """After one step m/(1-b1) = g and v/(1-b2) = g^2, so p' = p*(1 - lr*wd) - lr * g / (|g| + eps)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.tensor([0.3, -4.0, 1e-3])
    lr, wd = 0.1, 0.05
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=lr, betas=(0.8, 0.95), weight_decay=wd, eps=1e-10)])
    opt.step()
    expected = torch.tensor([1.0 * (1 - lr * wd) - lr, -2.0 * (1 - lr * wd) + lr, 0.5 * (1 - lr * wd) - lr])
    torch.testing.assert_close(p.detach(), expected, **tol("optimizer_step", F32))
    # second step with the same gradient: bias-corrected moments still equal g and g^2
    p.grad = torch.tensor([0.3, -4.0, 1e-3])
    opt.step()
    expected = expected * (1 - lr * wd) - lr * torch.sign(p.grad)
    torch.testing.assert_close(p.detach(), expected, **tol("optimizer_normalized", F32))  # m / sqrt(v)


def test_muon_step_by_hand():
    """G = diag(2, 1) (and a second matrix diag(1, 3)): Nesterov scales G by 1 - mu^2; row equilibration makes both
    rows norm ||G||_F/sqrt(2), i.e. a multiple of the identity; Polar Express keeps it a multiple of I; Muon+ rescales
    to Frobenius sqrt(2), i.e. exactly I; NorMuon's per-row scale is uniform so X = I. Then with
    lr' = lr*sqrt(max(1, m/n)) = lr: P' = P - lr*I - lr*wd*P*(I*P >= 0)."""
    lr, wd, mu = 0.05, 0.2, 0.9
    P0 = [torch.tensor([[0.5, -0.3], [0.2, -0.7]]), torch.tensor([[-0.1, 0.4], [0.6, 0.3]])]
    params = [torch.nn.Parameter(p.clone()) for p in P0]
    params[0].grad = torch.diag(torch.tensor([2.0, 1.0]))
    params[1].grad = torch.diag(torch.tensor([1.0, 3.0]))
    opt = MuonAdamW([dict(kind="muon", params=params, lr=lr, momentum=mu, beta2=0.9, weight_decay=wd, ns_steps=5)])
    opt.step()
    eye = torch.eye(2)
    for p, p0 in zip(params, P0):
        mask = (eye * p0 >= 0).float()
        torch.testing.assert_close(p.detach(), p0 - lr * eye - lr * wd * p0 * mask, **tol("optimizer_normalized", F32))
    buf = opt.state[params[0]]["momentum_buffer"]
    torch.testing.assert_close(buf, (1 - mu) * torch.diag(torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(opt.state[params[0]]["second_momentum_buffer"], torch.full((2, 1), 0.1 * 0.5))


def test_muon_tall_matrix_lr_scale_and_orthogonality():
    """A tall (m > n) update: lr' = lr*sqrt(m/n); the update direction has Frobenius norm sqrt(n) and is
    nearly orthogonal (X^T X close to I in the polar-express band) for a random gradient."""
    torch.manual_seed(0)
    m, n, lr = 64, 16, 0.01
    p = torch.nn.Parameter(torch.zeros(m, n) + 1e-3)
    p.grad = torch.randn(m, n)
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=0.0, beta2=0.9, weight_decay=0.0, ns_steps=5)])
    opt.step()
    X = (1e-3 - p.detach()) / (lr * math.sqrt(m / n))
    assert X.norm().item() == pytest.approx(math.sqrt(n), rel=tol("optimizer_polar", F32)["rtol"])
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.5 and sv.max() < 1.5


def test_param_groups_cover_model_with_spec_lrs():
    model = build_model(GPTConfig.from_depth(4, vocab_size=256, sequence_len=32))  # C = 256
    groups = build_param_groups(model, 0.008, 0.3, 0.02, 0.5, matrix_weight_decay=0.1, lr_scale=0.5)
    by_name = {g["name"]: g for g in groups}
    dim = (256 / 768) ** -0.5
    assert by_name["lm_head"]["lr"] == pytest.approx(0.008 * dim * 0.5)
    assert by_name["wte"]["lr"] == pytest.approx(0.3 * dim * 0.5)
    assert by_name["value_embeds"]["lr"] == pytest.approx(0.15 * dim * 0.5)
    assert by_name["resid_lambdas"]["lr"] == pytest.approx(0.005 * 0.5)
    assert by_name["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert by_name["smear"]["lr"] == 0.2
    muon = [g for g in groups if g["kind"] == "muon"]
    assert {tuple(g["params"][0].shape) for g in muon} == {(256, 256), (1024, 256), (256, 1024), (2, 12)}
    assert all(g["lr"] == pytest.approx(0.01) and g["weight_decay"] == 0.1 for g in muon)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def _fresh(**kw):
    torch.manual_seed(1)
    return build_model(GPTConfig.from_depth(2, vocab_size=64, sequence_len=16), **kw)


def _train_step(model, opt, idx):
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    model.zero_grad(set_to_none=True)


def test_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 17))
    fresh = _fresh
    step = lambda model, opt: _train_step(model, opt, idx)
    a = fresh()
    oa = MuonAdamW(build_param_groups(a, 0.008, 0.3, 0.02, 0.5, 0.1))
    step(a, oa)
    b = fresh()
    b.load_state_dict(a.state_dict())
    ob = MuonAdamW(build_param_groups(b, 0.008, 0.3, 0.02, 0.5, 0.1))
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as if through a file: no shared tensors
    step(a, oa)
    step(b, ob)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_bad_groups():
    p, q = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3, 2))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[p, q], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[p], lr=0.1)])


def test_muon_stack_parts_on_cpu_change_nothing(monkeypatch):
    """On a CPU a Muon group is updated in parts of at most CPU_STACK_NUMEL elements (bounded memory); every
    matrix's update is its own, so one matrix per part gives what the whole stack gives, over several steps."""
    torch.manual_seed(0)
    P0 = [torch.randn(24, 16) for _ in range(5)]
    grads = [[torch.randn(24, 16) for _ in range(5)] for _ in range(3)]
    out = []
    for numel in (1 << 30, 1):
        monkeypatch.setattr(MuonAdamW, "CPU_STACK_NUMEL", numel)
        params = [torch.nn.Parameter(p.clone()) for p in P0]
        opt = MuonAdamW([dict(kind="muon", params=params, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.1,
                              ns_steps=5)])
        assert len(opt._stack_parts(params)) == (1 if numel > 1 else 5)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        out.append(torch.stack([p.detach() for p in params]))
    torch.testing.assert_close(out[1], out[0], **tol("optimizer_normalized", F32))


def test_bf16_tables_keep_bf16_moments_and_resume_exactly(tmp_path):
    """A bf16 table's AdamW moments are bf16 (the reference's storage), so Optimizer.load_state_dict (which casts
    state to the parameter's dtype) gives back exactly the state that was saved, and the run continues the same."""
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 17))
    fresh = lambda: _fresh(embedding_dtype=torch.bfloat16)
    step = lambda model, opt: _train_step(model, opt, idx)
    a = fresh()
    oa = MuonAdamW(build_param_groups(a, 0.008, 0.3, 0.02, 0.5, 0.1))
    step(a, oa)
    st = oa.state[a.transformer.wte.weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert oa.state[a.lm_head.weight]["exp_avg"].dtype == torch.float32
    torch.save(oa.state_dict(), tmp_path / "optim.pt")
    b = fresh()
    b.load_state_dict(a.state_dict())
    ob = MuonAdamW(build_param_groups(b, 0.008, 0.3, 0.02, 0.5, 0.1))
    ob.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    step(a, oa)
    step(b, ob)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
