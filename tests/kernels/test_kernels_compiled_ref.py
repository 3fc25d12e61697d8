"""The references' compiled paths (what a CPU trains with under --compile): the fused functions against the eager
references, and the wiring (one graph per shape, none per step) through a counting backend that runs the captured
graph eagerly, so no test pays for inductor's C++ compilation."""

from __future__ import annotations

import pytest
import torch
from tritonchat.kernels import _dispatch
from tritonchat.kernels import linear_cross_entropy as lce
from tritonchat.kernels import muon as M
from tritonchat.kernels.linear_cross_entropy import linear_softcap_cross_entropy_ref

from tests.helpers import rand32
from tests.tolerances import tol

F32 = torch.float32


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs each one as it was captured."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def counting(monkeypatch):
    """Route the kernels' `compiled` helper through a fresh Counting backend (and a fresh cache)."""
    backend = Counting()
    cache: dict = {}

    def fake(fn, dynamic=False):
        key = (fn, dynamic)
        if key not in cache:
            torch._dynamo.reset()
            cache[key] = torch.compile(fn, dynamic=dynamic, backend=backend)
        return cache[key]

    for mod in (M, lce):
        monkeypatch.setattr(mod, "compiled_fn", fake)
    yield backend
    torch._dynamo.reset()


def _adamw_args(shape, p_dtype, seed):
    p = rand32(*shape, seed=seed).to(p_dtype)
    g = rand32(*shape, seed=seed + 1, scale=0.3).to(p_dtype)
    mdt = torch.bfloat16 if p_dtype == torch.bfloat16 else F32
    m = rand32(*shape, seed=seed + 2, scale=0.1).to(mdt)
    v = rand32(*shape, seed=seed + 3, scale=0.1).square().to(mdt)
    return [p, g, m, v]


@pytest.mark.parametrize("p_dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (37, 53), (4097,)])
def test_adamw_fused_matches_ref(shape, p_dtype):
    """_adamw_fused (the compiled function's body, run eagerly) against adamw_step_ref: fp32 rounding apart."""
    a = _adamw_args(shape, p_dtype, sum(shape))
    b = [t.clone() for t in a]
    hp = dict(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-10, wd=0.05)
    for step in (1, 2, 7):
        M.adamw_step_ref(*a, step, **hp)
        h = torch.tensor([1 - hp["lr"] * hp["wd"], 1 - hp["beta1"], 1 - hp["beta2"], 1 - hp["beta2"] ** step,
                          hp["lr"] / (1 - hp["beta1"] ** step), hp["eps"]])
        M._adamw_fused(*(t.view(-1) for t in b), h)
    for x, y, scale in zip(a, b, (1.0, 0.3, 0.1, 1e-3)):
        if x.dtype == F32:
            torch.testing.assert_close(y, x, **tol("optimizer_step", F32, scale=scale))
        else:  # bf16 storage: at most one bf16 step apart
            torch.testing.assert_close(y, x, **tol("optimizer_step", torch.bfloat16))
    assert not torch.equal(a[0], b[0].new_zeros(b[0].shape))


def test_adamw_compiled_one_graph_per_kind(counting):
    """Through the compiled path: the same result as eager, and new lr / step values or another size of the same
    rank never compile again (dynamic sizes, hyperparameters as a tensor); dynamo guards the flat views' bases,
    so a 1-D and a 2-D parameter take one graph each."""
    hp = dict(beta1=0.8, beta2=0.95, eps=1e-10, wd=0.05)
    seen = []
    for i, shape in enumerate([(37, 53), (300, 7), (4097,), (515,)]):
        a = _adamw_args(shape, F32, 10 + i)
        b = [t.clone() for t in a]
        for step, lr in ((1, 0.01), (2, 0.004), (3, 0.02)):
            M.adamw_step_ref(*a, step, lr=lr, **hp)
            M.adamw_step_(*b, step, lr=lr, **hp, impl="torch", compiled=True)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, **tol("optimizer_step", F32))
        seen.append(counting.graphs)
    assert seen == [1, 1, 2, 2]


def test_muon_compiled_matches_ref_without_recompiles(counting):
    """muon_step_ref under torch.compile (counting backend): equal to eager within fp32 rounding, one graph for a
    stack shape whatever the per-step lr, momentum and weight decay."""
    shape = (3, 48, 16)
    G = rand32(*shape, seed=8)
    a = [G, rand32(*shape, seed=9, scale=0.05), rand32(*shape, seed=10, scale=0.1),
         rand32(3, 48, 1, seed=11).abs() * 0.01]
    b = [t.clone() for t in a]
    for lr, mu, wd in ((0.02, 0.95, 0.2), (0.01, 0.9, 0.1), (0.015, 0.85, 0.0)):
        hp = dict(lr=lr, mu=mu, beta2=0.9, wd=wd, ns_dtype=F32)
        M.muon_step_ref(*a, **hp)
        M.muon_step_(*b, **hp, impl="torch", compiled=True)
    torch.testing.assert_close(b[1], a[1], **tol("optimizer_step", F32))  # parameters, ~0.05
    torch.testing.assert_close(b[2], a[2], **tol("optimizer_step", F32, scale=0.1))  # momentum
    torch.testing.assert_close(b[3], a[3], **tol("optimizer_polar", F32, scale=1e-2))  # second moment
    assert counting.graphs == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_compiled_chunks_match_eager(counting, reduction):
    """compile_chunks=True: the same losses and gradients as the eager chunked reference; one graph per chunk
    shape and grad mode (the chunks divide the rows evenly here: one shape)."""
    x = (rand32(4, 16, 24, seed=7) * 2).requires_grad_()
    w = (rand32(64, 24, seed=8) / 4).requires_grad_()
    targets = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(9))
    targets[0, :3] = -1
    out = []
    for comp in (False, True):
        xx, ww = (t.detach().clone().requires_grad_() for t in (x, w))
        loss = linear_softcap_cross_entropy_ref(xx, ww, targets, reduction=reduction, vocab_size=50, chunk_size=16,
                                                compile_chunks=comp)
        loss.sum().backward()
        with torch.no_grad():
            ev = linear_softcap_cross_entropy_ref(xx, ww, targets, reduction=reduction, vocab_size=50,
                                                  chunk_size=16, compile_chunks=comp)
        out.append((loss, ev, xx.grad, ww.grad))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, **tol("linear_cross_entropy_chunked", F32))
    # "mean"/"sum" with gradients and the no-grad forward: two graphs; "none" compiles only its no-grad forward
    assert counting.graphs == (1 if reduction == "none" else 2)


def test_compiled_helper_builds_once(monkeypatch):
    calls = []
    monkeypatch.setattr(_dispatch, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=False: calls.append(dynamic) or fn)
    f = _dispatch.compiled(abs)
    assert _dispatch.compiled(abs) is f and calls == [False]
    _dispatch.compiled(abs, dynamic=True)
    assert calls == [False, True]
