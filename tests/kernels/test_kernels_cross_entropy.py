"""Softcapped cross-entropy (plain and fused with the lm_head) against an explicit log-softmax in float64."""

import pytest
import torch

from kernels import (
    linear_softcap_cross_entropy,
    linear_softcap_cross_entropy_ref,
    softcap_cross_entropy,
    softcap_cross_entropy_ref,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _targets(shape, vocab, seed, ignore_frac=0.25, ignore_index=-1):
    t = torch.randint(0, vocab, shape, generator=_gen(seed))
    drop = torch.rand(shape, generator=_gen(seed + 1)) < ignore_frac
    return torch.where(drop, torch.full_like(t, ignore_index), t)


def _manual(logits64, targets, softcap, ignore_index, reduction):
    """Per position: -(z[t] - max z - log(sum exp(z - max z))), with z the softcapped logits."""
    z = logits64 if not softcap else softcap * torch.tanh(logits64 / softcap)
    m = z.max(dim=-1, keepdim=True).values
    logp = z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    losses = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum()


# (logits dtype, loss tolerance, gradient tolerance relative to the gradient's scale). The oracle sees the same
# rounded logits, and the op computes in fp32, so only the bf16 gradient (rounded on the way out) is looser.
DTYPES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-2)]


@pytest.mark.parametrize("lead,vocab", [((1,), 5), ((7,), 781), ((2, 33), 100)])
@pytest.mark.parametrize("softcap", [15.0, 2.0, None, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_softcap_ce_matches_math(lead, vocab, softcap, reduction, dtype, tol, gtol):
    logits = (_rand(*lead, vocab, seed=vocab) * 8).to(dtype).requires_grad_()
    targets = _targets(lead, vocab, seed=3)
    targets.view(-1)[0] = vocab - 1  # at least one counted target, and the last class
    loss = softcap_cross_entropy(logits, targets, softcap=softcap, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (targets.shape if reduction == "none" else ())
    ref64 = logits.detach().double().requires_grad_()  # the rounded inputs, in float64
    expect = _manual(ref64, targets, softcap, -1, reduction)
    torch.testing.assert_close(loss.double(), expect, rtol=tol, atol=tol)
    if reduction == "none":
        assert torch.all(loss[targets == -1] == 0)
    w = _rand(*targets.shape, seed=4) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (loss.double() * w).sum().backward()
    (expect * w).sum().backward()
    assert logits.grad.dtype == dtype
    gscale = ref64.grad.abs().max().item()
    torch.testing.assert_close(logits.grad.double(), ref64.grad, rtol=gtol, atol=gtol * gscale)


def test_softcap_ce_other_ignore_index():
    logits, targets = _rand(9, 11, seed=1), _targets((9,), 11, seed=2, ignore_frac=0.4, ignore_index=-100)
    targets[0] = 3
    got = softcap_cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(got, _manual(logits, targets, 15.0, -100, "mean"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_with_zero_grads(reduction):
    logits = _rand(4, 6, 13, seed=5).float().requires_grad_()
    targets = torch.full((4, 6), -1)
    loss = softcap_cross_entropy(logits, targets, reduction=reduction)
    assert torch.all(loss == 0) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def test_gradcheck_softcap_ce():
    logits = _rand(5, 7, seed=6).requires_grad_()
    targets = torch.tensor([0, -1, 6, 3, 3])
    assert torch.autograd.gradcheck(lambda z: softcap_cross_entropy_ref(z, targets, 3.0, -1, "mean"), (logits,))
    assert torch.autograd.gradcheck(lambda z: softcap_cross_entropy_ref(z, targets, 3.0, -1, "none"), (logits,))


@pytest.mark.parametrize("lead,c,vp,vocab", [((1,), 384, 64, 50), ((7,), 78, 128, None), ((3, 11), 32, 192, 131)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_matches_math(lead, c, vp, vocab, reduction):
    x = _rand(*lead, c, seed=c).float().requires_grad_()
    weight = (_rand(vp, c, seed=1) / c**0.5).float().requires_grad_()
    v = vp if vocab is None else vocab
    targets = _targets(lead, v, seed=2)
    targets.view(-1)[0] = v - 1
    loss = linear_softcap_cross_entropy(x, weight, targets, reduction=reduction, vocab_size=vocab)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    logits = (x64 @ w64.T)[..., :v]
    expect = _manual(logits, targets, 15.0, -1, reduction)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-5)
    w = _rand(*targets.shape, seed=4) if reduction == "none" else torch.tensor(0.9, dtype=torch.float64)
    (loss.double() * w).sum().backward()
    (expect * w).sum().backward()
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    if vocab is not None:
        assert torch.all(weight.grad[vocab:] == 0)


def test_linear_ce_bf16_activations_fp32_weight():
    x = _rand(17, 64, seed=1).to(torch.bfloat16).requires_grad_()
    weight = (_rand(128, 64, seed=2) / 8).float().requires_grad_()
    targets = _targets((17,), 100, seed=3)
    targets[0] = 99
    loss = linear_softcap_cross_entropy(x, weight, targets, vocab_size=100)
    logits64 = (x.detach().double() @ weight.detach().to(torch.bfloat16).double().T)[:, :100]
    torch.testing.assert_close(loss.double(), _manual(logits64, targets, 15.0, -1, "mean"), rtol=2e-2, atol=2e-2)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_linear_ce_padding_does_not_leak():
    x, targets = _rand(2, 9, 16, seed=1), _targets((2, 9), 40, seed=2)
    targets[0, 0] = 39
    weight = _rand(64, 16, seed=3)
    other = weight.clone()
    other[40:] = _rand(24, 16, seed=4) * 100  # huge padded rows would dominate the softmax if they leaked
    for reduction in ("mean", "none"):
        a = linear_softcap_cross_entropy_ref(weight=weight, x=x, targets=targets, reduction=reduction, vocab_size=40)
        b = linear_softcap_cross_entropy(x, other, targets, reduction=reduction, vocab_size=40)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    full = linear_softcap_cross_entropy(x, other, targets)
    assert not torch.allclose(full, linear_softcap_cross_entropy(x, other, targets, vocab_size=40))


def test_linear_ce_gradcheck():
    x, weight = _rand(3, 5, seed=1).requires_grad_(), _rand(9, 5, seed=2).requires_grad_()
    targets = torch.tensor([0, 6, -1])
    fn = lambda a, b: linear_softcap_cross_entropy_ref(a, b, targets, 4.0, vocab_size=7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight))


def test_ce_bad_inputs():
    logits, targets = _rand(4, 10), torch.tensor([1, 2, 3, -1])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\).*e\.g\. 10"):
        softcap_cross_entropy(logits, torch.tensor([1, 10, 3, -1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        softcap_cross_entropy(logits, torch.tensor([1, -2, 3, -1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        softcap_cross_entropy(logits, targets, ignore_index=-100)
    with pytest.raises(ValueError, match="targets shape"):
        softcap_cross_entropy(logits, targets[:3])
    with pytest.raises(TypeError, match="integer dtype"):
        softcap_cross_entropy(logits, targets.float())
    with pytest.raises(TypeError, match="floating"):
        softcap_cross_entropy(logits.long(), targets)
    with pytest.raises(ValueError, match="reduction must be one of"):
        softcap_cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        softcap_cross_entropy(logits, targets, softcap=-1.0)
    x, weight = _rand(4, 8), _rand(16, 8)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_softcap_cross_entropy(x, weight, torch.tensor([1, 12, 3, -1]), vocab_size=12)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_softcap_cross_entropy(x, _rand(16, 7), targets)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_softcap_cross_entropy(x, weight, targets, vocab_size=17)
    with pytest.raises(ValueError, match="targets shape"):
        linear_softcap_cross_entropy(x, weight, targets.view(2, 2))
    with pytest.raises(ValueError, match="same device"):
        linear_softcap_cross_entropy(x, weight, targets.to("meta"))
