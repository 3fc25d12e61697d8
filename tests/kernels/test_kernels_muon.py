"""The fused Muon / AdamW launches against their references, and a whole optimizer step against train/optim.py.

Stack shapes are the model's kinds at C = 128: C x C, 4C x C (tall), C x 4C (wide), Hkv x 12 (Hkv = 1), plus odd
ones. Everything runs in fp32 here (the CPU interpreter); tolerances come from tests/tolerances.py, with the
typical size of each compared state as the `scale` of its absolute bound.
"""

import math

import pytest
import torch
from tritonchat.kernels.muon import (
    adamw_step_,
    adamw_step_ref,
    muon_post,
    muon_post_ref,
    muon_pre,
    muon_pre_ref,
    muon_step_,
    muon_step_ref,
)
from tritonchat.train.optim import MuonAdamW

from tests.helpers import rand32
from tests.tolerances import tol

F32, BF16 = torch.float32, torch.bfloat16
C = 128
KINDS = {"CxC": (3, C, C), "4CxC": (2, 4 * C, C), "Cx4C": (2, C, 4 * C), "Hkvx12": (3, 1, 12)}
ODD = {"odd_wide": (3, 37, 53), "odd_tall": (2, 53, 37)}


def _away_from_zero(x, margin=0.05):
    """Keeps X P away from 0 so that the cautious mask cannot flip on a rounding difference."""
    return torch.where(x >= 0, x + margin, x - margin)


def _buf2_shape(K, m, n):
    return (K, m, 1) if m >= n else (K, 1, n)


@pytest.mark.parametrize("shape", list(KINDS.values()) + list(ODD.values()), ids=list(KINDS) + list(ODD))
def test_muon_pre_matches_ref(shape):
    G = rand32(*shape, seed=1)
    buf = rand32(*shape, seed=2, scale=0.1)
    buf_f, buf_r = buf.clone(), buf.clone()
    x_f = muon_pre(G, buf_f, 0.95, out_dtype=torch.float32, impl="triton")
    x_r = muon_pre_ref(G, buf_r, 0.95, torch.float32)
    assert x_f.dtype == torch.float32 and x_f.shape == shape
    # elementwise fp32 math, sums in another order: a few ulps (values ~1)
    torch.testing.assert_close(buf_f, buf_r, **tol("optimizer_step", F32))
    assert not torch.equal(buf_f, buf), "the momentum buffer is updated in place"
    torch.testing.assert_close(x_f, x_r, **tol("optimizer_normalized", F32))
    # every row has norm ||G'||_F / sqrt(m)
    norms = x_f.norm(dim=-1)
    torch.testing.assert_close(norms, norms[:, :1].expand_as(norms), **tol("optimizer_normalized", F32, scale=0))


@pytest.mark.parametrize("shape", [KINDS["4CxC"], ODD["odd_wide"]])
def test_muon_pre_bf16(shape):
    """bf16 gradients in, bf16 X out (the GPU's Polar-Express dtype): within one bf16 step of the reference."""
    G = rand32(*shape, seed=3).bfloat16()
    buf = rand32(*shape, seed=4, scale=0.1)
    buf_f, buf_r = buf.clone(), buf.clone()
    x_f = muon_pre(G, buf_f, 0.9, out_dtype=torch.bfloat16, impl="triton")
    x_r = muon_pre_ref(G, buf_r, 0.9, torch.bfloat16)
    assert x_f.dtype == torch.bfloat16
    torch.testing.assert_close(buf_f, buf_r, **tol("optimizer_step", F32))
    # one bf16 step (2^-7 relative): the CPU interpreter rounds fp32 -> bf16 toward zero, torch to nearest
    torch.testing.assert_close(x_f.float(), x_r.float(), **tol("optimizer_normalized", BF16))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(KINDS.values()) + list(ODD.values()), ids=list(KINDS) + list(ODD))
def test_muon_post_matches_ref(shape, x_dtype):
    K, m, n = shape
    X = _away_from_zero(rand32(*shape, seed=5)).to(x_dtype)
    P = _away_from_zero(rand32(*shape, seed=6, scale=0.05), 0.01)
    buf2 = rand32(*_buf2_shape(*shape), seed=7).abs() * 0.01 + 1e-3
    P_f, P_r, b_f, b_r = P.clone(), P.clone(), buf2.clone(), buf2.clone()
    assert muon_post(X, P_f, b_f, 0.02, 0.2, 0.9, impl="triton") is None
    muon_post_ref(X, P_r, b_r, 0.02, 0.2, 0.9)
    torch.testing.assert_close(b_f, b_r, **tol("optimizer_normalized", F32, scale=0))
    # the update is lr' X ~ 0.02 * O(1); fp32 factors agree to ~1e-6 relative
    torch.testing.assert_close(P_f, P_r, **tol("optimizer_normalized", F32, scale=0.1))
    assert (P_f - P).abs().max() > 1e-3, "the parameters are updated in place"
    # the decay term is live: some entries have X P >= 0, some not
    mask = X.float() * P >= 0
    assert 0 < mask.float().mean() < 1


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3,), (37, 53), (4097,)])
@pytest.mark.parametrize("step", [1, 7])
def test_adamw_matches_ref(shape, p_dtype, step):
    seed = sum(shape) + step
    p = rand32(*shape, seed=seed).to(p_dtype)
    g = rand32(*shape, seed=seed + 1, scale=0.3).to(p_dtype)
    m = rand32(*shape, seed=seed + 2, scale=0.1)
    v = rand32(*shape, seed=seed + 3, scale=0.1).square()
    f = [p.clone(), g, m.clone(), v.clone()]
    r = [p.clone(), g, m.clone(), v.clone()]
    hp = dict(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-10, wd=0.05)
    assert adamw_step_(*f, step, **hp, impl="triton") is None
    adamw_step_ref(*r, step, **hp)
    torch.testing.assert_close(f[2], r[2], **tol("optimizer_step", F32, scale=0.1))  # m ~ 0.1
    torch.testing.assert_close(f[3], r[3], **tol("optimizer_step", F32, scale=1e-3))  # v ~ 1e-2, many entries far less
    # fp32: a few ulps; bf16 storage: at most one bf16 step apart (the CPU interpreter rounds fp32 -> bf16 toward
    # zero, torch to nearest; on a GPU both round to nearest)
    torch.testing.assert_close(f[0], r[0], **tol("optimizer_step", p_dtype))
    assert not torch.equal(f[0], p) and not torch.equal(f[2], m)


@pytest.mark.parametrize("step", [1, 9])
def test_adamw_bf16_moments(step):
    """bf16 moments beside a bf16 parameter (the reference's storage for its bf16 tables): both paths update p from
    the fp32 moments and round them once; equal to a float64 oracle within bf16 rounding."""
    shape = (37, 53)
    p = rand32(*shape, seed=step).bfloat16()
    g = rand32(*shape, seed=step + 1, scale=0.3).bfloat16()
    m = rand32(*shape, seed=step + 2, scale=0.1).bfloat16()
    v = rand32(*shape, seed=step + 3, scale=0.1).square().bfloat16()
    hp = dict(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-10, wd=0.05)
    m64 = torch.lerp(m.double(), g.double(), 1 - hp["beta1"])
    v64 = torch.lerp(v.double(), g.double().square(), 1 - hp["beta2"])
    p64 = p.double() * (1 - hp["lr"] * hp["wd"]) - hp["lr"] / (1 - hp["beta1"] ** step) * m64 / (
        (v64 / (1 - hp["beta2"] ** step)).sqrt() + hp["eps"])
    for impl in ("torch", "triton"):
        f = [p.clone(), g, m.clone(), v.clone()]
        adamw_step_(*f, step, **hp, impl=impl)
        assert all(t.dtype == torch.bfloat16 for t in f)
        # one bf16 rounding (2^-8 relative) on each, toward zero in the interpreter
        torch.testing.assert_close(f[2].double(), m64, atol=1e-5, rtol=2 ** -7)
        torch.testing.assert_close(f[3].double(), v64, atol=1e-7, rtol=2 ** -7)
        torch.testing.assert_close(f[0].double(), p64, atol=1e-5, rtol=2 ** -7)
    with pytest.raises(TypeError, match="exp_avg must be float32"):
        adamw_step_(p.float(), g, m.clone(), v.float(), step, **hp)


def test_adamw_ref_chunks_equal_whole():
    """Off a GPU the reference updates a large tensor chunk by chunk: bitwise the same as one pass."""
    from tritonchat.kernels import muon as M

    n = M._ADAMW_REF_CHUNK * 2 + 12345
    p, g = rand32(n, seed=1), rand32(n, seed=2, scale=0.3)
    m, v = rand32(n, seed=3, scale=0.1), rand32(n, seed=4, scale=0.1).square()
    a = [p.clone(), g, m.clone(), v.clone()]
    b = [p.clone(), g, m.clone(), v.clone()]
    adamw_step_ref(*a, 3, 0.01, 0.8, 0.95, 1e-10, 0.05)
    M._adamw_math(*b, 3, 0.01, 0.8, 0.95, 1e-10, 0.05)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], p)


def test_muon_step_matches_ref():
    """muon_pre + polar_express + muon_post (all Triton) against the reference composition, on a tall stack
    (every kind runs through muon_step_ in the optimizer-step test below)."""
    shape = KINDS["4CxC"]
    G = rand32(*shape, seed=8)
    P = rand32(*shape, seed=9, scale=0.05)
    buf = rand32(*shape, seed=10, scale=0.1)
    buf2 = rand32(*_buf2_shape(*shape), seed=11).abs() * 0.01
    f = [G, P.clone(), buf.clone(), buf2.clone()]
    r = [G, P.clone(), buf.clone(), buf2.clone()]
    hp = dict(lr=0.02, mu=0.95, beta2=0.9, wd=0.2, ns_dtype=torch.float32)
    muon_step_(*f, **hp, impl="triton")
    muon_step_ref(*r, **hp)
    torch.testing.assert_close(f[2], r[2], **tol("optimizer_step", F32))
    torch.testing.assert_close(f[3], r[3], **tol("optimizer_polar", F32))
    _assert_params_close(f[1], r[1], P, shape, hp["lr"], hp["wd"])


def _assert_params_close(new_f, new_r, old, shape, lr, wd):
    """Polar Express in another summation order moves X by ~1e-5 relative (lr' X by ~1e-7), so parameters agree
    to tol("optimizer_normalized") everywhere except where the cautious mask [X P >= 0] flipped on an X within
    rounding of 0: there the two results differ by exactly the decay term lr' wd P. Such entries must be rare
    (< 0.1%)."""
    m, n = shape[-2:]
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    bound = tol("optimizer_normalized", F32)
    diff = (new_f - new_r).abs()
    off = diff > bound["atol"] + bound["rtol"] * new_r.abs()
    assert off.float().mean() < 1e-3, off.float().mean()
    decay = lr_eff * wd * old.abs()
    assert ((diff[off] - decay[off]).abs() < bound["atol"]).all()


def _model_like_groups(seed):
    """Every stack kind at C = 128 as Muon groups, and AdamW tensors of the shapes the model has
    (embedding-like tables, one in bf16, a vector, scalars), with each group's SPEC hyperparameters."""
    def param(*shape, scale, dtype=torch.float32, s=0):
        return torch.nn.Parameter((rand32(*shape, seed=seed + s, scale=scale)).to(dtype))

    groups = [
        dict(kind="adamw", params=[param(64, C, scale=0.02, s=1)], lr=0.008, betas=(0.8, 0.96), weight_decay=0.01,
             eps=1e-10),
        dict(kind="adamw", params=[param(64, C, scale=0.8, dtype=torch.bfloat16, s=2)], lr=0.3, betas=(0.8, 0.995),
             weight_decay=0.001, eps=1e-10),
        dict(kind="adamw", params=[param(4, scale=1.0, s=3)], lr=0.005, betas=(0.8, 0.95), weight_decay=0.05,
             eps=1e-10),
        dict(kind="adamw", params=[param(1, 24, scale=0.01, s=4), param(1, scale=0.1, s=5)], lr=0.2,
             betas=(0.8, 0.95), weight_decay=0.0, eps=1e-10),
    ]
    for i, (K, m, n) in enumerate(KINDS.values()):
        params = [param(m, n, scale=3**0.5 / C**0.5, s=10 * i + k) for k in range(K)]
        groups.append(dict(kind="muon", params=params, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.2,
                           ns_steps=5))
    return groups


def _set_grads(groups, step):
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            p.grad = rand32(*p.shape, seed=1000 * step + 10 * gi + pi, scale=0.01).to(p.dtype)


def _fused_step(groups, state):
    """One MuonAdamW step written with the fused functions: what train/optim.py's Triton path amounts to."""
    for group in groups:
        if group["kind"] == "adamw":
            (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                mdt = torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32  # as train/optim.py keeps them
                st = state.setdefault(p, dict(step=0, exp_avg=torch.zeros_like(p, dtype=mdt),
                                              exp_avg_sq=torch.zeros_like(p, dtype=mdt)))
                st["step"] += 1
                adamw_step_(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], lr, b1, b2, eps, wd,
                            impl="triton")
        else:
            params = group["params"]
            K, (m, n) = len(params), params[0].shape
            st = state.setdefault(id(group), dict(buf=torch.zeros(K, m, n), buf2=torch.zeros(_buf2_shape(K, m, n))))
            P = torch.stack([p.data for p in params])
            muon_step_(torch.stack([p.grad for p in params]), P, st["buf"], st["buf2"], lr=group["lr"],
                       mu=group["momentum"], beta2=group["beta2"], wd=group["weight_decay"],
                       ns_steps=group["ns_steps"], ns_dtype=torch.float32, impl="triton")
            for i, p in enumerate(params):
                p.data.copy_(P[i])


def test_full_optimizer_step_matches_train_optim():
    """Two steps of train.optim.MuonAdamW (the PyTorch reference) against the same two steps built from the fused
    functions, on every Muon stack kind and every AdamW tensor kind; parameters and all optimizer state."""
    ref_groups, fused_groups = _model_like_groups(0), _model_like_groups(0)
    opt = MuonAdamW(ref_groups, ns_dtype=torch.float32, impl="torch")
    state = {}
    for step in (1, 2):
        olds = [p.detach().clone() for g in fused_groups for p in g["params"]]
        _set_grads(ref_groups, step)
        _set_grads(fused_groups, step)
        opt.step()
        _fused_step(fused_groups, state)
        k = 0
        for gr, gf in zip(ref_groups, fused_groups):
            for pr, pf in zip(gr["params"], gf["params"]):
                if gr["kind"] == "adamw":
                    if pr.dtype == torch.float32:
                        torch.testing.assert_close(pf, pr, **tol("optimizer_step", F32))
                    else:  # each step's bf16 store may land one step (<= 2^-7 |p|) apart, see test_adamw_matches_ref,
                        # and the bf16 moments one rounding apart, which moves an update (~lr) by ~2^-7 lr
                        bound = tol("optimizer_step", BF16)["rtol"] * (olds[k].abs() + pr.detach().abs()).float()
                        bound = bound + step * gr["lr"] * 2**-7
                        assert ((pf.detach() - pr.detach()).float().abs() <= bound).all()
                    # moments of gradients ~1e-2: fp32 ulps are ~1e-9 (m) and ~1e-11 (v); lerp may cancel. Beside
                    # a bf16 table they are bf16 on both paths, one rounding (2^-8 relative) apart at most.
                    mf, mr = state[pf]["exp_avg"], opt.state[pr]["exp_avg"]
                    vf, vr = state[pf]["exp_avg_sq"], opt.state[pr]["exp_avg_sq"]
                    assert mf.dtype == mr.dtype == vr.dtype == (torch.bfloat16 if pr.dtype == BF16 else F32)
                    if pr.dtype == torch.float32:
                        torch.testing.assert_close(mf, mr, **tol("optimizer_step", F32, scale=1e-2))
                        torch.testing.assert_close(vf, vr, **tol("optimizer_step", F32, scale=1e-4))
                    else:
                        # a lerp carries last step's rounding (<= 2^-8 of the moment's size) and may cancel: an
                        # absolute bound of 2^-6 x the typical size (1e-2 for m, 1e-4 for v)
                        torch.testing.assert_close(mf.float(), mr.float(), atol=2**-6 * 1e-2, rtol=2**-7)
                        torch.testing.assert_close(vf.float(), vr.float(), atol=2**-6 * 1e-4, rtol=2**-7)
                else:
                    _assert_params_close(pf.detach(), pr.detach(), olds[k], (pr.shape[0], pr.shape[1]), gr["lr"],
                                         gr["weight_decay"])
                k += 1
            if gr["kind"] == "muon":
                st = state[id(gf)]
                torch.testing.assert_close(st["buf"], torch.stack([opt.state[p]["momentum_buffer"]
                                                                  for p in gr["params"]]),
                                           **tol("optimizer_step", F32, scale=1e-2))
                torch.testing.assert_close(st["buf2"], torch.stack([opt.state[p]["second_momentum_buffer"]
                                                                   for p in gr["params"]]),
                                           **tol("optimizer_polar", F32, scale=1e-3))


def test_edge_hyperparameters():
    """mu = 0 (lerp weight 1: buf = G, G' = G), beta2 = 0 (buf2 = v), wd = 0, given as Python ints."""
    shape = (2, 20, 9)
    G = rand32(*shape, seed=30)
    b_f, b_r = rand32(*shape, seed=31), rand32(*shape, seed=31)
    x_f = muon_pre(G, b_f, 0, impl="triton")
    torch.testing.assert_close(x_f, muon_pre_ref(G, b_r, 0), **tol("optimizer_normalized", F32))
    assert torch.equal(b_f, G)
    P_f, P_r = rand32(*shape, seed=32), rand32(*shape, seed=32)
    s_f, s_r = torch.ones(2, 20, 1), torch.ones(2, 20, 1)
    muon_post(x_f, P_f, s_f, 0.02, 0, 0, impl="triton")
    muon_post_ref(x_f, P_r, s_r, 0.02, 0, 0)
    torch.testing.assert_close(s_f, s_r, **tol("optimizer_normalized", F32, scale=0))
    torch.testing.assert_close(P_f, P_r, **tol("optimizer_normalized", F32, scale=0.1))


def test_reference_paths_and_auto_dispatch():
    """impl='torch' is the reference exactly; impl='auto' under the interpreter runs the kernels."""
    G = rand32(2, 9, 14, seed=20)
    b1, b2 = torch.zeros(2, 9, 14), torch.zeros(2, 9, 14)
    assert torch.equal(muon_pre(G, b1, 0.9, impl="torch"), muon_pre_ref(G, b2, 0.9))
    b3 = torch.zeros(2, 9, 14)
    torch.testing.assert_close(muon_pre(G, b3, 0.9), muon_pre_ref(G, torch.zeros(2, 9, 14), 0.9),
                               **tol("optimizer_normalized", F32))
    assert muon_pre(G, b3, 0.9).dtype == torch.float32  # the CPU default Polar-Express dtype


def test_bad_inputs():
    G, buf = rand32(2, 8, 6, seed=21), torch.zeros(2, 8, 6)
    with pytest.raises(ValueError, match="3 dims"):
        muon_pre(G[0], buf[0], 0.9)
    with pytest.raises(TypeError, match="float32"):
        muon_pre(G, buf.bfloat16(), 0.9)
    with pytest.raises(ValueError, match="shape"):
        muon_pre(G, torch.zeros(2, 6, 8), 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        muon_pre(G.mT.contiguous().mT, buf, 0.9)
    with pytest.raises(TypeError, match="out_dtype"):
        muon_pre(G, buf, 0.9, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="CPU or CUDA tensor"):
        muon_pre(G, torch.zeros(2, 8, 6, device="meta"), 0.9)
    with pytest.raises(ValueError, match=r"\(2, 8, 1\)"):  # tall: NorMuon reduces over rows -> one value per row
        muon_post(G, buf.clone(), torch.zeros(2, 1, 6), 0.02, 0.1, 0.9)
    with pytest.raises(TypeError, match="float32"):
        muon_post(G, buf.double(), torch.zeros(2, 8, 1), 0.02, 0.1, 0.9)
    p = torch.zeros(5)
    with pytest.raises(ValueError, match="step"):
        adamw_step_(p, p.clone(), p.clone(), p.clone(), 0, 0.1, 0.9, 0.95, 1e-10, 0.0)
    with pytest.raises(ValueError, match="shape"):
        adamw_step_(p, torch.zeros(4), p.clone(), p.clone(), 1, 0.1, 0.9, 0.95, 1e-10, 0.0)
    with pytest.raises(ValueError, match="impl"):
        adamw_step_(p, p.clone(), p.clone(), p.clone(), 1, 0.1, 0.9, 0.95, 1e-10, 0.0, impl="cuda")
