"""relu2_mlp / relu2_mlp_ref against explicit matmuls in float64, and the fused GEMM of kernels.matmul.

The Triton tests run in the interpreter (tests/conftest.py) on CPU tensors; the interpreter's bf16 tl.dot is
wrong, so the kernels up-cast bf16 operands off CUDA, and its fp32 -> bf16 cast truncates instead of rounding
(one bf16 ulp, inside the bf16 tolerance).
"""

import pytest
import torch
from tritonchat.kernels.matmul import GEMM_CONFIGS, INTERPRETER_CONFIG, gemm, gemm_ref
from tritonchat.kernels.mlp import relu2_mlp, relu2_mlp_ref

from tests.helpers import rand
from tests.tolerances import tol

SMALL_CONFIG = "test_32x64x32"
TMA_CONFIG = "test_tma_32x64x32"


def _manual(x, w_fc, w_proj):
    h = x @ w_fc.T
    h = torch.where(h > 0, h, torch.zeros_like(h))
    return (h * h) @ w_proj.T


def _check_against_math(lead, c, hd, dtype, **kwargs):
    """relu2_mlp(**kwargs) on fresh inputs vs float64 math on the same rounded inputs: output and 3 gradients,
    each to tol("matmul", dtype) with its atol relative to max|expected|."""
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x64 = rand(*lead, c, seed=c + hd)
    w_fc = (rand(hd, c, seed=hd) / c**0.5).to(wdtype).requires_grad_()
    w_proj = (rand(c, hd, seed=c) / hd**0.5).to(wdtype).requires_grad_()
    x = x64.to(dtype).requires_grad_()
    y = relu2_mlp(x, w_fc, w_proj, **kwargs)
    assert y.dtype == dtype and y.shape == (*lead, c)
    # The oracle sees the same rounded inputs (weights rounded to x's dtype), in float64.
    xs, fs, ps = (t.detach().double().requires_grad_() for t in (x, w_fc, w_proj))
    expect = _manual(xs, fs.to(dtype).double(), ps.to(dtype).double())
    torch.testing.assert_close(y.double(), expect, **tol("matmul", dtype, scale=expect.abs().max().item()))
    dy = rand(*lead, c, seed=7)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    assert w_fc.grad.dtype == wdtype and w_proj.grad.dtype == wdtype and x.grad.dtype == dtype
    for got, want in ((x.grad, xs.grad), (w_fc.grad, fs.grad), (w_proj.grad, ps.grad)):
        torch.testing.assert_close(got.double(), want, **tol("matmul", dtype, scale=want.abs().max().item()))


# x dtypes; weights stay fp32 masters (or fp64) and are cast to x's dtype.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("lead,c,hd", [((1,), 384, 1536), ((7,), 96, 384), ((2, 33), 78, 50)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_mlp_ref_matches_math(lead, c, hd, dtype):
    _check_against_math(lead, c, hd, dtype, impl="torch")


# The Triton path: N=37 and N=35 end inside a row tile; Hd=50/200/520/1000 end inside a 64-column tile; C=78 and
# C=100 leave a masked K tail (BLOCK_K 64 or 32), C=384 and C=1664 (the depth-26 width) run the unmasked K loop.
TRITON_CASES = [
    ((37,), 384, 1536, torch.float32, INTERPRETER_CONFIG),
    ((37,), 384, 1536, torch.float16, INTERPRETER_CONFIG),
    ((2, 3), 1664, 1000, torch.float32, INTERPRETER_CONFIG),
    ((2, 33), 78, 50, torch.float32, SMALL_CONFIG),
    ((5, 7), 100, 200, torch.bfloat16, INTERPRETER_CONFIG),
    ((37,), 128, 520, torch.float32, TMA_CONFIG),
    ((37,), 128, 520, torch.float16, TMA_CONFIG),
]


@pytest.mark.parametrize("lead,c,hd,dtype,config", TRITON_CASES)
def test_relu2_mlp_triton_matches_math(lead, c, hd, dtype, config):
    _check_against_math(lead, c, hd, dtype, impl="triton", config=config)


def test_relu2_mlp_triton_auto_and_default_config():
    """impl='auto' under the interpreter runs the kernel with its default config; matches the reference."""
    x, w_fc, w_proj = rand(3, 11, 40, seed=3).float(), rand(90, 40, seed=4).float(), rand(40, 90, seed=5).float()
    want = relu2_mlp_ref(x, w_fc, w_proj)
    same = tol("same_math", torch.float32, scale=want.abs().max().item())
    torch.testing.assert_close(relu2_mlp(x, w_fc, w_proj), want, **same)
    torch.testing.assert_close(relu2_mlp(x, w_fc, w_proj, impl="triton"), want, **same)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)])
def test_relu2_mlp_triton_partial_grads(need):
    """Backward skips the products nobody asked for and still gets the requested ones right."""
    base = (rand(19, 64, seed=1).float(), rand(100, 64, seed=2).float() / 8, rand(64, 100, seed=3).float() / 10)
    got = [t.clone().requires_grad_(n) for t, n in zip(base, need)]
    want = [t.clone().requires_grad_(n) for t, n in zip(base, need)]
    dy = rand(19, 64, seed=4).float()
    (relu2_mlp(*got, impl="triton") * dy).sum().backward()
    (relu2_mlp_ref(*want) * dy).sum().backward()
    for g, w, n in zip(got, want, need):
        assert (g.grad is None) == (not n)
        if n:
            torch.testing.assert_close(g.grad, w.grad, **tol("matmul", torch.float32, scale=w.grad.abs().max().item()))


@pytest.mark.parametrize("config", [SMALL_CONFIG, TMA_CONFIG])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("epilogue", ["none", "relu2", "relu2_grad"])
def test_gemm_matches_ref(epilogue, trans_b, config):
    # M=70: three 32-row tiles, so with GROUP_M=2 the last L2 group is partial; N=136 and K=100 leave tails.
    m, n, k = 70, 136, 100
    a = rand(m, k, seed=1).float()
    b = (rand(n, k, seed=2) if trans_b else rand(k, n, seed=2)).float()
    aux = rand(m, n, seed=3).float().abs() if epilogue == "relu2_grad" else None
    got = gemm(a, b, trans_b=trans_b, epilogue=epilogue, aux=aux, config=config)
    want = gemm_ref(a, b, trans_b=trans_b, epilogue=epilogue, aux=aux)
    torch.testing.assert_close(got, want, **tol("same_math", torch.float32, scale=want.abs().max().item()))


def test_gemm_empty_shapes():
    a, b = rand(0, 8).float(), rand(16, 8).float()
    assert gemm(a, b, trans_b=True).shape == (0, 16)
    out = gemm(rand(5, 0).float(), rand(0, 7).float(), trans_b=False, epilogue="relu2")
    assert out.shape == (5, 7) and (out == 0).all()
    x, w_fc, w_proj = (t.float().requires_grad_() for t in (rand(0, 3, 8), rand(16, 8), rand(8, 16)))
    y = relu2_mlp(x, w_fc, w_proj, impl="triton")
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert (w_fc.grad == 0).all() and (w_proj.grad == 0).all()


def test_gemm_tuner_skips_failing_and_wrong_configs(monkeypatch):
    """The tuner's choice, with a fake clock: a config that raises and one that is fast but wrong both lose."""
    import triton.testing
    from tritonchat.kernels import _launch

    fake_ms = {"ok_slow": 3.0, "raises": 0.5, "wrong_fast": 1.0, "ok_fast": 2.0}
    out = torch.empty(4, 4)
    good = rand(4, 4, seed=9).float()

    def run(name):
        if name == "raises":
            raise RuntimeError("out of shared memory")
        out.copy_(good + (1.0 if name == "wrong_fast" else 0.0))
        return name

    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fake_ms[fn()])
    assert _launch.autotune(("key",), list(fake_ms), run, (out,)) == "ok_fast"
    assert _launch.tuned_configs() == {("key",): "ok_fast"}
    assert _launch.autotune(("key",), ["raises"], run, (out,)) == "ok_fast"  # remembered: not timed again
    with pytest.raises(RuntimeError, match="no kernel config"):
        _launch.autotune(("key2",), ["raises"], run, (out,))


def test_gemm_configs_are_named_and_sane():
    for name, cfg in GEMM_CONFIGS.items():
        assert name.startswith(("ptr_", "tma_", "test_")) and cfg.tma == ("tma_" in name)
        assert all(v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps))


def test_relu2_mlp_bad_inputs():
    x, w_fc, w_proj = rand(2, 8), rand(32, 8), rand(8, 32)
    with pytest.raises(ValueError, match="w_fc must have shape"):
        relu2_mlp(x, rand(32, 7), w_proj)
    with pytest.raises(ValueError, match="w_proj must have shape"):
        relu2_mlp(x, w_fc, rand(8, 31))
    with pytest.raises(ValueError, match="w_fc must have 2 dims"):
        relu2_mlp(x, rand(1, 32, 8), w_proj)
    with pytest.raises(TypeError, match="floating"):
        relu2_mlp(x.long(), w_fc, w_proj)
    with pytest.raises(ValueError, match="CPU or CUDA tensor"):
        relu2_mlp(x, w_fc.to("meta"), w_proj)
    with pytest.raises(ValueError, match="config must be"):
        relu2_mlp(x.float(), w_fc.float(), w_proj.float(), config="fastest")
    with pytest.raises(TypeError, match="takes x in"):
        relu2_mlp(x, w_fc, w_proj, impl="triton")  # float64 has no kernel
    # ... but impl="auto" falls back to the reference for it.
    torch.testing.assert_close(relu2_mlp(x, w_fc, w_proj), relu2_mlp_ref(x, w_fc, w_proj))


def test_gemm_bad_inputs():
    a, b = rand(4, 8).float(), rand(16, 8).float()
    with pytest.raises(ValueError, match="inner dims"):
        gemm(a, b, trans_b=False)
    with pytest.raises(TypeError, match="match a"):
        gemm(a, b.half(), trans_b=True)
    with pytest.raises(ValueError, match="contiguous"):
        gemm(a, b.t(), trans_b=False)
    with pytest.raises(ValueError, match="aux"):
        gemm(a, b, trans_b=True, epilogue="relu2_grad")
    with pytest.raises(ValueError, match="aux"):
        gemm(a, b, trans_b=True, epilogue="relu2_grad", aux=rand(4, 15).float())
    with pytest.raises(ValueError, match="epilogue"):
        gemm(a, b, trans_b=True, epilogue="gelu")
    with pytest.raises(ValueError, match="needs TMA"):  # 10 fp16 elements = 20-byte rows: no TMA
        gemm(rand(4, 10).half(), rand(16, 10).half(), trans_b=True, config=TMA_CONFIG)


def test_relu2_mlp_gradcheck():
    x, w_fc, w_proj = rand(3, 5, seed=1), rand(11, 5, seed=2), rand(4, 11, seed=3)
    args = tuple(t.requires_grad_() for t in (x, w_fc, w_proj))
    assert torch.autograd.gradcheck(relu2_mlp_ref, args)
