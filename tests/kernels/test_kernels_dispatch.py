"""resolve_impl, use_kernel and the impl= keyword of every public op."""

import pytest
import torch
from tritonchat.kernels import resolve_impl
from tritonchat.kernels._dispatch import use_kernel

from tests.helpers import rand32
from tests.tolerances import EXACT, tol
from tritonchat import kernels


def test_resolve_names_pass_through(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("torch", "cpu") == "torch"
    assert resolve_impl("triton", "cpu") == "triton"
    assert resolve_impl("torch", torch.device("cuda", 3)) == "torch"


def test_resolve_auto_by_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl("auto", "cpu") == "torch"
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"  # no CUDA needed: it only reads the type
    assert resolve_impl("auto", "meta") == "torch"


def test_resolve_auto_reads_env_at_call_time(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", "cpu") == "torch"


@pytest.mark.parametrize("impl", ["bogus", "Torch", "", "cuda", None, 1])
def test_resolve_unknown_impl(impl):
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl(impl, "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        use_kernel(impl, rand32(3))


def test_use_kernel_decides_per_call(monkeypatch):
    x = rand32(3)
    why = TypeError("the Triton kernel takes x in torch.float32, got torch.float64")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_kernel("auto", x) and use_kernel("triton", x, None)
    assert not use_kernel("torch", x)
    assert not use_kernel("auto", x, unsupported=why)  # auto falls back to the reference
    with pytest.raises(TypeError, match="takes x in"):
        use_kernel("triton", x, unsupported=why)  # triton says why it cannot
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_kernel("auto", x)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_kernel("triton", x)  # a CPU tensor without the interpreter: no kernel can run there


def _calls():
    x = rand32(2, 5, 8, seed=1)
    q, k = rand32(1, 3, 4, 8, seed=2), rand32(1, 3, 2, 8, seed=3)
    cos, sin = rand32(1, 3, 1, 4, seed=4), rand32(1, 3, 1, 4, seed=5)
    targets = torch.tensor([[0, 1, 2, 3, -1], [4, 5, 6, 7, 0]])
    return {
        "rms_norm": lambda impl: kernels.rms_norm(x, impl=impl),
        "apply_rope": lambda impl: kernels.apply_rope(q, cos, sin, impl=impl),
        "rope_qk_norm": lambda impl: kernels.rope_qk_norm(q, k, cos, sin, impl=impl),
        "relu2_mlp": lambda impl: kernels.relu2_mlp(x, rand32(32, 8), rand32(8, 32), impl=impl),
        "softcap_cross_entropy": lambda impl: kernels.softcap_cross_entropy(x, targets, impl=impl),
        "linear_softcap_cross_entropy": lambda impl: kernels.linear_softcap_cross_entropy(
            x, rand32(10, 8), targets, impl=impl
        ),
        "flash_attention": lambda impl: kernels.flash_attention(q, k, k, impl=impl),
        "polar_express": lambda impl: kernels.polar_express(rand32(3, 4, 6), impl=impl),
    }


@pytest.mark.parametrize("op", sorted(_calls()))
def test_public_ops_impl_keyword(op, monkeypatch):
    call = _calls()[op]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.testing.assert_close(call("auto"), call("torch"), **EXACT)  # auto on CPU without the interpreter: torch
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel, where one exists, runs in the interpreter
    ref = call("torch")
    torch.testing.assert_close(call("auto"), ref, **tol("any_op", torch.float32))
    torch.testing.assert_close(call("triton"), ref, **tol("any_op", torch.float32))
    with pytest.raises(ValueError, match="impl must be one of"):
        call("bogus")


def test_exports():
    for name in kernels.__all__:
        assert hasattr(kernels, name), name
