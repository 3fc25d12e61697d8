"""flash_attention / flash_attention_ref against attention written query by query in float64, and the Triton
flash-attention kernel against the reference.

Under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) impl="auto" runs the kernel for float32 and
bfloat16 CPU inputs and the reference for float64, so the first tests below check both. The kernel tests
pin a tile config and compare float32 results with the float64 reference; with TRITON_INTERPRET=0 on a
machine with a GPU they run compiled on CUDA tensors instead.
"""

import functools
import inspect
import math
import os

import pytest
import torch
import tritonchat.kernels.attention as attention
from tritonchat.kernels import flash_attention, flash_attention_ref

from tests.helpers import rand
from tests.tolerances import tol


def _manual(q, k, v, causal=True, window=None, scale=None):
    """Loop over (batch, head, query); query i sits at position Tk - Tq + i and reads kv head h // (H / Hkv)."""
    b_, tq, h_, d = q.shape
    tk, hkv = k.size(1), k.size(2)
    scale = 1 / math.sqrt(d) if scale is None else scale
    rows = []
    for b in range(b_):
        heads = []
        for h in range(h_):
            g = h // (h_ // hkv)
            outs = []
            for i in range(tq):
                p = tk - tq + i
                keys = [j for j in range(tk) if not causal or (j <= p and (window is None or p - j <= window))]
                s = torch.stack([(q[b, i, h] * k[b, j, g]).sum() * scale for j in keys])
                w = torch.exp(s - s.max())
                w = w / w.sum()
                outs.append((w[:, None] * v[b, keys, g]).sum(0))
            heads.append(torch.stack(outs))  # (Tq, D)
        rows.append(torch.stack(heads, dim=1))  # (Tq, H, D)
    return torch.stack(rows)  # (B, Tq, H, D)


def _scale(t):
    """max(|t|, 1): what an absolute error is judged against (window 0 makes the q and k gradients exactly 0)."""
    return max(t.abs().max().item(), 1.0)


CASES = [  # (B, Tq, Tk, H, Hkv, D, window)
    (2, 33, 33, 4, 2, 16, None),
    (2, 33, 33, 4, 2, 16, 7),
    (1, 17, 17, 3, 3, 8, 0),
    (1, 17, 17, 2, 1, 8, 1),
    (1, 9, 9, 2, 2, 8, 8),
    (1, 9, 9, 2, 2, 8, 100),
    (2, 1, 20, 4, 2, 16, None),
    (2, 1, 20, 4, 4, 16, 7),
    (1, 5, 12, 4, 2, 8, 3),
    (1, 5, 12, 2, 2, 12, None),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("b,tq,tk,h,hkv,d,window", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_math(b, tq, tk, h, hkv, d, window, dtype):
    seed = tq * 100 + tk + h
    q = (rand(b, tq, h, d, seed=seed) * 1.5).to(dtype).requires_grad_()
    k = (rand(b, tk, hkv, d, seed=seed + 1) * 1.5).to(dtype).requires_grad_()
    v = rand(b, tk, hkv, d, seed=seed + 2).to(dtype).requires_grad_()
    y = flash_attention(q, k, v, window=window)
    assert y.shape == (b, tq, h, d) and y.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expect = _manual(q64, k64, v64, window=window)
    torch.testing.assert_close(y.double(), expect, **tol("attention", dtype))
    dy = rand(b, tq, h, d, seed=3)
    (y.double() * dy).sum().backward()
    (expect * dy).sum().backward()
    # gradients: absolute errors relative to max(gradient scale, 1)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, **tol("attention_grad", dtype, scale=_scale(want)))

def test_attention_window_zero_returns_values():
    # Each query sees only its own key, so the output is v itself (repeated over the grouped heads).
    q, k, v = rand(2, 6, 4, 8, seed=1), rand(2, 6, 2, 8, seed=2), rand(2, 6, 2, 8, seed=3)
    y = flash_attention(q, k, v, window=0)
    torch.testing.assert_close(y, v.repeat_interleave(2, dim=2), **tol("attention", torch.float64))


@pytest.mark.parametrize("tq,tk", [(7, 7), (3, 10), (12, 5)])
def test_attention_non_causal_and_scale(tq, tk):
    q, k, v = rand(1, tq, 4, 8, seed=tq), rand(1, tk, 2, 8, seed=tk), rand(1, tk, 2, 8, seed=tk + 1)
    y = flash_attention(q, k, v, causal=False, scale=0.3)
    torch.testing.assert_close(y, _manual(q, k, v, causal=False, scale=0.3), **tol("attention", torch.float64))
    y = flash_attention(q[:, : min(tq, tk)], k, v, scale=0.05, window=2)
    expect = _manual(q[:, : min(tq, tk)], k, v, window=2, scale=0.05)
    torch.testing.assert_close(y, expect, **tol("attention", torch.float64))


def test_decode_matches_full_sequence():
    # The last query of a full causal pass equals a one-query decode over the same keys.
    q, k, v = rand(2, 11, 4, 8, seed=1), rand(2, 11, 2, 8, seed=2), rand(2, 11, 2, 8, seed=3)
    for window in (None, 3):
        full = flash_attention(q, k, v, window=window)
        step = flash_attention(q[:, -1:], k, v, window=window)
        torch.testing.assert_close(step, full[:, -1:], **tol("attention", torch.float64))


@pytest.mark.parametrize("tq,tk,window", [(5, 5, None), (5, 5, 1), (2, 6, 2)])
def test_attention_gradcheck(tq, tk, window):
    q = rand(1, tq, 2, 4, seed=1).requires_grad_()
    k = rand(1, tk, 1, 4, seed=2).requires_grad_()
    v = rand(1, tk, 1, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention_ref(a, b, c, window=window), (q, k, v))


def test_attention_bad_inputs():
    q, k, v = rand(1, 4, 4, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_attention(rand(1, 4, 3, 8), k, v)
    with pytest.raises(ValueError, match="4 dims"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="agree on B and D"):
        flash_attention(q, rand(1, 4, 2, 6), rand(1, 4, 2, 6))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(rand(1, 5, 4, 8), k, v)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="causal=True"):
        flash_attention(q, k, v, causal=False, window=3)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.float(), v)
    with pytest.raises(TypeError, match="floating"):
        flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="CPU or CUDA tensor"):
        flash_attention(q, k, v.to("meta"))


# ---- the Triton kernel against the reference ----------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _qkv(b, tq, tk, h, hkv, d, seed, dtype=torch.float32, mag=1.5):
    q = (rand(b, tq, h, d, seed=seed) * mag).to(device=DEVICE, dtype=dtype).requires_grad_()
    k = (rand(b, tk, hkv, d, seed=seed + 1) * mag).to(device=DEVICE, dtype=dtype).requires_grad_()
    v = rand(b, tk, hkv, d, seed=seed + 2).to(device=DEVICE, dtype=dtype).requires_grad_()
    return q, k, v


def _ref_with_grads(q, k, v, dy, **kw):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y = flash_attention_ref(q64, k64, v64, **kw)
    return (y, *torch.autograd.grad(y, (q64, k64, v64), dy.double()))


def _assert_matches(got, want):
    y, *grads = got
    y_ref, *grads_ref = want
    for t in got:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(y.double(), y_ref, **tol("attention_kernel", torch.float32))
    for g, r in zip(grads, grads_ref):  # absolute error relative to max(|gradient|, 1)
        torch.testing.assert_close(g.double(), r, **tol("attention_kernel_grad", torch.float32, scale=_scale(r)))


KERNEL_CASES = [  # (B, Tq, Tk, H, Hkv, D, window, causal, config)
    (1, 300, 300, 4, 2, 16, 64, True, "h128_i64_w8_s3"),  # the three tile phases along a long sequence
    (1, 130, 130, 4, 2, 16, None, True, "h64_i32_w4_s4"),  # full causal, ragged last tiles
    (1, 97, 97, 2, 2, 32, 7, True, "h16_i16_w4_s1"),  # many small tiles, H == Hkv
    (1, 70, 70, 2, 1, 16, 64, True, "h16_i16_w4_s1"),
    (2, 61, 61, 2, 1, 16, 1, True, "h64_i64_w4_s3"),  # most rows of the edge tiles fully masked
    (1, 45, 45, 2, 2, 16, 0, True, "h128_i128_w8_s2"),
    (1, 40, 40, 2, 1, 128, 7, True, "h64_i32_w4_s4"),  # the model's head_dim
    (1, 50, 50, 2, 2, 64, None, True, "h128_i32_w4_s3"),
    (1, 290, 290, 4, 2, 16, 100, True, "h128_i32_w8_s3"),  # the dK/dV pick: 128 keys, every row phase, GQA
    (1, 33, 33, 2, 1, 24, 3, True, "h64_i32_w4_s4"),  # head_dim padded to 32
    (1, 37, 100, 4, 2, 16, 7, True, "h16_i16_w4_s1"),  # queries are the last Tq positions
    (1, 1, 77, 4, 1, 32, None, True, "h64_i32_w4_s4"),  # one-token decode
    (1, 40, 23, 4, 1, 32, None, False, "h16_i16_w4_s1"),  # non-causal, Tq > Tk
    (1, 1, 1, 2, 1, 16, None, True, "h16_i16_w4_s1"),
]


@pytest.mark.parametrize("b,tq,tk,h,hkv,d,window,causal,config", KERNEL_CASES)
def test_kernel_matches_reference(b, tq, tk, h, hkv, d, window, causal, config):
    q, k, v = _qkv(b, tq, tk, h, hkv, d, seed=tq + 7 * tk + d)
    y = flash_attention(q, k, v, causal=causal, window=window, impl="triton", config=config)
    assert y.shape == (b, tq, h, d) and y.dtype == q.dtype
    dy = rand(b, tq, h, d, seed=5).float().to(DEVICE)
    got = (y, *torch.autograd.grad(y, (q, k, v), dy))
    _assert_matches(got, _ref_with_grads(q, k, v, dy, causal=causal, window=window))


def test_kernel_large_scores_stay_finite():
    # Scores of several hundred: exp2 of anything but (score - running max) would overflow.
    q, k, v = _qkv(1, 40, 40, 2, 1, 32, seed=11, mag=6.0)
    dy = rand(1, 40, 2, 32, seed=12).float().to(DEVICE)
    for window in (None, 5):
        y = flash_attention(q, k, v, window=window, impl="triton", config="h16_i16_w4_s1")
        got = (y, *torch.autograd.grad(y, (q, k, v), dy))
        _assert_matches(got, _ref_with_grads(q, k, v, dy, window=window))


def test_kernel_single_visible_key_is_exact():
    # Window 0 leaves each row only its own key, and row 0 of any causal attention sees only key 0: the
    # softmax weight is exactly 1, so the output is v itself and dV is the summed dO of the group's heads.
    q, k, v = _qkv(2, 30, 30, 4, 2, 16, seed=3)
    dy = rand(2, 30, 4, 16, seed=4).float().to(DEVICE)
    y = flash_attention(q, k, v, window=0, impl="triton", config="h16_i16_w4_s1")
    (dv,) = torch.autograd.grad(y, (v,), dy)
    assert torch.equal(y, v.detach().repeat_interleave(2, dim=2))
    assert torch.equal(dv, dy.view(2, 30, 2, 2, 16).sum(3))
    for window in (None, 7):
        y = flash_attention(q, k, v, window=window, impl="triton", config="h64_i32_w4_s4")
        assert torch.equal(y[:, 0], v.detach()[:, 0].repeat_interleave(2, dim=1))


def test_kernel_strided_views():
    # q, k, v sliced out of one fused projection, and q from a (B, H, T, D) transpose: no copies needed.
    b, t, h, hkv, d = 2, 21, 4, 2, 16
    fused = rand(b, t, h + 2 * hkv, d, seed=21).float().to(DEVICE).requires_grad_()
    q, k, v = fused[:, :, :h], fused[:, :, h:h + hkv], fused[:, :, h + hkv:]
    qt = rand(b, h, t, d, seed=22).float().to(DEVICE).transpose(1, 2).requires_grad_()
    wide = rand(b, t, hkv, 2 * d, seed=23).float().to(DEVICE)[..., ::2].requires_grad_()  # D stride 2: copied
    dy = rand(b, t, h, d, seed=24).float().to(DEVICE)
    for qq, kk, vv in ((q, k, v), (qt, k, v), (qt, wide, v)):
        assert not (qq.is_contiguous() and kk.is_contiguous())
        y = flash_attention(qq, kk, vv, window=7, impl="triton", config="h64_i32_w4_s4")
        got = (y, *torch.autograd.grad(y, (qq, kk, vv), dy))
        dense = [t_.detach().contiguous().requires_grad_() for t_ in (qq, kk, vv)]
        y2 = flash_attention(*dense, window=7, impl="triton", config="h64_i32_w4_s4")
        want = (y2, *torch.autograd.grad(y2, dense, dy))
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("config", ["h16_i16_w4_s1", "h128_i64_w8_s3"])
def test_kernel_never_reads_tiles_outside_the_window(config):
    # Keys [0, 256) lie more than `window` behind every query, so no tile of them may be loaded, in either
    # pass: they hold NaN, which any load (even one masked afterwards) would spread into o, dq or dk/dv.
    tq, tk, window = 20, 300, 7
    q, k, v = _qkv(1, tq, tk, 4, 2, 16, seed=31)
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :256], vp[:, :256] = float("nan"), float("nan")
    kp.requires_grad_()
    vp.requires_grad_()
    dy = rand(1, tq, 4, 16, seed=32).float().to(DEVICE)
    y = flash_attention(q, kp, vp, window=window, impl="triton", config=config)
    dq, dk, dv = torch.autograd.grad(y, (q, kp, vp), dy)
    assert torch.equal(dk[:, :256], torch.zeros_like(dk[:, :256])) and torch.equal(dv[:, :256], dk[:, :256])
    want = _ref_with_grads(q, k, v, dy, window=window)
    _assert_matches((y, dq, dk[:, 256:], dv[:, 256:]), (want[0], want[1], want[2][:, 256:], want[3][:, 256:]))


def test_kernel_autotuned_path(monkeypatch):
    # config=None on CUDA autotunes over every named config (kernels._launch.autotune). The interpreter cannot
    # time kernels, so there the tuner is handed a constant timer: each config is still launched and checked
    # against the first one, and the first one is kept.
    import triton.testing
    from tritonchat.kernels import _launch

    b, t, h, hkv, d = 1, 20, 2, 1, 16
    launched = []
    if DEVICE == "cpu":
        monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (launched.append(1), fn(), 1.0)[2])
    monkeypatch.setattr(_launch, "_TUNED", {})
    q, k, v = _qkv(b, t, t, h, hkv, d, seed=41)
    dy = rand(b, t, h, d, seed=42).float().to(DEVICE)
    y, lse = attention._attention_forward(q, k, v, True, 5, 1 / math.sqrt(d), None)
    grads = attention._attention_backward(dy, q, k, v, y, lse, True, 5, 1 / math.sqrt(d), None)
    _assert_matches((y, *grads), _ref_with_grads(q, k, v, dy, window=5))
    tuned = {key[1]: name for key, name in _launch.tuned_configs().items() if key[0] == "attention"}
    assert set(tuned) == {"fwd", "dq", "dkdv"}
    assert all(name in attention.autotune_space(kind, q.dtype) for kind, name in tuned.items())
    if DEVICE == "cpu":
        assert len(launched) == sum(len(attention.autotune_space(kind, q.dtype)) for kind in tuned)
    keys = len(_launch.tuned_configs())
    attention._attention_forward(q[:, 1:], k[:, 1:], v[:, 1:], True, 5, 0.25, None)  # same size bucket
    assert len(_launch.tuned_configs()) == keys


def test_auto_runs_the_kernel(monkeypatch):
    calls = []
    forward = attention._attention_forward
    monkeypatch.setattr(attention, "_attention_forward", lambda *a: calls.append(a[0].dtype) or forward(*a))
    q, k, v = _qkv(1, 9, 9, 2, 1, 16, seed=51)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flash_attention(q, k, v, window=3)
    flash_attention(q.double(), k.double(), v.double(), window=3)  # no float64 kernel: the reference
    flash_attention(q, k, v, window=3, impl="torch")
    assert calls == [torch.float32]


def test_kernel_bad_inputs():
    q, k, v = _qkv(1, 4, 4, 2, 1, 16, seed=61)
    with pytest.raises(TypeError, match="takes q in"):
        flash_attention(q.double(), k.double(), v.double(), impl="triton")
    with pytest.raises(ValueError, match="head_dim <= 128"):
        flash_attention(*(torch.randn(1, 4, 2, 256, device=DEVICE) for _ in range(3)), impl="triton")
    with pytest.raises(ValueError, match="config must be"):
        flash_attention(q, k, v, impl="triton", config="h100_i7")
    with pytest.raises(ValueError, match="at least one key"):
        flash_attention(q, k[:, :0], v[:, :0], causal=False, impl="triton")
    y = flash_attention(q[:, :0], k, v, impl="triton")  # no queries: an empty result
    assert y.shape == (1, 0, 2, 16)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot is only meaningful compiled on a GPU")
@pytest.mark.parametrize("window", [None, 128])
def test_kernel_bf16_on_gpu(window):
    q, k, v = _qkv(2, 512, 512, 6, 2, 128, seed=71, dtype=torch.bfloat16)
    dy = rand(2, 512, 6, 128, seed=72).to(DEVICE, torch.bfloat16)
    y = flash_attention(q, k, v, window=window, impl="triton")
    got = (y, *torch.autograd.grad(y, (q, k, v), dy))
    want = _ref_with_grads(q, k, v, dy, window=window)
    torch.testing.assert_close(got[0].double(), want[0], **tol("attention_kernel", torch.bfloat16,
                                                                 scale=_scale(want[0])))
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, **tol("attention_kernel_grad", torch.bfloat16, scale=_scale(w)))


def test_tiny_model_trains_like_reference(monkeypatch):
    # Three MuonAdamW steps of a 2-layer GQA model (windows 7 and full) with impl="triton", whose attention
    # resolves "auto" to the kernel here, against impl="torch". Every other op is held on its reference so the
    # comparison isolates attention (each op's kernel has its own tests). Step 0 has c_proj = 0, so the
    # attention backward first matters at step 1: its gradients are compared, and every step's loss.
    from tritonchat.engine.gpt import GPTConfig, build_model
    from tritonchat.train.optim import MuonAdamW, build_param_groups

    from tritonchat import kernels

    for name in kernels.__all__:
        op = getattr(kernels, name)
        params = inspect.signature(op).parameters if callable(op) else {}
        if name != "flash_attention" and "impl" in params and params["impl"].kind is inspect.Parameter.KEYWORD_ONLY:
            monkeypatch.setattr(kernels, name, functools.partial(_force_reference, op))
    calls = []
    kernel_forward = attention._attention_forward
    monkeypatch.setattr(attention, "_attention_forward", lambda *a: calls.append(a[4]) or kernel_forward(*a))
    cfg = GPTConfig.from_depth(2, n_embd=256, n_head=2, n_kv_head=1, vocab_size=128, sequence_len=32,
                               window_pattern="SL")
    idx = torch.randint(0, 128, (3, 2, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def train(impl):
        torch.manual_seed(0)
        model = build_model(cfg, device=DEVICE, impl=impl, compute_dtype=torch.float32)
        model.windows = [7, 32]  # at T=32 the S window (a multiple of 128) would not cut anything
        opt = MuonAdamW(build_param_groups(model, 0.008, 0.3, 0.02, 0.5, 0.1), ns_dtype=torch.float32)
        losses, grads = [], {}
        for step in range(3):
            loss = model(idx[step, :, :-1], idx[step, :, 1:])
            loss.backward()
            if step == 1:
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, grads

    losses_ref, grads_ref = train("torch")
    assert calls == []
    losses, grads = train("triton")
    assert calls == [7, 32] * 3
    assert losses == pytest.approx(losses_ref, rel=tol("model_loss", torch.float32)["rtol"])
    # A bound set for this test, looser than tol("model_grad"): the step-1 gradients come after an optimizer step
    # taken on each path's own step-0 gradients; atol relative to each tensor's scale (+1e-7 where it is all 0).
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item() + 1e-7, msg=name)


def _force_reference(op, *args, impl="auto", **kwargs):
    return op(*args, impl="torch", **kwargs)


def test_windowed_ref_keeps_no_score_matrix_and_matches_the_explicit_softmax(monkeypatch):
    """A sliding window on finite inputs goes through SDPA's fused masked path: nothing of size H x Tq x Tk is kept
    for backward (one shared Tq x Tk mask at most), and output and gradients equal the explicit masked softmax."""
    from tritonchat.kernels import attention as A

    torch.manual_seed(0)
    B, T, H, D, window = 1, 256, 4, 32, 64
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = flash_attention_ref(q, k, v, window=window)
    assert max(sizes) < H * T * T, max(sizes)
    y.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    bounded = A._scores_bounded
    monkeypatch.setattr(A, "_scores_bounded", lambda *a: False)  # the explicit path
    y2 = flash_attention_ref(q, k, v, window=window)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)
    assert bounded(q.detach(), k.detach(), None)
    assert not bounded(q.detach(), k.detach().clone().index_fill_(1, torch.tensor([3]), float("nan")), None)
    assert not bounded(q.detach(), k.detach() * 1e37, None)  # scores that could overflow fp32
    assert not bounded(q.detach(), k.detach(), -1.0)
