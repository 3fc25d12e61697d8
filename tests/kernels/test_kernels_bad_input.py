"""Bad and unusual input for every public op of ``kernels`` (and ``kernels.matmul.gemm``), on both paths.

Every case runs once with ``impl="torch"`` (the PyTorch reference path) and once with ``impl="triton"`` (the
Triton kernel, in the interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1). ``gemm`` has no impl
argument and a single (Triton) path. Test ids read ``<op>-<case>-<path>``, e.g. ``rms_norm-eps_nan-triton``.
Uninitialized memory is NaN-filled while the module runs (deterministic mode), so an output that an op leaves
partly unwritten shows up as NaN instead of passing by reusing freed memory that held the right values.

Each case expects exactly one of two outcomes:

(a) ``Err``: a ``ValueError`` or ``TypeError`` raised by the project's own code (the innermost traceback
    frame lies in a file under kernels/), whose message names the offending argument (matched as a whole
    identifier, e.g. ``targets``, ``eps``, ``block_table``). The inputs must be left untouched (an in-place op
    that raises must not have modified its state first), and when both paths raise, they raise the same type.
    Any other exception type (NotImplementedError, RuntimeError, IndexError, ZeroDivisionError,
    AttributeError, AssertionError, ...) or an exception raised from inside torch/triton is a failure.
(b) ``Ref``: a result equal to an oracle: a float64 restatement of the op's documented math (the ``*_ref``
    functions evaluated on float64 copies where they can be, an independent restatement where the reference
    itself is under test), within a stated tolerance, with NaN and inf at exactly the oracle's positions
    (``torch.testing.assert_close(..., equal_nan=True)``); the first output must have the documented dtype.
    In-place ops are judged on their updated state tensors; inputs that are not state must be unchanged.
    Cases marked with a gradient also compare the gradients of every differentiable input.

Decision rule (what a demanding user of Liger-Kernel or vLLM would expect):

* Accepted, and equal to the oracle: anything the op's docstring promises (strided, transposed, expanded or
  offset views where the op says it takes any strides or copies; mixed float dtypes where it says it casts;
  any integer dtype for cross-entropy targets, as ``F.cross_entropy`` users pass int32 ids), and valid but
  unusual input: empty batches (0 rows, 0 tokens, 0 query heads, 0 sequences, 0 pages when nothing is
  read, an empty parameter), ``ignore_index`` inside [0, V), ``window=0``, an attention ``scale`` of 0 or
  below (uniform or reversed attention: a well-defined, input-dependent result), negative ``slots`` and
  unused block-table entries (documented as skipped / never read), ``eps=0``, ``mu`` of 0 or 1, ``lr=0``.
* NaN or inf inside a tensor is never an error: it must propagate exactly as in the oracle (NaN in means NaN
  out; a NaN or inf that the math never reads, such as padding rows of the lm_head weight, an ignored
  target's logits, a key masked out for a query, unused cache slots or unreferenced pages, must not leak
  anywhere, gradients included). Infinite logits follow ``F.cross_entropy`` (a +inf logit gives NaN). Finite
  inputs whose float32 squares overflow (|x| ~ 1e20) follow the op's float32 ``*_ref`` (torch's norms overflow
  to inf), on both paths.
* A ValueError/TypeError naming the argument for a real mistake: a non-tensor where a tensor is needed
  (list, numpy array, Python float), a wrong rank, a non-floating or mismatched dtype, mismatched shapes,
  GQA heads that do not divide, a non-contiguous tensor where contiguity is documented as required, a
  tensor on another device (meta tensors mixed with CPU ones; a meta tensor must never reach ``.item()`` or
  a kernel), out-of-range indices or lengths (targets outside [0, V) that are not ``ignore_index``,
  block-table pages, seq_lens beyond capacity, q_lens > Tq, negative lengths, int64 values such as 2**32 + 2
  that would alias a valid value if narrowed to int32, slots beyond the pool), a bool where an int or a
  number is expected, a non-number where a number is expected, NaN/inf scalars (eps, scale, softcap, lr,
  wd, betas, mu, coefficients), and scalars outside their domain, taken from ``torch.optim.AdamW`` where it
  applies (lr >= 0, eps >= 0, 0 <= beta < 1, wd >= 0; 0 <= mu <= 1), plus eps < 0, softcap < 0,
  rope_qk_norm's ``scale=0`` (the output would be a constant and its gradient undefined), steps outside
  [0, 5], vocab_size outside [1, Vp], an unknown reduction/epilogue/config/impl.
* An empty dimension is accepted (the result is empty or trivially defined, e.g. a matmul over K=0 gives
  zeros) unless the op normalizes or takes a softmax over it, or a default derived from it is undefined:
  C=0 for RMSNorm, head_dim 0 for rope_qk_norm and attention, V=0 for cross-entropy, no keys for a query,
  0 kv heads, page_size 0, and a Muon matrix with 0 rows or 0 columns (the NorMuon mean over an empty line)
  are ValueErrors naming the argument.
* The one asymmetry allowed between the paths is the documented dispatch contract: a dtype or size that the
  kernel does not implement (float64 for most ops, head_dim > 128, a gradient through gram/polar_express)
  runs the reference under impl="torch" and is a TypeError/ValueError under impl="triton".
"""

from __future__ import annotations

import math
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tritonchat.kernels.matmul import gemm

from tritonchat import kernels

KERNELS_DIR = os.path.dirname(os.path.abspath(kernels.__file__)) + os.sep
IMPLS = ("torch", "triton")
NAN, INF = float("nan"), float("inf")
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
I16, I32, I64, U8 = torch.int16, torch.int32, torch.int64, torch.uint8
EPS32 = torch.finfo(torch.float32).eps
BIG = 2**32 + 2  # an int64 value that is 2 once narrowed to int32

# NaN/inf inputs make the interpreter's numpy arithmetic warn; the values are what the cases check.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_nan_filled_empty():
    """One thread, and torch.empty filled with NaN (deterministic mode), so that an output the op leaves
    partly unwritten cannot pass by reusing freed memory that happens to hold the right values."""
    n = torch.get_num_threads()
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(det)
    torch.set_num_threads(n)


# ---- inputs -------------------------------------------------------------------------------------------------------
def rnd(*shape, seed=0, dtype=F32, scale=1.0):
    """Fresh standard-normal values (never zeros), drawn in float64 and rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def put(t, idx, val):
    """A copy of t with t[idx] = val."""
    t = t.clone()
    t[idx] = val
    return t


def meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def ints(values, dtype=I64):
    return torch.tensor(values, dtype=dtype)


def sym(m, seed=0, k=None):
    r = rnd(*(() if k is None else (k,)), m, m, seed=seed)
    return (r + r.mT) / 2


def angles(t=5, half=8, b=1, seed=7):
    a = rnd(b, t, 1, half, seed=seed, scale=2.0)
    return a.cos(), a.sin()


def _f64(v):
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        v = v.detach()
        return v.double() if v.is_floating_point() else v.clone()
    return v


# ---- expectations -------------------------------------------------------------------------------------------------
@dataclass
class Err:
    """A ValueError/TypeError from kernels/ whose message names one of ``names`` ("a|b") as an identifier."""

    names: str
    exc: tuple = (ValueError, TypeError)

    def pattern(self) -> re.Pattern:
        alts = "|".join(re.escape(n) for n in self.names.split("|"))
        return re.compile(rf"(?<![A-Za-z0-9_])(?:{alts})(?![A-Za-z0-9_])")


@dataclass
class Ref:
    """Outputs equal to the oracle (None: the op's default oracle) within atol/rtol, NaN/inf where it has them."""

    oracle: Callable | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    dtype: Any = "default"  # dtype of the first output; "default": the op's documented output dtype


@dataclass
class Op:
    run: Callable  # (args, impl) -> outputs (the updated state for in-place ops)
    oracle: Callable  # (float64 args, original args) -> expected outputs
    out_dtype: Callable  # original args -> dtype of the first output
    paths: tuple = IMPLS
    state: tuple = ()  # names of the arguments updated in place


@dataclass
class Case:
    op: str
    name: str
    make: Callable[[], dict]
    expect: Any  # Err | Ref | {"torch": Err | Ref, "triton": Err | Ref}
    grad: tuple = ()
    run: Callable | None = None  # overrides the op's runner (e.g. a bogus impl)

    def expectation(self, impl):
        return self.expect[impl] if isinstance(self.expect, dict) else self.expect


OPS: dict[str, Op] = {}
CASES: list[Case] = []


def add(op, name, make, expect=None, *, grad=(), run=None):
    CASES.append(Case(op, name, make, Ref() if expect is None else expect, tuple(grad), run))


def mk(base: Callable[[], dict], **over) -> Callable[[], dict]:
    """A fresh-argument factory: base() with some arguments replaced (a callable is called for a fresh value;
    DROP removes the argument)."""

    def make():
        d = base()
        for k, v in over.items():
            if v is DROP:
                d.pop(k, None)
            else:
                d[k] = v() if callable(v) else v
        return d

    return make


DROP = object()


def per_path(torch_expect, triton_expect):
    return {"torch": torch_expect, "triton": triton_expect}


def bogus_impl(fn):
    """A runner that passes a near-miss spelling of the impl (``TORCH`` / ``TRITON``)."""
    return lambda d, impl: fn(**d, impl=impl.upper())


# ---- harness ------------------------------------------------------------------------------------------------------
def _flat(x):
    if isinstance(x, (tuple, list)):
        return [y for e in x for y in _flat(e)]
    return [x]


def _upstream(o: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + o.numel())
    return torch.randn(o.shape, generator=g, dtype=F64)


def _with_grads(out, leaves):
    outs = [o for o in _flat(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    if outs:
        loss = sum((o.double() * _upstream(o)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    return (*[o.detach() if isinstance(o, torch.Tensor) else o for o in _flat(out)], *grads)


def _execute(case: Case, d: dict, impl: str):
    op = OPS[case.op]
    run = case.run or op.run
    if not case.grad:
        return run(d, impl)
    for n in case.grad:
        d[n] = d[n].detach().requires_grad_(True)
    return _with_grads(run(d, impl), [d[n] for n in case.grad])


def _expected(case: Case, ref: Ref):
    op = OPS[case.op]
    d = case.make()
    dd = {k: _f64(v) for k, v in d.items()}
    oracle = ref.oracle or op.oracle
    if not case.grad:
        return oracle(dd, d)
    for n in case.grad:
        dd[n] = dd[n].detach().requires_grad_(True)
    return _with_grads(oracle(dd, d), [dd[n] for n in case.grad])


def _snapshot(d: dict, skip=()):
    return {k: v.detach().clone() for k, v in d.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta" and k not in skip}


def _changed(d: dict, snap: dict):
    bad = []
    for k, v in snap.items():
        now = d[k].detach()
        if now.shape != v.shape or not torch.equal(now.isnan(), v.isnan()) or not torch.equal(
                torch.nan_to_num(now), torch.nan_to_num(v)):
            bad.append(k)
    return bad


def _where(e: BaseException):
    frame = traceback.extract_tb(e.__traceback__)[-1]
    inside = os.path.abspath(frame.filename).startswith(KERNELS_DIR)
    return inside, f"{os.path.relpath(frame.filename)}:{frame.lineno}"


def _kind(e: BaseException, inside: bool) -> str:
    """'internals' for an error from torch/triton (their Python frames, or a RuntimeError out of a torch op
    called from kernels/), 'unhelpful' for a wrong exception raised by the project's own code."""
    return "unhelpful" if inside and not isinstance(e, RuntimeError) else "internals"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _raise_outcome(case: Case, impl: str):
    """(exception or None) of one call, for the cross-path check."""
    try:
        _execute(case, case.make(), impl)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _check_err(case: Case, impl: str, err: Err):
    d = case.make()
    snap = _snapshot(d)
    try:
        out = _execute(case, d, impl)
    except Exception as e:  # noqa: BLE001
        inside, where = _where(e)
        if not inside:
            pytest.fail(f"[internals] expected a ValueError/TypeError naming {err.names!r} from kernels/, got "
                        f"{_describe(e)} raised at {where}")
        if not isinstance(e, err.exc):
            pytest.fail(f"[{_kind(e, inside)}] expected a ValueError/TypeError naming {err.names!r}, got "
                        f"{_describe(e)} at {where}")
        if not err.pattern().search(str(e)):
            pytest.fail(f"[unhelpful] the message does not name {err.names!r}: {_describe(e)} at {where}")
        changed = _changed(d, snap)
        if changed:
            pytest.fail(f"[silent] raised {type(e).__name__} but only after modifying {changed} in place")
        other = "triton" if impl == "torch" else "torch"
        if other in OPS[case.op].paths and isinstance(case.expectation(other), Err):
            e2 = _raise_outcome(case, other)
            if isinstance(e2, (ValueError, TypeError)) and _where(e2)[0] and type(e2) is not type(e):
                pytest.fail(f"[unhelpful] impl={impl!r} raised {type(e).__name__} but impl={other!r} raised "
                            f"{type(e2).__name__} for the same input")
        return
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in _flat(out)][:4]
    pytest.fail(f"[silent] expected a ValueError/TypeError naming {err.names!r}, but the op returned {shapes}")


def _check_ref(case: Case, impl: str, ref: Ref):
    op = OPS[case.op]
    d = case.make()
    snap = _snapshot(d, skip=op.state)
    dtype = op.out_dtype(d) if ref.dtype == "default" else ref.dtype
    try:
        out = _execute(case, d, impl)
    except Exception as e:  # noqa: BLE001
        inside, where = _where(e)
        pytest.fail(f"[{_kind(e, inside)}] expected a result equal to the reference, got {_describe(e)} raised at "
                    f"{where}")
    expected = _expected(case, ref)
    got, want = _flat(out), _flat(expected)
    assert len(got) == len(want), f"[silent] {len(got)} outputs, expected {len(want)}"
    for i, (a, e) in enumerate(zip(got, want)):
        if e is None:
            assert a is None, f"[silent] output {i}: expected None"
            continue
        assert isinstance(a, torch.Tensor), f"[silent] output {i}: expected a tensor, got {type(a).__name__}"
        assert tuple(a.shape) == tuple(e.shape), (f"[silent] output {i}: shape {tuple(a.shape)}, expected "
                                                  f"{tuple(e.shape)}")
        if i == 0 and dtype is not None:
            assert a.dtype == dtype, f"[silent] output 0: dtype {a.dtype}, expected {dtype}"
        a64, e64 = a.detach().double(), e.detach().double()
        n_bad = int((a64.isnan() != e64.isnan()).sum())
        assert n_bad == 0, (f"[silent] output {i}: NaN at {n_bad} position(s) where the reference has none or the "
                            f"reverse (got {int(a64.isnan().sum())} NaN, expected {int(e64.isnan().sum())})")
        torch.testing.assert_close(a64, e64, atol=ref.atol, rtol=ref.rtol, equal_nan=True,
                                   msg=lambda m, i=i: f"[silent] output {i}: {m}")
    changed = _changed(d, snap)
    assert not changed, f"[silent] the op modified its non-state input(s) {changed}"


def _params():
    out = []
    for c in CASES:
        for impl in OPS[c.op].paths:
            out.append(pytest.param(c, impl, id=f"{c.op}-{c.name}-{impl}"))
    return out


# ====================================================================================================================
# oracles (float64 restatements)
# ====================================================================================================================
def _rms(x, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _eps_for(x, eps):
    if eps is not None:
        return eps
    return torch.finfo(F64 if x.dtype == F64 else F32).eps


def o_rms_norm(dd, d):
    return _rms(dd["x"], _eps_for(d["x"], d.get("eps")))


def o_mix_rms_norm(dd, d):
    h = dd["a"] * dd["x"] + dd["b"] * dd["x0"]
    return h, _rms(h, _eps_for(d["x"], d.get("eps")))


def _rope(x, cos, sin):
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def o_apply_rope(dd, d):
    return _rope(dd["x"], dd["cos"], dd["sin"])


def o_rope_qk_norm(dd, d):
    s = d.get("scale", 1.2)
    return tuple(_rms(_rope(dd[n], dd["cos"], dd["sin"]), EPS32) * s for n in ("q", "k"))


def o_relu2_mlp(dd, d):
    return F.linear(F.relu(F.linear(dd["x"], dd["w_fc"])).square(), dd["w_proj"])


def o_gemm(dd, d):
    a, b = dd["a"], dd["b"]
    acc = a @ (b.t() if d["trans_b"] else b)
    ep = d.get("epilogue", "none")
    if ep == "relu2":
        return torch.relu(acc).square()
    if ep == "relu2_grad":
        return 2.0 * dd["aux"].sqrt() * acc
    return acc


def _ce(z, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    """Softcapped cross-entropy of z (..., V) float64: only counted rows are ever read (index first)."""
    shape = targets.shape
    z2, t = z.reshape(-1, z.size(-1)), targets.reshape(-1).long()
    idx = (t != ignore_index).nonzero().flatten()
    zc, tc = z2[idx], t[idx]
    if softcap:
        zc = softcap * torch.tanh(zc / softcap)
    # -log_softmax, as F.cross_entropy: a +inf logit gives NaN (inf - inf), a -inf target logit gives +inf
    lc = -torch.log_softmax(zc, -1).gather(-1, tc[:, None])[:, 0] if zc.numel() else zc.new_zeros(idx.shape)
    losses = torch.zeros(t.shape, dtype=z.dtype).index_put((idx,), lc)
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(int(idx.numel()), 1)


def _ce_kw(d):
    return {k: d[k] for k in ("softcap", "ignore_index", "reduction") if k in d}


def o_softcap_cross_entropy(dd, d):
    return _ce(dd["logits"], d["targets"], **_ce_kw(d))


def o_linear_softcap_cross_entropy(dd, d):
    vocab = d.get("vocab_size") or d["weight"].size(0)
    return _ce(dd["x"] @ dd["weight"][:vocab].t(), d["targets"], **_ce_kw(d))


def _attn(q, k, v, causal=True, window=None, scale=None):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D) float64; queries are the last Tq positions."""
    tq, tk, h, hkv, dim = q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k, v = k.repeat_interleave(h // hkv, 2), v.repeat_interleave(h // hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p_pos = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None, :]
    vis = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        vis = j <= p_pos
        if window is not None:
            vis = vis & (p_pos - j <= window)
    p = torch.softmax(s.masked_fill(~vis, -INF), -1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def o_flash_attention(dd, d):
    return _attn(dd["q"], dd["k"], dd["v"], d.get("causal", True), d.get("window"), d.get("scale"))


def o_paged_attention(dd, d):
    q, kp, vp, bt, seq = dd["q"], dd["k_pages"], dd["v_pages"], d["block_table"], d["seq_lens"]
    B, Tq = q.shape[:2]
    ps = kp.size(1)
    ql = [Tq] * B if d.get("q_lens") is None else d["q_lens"].tolist()
    out = torch.zeros_like(q)
    for b in range(B):
        n, m = int(seq[b]), int(ql[b])
        if m == 0:
            continue
        pages = bt[b, : -(-n // ps)].long()
        k, v = kp[pages].flatten(0, 1)[:n], vp[pages].flatten(0, 1)[:n]
        out[b, :m] = _attn(q[b:b + 1, :m], k[None], v[None], True, d.get("window"), d.get("scale"))[0]
    return out


def o_paged_kv_append(dd, d):
    kp, vp, slots = dd["k_pages"], dd["v_pages"], d["slots"].long()
    keep, n_slots = slots >= 0, kp.size(0) * kp.size(1)
    kp.view(n_slots, *kp.shape[2:])[slots[keep]] = dd["k"][keep]
    vp.view(n_slots, *vp.shape[2:])[slots[keep]] = dd["v"][keep]
    return kp, vp


def o_gram(dd, d):
    return dd["x"] @ dd["x"].mT


def o_sym_update(dd, d):
    a = dd["a"]
    return d["b"] * a + d["c"] * (a @ a)


def o_polar_express(dd, d):
    return kernels.polar_express_ref(dd["g"], d.get("steps", 5))


def _fro(x):
    return x.square().sum(dim=(-2, -1), keepdim=True).sqrt()


def _muon_pre64(g, buf, mu):
    buf = torch.lerp(buf, g, 1 - mu)
    gn = torch.lerp(g, buf, mu)
    target = _fro(gn) / math.sqrt(g.size(-2))
    return gn * (target / gn.norm(dim=-1, keepdim=True).clamp_min(1e-12)), buf


def _muon_post64(X, P, buf2, lr, wd, beta2):
    # Muon+ does not depend on X's scale: the op works on X / max|X| (inf anywhere: NaN for the whole matrix)
    m, n = X.shape[-2:]
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(amax > 0, amax, 1.0)
    X = X * (math.sqrt(min(m, n)) / _fro(X).clamp_min(1e-12))
    v = X.square().mean(dim=-1 if m >= n else -2, keepdim=True)
    buf2 = torch.lerp(buf2, v, 1 - beta2)
    Xs = X * buf2.clamp_min(1e-10).rsqrt()
    X = Xs * (_fro(X) / _fro(Xs).clamp_min(1e-12))
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    return P - (lr_eff * X + lr_eff * wd * P * ((X * P) >= 0)), buf2


def o_muon_pre(dd, d):
    return _muon_pre64(dd["grad_stack"], dd["momentum_buf"], d["mu"])


def o_muon_post(dd, d):
    return _muon_post64(dd["X"], dd["params_stack"], dd["second_buf"], d["lr"], d["wd"], d["beta2"])


def o_muon_step_(dd, d):
    X, buf = _muon_pre64(dd["grad_stack"], dd["momentum_buf"], d["mu"])
    X = kernels.polar_express_ref(X, d.get("ns_steps", 5))
    P, buf2 = _muon_post64(X, dd["params_stack"], dd["second_buf"], d["lr"], d["wd"], d["beta2"])
    return P, buf, buf2


def o_adamw_step_(dd, d):
    g, step = dd["grad"], d["step"]
    m = torch.lerp(dd["exp_avg"], g, 1 - d["beta1"])
    v = torch.lerp(dd["exp_avg_sq"], g.square(), 1 - d["beta2"])
    p = dd["p"] * (1 - d["lr"] * d["wd"])
    p = p - d["lr"] / (1 - d["beta1"] ** step) * m / ((v / (1 - d["beta2"] ** step)).sqrt() + d["eps"])
    return p, m, v


def fp32_ref(ref_fn):
    """An oracle for finite inputs whose squares overflow float32: the op's own ``*_ref`` at float32, whose
    norms overflow like torch's (such inputs follow the float32 reference, not float64 math)."""
    return lambda dd, d: ref_fn(**d)


def _fp32_or_64(t):
    return F64 if isinstance(t, torch.Tensor) and t.dtype == F64 else F32


def _dtype_of(name):
    return lambda d: d[name].dtype if isinstance(d.get(name), torch.Tensor) else None


def _state_run(fn, *names):
    def run(d, impl):
        fn(**d, impl=impl)
        return tuple(d[n] for n in names)

    return run


OPS.update(
    rms_norm=Op(lambda d, impl: kernels.rms_norm(**d, impl=impl), o_rms_norm, _dtype_of("x")),
    mix_rms_norm=Op(lambda d, impl: kernels.mix_rms_norm(**d, impl=impl), o_mix_rms_norm, _dtype_of("x")),
    apply_rope=Op(lambda d, impl: kernels.apply_rope(**d, impl=impl), o_apply_rope, _dtype_of("x")),
    rope_qk_norm=Op(lambda d, impl: kernels.rope_qk_norm(**d, impl=impl), o_rope_qk_norm, _dtype_of("q")),
    relu2_mlp=Op(lambda d, impl: kernels.relu2_mlp(**d, impl=impl), o_relu2_mlp, _dtype_of("x")),
    gemm=Op(lambda d, impl: gemm(**d), o_gemm, _dtype_of("a"), paths=("triton",)),
    softcap_cross_entropy=Op(lambda d, impl: kernels.softcap_cross_entropy(**d, impl=impl),
                             o_softcap_cross_entropy, lambda d: _fp32_or_64(d.get("logits"))),
    linear_softcap_cross_entropy=Op(lambda d, impl: kernels.linear_softcap_cross_entropy(**d, impl=impl),
                                    o_linear_softcap_cross_entropy, lambda d: _fp32_or_64(d.get("x"))),
    flash_attention=Op(lambda d, impl: kernels.flash_attention(**d, impl=impl), o_flash_attention, _dtype_of("q")),
    paged_attention=Op(lambda d, impl: kernels.paged_attention(**d, impl=impl), o_paged_attention, _dtype_of("q")),
    paged_kv_append=Op(_state_run(kernels.paged_kv_append, "k_pages", "v_pages"), o_paged_kv_append,
                       _dtype_of("k_pages"), state=("k_pages", "v_pages")),
    gram=Op(lambda d, impl: kernels.gram(**d, impl=impl), o_gram, _dtype_of("x")),
    sym_update=Op(lambda d, impl: kernels.sym_update(**d, impl=impl), o_sym_update, _dtype_of("a")),
    polar_express=Op(lambda d, impl: kernels.polar_express(**d, impl=impl), o_polar_express, _dtype_of("g")),
    muon_pre=Op(lambda d, impl: (kernels.muon_pre(**d, impl=impl), d["momentum_buf"]), o_muon_pre,
                lambda d: d.get("out_dtype") or F32, state=("momentum_buf",)),
    muon_post=Op(_state_run(kernels.muon_post, "params_stack", "second_buf"), o_muon_post, lambda d: F32,
                 state=("params_stack", "second_buf")),
    muon_step_=Op(_state_run(kernels.muon_step_, "params_stack", "momentum_buf", "second_buf"), o_muon_step_,
                  lambda d: F32, state=("params_stack", "momentum_buf", "second_buf")),
    adamw_step_=Op(_state_run(kernels.adamw_step_, "p", "exp_avg", "exp_avg_sq"), o_adamw_step_, _dtype_of("p"),
                   state=("p", "exp_avg", "exp_avg_sq")),
)

TOL16 = dict(atol=3e-3, rtol=3e-3)
TOLBF = dict(atol=3e-2, rtol=3e-2)


def fp64_contract(names="float64"):
    """float64: the reference under impl='torch'; a TypeError naming the dtype under impl='triton'."""
    return per_path(Ref(), Err(names, (TypeError,)))


# ====================================================================================================================
# rms_norm
# ====================================================================================================================
def _rms_cases():
    op = "rms_norm"
    base = mk(lambda: {"x": rnd(3, 8)})
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=("x",))
    add(op, "x_list", mk(base, x=[[1.0, 2.0], [3.0, 4.0]]), Err("x"))
    add(op, "x_numpy", mk(base, x=lambda: np.ones((3, 8), np.float32)), Err("x"))
    add(op, "x_python_float", mk(base, x=1.5), Err("x"))
    add(op, "x_int64", mk(base, x=lambda: torch.ones(3, 8, dtype=I64)), Err("x"))
    add(op, "x_bool", mk(base, x=lambda: torch.ones(3, 8, dtype=torch.bool)), Err("x"))
    add(op, "x_0dim", mk(base, x=lambda: torch.tensor(1.5)), Err("x"))
    add(op, "x_float64", mk(base, x=lambda: rnd(3, 8, dtype=F64)), fp64_contract())
    add(op, "x_fp16", mk(base, x=lambda: rnd(3, 8, dtype=F16)), Ref(**TOL16))
    add(op, "x_bf16", mk(base, x=lambda: rnd(3, 8, dtype=BF16)), Ref(**TOLBF))
    add(op, "x_odd_C", mk(base, x=lambda: rnd(5, 13)))
    add(op, "rows_0", mk(base, x=lambda: rnd(0, 8)))
    add(op, "rows_0_grad", mk(base, x=lambda: rnd(0, 8)), grad=("x",))
    add(op, "tokens_0_3d", mk(base, x=lambda: rnd(2, 0, 8)))
    add(op, "C_0", mk(base, x=lambda: rnd(3, 0)), Err("x"))
    add(op, "x_transposed", mk(base, x=lambda: rnd(8, 3).t()))
    add(op, "x_transposed_grad", mk(base, x=lambda: rnd(8, 3).t()), grad=("x",))
    add(op, "x_col_stride_2", mk(base, x=lambda: rnd(3, 16)[:, ::2]))
    add(op, "x_expanded_rows", mk(base, x=lambda: rnd(1, 8).expand(4, 8)))
    add(op, "x_nan", mk(base, x=lambda: put(rnd(3, 8), (1, 2), NAN)))
    add(op, "x_nan_grad", mk(base, x=lambda: put(rnd(3, 8), (1, 2), NAN)), grad=("x",))
    add(op, "x_inf", mk(base, x=lambda: put(rnd(3, 8), (0, 5), INF)))
    add(op, "x_neg_inf_grad", mk(base, x=lambda: put(rnd(3, 8), (2, 0), -INF)), grad=("x",))
    add(op, "x_1e20_overflows_fp32", mk(base, x=lambda: rnd(3, 8, scale=1e20)),
        Ref(oracle=fp32_ref(kernels.rms_norm_ref)))
    add(op, "C_16385", mk(base, x=lambda: rnd(1, 16385)), per_path(Ref(), Err("16384|x")))
    add(op, "eps_nan", mk(base, eps=NAN), Err("eps"))
    add(op, "eps_inf", mk(base, eps=INF), Err("eps"))
    add(op, "eps_neg", mk(base, eps=-1.0), Err("eps"))
    add(op, "eps_str", mk(base, eps="1e-6"), Err("eps"))
    add(op, "eps_bool", mk(base, eps=True), Err("eps"))
    add(op, "eps_zero", mk(base, eps=0.0))
    add(op, "eps_int_1", mk(base, eps=1))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.rms_norm))


# ====================================================================================================================
# mix_rms_norm
# ====================================================================================================================
def _mix_cases():
    op = "mix_rms_norm"
    base = mk(lambda: {"x": rnd(3, 8, seed=1), "x0": rnd(3, 8, seed=2), "a": torch.tensor(0.7),
                       "b": torch.tensor(0.4)})
    every = ("x", "x0", "a", "b")
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=every)
    add(op, "x_numpy", mk(base, x=lambda: np.ones((3, 8), np.float32)), Err("x"))
    add(op, "x0_list", mk(base, x0=[[1.0] * 8] * 3), Err("x0"))
    add(op, "x0_shape", mk(base, x0=lambda: rnd(3, 9)), Err("x0"))
    add(op, "x0_0dim", mk(base, x0=lambda: torch.tensor(1.0)), Err("x0"))
    add(op, "x0_fp16", mk(base, x0=lambda: rnd(3, 8, dtype=F16)), Err("x0"))
    add(op, "x0_int", mk(base, x0=lambda: torch.ones(3, 8, dtype=I32)), Err("x0"))
    add(op, "a_python_float", mk(base, a=0.7), Err("a"))
    add(op, "a_list", mk(base, a=[0.7]), Err("a"))
    add(op, "a_int_tensor", mk(base, a=lambda: torch.tensor(1)), Err("a"))
    add(op, "a_two_elements", mk(base, a=lambda: torch.tensor([0.7, 0.1])), Err("a"))
    add(op, "b_shape_1x1", mk(base, b=lambda: torch.tensor([[0.4]])), Err("b"))
    add(op, "a_shape_1", mk(base, a=lambda: torch.tensor([0.7])))
    add(op, "a_float64", mk(base, a=lambda: torch.tensor(0.7, dtype=F64)))
    add(op, "b_bf16", mk(base, b=lambda: torch.tensor(0.375, dtype=BF16)))
    add(op, "a_meta", mk(base, a=lambda: meta(torch.tensor(0.7))), Err("a"))
    add(op, "x0_meta", mk(base, x0=lambda: meta(rnd(3, 8))), Err("x0"))
    add(op, "x_nan", mk(base, x=lambda: put(rnd(3, 8, seed=1), (0, 3), NAN)))
    add(op, "x0_nan_grad", mk(base, x0=lambda: put(rnd(3, 8, seed=2), (2, 7), NAN)), grad=every)
    add(op, "x0_inf", mk(base, x0=lambda: put(rnd(3, 8, seed=2), (1, 1), INF)))
    add(op, "a_nan", mk(base, a=lambda: torch.tensor(NAN)))
    add(op, "b_nan_grad", mk(base, b=lambda: torch.tensor(NAN)), grad=every)
    add(op, "rows_0", mk(base, x=lambda: rnd(0, 8), x0=lambda: rnd(0, 8)))
    add(op, "tokens_0_3d", mk(base, x=lambda: rnd(2, 0, 8), x0=lambda: rnd(2, 0, 8)))
    add(op, "rows_0_grad", mk(base, x=lambda: rnd(0, 8), x0=lambda: rnd(0, 8)), grad=every)
    add(op, "C_0", mk(base, x=lambda: rnd(3, 0), x0=lambda: rnd(3, 0)), Err("x"))
    add(op, "x0_transposed_grad", mk(base, x0=lambda: rnd(8, 3, seed=2).t()), grad=every)
    add(op, "x_3d_odd", mk(base, x=lambda: rnd(2, 3, 13, seed=1), x0=lambda: rnd(2, 3, 13, seed=2)))
    add(op, "x_float64", mk(base, x=lambda: rnd(3, 8, seed=1, dtype=F64), x0=lambda: rnd(3, 8, seed=2, dtype=F64)),
        fp64_contract())
    add(op, "x_fp16", mk(base, x=lambda: rnd(3, 8, seed=1, dtype=F16), x0=lambda: rnd(3, 8, seed=2, dtype=F16)),
        Ref(**TOL16))
    add(op, "eps_nan", mk(base, eps=NAN), Err("eps"))
    add(op, "eps_inf", mk(base, eps=INF), Err("eps"))
    add(op, "eps_neg", mk(base, eps=-1e-6), Err("eps"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.mix_rms_norm))


# ====================================================================================================================
# apply_rope
# ====================================================================================================================
def _rope_cases():
    op = "apply_rope"

    def base_args():
        cos, sin = angles()
        return {"x": rnd(2, 5, 3, 16), "cos": cos, "sin": sin}

    base = mk(base_args)
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=("x",))
    add(op, "x_3d", mk(base, x=lambda: rnd(2, 5, 16)), Err("x"))
    add(op, "cos_3d", mk(base, cos=lambda: angles()[0][0], sin=lambda: angles()[1][0]), Err("cos"))
    add(op, "sin_5d", mk(base, sin=lambda: angles()[1][None]), Err("sin"))
    add(op, "x_int", mk(base, x=lambda: torch.ones(2, 5, 3, 16, dtype=I64)), Err("x"))
    add(op, "cos_int", mk(base, cos=lambda: torch.ones(1, 5, 1, 8, dtype=I32)), Err("cos"))
    add(op, "sin_bool", mk(base, sin=lambda: torch.ones(1, 5, 1, 8, dtype=torch.bool)), Err("sin"))
    add(op, "x_list", mk(base, x=[[[[1.0, 2.0]]]]), Err("x"))
    add(op, "cos_numpy", mk(base, cos=lambda: np.ones((1, 5, 1, 8), np.float32)), Err("cos"))
    add(op, "sin_python_float", mk(base, sin=0.5), Err("sin"))
    add(op, "D_odd", mk(base, x=lambda: rnd(2, 5, 3, 15)), Err("x"))
    add(op, "sin_T_mismatch", mk(base, sin=lambda: angles(t=4)[1]), Err("sin"))
    add(op, "cos_sin_T_4", mk(base, cos=lambda: angles(t=4)[0], sin=lambda: angles(t=4)[1]), Err("cos"))
    add(op, "cos_half_7", mk(base, cos=lambda: angles(half=7)[0], sin=lambda: angles(half=7)[1]), Err("cos"))
    add(op, "cos_heads_2", mk(base, cos=lambda: angles()[0].expand(1, 5, 2, 8),
                              sin=lambda: angles()[1].expand(1, 5, 2, 8)), Err("cos"))
    add(op, "cos_batch_3", mk(base, cos=lambda: angles(b=3)[0], sin=lambda: angles(b=3)[1]), Err("cos"))
    add(op, "cos_batch_2", mk(base, cos=lambda: angles(b=2)[0], sin=lambda: angles(b=2)[1]))
    add(op, "cos_offset_slice", mk(base, cos=lambda: angles(t=12)[0][:, 4:9], sin=lambda: angles(t=12)[1][:, 4:9]))
    add(op, "cos_T_stride_2", mk(base, cos=lambda: angles(t=10)[0][:, ::2], sin=lambda: angles(t=10)[1][:, ::2]))
    add(op, "cos_float64", mk(base, cos=lambda: angles()[0].double(), sin=lambda: angles()[1].double()))
    add(op, "cos_fp16", mk(base, cos=lambda: angles()[0].half(), sin=lambda: angles()[1].half()), Ref(**TOL16))
    add(op, "x_fp16", mk(base, x=lambda: rnd(2, 5, 3, 16, dtype=F16)), Ref(**TOL16))
    add(op, "x_float64", mk(base, x=lambda: rnd(2, 5, 3, 16, dtype=F64)), fp64_contract())
    add(op, "x_transposed_grad", mk(base, x=lambda: rnd(2, 3, 5, 16).transpose(1, 2)), grad=("x",))
    add(op, "x_D_stride_2", mk(base, x=lambda: rnd(2, 5, 3, 32)[..., ::2]))
    add(op, "x_nan_grad", mk(base, x=lambda: put(rnd(2, 5, 3, 16), (1, 2, 0, 3), NAN)), grad=("x",))
    add(op, "x_inf", mk(base, x=lambda: put(rnd(2, 5, 3, 16), (0, 4, 2, 11), INF)))
    add(op, "cos_nan", mk(base, cos=lambda: put(angles()[0], (0, 1, 0, 2), NAN)))
    add(op, "T_0", mk(base, x=lambda: rnd(2, 0, 3, 16), cos=lambda: angles(t=0)[0], sin=lambda: angles(t=0)[1]))
    add(op, "T_0_grad", mk(base, x=lambda: rnd(2, 0, 3, 16), cos=lambda: angles(t=0)[0], sin=lambda: angles(t=0)[1]),
        grad=("x",))
    add(op, "B_0", mk(base, x=lambda: rnd(0, 5, 3, 16)))
    add(op, "heads_0_grad", mk(base, x=lambda: rnd(2, 5, 0, 16)), grad=("x",))
    add(op, "D_0", mk(base, x=lambda: rnd(2, 5, 3, 0), cos=lambda: angles(half=0)[0], sin=lambda: angles(half=0)[1]))
    add(op, "cos_meta", mk(base, cos=lambda: meta(angles()[0])), Err("cos"))
    add(op, "x_meta", mk(base, x=lambda: meta(rnd(2, 5, 3, 16))), Err("x"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.apply_rope))


# ====================================================================================================================
# rope_qk_norm
# ====================================================================================================================
def _rope_qk_cases():
    op = "rope_qk_norm"

    def base_args():
        cos, sin = angles()
        return {"q": rnd(2, 5, 4, 16, seed=1), "k": rnd(2, 5, 2, 16, seed=2), "cos": cos, "sin": sin}

    def packed():
        qkv = rnd(2, 5, 8, 16, seed=3)
        cos, sin = angles()
        return {"q": qkv[:, :, :4], "k": qkv[:, :, 4:6], "cos": cos, "sin": sin}

    base = mk(base_args)
    qk = ("q", "k")
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=qk)
    add(op, "q_3d", mk(base, q=lambda: rnd(2, 5, 16)), Err("q"))
    add(op, "k_5d", mk(base, k=lambda: rnd(1, 2, 5, 2, 16)), Err("k"))
    add(op, "k_int", mk(base, k=lambda: torch.ones(2, 5, 2, 16, dtype=I32)), Err("k"))
    add(op, "q_list", mk(base, q=[[[[1.0] * 16]]]), Err("q"))
    add(op, "k_numpy", mk(base, k=lambda: np.ones((2, 5, 2, 16), np.float32)), Err("k"))
    add(op, "k_fp16", mk(base, k=lambda: rnd(2, 5, 2, 16, dtype=F16)), Err("k"))
    add(op, "k_T_mismatch", mk(base, k=lambda: rnd(2, 4, 2, 16)), Err("k"))
    add(op, "k_B_mismatch", mk(base, k=lambda: rnd(1, 5, 2, 16)), Err("k"))
    add(op, "k_D_mismatch", mk(base, k=lambda: rnd(2, 5, 2, 8)), Err("k"))
    add(op, "D_odd", mk(base, q=lambda: rnd(2, 5, 4, 15), k=lambda: rnd(2, 5, 2, 15)), Err("q"))
    add(op, "cos_T_4", mk(base, cos=lambda: angles(t=4)[0], sin=lambda: angles(t=4)[1]), Err("cos"))
    add(op, "sin_list", mk(base, sin=[0.0]), Err("sin"))
    add(op, "scale_0", mk(base, scale=0.0), Err("scale"))
    add(op, "scale_nan", mk(base, scale=NAN), Err("scale"))
    add(op, "scale_inf", mk(base, scale=INF), Err("scale"))
    add(op, "scale_str", mk(base, scale="1.2"), Err("scale"))
    add(op, "scale_bool", mk(base, scale=True), Err("scale"))
    add(op, "scale_neg_grad", mk(base, scale=-1.0), grad=qk)
    add(op, "scale_int_2", mk(base, scale=2))
    add(op, "q_nan_grad", mk(base, q=lambda: put(rnd(2, 5, 4, 16, seed=1), (1, 3, 2, 5), NAN)), grad=qk)
    add(op, "k_inf", mk(base, k=lambda: put(rnd(2, 5, 2, 16, seed=2), (0, 0, 1, 12), INF)))
    add(op, "cos_nan", mk(base, cos=lambda: put(angles()[0], (0, 2, 0, 7), NAN)))
    add(op, "T_0_grad", mk(base, q=lambda: rnd(2, 0, 4, 16), k=lambda: rnd(2, 0, 2, 16),
                           cos=lambda: angles(t=0)[0], sin=lambda: angles(t=0)[1]), grad=qk)
    add(op, "B_0_grad", mk(base, q=lambda: rnd(0, 5, 4, 16), k=lambda: rnd(0, 5, 2, 16)), grad=qk)
    add(op, "q_heads_0_grad", mk(base, q=lambda: rnd(2, 5, 0, 16)), grad=qk)
    add(op, "q_heads_0", mk(base, q=lambda: rnd(2, 5, 0, 16)))
    add(op, "k_heads_0", mk(base, k=lambda: rnd(2, 5, 0, 16)))
    add(op, "k_heads_0_grad", mk(base, k=lambda: rnd(2, 5, 0, 16)), grad=qk)
    add(op, "D_0", mk(base, q=lambda: rnd(2, 5, 4, 0), k=lambda: rnd(2, 5, 2, 0), cos=lambda: angles(half=0)[0],
                      sin=lambda: angles(half=0)[1]), Err("q|head_dim"))
    add(op, "packed_qkv_views_grad", mk(packed), grad=qk)
    add(op, "q_transposed", mk(base, q=lambda: rnd(2, 4, 5, 16, seed=1).transpose(1, 2)))
    add(op, "q_float64", mk(base, q=lambda: rnd(2, 5, 4, 16, dtype=F64), k=lambda: rnd(2, 5, 2, 16, dtype=F64)),
        fp64_contract())
    add(op, "q_fp16", mk(base, q=lambda: rnd(2, 5, 4, 16, dtype=F16), k=lambda: rnd(2, 5, 2, 16, dtype=F16)),
        Ref(**TOL16))
    add(op, "k_meta", mk(base, k=lambda: meta(rnd(2, 5, 2, 16))), Err("k"))
    add(op, "cos_meta", mk(base, cos=lambda: meta(angles()[0])), Err("cos"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.rope_qk_norm))


# ====================================================================================================================
# relu2_mlp
# ====================================================================================================================
def _mlp_cases():
    op = "relu2_mlp"
    base = mk(lambda: {"x": rnd(3, 8), "w_fc": rnd(32, 8, seed=1, scale=0.3), "w_proj": rnd(8, 32, seed=2, scale=0.2)})
    every = ("x", "w_fc", "w_proj")
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=every)
    add(op, "x_nan", mk(base, x=lambda: put(rnd(3, 8), (1, 4), NAN)))
    add(op, "x_nan_grad", mk(base, x=lambda: put(rnd(3, 8), (1, 4), NAN)), grad=every)
    add(op, "w_fc_nan", mk(base, w_fc=lambda: put(rnd(32, 8, seed=1, scale=0.3), (5, 2), NAN)))
    add(op, "w_proj_nan", mk(base, w_proj=lambda: put(rnd(8, 32, seed=2, scale=0.2), (3, 9), NAN)))
    add(op, "x_inf", mk(base, x=lambda: put(rnd(3, 8), (0, 0), INF)))
    add(op, "x_neg_inf", mk(base, x=lambda: put(rnd(3, 8), (2, 7), -INF)))
    add(op, "x_int", mk(base, x=lambda: torch.ones(3, 8, dtype=I64)), Err("x"))
    add(op, "w_fc_int", mk(base, w_fc=lambda: torch.ones(32, 8, dtype=I32)), Err("w_fc"))
    add(op, "w_proj_bool", mk(base, w_proj=lambda: torch.ones(8, 32, dtype=torch.bool)), Err("w_proj"))
    add(op, "x_list", mk(base, x=[[1.0] * 8]), Err("x"))
    add(op, "w_fc_numpy", mk(base, w_fc=lambda: np.ones((32, 8), np.float32)), Err("w_fc"))
    add(op, "x_0dim", mk(base, x=lambda: torch.tensor(1.0)), Err("x"))
    add(op, "w_fc_3d", mk(base, w_fc=lambda: rnd(1, 32, 8)), Err("w_fc"))
    add(op, "w_fc_C_mismatch", mk(base, w_fc=lambda: rnd(32, 9)), Err("w_fc"))
    add(op, "w_proj_Hd_mismatch", mk(base, w_proj=lambda: rnd(8, 31)), Err("w_proj"))
    add(op, "w_fc_fp16", mk(base, w_fc=lambda: rnd(32, 8, seed=1, scale=0.3, dtype=F16)))
    add(op, "x_fp16", mk(base, x=lambda: rnd(3, 8, dtype=F16)), Ref(atol=5e-3, rtol=5e-3))
    add(op, "x_float64", mk(base, x=lambda: rnd(3, 8, dtype=F64)), fp64_contract())
    add(op, "rows_0_grad", mk(base, x=lambda: rnd(0, 8)), grad=every)
    add(op, "C_0_grad", mk(base, x=lambda: rnd(3, 0), w_fc=lambda: rnd(32, 0)), grad=every)
    add(op, "Hd_0_grad", mk(base, w_fc=lambda: rnd(0, 8), w_proj=lambda: rnd(8, 0)), grad=every)
    add(op, "C_out_0", mk(base, w_proj=lambda: rnd(0, 32)))
    add(op, "x_3d_odd", mk(base, x=lambda: rnd(2, 3, 8)))
    add(op, "x_transposed_grad", mk(base, x=lambda: rnd(8, 3).t()), grad=every)
    add(op, "w_fc_transposed", mk(base, w_fc=lambda: rnd(8, 32, seed=1, scale=0.3).t()))
    add(op, "w_proj_meta", mk(base, w_proj=lambda: meta(rnd(8, 32))), Err("w_proj"))
    add(op, "x_meta", mk(base, x=lambda: meta(rnd(3, 8))), Err("x"))
    add(op, "config_bogus", mk(base, config="fastest"), Err("config"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.relu2_mlp))


# ====================================================================================================================
# gemm (kernels.matmul; Triton only)
# ====================================================================================================================
def _gemm_cases():
    op = "gemm"
    base = mk(lambda: {"a": rnd(5, 8), "b": rnd(6, 8, seed=1), "trans_b": True})
    relu2 = mk(base, epilogue="relu2")
    grad = mk(base, trans_b=False, b=lambda: rnd(8, 6, seed=1), epilogue="relu2_grad",
              aux=lambda: rnd(5, 6, seed=2).abs())
    add(op, "baseline", base)
    add(op, "relu2", relu2)
    add(op, "relu2_grad", grad)
    add(op, "not_trans_b", mk(base, trans_b=False, b=lambda: rnd(8, 6, seed=1)))
    add(op, "a_nan_relu2", mk(relu2, a=lambda: put(rnd(5, 8), (2, 3), NAN)))
    add(op, "b_nan_relu2", mk(relu2, b=lambda: put(rnd(6, 8, seed=1), (4, 0), NAN)))
    add(op, "a_inf_relu2", mk(relu2, a=lambda: put(rnd(5, 8), (1, 1), INF)))
    add(op, "a_neg_inf_relu2", mk(relu2, a=lambda: put(rnd(5, 8), (3, 6), -INF)))
    add(op, "a_nan_none", mk(base, a=lambda: put(rnd(5, 8), (0, 7), NAN)))
    add(op, "aux_nan_relu2_grad", mk(grad, aux=lambda: put(rnd(5, 6, seed=2).abs(), (4, 5), NAN)))
    add(op, "a_nan_relu2_grad", mk(grad, a=lambda: put(rnd(5, 8), (2, 2), NAN)))
    add(op, "aux_negative_relu2_grad", mk(grad, aux=lambda: rnd(5, 6, seed=2)))
    add(op, "a_int", mk(base, a=lambda: torch.ones(5, 8, dtype=I32)), Err("a"))
    add(op, "b_fp16", mk(base, b=lambda: rnd(6, 8, dtype=F16)), Err("b"))
    add(op, "a_float64", mk(base, a=lambda: rnd(5, 8, dtype=F64), b=lambda: rnd(6, 8, dtype=F64)), Err("a"))
    add(op, "a_list", mk(base, a=[[1.0] * 8]), Err("a"))
    add(op, "b_numpy", mk(base, b=lambda: np.ones((6, 8), np.float32)), Err("b"))
    add(op, "a_3d", mk(base, a=lambda: rnd(1, 5, 8)), Err("a"))
    add(op, "b_1d", mk(base, b=lambda: rnd(8)), Err("b"))
    add(op, "a_transposed", mk(base, a=lambda: rnd(8, 5).t()), Err("a"))
    add(op, "b_transposed", mk(base, b=lambda: rnd(8, 6).t()), Err("b"))
    add(op, "inner_mismatch", mk(base, b=lambda: rnd(6, 7)), Err("b"))
    add(op, "epilogue_bogus", mk(base, epilogue="relu"), Err("epilogue"))
    add(op, "relu2_grad_without_aux", mk(grad, aux=DROP), Err("aux"))
    add(op, "aux_with_none", mk(base, aux=lambda: rnd(5, 6)), Err("aux"))
    add(op, "aux_shape", mk(grad, aux=lambda: rnd(6, 5).abs()), Err("aux"))
    add(op, "aux_list", mk(grad, aux=[[1.0] * 6] * 5), Err("aux"))
    add(op, "aux_fp16", mk(grad, aux=lambda: rnd(5, 6, dtype=F16).abs()), Err("aux"))
    add(op, "aux_transposed", mk(grad, aux=lambda: rnd(6, 5).abs().t()), Err("aux"))
    add(op, "config_bogus", mk(base, config="big"), Err("config"))
    add(op, "M_0", mk(base, a=lambda: rnd(0, 8)))
    add(op, "M_0_relu2_grad", mk(grad, a=lambda: rnd(0, 8), aux=lambda: rnd(0, 6)))
    add(op, "N_0", mk(base, b=lambda: rnd(0, 8)))
    add(op, "K_0_relu2", mk(relu2, a=lambda: rnd(5, 0), b=lambda: rnd(6, 0)))
    add(op, "b_meta", mk(base, b=lambda: meta(rnd(6, 8))), Err("b"))
    add(op, "a_fp16", mk(base, a=lambda: rnd(5, 8, dtype=F16), b=lambda: rnd(6, 8, seed=1, dtype=F16)),
        Ref(**TOL16))


# ====================================================================================================================
# softcap_cross_entropy
# ====================================================================================================================
def _ce_cases():
    op = "softcap_cross_entropy"
    T = [0, 5, 10, 3]
    base = mk(lambda: {"logits": rnd(4, 11, scale=3.0), "targets": ints(T)})
    lg = ("logits",)
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=lg)
    add(op, "sum_grad", mk(base, reduction="sum"), grad=lg)
    add(op, "none_grad", mk(base, reduction="none"), grad=lg)
    add(op, "softcap_none_grad", mk(base, softcap=None), grad=lg)
    add(op, "softcap_0", mk(base, softcap=0))
    add(op, "targets_eq_V", mk(base, targets=lambda: ints([0, 11, 1, 2])), Err("targets"))
    add(op, "targets_neg_2", mk(base, targets=lambda: ints([0, -2, 1, 2])), Err("targets"))
    add(op, "targets_int64_2pow32", mk(base, targets=lambda: ints([0, BIG, 1, 2])), Err("targets"))
    add(op, "targets_int32", mk(base, targets=lambda: ints(T, I32)))
    add(op, "targets_int32_grad", mk(base, targets=lambda: ints([0, -1, 10, 3], I32)), grad=lg)
    add(op, "targets_int16", mk(base, targets=lambda: ints([0, -1, 10, 3], I16)))
    add(op, "targets_uint8", mk(base, targets=lambda: ints(T, U8)))
    add(op, "targets_int32_oob", mk(base, targets=lambda: ints([0, 11, 1, 2], I32)), Err("targets"))
    add(op, "targets_float", mk(base, targets=lambda: ints(T).float()), Err("targets"))
    add(op, "targets_bool", mk(base, targets=lambda: ints([0, 1, 1, 0]).bool()), Err("targets"))
    add(op, "targets_list", mk(base, targets=T), Err("targets"))
    add(op, "targets_numpy", mk(base, targets=lambda: np.array(T)), Err("targets"))
    add(op, "targets_shape", mk(base, targets=lambda: ints([0, 1, 2, 3, 4])), Err("targets"))
    add(op, "targets_2d", mk(base, targets=lambda: ints([T])), Err("targets"))
    add(op, "targets_strided_view", mk(base, targets=lambda: ints([0, 9, 5, 9, 10, 9, 3, 9])[::2]))
    add(op, "ignore_index_in_range", mk(base, ignore_index=5))
    add(op, "ignore_index_minus_100", mk(base, ignore_index=-100, targets=lambda: ints([0, -100, 10, 3])))
    add(op, "ignore_index_float", mk(base, ignore_index=1.5), Err("ignore_index"))
    add(op, "ignore_index_bool", mk(base, ignore_index=True), Err("ignore_index"))
    add(op, "all_ignored_grad", mk(base, targets=lambda: ints([-1, -1, -1, -1])), grad=lg)
    add(op, "reduction_bogus", mk(base, reduction="avg"), Err("reduction"))
    add(op, "reduction_None", mk(base, reduction=None), Err("reduction"))
    add(op, "softcap_neg", mk(base, softcap=-15.0), Err("softcap"))
    add(op, "softcap_nan", mk(base, softcap=NAN), Err("softcap"))
    add(op, "softcap_inf", mk(base, softcap=INF), Err("softcap"))
    add(op, "softcap_bool", mk(base, softcap=True), Err("softcap"))
    add(op, "softcap_str", mk(base, softcap="15"), Err("softcap"))
    add(op, "logits_int", mk(base, logits=lambda: torch.ones(4, 11, dtype=I64)), Err("logits"))
    add(op, "logits_0dim", mk(base, logits=lambda: torch.tensor(1.0), targets=lambda: ints(0)), Err("logits"))
    add(op, "logits_list", mk(base, logits=[[0.0] * 11] * 4), Err("logits"))
    add(op, "V_0", mk(base, logits=lambda: rnd(4, 0), targets=lambda: ints([-1] * 4)), Err("logits"))
    add(op, "rows_0_mean_grad", mk(base, logits=lambda: rnd(0, 11), targets=lambda: ints([])), grad=lg)
    add(op, "rows_0_none_grad", mk(base, logits=lambda: rnd(0, 11), targets=lambda: ints([]), reduction="none"),
        grad=lg)
    add(op, "rows_0_3d_sum", mk(base, logits=lambda: rnd(2, 0, 11), targets=lambda: ints([[], []]), reduction="sum"))
    add(op, "logits_nan", mk(base, logits=lambda: put(rnd(4, 11, scale=3.0), (2, 4), NAN)))
    add(op, "logits_nan_grad", mk(base, logits=lambda: put(rnd(4, 11, scale=3.0), (2, 4), NAN)), grad=lg)
    add(op, "logits_nan_none", mk(base, logits=lambda: put(rnd(4, 11, scale=3.0), (1, 0), NAN), reduction="none"))
    add(op, "logits_inf_softcap_grad", mk(base, logits=lambda: put(rnd(4, 11, scale=3.0), (0, 3), INF)), grad=lg)
    add(op, "logits_inf_no_softcap", mk(base, softcap=None, reduction="none",
                                        logits=lambda: put(rnd(4, 11, scale=3.0), (0, 3), INF)))
    add(op, "logits_neg_inf_target_no_softcap", mk(base, softcap=None, reduction="none",
                                                   logits=lambda: put(rnd(4, 11, scale=3.0), (1, 5), -INF)))
    add(op, "logits_neg_inf_other_no_softcap_grad", mk(base, softcap=None,
                                                       logits=lambda: put(rnd(4, 11, scale=3.0), (1, 6), -INF)),
        grad=lg)
    add(op, "nan_in_ignored_row_grad", mk(base, targets=lambda: ints([0, -1, 10, 3]),
                                          logits=lambda: put(rnd(4, 11, scale=3.0), (1, 2), NAN)), grad=lg)
    add(op, "logits_transposed_grad", mk(base, logits=lambda: rnd(11, 4, scale=3.0).t()), grad=lg)
    add(op, "logits_row_slice", mk(base, logits=lambda: rnd(4, 20, scale=3.0)[:, :11]))
    add(op, "logits_1e30_softcap_grad", mk(base, logits=lambda: put(rnd(4, 11, scale=3.0), (2, 1), -1e30)), grad=lg)
    add(op, "logits_3d", mk(base, logits=lambda: rnd(2, 2, 11, scale=3.0), targets=lambda: ints([[0, 5], [10, -1]])))
    add(op, "logits_fp16_grad", mk(base, logits=lambda: rnd(4, 11, scale=3.0, dtype=F16)), Ref(**TOL16), grad=lg)
    add(op, "logits_bf16", mk(base, logits=lambda: rnd(4, 11, scale=3.0, dtype=BF16)), Ref(**TOLBF))
    add(op, "logits_float64", mk(base, logits=lambda: rnd(4, 11, scale=3.0, dtype=F64)), fp64_contract())
    add(op, "targets_meta", mk(base, targets=lambda: meta(ints(T))), Err("targets"))
    add(op, "logits_meta", mk(base, logits=lambda: meta(rnd(4, 11))), Err("logits"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.softcap_cross_entropy))


# ====================================================================================================================
# linear_softcap_cross_entropy
# ====================================================================================================================
def _lce_cases():
    op = "linear_softcap_cross_entropy"
    T = [0, 5, 12, 3]
    base = mk(lambda: {"x": rnd(4, 8), "weight": rnd(13, 8, seed=1), "targets": ints(T)})
    vocab = mk(base, vocab_size=11, targets=lambda: ints([0, 5, 10, 3]))
    xw = ("x", "weight")
    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=xw)
    add(op, "none_grad", mk(base, reduction="none"), grad=xw)
    add(op, "vocab_size_11_grad", vocab, grad=xw)
    add(op, "vocab_size_0", mk(vocab, vocab_size=0), Err("vocab_size"))
    add(op, "vocab_size_14", mk(vocab, vocab_size=14), Err("vocab_size"))
    add(op, "vocab_size_neg", mk(vocab, vocab_size=-1), Err("vocab_size"))
    add(op, "vocab_size_bool", mk(vocab, vocab_size=True), Err("vocab_size"))
    add(op, "vocab_size_float", mk(vocab, vocab_size=11.0), Err("vocab_size"))
    add(op, "targets_beyond_vocab_size", mk(vocab, targets=lambda: ints([0, 5, 12, 3])), Err("targets"))
    add(op, "targets_int32_grad", mk(base, targets=lambda: ints(T, I32)), grad=xw)
    add(op, "targets_int16", mk(base, targets=lambda: ints([0, -1, 12, 3], I16)))
    add(op, "targets_uint8", mk(base, targets=lambda: ints(T, U8)))
    add(op, "targets_oob", mk(base, targets=lambda: ints([0, 13, 1, 2])), Err("targets"))
    add(op, "targets_int64_2pow32", mk(base, targets=lambda: ints([0, BIG, 1, 2])), Err("targets"))
    add(op, "targets_list", mk(base, targets=T), Err("targets"))
    add(op, "targets_float", mk(base, targets=lambda: ints(T).float()), Err("targets"))
    add(op, "targets_shape", mk(base, targets=lambda: ints([0, 1, 2])), Err("targets"))
    add(op, "x_int", mk(base, x=lambda: torch.ones(4, 8, dtype=I64)), Err("x"))
    add(op, "weight_int", mk(base, weight=lambda: torch.ones(13, 8, dtype=I32)), Err("weight"))
    add(op, "weight_3d", mk(base, weight=lambda: rnd(1, 13, 8)), Err("weight"))
    add(op, "weight_C_mismatch", mk(base, weight=lambda: rnd(13, 9)), Err("weight"))
    add(op, "x_list", mk(base, x=[[0.0] * 8] * 4), Err("x"))
    add(op, "weight_numpy", mk(base, weight=lambda: np.ones((13, 8), np.float32)), Err("weight"))
    add(op, "weight_fp16_grad", mk(base, weight=lambda: rnd(13, 8, seed=1, dtype=F16)), Ref(**TOL16), grad=xw)
    add(op, "x_fp16", mk(base, x=lambda: rnd(4, 8, dtype=F16)), Ref(atol=5e-3, rtol=5e-3))
    add(op, "x_float64", mk(base, x=lambda: rnd(4, 8, dtype=F64)), fp64_contract())
    add(op, "rows_0_grad", mk(base, x=lambda: rnd(0, 8), targets=lambda: ints([])), grad=xw)
    add(op, "rows_0_none_grad", mk(base, x=lambda: rnd(0, 8), targets=lambda: ints([]), reduction="none"), grad=xw)
    add(op, "C_0_grad", mk(base, x=lambda: rnd(4, 0), weight=lambda: rnd(13, 0)), grad=xw)
    add(op, "weight_V_0", mk(base, weight=lambda: rnd(0, 8), targets=lambda: ints([-1] * 4)), Err("weight"))
    add(op, "x_nan_grad", mk(base, x=lambda: put(rnd(4, 8), (2, 1), NAN)), grad=xw)
    add(op, "weight_class_row_nan", mk(base, weight=lambda: put(rnd(13, 8, seed=1), (7, 3), NAN)))
    add(op, "weight_padding_nan_grad", mk(vocab, weight=lambda: put(rnd(13, 8, seed=1), (12, 3), NAN)), grad=xw)
    add(op, "nan_in_ignored_row", mk(base, targets=lambda: ints([0, -1, 12, 3]), x=lambda: put(rnd(4, 8), (1, 0), NAN)))
    add(op, "x_transposed", mk(base, x=lambda: rnd(8, 4).t()))
    add(op, "weight_transposed_grad", mk(base, weight=lambda: rnd(8, 13, seed=1).t()), grad=xw)
    add(op, "x_3d", mk(base, x=lambda: rnd(2, 2, 8), targets=lambda: ints([[0, 5], [12, -1]])))
    add(op, "all_ignored_grad", mk(base, targets=lambda: ints([-1] * 4)), grad=xw)
    add(op, "targets_meta", mk(base, targets=lambda: meta(ints(T))), Err("targets"))
    add(op, "weight_meta", mk(base, weight=lambda: meta(rnd(13, 8))), Err("weight"))
    add(op, "reduction_bogus", mk(base, reduction="mean "), Err("reduction"))
    add(op, "softcap_nan", mk(base, softcap=NAN), Err("softcap"))
    add(op, "ignore_index_bool", mk(base, ignore_index=False), Err("ignore_index"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.linear_softcap_cross_entropy))


# ====================================================================================================================
# flash_attention
# ====================================================================================================================
def _attn_cases():
    op = "flash_attention"
    base = mk(lambda: {"q": rnd(1, 5, 4, 16), "k": rnd(1, 7, 2, 16, seed=1), "v": rnd(1, 7, 2, 16, seed=2)})
    qkv = ("q", "k", "v")

    def kv_packed():
        kv = rnd(1, 7, 4, 16, seed=1)
        return {"q": rnd(1, 5, 4, 16), "k": kv[:, :, :2], "v": kv[:, :, 2:]}

    add(op, "baseline", base)
    add(op, "baseline_grad", base, grad=qkv)
    add(op, "non_causal", mk(base, causal=False))
    add(op, "non_causal_Tq_gt_Tk_grad", mk(base, causal=False, q=lambda: rnd(1, 9, 4, 16)), grad=qkv)
    add(op, "window_2_grad", mk(base, window=2), grad=qkv)
    add(op, "window_0", mk(base, window=0))
    add(op, "window_huge", mk(base, window=1000))
    add(op, "q_3d", mk(base, q=lambda: rnd(5, 4, 16)), Err("q"))
    add(op, "k_5d", mk(base, k=lambda: rnd(1, 1, 7, 2, 16)), Err("k"))
    add(op, "v_int", mk(base, v=lambda: torch.ones(1, 7, 2, 16, dtype=I32)), Err("v"))
    add(op, "q_list", mk(base, q=[[[[0.0] * 16]]]), Err("q"))
    add(op, "k_numpy", mk(base, k=lambda: np.ones((1, 7, 2, 16), np.float32)), Err("k"))
    add(op, "v_python_float", mk(base, v=1.0), Err("v"))
    add(op, "v_fp16", mk(base, v=lambda: rnd(1, 7, 2, 16, dtype=F16)), Err("v"))
    add(op, "v_Tk_mismatch", mk(base, v=lambda: rnd(1, 6, 2, 16)), Err("v"))
    add(op, "k_B_mismatch", mk(base, k=lambda: rnd(2, 7, 2, 16), v=lambda: rnd(2, 7, 2, 16)), Err("k"))
    add(op, "k_D_mismatch", mk(base, k=lambda: rnd(1, 7, 2, 8), v=lambda: rnd(1, 7, 2, 8)), Err("k"))
    add(op, "gqa_3_over_2", mk(base, q=lambda: rnd(1, 5, 3, 16)), Err("heads"))
    add(op, "kv_heads_0", mk(base, k=lambda: rnd(1, 7, 0, 16), v=lambda: rnd(1, 7, 0, 16)), Err("heads"))
    add(op, "q_heads_0_grad", mk(base, q=lambda: rnd(1, 5, 0, 16)), grad=qkv)
    add(op, "Tq_gt_Tk_causal", mk(base, q=lambda: rnd(1, 8, 4, 16)), Err("Tq"))
    add(op, "Tq_0_grad", mk(base, q=lambda: rnd(1, 0, 4, 16)), grad=qkv)
    add(op, "B_0_grad", mk(base, q=lambda: rnd(0, 5, 4, 16), k=lambda: rnd(0, 7, 2, 16), v=lambda: rnd(0, 7, 2, 16)),
        grad=qkv)
    add(op, "Tk_0_non_causal", mk(base, causal=False, k=lambda: rnd(1, 0, 2, 16), v=lambda: rnd(1, 0, 2, 16)),
        Err("k|Tk|key|keys"))
    add(op, "Tq_0_Tk_0", mk(base, q=lambda: rnd(1, 0, 4, 16), k=lambda: rnd(1, 0, 2, 16), v=lambda: rnd(1, 0, 2, 16)))
    add(op, "D_0", mk(base, q=lambda: rnd(1, 5, 4, 0), k=lambda: rnd(1, 7, 2, 0), v=lambda: rnd(1, 7, 2, 0)),
        Err("head_dim|D"))
    add(op, "D_130", mk(base, q=lambda: rnd(1, 2, 2, 130), k=lambda: rnd(1, 3, 2, 130), v=lambda: rnd(1, 3, 2, 130)),
        per_path(Ref(), Err("head_dim")))
    add(op, "window_neg", mk(base, window=-1), Err("window"))
    add(op, "window_float", mk(base, window=2.0), Err("window"))
    add(op, "window_bool", mk(base, window=True), Err("window"))
    add(op, "window_non_causal", mk(base, window=2, causal=False), Err("window"))
    add(op, "scale_0", mk(base, scale=0.0))
    add(op, "scale_0_grad", mk(base, scale=0.0), grad=qkv)
    add(op, "scale_neg_grad", mk(base, scale=-0.5), grad=qkv)
    add(op, "scale_neg_non_causal", mk(base, scale=-1.0, causal=False))
    square = mk(base, q=lambda: rnd(1, 7, 4, 16))
    add(op, "scale_0_Tq_eq_Tk", mk(square, scale=0.0))
    add(op, "scale_neg_Tq_eq_Tk_grad", mk(square, scale=-0.5), grad=qkv)
    add(op, "scale_neg_Tq_eq_Tk_window_huge", mk(square, scale=-1.0, window=100))
    add(op, "scale_int_1", mk(base, scale=1))
    add(op, "scale_nan", mk(base, scale=NAN), Err("scale"))
    add(op, "scale_inf", mk(base, scale=INF), Err("scale"))
    add(op, "scale_bool", mk(base, scale=True), Err("scale"))
    add(op, "scale_str", mk(base, scale="0.25"), Err("scale"))
    add(op, "q_nan_last_row_grad", mk(base, q=lambda: put(rnd(1, 5, 4, 16), (0, 4, 1, 3), NAN)), grad=qkv)
    add(op, "k_nan_first_key", mk(base, k=lambda: put(rnd(1, 7, 2, 16, seed=1), (0, 0, 0, 0), NAN)))
    add(op, "v_nan_first_key_grad", mk(base, v=lambda: put(rnd(1, 7, 2, 16, seed=2), (0, 0, 1, 5), NAN)), grad=qkv)
    add(op, "k_inf_last_key", mk(base, k=lambda: put(rnd(1, 7, 2, 16, seed=1), (0, 6, 1, 2), INF)))
    add(op, "v_inf_first_key", mk(base, v=lambda: put(rnd(1, 7, 2, 16, seed=2), (0, 0, 0, 9), INF)))
    add(op, "q_transposed_grad", mk(base, q=lambda: rnd(1, 4, 5, 16).transpose(1, 2)), grad=qkv)
    add(op, "kv_packed_views", mk(kv_packed))
    add(op, "k_v_expanded_heads", mk(base, k=lambda: rnd(1, 7, 1, 16, seed=1).expand(1, 7, 2, 16),
                                     v=lambda: rnd(1, 7, 1, 16, seed=2).expand(1, 7, 2, 16)))
    add(op, "q_D_stride_2", mk(base, q=lambda: rnd(1, 5, 4, 32)[..., ::2]))
    add(op, "fp16", mk(base, q=lambda: rnd(1, 5, 4, 16, dtype=F16), k=lambda: rnd(1, 7, 2, 16, seed=1, dtype=F16),
                       v=lambda: rnd(1, 7, 2, 16, seed=2, dtype=F16)), Ref(**TOL16))
    add(op, "float64", mk(base, q=lambda: rnd(1, 5, 4, 16, dtype=F64), k=lambda: rnd(1, 7, 2, 16, seed=1, dtype=F64),
                          v=lambda: rnd(1, 7, 2, 16, seed=2, dtype=F64)), fp64_contract())
    add(op, "v_meta", mk(base, v=lambda: meta(rnd(1, 7, 2, 16))), Err("v"))
    add(op, "q_meta", mk(base, q=lambda: meta(rnd(1, 5, 4, 16))), Err("q"))
    add(op, "config_bogus", mk(base, config="h999"), Err("config"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.flash_attention))


# ====================================================================================================================
# paged_attention
# ====================================================================================================================
def _paged_base(dtype=F32):
    """2 sequences (9 and 5 tokens, 2 and 1 new query rows), pages of 4 tokens, 6 pages in the pool; page 2 of
    sequence 1's row and pages 2 are never read."""
    return {
        "q": rnd(2, 2, 4, 16, seed=1, dtype=dtype),
        "k_pages": rnd(6, 4, 2, 16, seed=2, dtype=dtype),
        "v_pages": rnd(6, 4, 2, 16, seed=3, dtype=dtype),
        "block_table": ints([[3, 0, 5], [1, 4, 2]], I32),
        "seq_lens": ints([9, 5], I32),
        "q_lens": ints([2, 1], I32),
    }


def _paged_cases():
    op = "paged_attention"
    base = mk(_paged_base)
    add(op, "baseline", base)
    add(op, "decode_q_lens_None", mk(base, q=lambda: rnd(2, 1, 4, 16, seed=1), q_lens=None))
    add(op, "window_1", mk(base, window=1))
    add(op, "window_0", mk(base, window=0))
    add(op, "num_splits_3", mk(base, num_splits=3))
    add(op, "bf16", mk(lambda: _paged_base(BF16)), Ref(**TOLBF))
    add(op, "fp16", mk(lambda: _paged_base(F16)), Ref(**TOL16))
    add(op, "float64", mk(lambda: _paged_base(F64)))
    add(op, "block_table_int64", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, 2]])))
    add(op, "lens_int64", mk(base, seq_lens=lambda: ints([9, 5]), q_lens=lambda: ints([2, 1])))
    add(op, "q_3d", mk(base, q=lambda: rnd(2, 2, 64)), Err("q"))
    add(op, "k_pages_3d", mk(base, k_pages=lambda: rnd(24, 2, 16)), Err("k_pages"))
    add(op, "v_pages_int", mk(base, v_pages=lambda: torch.ones(6, 4, 2, 16, dtype=I32)), Err("v_pages"))
    add(op, "q_list", mk(base, q=[[[[0.0] * 16]]]), Err("q"))
    add(op, "block_table_float", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, 2]]).float()),
        Err("block_table"))
    add(op, "block_table_int16", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, 2]], I16)), Err("block_table"))
    add(op, "block_table_list", mk(base, block_table=[[3, 0, 5], [1, 4, 2]]), Err("block_table"))
    add(op, "block_table_3_rows", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, 2], [0, 0, 0]], I32)),
        Err("block_table"))
    add(op, "block_table_1d", mk(base, block_table=lambda: ints([3, 0, 5], I32)), Err("block_table"))
    add(op, "seq_lens_float", mk(base, seq_lens=lambda: ints([9, 5]).float()), Err("seq_lens"))
    add(op, "seq_lens_shape", mk(base, seq_lens=lambda: ints([9, 5, 1], I32)), Err("seq_lens"))
    add(op, "q_lens_bool", mk(base, q_lens=lambda: ints([1, 1]).bool()), Err("q_lens"))
    add(op, "q_lens_list", mk(base, q_lens=[2, 1]), Err("q_lens"))
    add(op, "block_table_page_oob", mk(base, block_table=lambda: ints([[3, 6, 5], [1, 4, 2]], I32)),
        Err("block_table"))
    add(op, "block_table_neg_used", mk(base, block_table=lambda: ints([[3, 0, 5], [-1, 4, 2]], I32)),
        Err("block_table"))
    add(op, "block_table_neg_unused", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, -1]], I32)))
    add(op, "block_table_oob_unused", mk(base, block_table=lambda: ints([[3, 0, 5], [1, 4, 99]], I32)))
    add(op, "block_table_int64_2pow32", mk(base, block_table=lambda: ints([[3, BIG, 5], [1, 4, 2]])),
        Err("block_table"))
    add(op, "seq_lens_over_capacity", mk(base, seq_lens=lambda: ints([13, 5], I32)), Err("seq_lens"))
    add(op, "seq_lens_int64_2pow32", mk(base, seq_lens=lambda: ints([2**32 + 9, 5])), Err("seq_lens"))
    add(op, "seq_lens_neg", mk(base, seq_lens=lambda: ints([-1, 5], I32), q_lens=lambda: ints([0, 1], I32)),
        Err("seq_lens"))
    add(op, "q_lens_gt_Tq", mk(base, q_lens=lambda: ints([3, 1], I32)), Err("q_lens"))
    add(op, "q_lens_gt_seq_lens", mk(base, seq_lens=lambda: ints([9, 1], I32), q_lens=lambda: ints([2, 2], I32)),
        Err("q_lens"))
    add(op, "q_lens_neg", mk(base, q_lens=lambda: ints([2, -1], I32)), Err("q_lens"))
    add(op, "q_lens_int64_2pow32", mk(base, q_lens=lambda: ints([2**32 + 1, 1])), Err("q_lens"))
    add(op, "v_pages_fp16", mk(base, v_pages=lambda: rnd(6, 4, 2, 16, dtype=F16)), Err("v_pages"))
    add(op, "v_pages_shape", mk(base, v_pages=lambda: rnd(5, 4, 2, 16)), Err("v_pages"))
    add(op, "k_pages_non_contiguous", mk(base, k_pages=lambda: rnd(6, 4, 2, 32, seed=2)[..., ::2]), Err("k_pages"))
    add(op, "D_mismatch", mk(base, q=lambda: rnd(2, 2, 4, 8)), Err("head_dim|k_pages"))
    add(op, "gqa_3_over_2", mk(base, q=lambda: rnd(2, 2, 3, 16)), Err("heads"))
    add(op, "kv_heads_0", mk(base, k_pages=lambda: rnd(6, 4, 0, 16), v_pages=lambda: rnd(6, 4, 0, 16)),
        Err("heads"))
    add(op, "page_size_0", mk(base, k_pages=lambda: rnd(6, 0, 2, 16), v_pages=lambda: rnd(6, 0, 2, 16)),
        Err("page_size|k_pages"))
    add(op, "D_0", mk(base, q=lambda: rnd(2, 2, 4, 0), k_pages=lambda: rnd(6, 4, 2, 0),
                      v_pages=lambda: rnd(6, 4, 2, 0)), Err("head_dim"))
    add(op, "pages_0_nothing_cached", mk(base, k_pages=lambda: rnd(0, 4, 2, 16), v_pages=lambda: rnd(0, 4, 2, 16),
                                         seq_lens=lambda: ints([0, 0], I32), q_lens=lambda: ints([0, 0], I32)))
    add(op, "max_pages_0", mk(base, block_table=lambda: torch.zeros(2, 0, dtype=I32),
                              seq_lens=lambda: ints([0, 0], I32), q_lens=lambda: ints([0, 0], I32)))
    add(op, "B_0", mk(base, q=lambda: rnd(0, 2, 4, 16), block_table=lambda: torch.zeros(0, 3, dtype=I32),
                      seq_lens=lambda: ints([], I32), q_lens=lambda: ints([], I32)))
    add(op, "Tq_0", mk(base, q=lambda: rnd(2, 0, 4, 16), q_lens=lambda: ints([0, 0], I32)))
    add(op, "q_len_0_one_sequence", mk(base, q_lens=lambda: ints([2, 0], I32)))
    add(op, "window_neg", mk(base, window=-1), Err("window"))
    add(op, "window_float", mk(base, window=1.0), Err("window"))
    add(op, "window_bool", mk(base, window=True), Err("window"))
    add(op, "scale_nan", mk(base, scale=NAN), Err("scale"))
    add(op, "scale_inf", mk(base, scale=-INF), Err("scale"))
    add(op, "scale_bool", mk(base, scale=True), Err("scale"))
    add(op, "scale_0", mk(base, scale=0.0))
    add(op, "scale_neg", mk(base, scale=-0.5))
    add(op, "num_splits_0", mk(base, num_splits=0), Err("num_splits"))
    add(op, "num_splits_bool", mk(base, num_splits=True), Err("num_splits"))
    add(op, "q_nan", mk(base, q=lambda: put(rnd(2, 2, 4, 16, seed=1), (0, 1, 3, 2), NAN)))
    add(op, "k_nan_unused_slot", mk(base, k_pages=lambda: put(rnd(6, 4, 2, 16, seed=2), (4, 2, 0, 0), NAN)))
    add(op, "v_nan_unreferenced_page", mk(base, v_pages=lambda: put(rnd(6, 4, 2, 16, seed=3), (2, 1, 1, 1), NAN)))
    add(op, "v_nan_first_token", mk(base, v_pages=lambda: put(rnd(6, 4, 2, 16, seed=3), (3, 0, 0, 4), INF * 0)))
    add(op, "k_inf_last_token", mk(base, k_pages=lambda: put(rnd(6, 4, 2, 16, seed=2), (5, 0, 1, 7), INF)))
    add(op, "q_transposed_view", mk(base, q=lambda: rnd(2, 4, 2, 16, seed=1).transpose(1, 2)))
    add(op, "block_table_transposed_view", mk(base, block_table=lambda: ints([[3, 1], [0, 4], [5, 2]], I32).t()))
    add(op, "num_splits_3_q_len_0", mk(base, num_splits=3, q_lens=lambda: ints([0, 1], I32)))
    add(op, "block_table_meta", mk(base, block_table=lambda: meta(ints([[3, 0, 5], [1, 4, 2]], I32))),
        Err("block_table"))
    add(op, "seq_lens_meta", mk(base, seq_lens=lambda: meta(ints([9, 5], I32))), Err("seq_lens"))
    add(op, "q_meta", mk(base, q=lambda: meta(rnd(2, 2, 4, 16))), Err("q"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.paged_attention))


# ====================================================================================================================
# paged_kv_append
# ====================================================================================================================
def _append_cases():
    op = "paged_kv_append"
    base = mk(lambda: {"k_pages": rnd(3, 4, 2, 16), "v_pages": rnd(3, 4, 2, 16, seed=1), "k": rnd(3, 2, 16, seed=2),
                       "v": rnd(3, 2, 16, seed=3), "slots": ints([5, 0, 11])})
    add(op, "baseline", base)
    add(op, "slots_int32", mk(base, slots=lambda: ints([5, 0, 11], I32)))
    add(op, "slots_negative_skipped", mk(base, slots=lambda: ints([5, -1, 11])))
    add(op, "slots_eq_capacity", mk(base, slots=lambda: ints([5, 0, 12])), Err("slots"))
    add(op, "slots_int64_2pow32", mk(base, slots=lambda: ints([5, 2**32 + 1, 11])), Err("slots"))
    add(op, "slots_float", mk(base, slots=lambda: ints([5, 0, 11]).float()), Err("slots"))
    add(op, "slots_bool", mk(base, slots=lambda: ints([1, 0, 1]).bool()), Err("slots"))
    add(op, "slots_list", mk(base, slots=[5, 0, 11]), Err("slots"))
    add(op, "slots_shape", mk(base, slots=lambda: ints([5, 0])), Err("slots"))
    add(op, "slots_2d", mk(base, slots=lambda: ints([[5], [0], [11]])), Err("slots"))
    add(op, "k_fp16", mk(base, k=lambda: rnd(3, 2, 16, dtype=F16)), Err("k"))
    add(op, "k_shape", mk(base, k=lambda: rnd(3, 1, 16)), Err("k"))
    add(op, "v_shape", mk(base, v=lambda: rnd(2, 2, 16)), Err("v"))
    add(op, "k_2d", mk(base, k=lambda: rnd(3, 32)), Err("k"))
    add(op, "k_int", mk(base, k=lambda: torch.ones(3, 2, 16, dtype=I32)), Err("k"))
    add(op, "k_pages_list", mk(base, k_pages=[[0.0]]), Err("k_pages"))
    add(op, "k_pages_non_contiguous", mk(base, k_pages=lambda: rnd(3, 4, 2, 32)[..., ::2]), Err("k_pages"))
    add(op, "v_pages_shape", mk(base, v_pages=lambda: rnd(2, 4, 2, 16)), Err("v_pages"))
    add(op, "N_0", mk(base, k=lambda: rnd(0, 2, 16), v=lambda: rnd(0, 2, 16), slots=lambda: ints([])))
    add(op, "pages_0_all_skipped", mk(base, k_pages=lambda: rnd(0, 4, 2, 16), v_pages=lambda: rnd(0, 4, 2, 16),
                                      slots=lambda: ints([-1, -1, -1])))
    add(op, "kv_heads_0", mk(base, k_pages=lambda: rnd(3, 4, 0, 16), v_pages=lambda: rnd(3, 4, 0, 16),
                             k=lambda: rnd(3, 0, 16), v=lambda: rnd(3, 0, 16)))
    add(op, "k_nan", mk(base, k=lambda: put(rnd(3, 2, 16, seed=2), (1, 1, 3), NAN)))
    add(op, "k_transposed_view", mk(base, k=lambda: rnd(2, 3, 16, seed=2).transpose(0, 1)))
    add(op, "fp16", mk(base, k_pages=lambda: rnd(3, 4, 2, 16, dtype=F16), v_pages=lambda: rnd(3, 4, 2, 16, dtype=F16),
                       k=lambda: rnd(3, 2, 16, seed=2, dtype=F16), v=lambda: rnd(3, 2, 16, seed=3, dtype=F16)),
        Ref(atol=0, rtol=0))
    add(op, "slots_meta", mk(base, slots=lambda: meta(ints([5, 0, 11]))), Err("slots"))
    add(op, "k_meta", mk(base, k=lambda: meta(rnd(3, 2, 16))), Err("k"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.paged_kv_append))


# ====================================================================================================================
# gram, sym_update
# ====================================================================================================================
def _gram_cases():
    op = "gram"
    base = mk(lambda: {"x": rnd(5, 12)})
    add(op, "baseline", base)
    add(op, "stack", mk(base, x=lambda: rnd(2, 5, 12)))
    add(op, "tall", mk(base, x=lambda: rnd(12, 5)))
    add(op, "x_1d", mk(base, x=lambda: rnd(5)), Err("x"))
    add(op, "x_4d", mk(base, x=lambda: rnd(1, 2, 5, 12)), Err("x"))
    add(op, "x_int", mk(base, x=lambda: torch.ones(5, 12, dtype=I32)), Err("x"))
    add(op, "x_list", mk(base, x=[[1.0, 2.0]]), Err("x"))
    add(op, "x_numpy", mk(base, x=lambda: np.ones((5, 12), np.float32)), Err("x"))
    add(op, "x_float64", mk(base, x=lambda: rnd(5, 12, dtype=F64)), fp64_contract())
    add(op, "x_fp16", mk(base, x=lambda: rnd(5, 12, dtype=F16)), Ref(atol=1e-2, rtol=3e-3))
    add(op, "K_0", mk(base, x=lambda: rnd(0, 5, 12)))
    add(op, "m_0", mk(base, x=lambda: rnd(0, 12)))
    add(op, "n_0", mk(base, x=lambda: rnd(5, 0)))
    add(op, "x_nan", mk(base, x=lambda: put(rnd(5, 12), (2, 7), NAN)))
    add(op, "x_inf", mk(base, x=lambda: put(rnd(2, 5, 12), (1, 0, 3), INF)))
    add(op, "x_transposed", mk(base, x=lambda: rnd(12, 5).t()))
    add(op, "x_col_stride_2", mk(base, x=lambda: rnd(5, 24)[:, ::2]))
    add(op, "x_stack_permuted", mk(base, x=lambda: rnd(5, 2, 12).transpose(0, 1)))
    add(op, "x_requires_grad", base, per_path(Ref(), Err("backward|x")), grad=("x",))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.gram))

    op = "sym_update"
    base = mk(lambda: {"a": sym(6), "b": -1.5, "c": 0.5})
    add(op, "baseline", base)
    add(op, "stack", mk(base, a=lambda: sym(6, k=2)))
    add(op, "a_non_square", mk(base, a=lambda: rnd(6, 5)), Err("a"))
    add(op, "a_1d", mk(base, a=lambda: rnd(6)), Err("a"))
    add(op, "a_int", mk(base, a=lambda: torch.ones(6, 6, dtype=I64)), Err("a"))
    add(op, "a_list", mk(base, a=[[1.0]]), Err("a"))
    add(op, "b_bool", mk(base, b=True), Err("b"))
    add(op, "c_tensor", mk(base, c=lambda: torch.tensor(0.5)), Err("c"))
    add(op, "b_str", mk(base, b="-1.5"), Err("b"))
    add(op, "b_nan", mk(base, b=NAN), Err("b"))
    add(op, "c_inf", mk(base, c=INF), Err("c"))
    add(op, "b_int", mk(base, b=2))
    add(op, "m_0", mk(base, a=lambda: rnd(0, 0)))
    add(op, "K_0", mk(base, a=lambda: rnd(0, 6, 6)))
    add(op, "a_nan_symmetric", mk(base, a=lambda: put(put(sym(6), (1, 4), NAN), (4, 1), NAN)))
    add(op, "a_inf_diagonal", mk(base, a=lambda: put(sym(6), (2, 2), INF)))
    add(op, "a_transposed", mk(base, a=lambda: sym(6).t()))
    add(op, "a_col_stride_2", mk(base, a=lambda: torch.stack([sym(6), sym(6, seed=1)], -1).flatten(-2)[:, ::2]))
    add(op, "a_float64", mk(base, a=lambda: sym(6).double()), fp64_contract())
    add(op, "a_fp16", mk(base, a=lambda: sym(6).half()), Ref(atol=1e-2, rtol=3e-3))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.sym_update))


# ====================================================================================================================
# polar_express
# ====================================================================================================================
def _polar_cases():
    op = "polar_express"
    base = mk(lambda: {"g": rnd(6, 10)})
    tol = dict(atol=2e-4, rtol=2e-3)
    add(op, "baseline", base, Ref(**tol))
    add(op, "tall", mk(base, g=lambda: rnd(10, 6)), Ref(**tol))
    add(op, "stack", mk(base, g=lambda: rnd(2, 6, 10)), Ref(**tol))
    add(op, "steps_0", mk(base, steps=0))
    add(op, "steps_3", mk(base, steps=3), Ref(**tol))
    add(op, "steps_6", mk(base, steps=6), Err("steps"))
    add(op, "steps_neg", mk(base, steps=-1), Err("steps"))
    add(op, "steps_bool", mk(base, steps=True), Err("steps"))
    add(op, "steps_float", mk(base, steps=2.0), Err("steps"))
    add(op, "g_1d", mk(base, g=lambda: rnd(6)), Err("g"))
    add(op, "g_int", mk(base, g=lambda: torch.ones(6, 10, dtype=I32)), Err("g"))
    add(op, "g_list", mk(base, g=[[1.0, 0.0]]), Err("g"))
    add(op, "g_numpy", mk(base, g=lambda: np.ones((6, 10), np.float32)), Err("g"))
    add(op, "g_float64", mk(base, g=lambda: rnd(6, 10, dtype=F64)), fp64_contract())
    add(op, "g_fp16", mk(base, g=lambda: rnd(6, 10, dtype=F16)), Ref(atol=2e-2, rtol=2e-2))
    add(op, "K_0", mk(base, g=lambda: rnd(0, 6, 10)))
    add(op, "m_0", mk(base, g=lambda: rnd(0, 10)))
    add(op, "n_0", mk(base, g=lambda: rnd(2, 6, 0)))
    add(op, "g_nan", mk(base, g=lambda: put(rnd(6, 10), (3, 3), NAN)))
    add(op, "g_inf", mk(base, g=lambda: put(rnd(2, 6, 10), (1, 2, 2), INF)))
    add(op, "g_zero", mk(base, g=lambda: torch.zeros(6, 10)))
    add(op, "g_scaled_1e18", mk(base, g=lambda: rnd(6, 10, scale=1e18)), Ref(**tol))
    add(op, "g_1e25_overflows_fp32", mk(base, g=lambda: rnd(6, 10, scale=1e25)),
        Ref(oracle=fp32_ref(kernels.polar_express_ref), **tol))
    add(op, "g_transposed", mk(base, g=lambda: rnd(10, 6).t()), Ref(**tol))
    add(op, "g_requires_grad", base, per_path(Ref(**tol), Err("backward|g")), grad=("g",))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.polar_express))


# ====================================================================================================================
# muon_pre, muon_post, muon_step_, adamw_step_
# ====================================================================================================================
def _muon_cases():
    op = "muon_pre"
    base = mk(lambda: {"grad_stack": rnd(2, 6, 10), "momentum_buf": rnd(2, 6, 10, seed=1, scale=0.1), "mu": 0.95})
    add(op, "baseline", base)
    add(op, "tall", mk(base, grad_stack=lambda: rnd(2, 10, 6), momentum_buf=lambda: rnd(2, 10, 6, seed=1)))
    add(op, "out_dtype_fp16", mk(base, out_dtype=F16), Ref(**TOL16))
    add(op, "out_dtype_float64", mk(base, out_dtype=F64))
    add(op, "mu_nan", mk(base, mu=NAN), Err("mu"))
    add(op, "mu_1_5", mk(base, mu=1.5), Err("mu"))
    add(op, "mu_neg", mk(base, mu=-0.1), Err("mu"))
    add(op, "mu_bool", mk(base, mu=True), Err("mu"))
    add(op, "mu_str", mk(base, mu="0.95"), Err("mu"))
    add(op, "mu_0", mk(base, mu=0.0))
    add(op, "mu_1", mk(base, mu=1.0))
    add(op, "grad_2d", mk(base, grad_stack=lambda: rnd(6, 10), momentum_buf=lambda: rnd(6, 10)), Err("grad_stack"))
    add(op, "grad_int", mk(base, grad_stack=lambda: torch.ones(2, 6, 10, dtype=I32)), Err("grad_stack"))
    add(op, "grad_list", mk(base, grad_stack=[[[0.0]]]), Err("grad_stack"))
    add(op, "grad_non_contiguous", mk(base, grad_stack=lambda: rnd(2, 10, 6).transpose(1, 2)), Err("grad_stack"))
    add(op, "grad_fp16", mk(base, grad_stack=lambda: rnd(2, 6, 10, dtype=F16)))
    add(op, "grad_float64", mk(base, grad_stack=lambda: rnd(2, 6, 10, dtype=F64)))
    add(op, "buf_fp16", mk(base, momentum_buf=lambda: rnd(2, 6, 10, dtype=F16)), Err("momentum_buf"))
    add(op, "buf_shape", mk(base, momentum_buf=lambda: rnd(2, 6, 9)), Err("momentum_buf"))
    add(op, "buf_non_contiguous", mk(base, momentum_buf=lambda: rnd(2, 10, 6).transpose(1, 2)), Err("momentum_buf"))
    add(op, "buf_numpy", mk(base, momentum_buf=lambda: np.zeros((2, 6, 10), np.float32)), Err("momentum_buf"))
    add(op, "out_dtype_int", mk(base, out_dtype=I32), Err("out_dtype"))
    add(op, "out_dtype_str", mk(base, out_dtype="bfloat16"), Err("out_dtype"))
    add(op, "K_0", mk(base, grad_stack=lambda: rnd(0, 6, 10), momentum_buf=lambda: rnd(0, 6, 10)))
    add(op, "m_0", mk(base, grad_stack=lambda: rnd(2, 0, 10), momentum_buf=lambda: rnd(2, 0, 10)))
    add(op, "n_0", mk(base, grad_stack=lambda: rnd(2, 6, 0), momentum_buf=lambda: rnd(2, 6, 0)))
    add(op, "grad_nan", mk(base, grad_stack=lambda: put(rnd(2, 6, 10), (1, 2, 3), NAN)))
    add(op, "grad_inf", mk(base, grad_stack=lambda: put(rnd(2, 6, 10), (0, 5, 9), INF)))
    add(op, "grad_zero_row", mk(base, grad_stack=lambda: put(rnd(2, 6, 10), (0, 1), 0.0), mu=0.0))
    add(op, "buf_meta", mk(base, momentum_buf=lambda: meta(rnd(2, 6, 10))), Err("momentum_buf"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.muon_pre))

    op = "muon_post"
    base = mk(lambda: {"X": rnd(2, 6, 10), "params_stack": rnd(2, 6, 10, seed=1),
                       "second_buf": rnd(2, 1, 10, seed=2).abs(), "lr": 0.02, "wd": 0.1, "beta2": 0.95})
    add(op, "baseline", base)
    add(op, "tall", mk(base, X=lambda: rnd(2, 10, 6), params_stack=lambda: rnd(2, 10, 6, seed=1),
                       second_buf=lambda: rnd(2, 10, 1, seed=2).abs()))
    add(op, "square", mk(base, X=lambda: rnd(2, 6, 6), params_stack=lambda: rnd(2, 6, 6, seed=1),
                         second_buf=lambda: rnd(2, 6, 1, seed=2).abs()))
    add(op, "X_fp16", mk(base, X=lambda: rnd(2, 6, 10, dtype=F16)), Ref(atol=1e-4, rtol=1e-3))
    add(op, "X_bf16", mk(base, X=lambda: rnd(2, 6, 10, dtype=BF16)), Ref(atol=1e-4, rtol=1e-3))
    add(op, "lr_nan", mk(base, lr=NAN), Err("lr"))
    add(op, "lr_inf", mk(base, lr=INF), Err("lr"))
    add(op, "lr_neg", mk(base, lr=-0.02), Err("lr"))
    add(op, "lr_str", mk(base, lr="0.02"), Err("lr"))
    add(op, "lr_0", mk(base, lr=0.0))
    add(op, "wd_nan", mk(base, wd=NAN), Err("wd"))
    add(op, "wd_neg", mk(base, wd=-0.1), Err("wd"))
    add(op, "beta2_nan", mk(base, beta2=NAN), Err("beta2"))
    add(op, "beta2_1_5", mk(base, beta2=1.5), Err("beta2"))
    add(op, "beta2_neg", mk(base, beta2=-0.5), Err("beta2"))
    add(op, "X_2d", mk(base, X=lambda: rnd(6, 10)), Err("X"))
    add(op, "X_int", mk(base, X=lambda: torch.ones(2, 6, 10, dtype=I32)), Err("X"))
    add(op, "X_list", mk(base, X=[[[0.0]]]), Err("X"))
    add(op, "X_non_contiguous", mk(base, X=lambda: rnd(2, 10, 6).transpose(1, 2)), Err("X"))
    add(op, "params_fp16", mk(base, params_stack=lambda: rnd(2, 6, 10, dtype=F16)), Err("params_stack"))
    add(op, "params_shape", mk(base, params_stack=lambda: rnd(2, 6, 9)), Err("params_stack"))
    add(op, "params_non_contiguous", mk(base, params_stack=lambda: rnd(2, 10, 6).transpose(1, 2)),
        Err("params_stack"))
    add(op, "second_buf_row_orientation", mk(base, second_buf=lambda: rnd(2, 6, 1).abs()), Err("second_buf"))
    add(op, "second_buf_fp16", mk(base, second_buf=lambda: rnd(2, 1, 10, dtype=F16).abs()), Err("second_buf"))
    add(op, "K_0", mk(base, X=lambda: rnd(0, 6, 10), params_stack=lambda: rnd(0, 6, 10),
                      second_buf=lambda: rnd(0, 1, 10)))
    add(op, "m_0", mk(base, X=lambda: rnd(2, 0, 10), params_stack=lambda: rnd(2, 0, 10),
                      second_buf=lambda: rnd(2, 1, 10).abs()), Err("X"))
    add(op, "n_0", mk(base, X=lambda: rnd(2, 6, 0), params_stack=lambda: rnd(2, 6, 0),
                      second_buf=lambda: rnd(2, 6, 1).abs()), Err("X"))
    add(op, "X_nan", mk(base, X=lambda: put(rnd(2, 6, 10), (0, 1, 1), NAN)))
    add(op, "X_inf", mk(base, X=lambda: put(rnd(2, 6, 10), (1, 3, 4), INF)))
    add(op, "X_scaled_1e18", mk(base, X=lambda: rnd(2, 6, 10, scale=1e18)))
    add(op, "X_1e25_scale_invariant", mk(base, X=lambda: rnd(2, 6, 10, scale=1e25)), Ref())
    add(op, "X_float64", mk(base, X=lambda: rnd(2, 6, 10, dtype=F64)))
    add(op, "X_zero", mk(base, X=lambda: torch.zeros(2, 6, 10)))
    add(op, "params_nan", mk(base, params_stack=lambda: put(rnd(2, 6, 10, seed=1), (1, 0, 0), NAN)))
    add(op, "second_buf_nan", mk(base, second_buf=lambda: put(rnd(2, 1, 10, seed=2).abs(), (0, 0, 3), NAN)))
    add(op, "second_buf_meta", mk(base, second_buf=lambda: meta(rnd(2, 1, 10))), Err("second_buf"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.muon_post))

    op = "muon_step_"
    base = mk(lambda: {"grad_stack": rnd(2, 6, 10), "params_stack": rnd(2, 6, 10, seed=1),
                       "momentum_buf": rnd(2, 6, 10, seed=2, scale=0.1), "second_buf": rnd(2, 1, 10, seed=3).abs(),
                       "lr": 0.02, "mu": 0.95, "beta2": 0.95, "wd": 0.1})
    tol = dict(atol=1e-5, rtol=1e-4)
    add(op, "baseline", base, Ref(**tol))
    add(op, "ns_steps_2", mk(base, ns_steps=2), Ref(**tol))
    add(op, "ns_steps_6", mk(base, ns_steps=6), Err("ns_steps|steps"))
    add(op, "ns_steps_bool", mk(base, ns_steps=True), Err("ns_steps|steps"))
    add(op, "ns_dtype_int", mk(base, ns_dtype=I64), Err("ns_dtype|out_dtype"))
    add(op, "lr_nan", mk(base, lr=NAN), Err("lr"))
    add(op, "mu_nan", mk(base, mu=NAN), Err("mu"))
    add(op, "beta2_nan", mk(base, beta2=NAN), Err("beta2"))
    add(op, "wd_neg", mk(base, wd=-1.0), Err("wd"))
    add(op, "params_fp16", mk(base, params_stack=lambda: rnd(2, 6, 10, dtype=F16)), Err("params_stack"))
    add(op, "second_buf_meta", mk(base, second_buf=lambda: meta(rnd(2, 1, 10))), Err("second_buf"))
    add(op, "grad_nan", mk(base, grad_stack=lambda: put(rnd(2, 6, 10), (1, 4, 4), NAN)))
    add(op, "K_0", mk(base, grad_stack=lambda: rnd(0, 6, 10), params_stack=lambda: rnd(0, 6, 10),
                      momentum_buf=lambda: rnd(0, 6, 10), second_buf=lambda: rnd(0, 1, 10)))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.muon_step_))

    op = "adamw_step_"
    base = mk(lambda: {"p": rnd(3, 8), "grad": rnd(3, 8, seed=1), "exp_avg": rnd(3, 8, seed=2, scale=0.1),
                       "exp_avg_sq": rnd(3, 8, seed=3).abs() * 0.01, "step": 3, "lr": 1e-3, "beta1": 0.9,
                       "beta2": 0.999, "eps": 1e-8, "wd": 0.01})
    add(op, "baseline", base)
    add(op, "step_1", mk(base, step=1))
    add(op, "step_10_6", mk(base, step=10**6))
    add(op, "p_bf16", mk(base, p=lambda: rnd(3, 8, dtype=BF16)), Ref(atol=1e-2, rtol=1e-2))
    add(op, "p_fp16", mk(base, p=lambda: rnd(3, 8, dtype=F16)), Ref(**TOL16))
    add(op, "p_0dim", mk(base, p=lambda: torch.tensor(0.5), grad=lambda: torch.tensor(-0.25),
                         exp_avg=lambda: torch.tensor(0.01), exp_avg_sq=lambda: torch.tensor(0.02)))
    add(op, "grad_float64", mk(base, grad=lambda: rnd(3, 8, seed=1, dtype=F64)))
    add(op, "grad_fp16", mk(base, grad=lambda: rnd(3, 8, seed=1, dtype=F16)))
    add(op, "grad_transposed", mk(base, grad=lambda: rnd(8, 3, seed=1).t()))
    add(op, "eps_0", mk(base, eps=0.0))
    add(op, "beta1_1", mk(base, beta1=1.0), Err("beta1"))
    add(op, "beta2_1", mk(base, beta2=1.0), Err("beta2"))
    add(op, "beta1_nan", mk(base, beta1=NAN), Err("beta1"))
    add(op, "beta1_neg", mk(base, beta1=-0.1), Err("beta1"))
    add(op, "beta2_1_5", mk(base, beta2=1.5), Err("beta2"))
    add(op, "beta2_nan", mk(base, beta2=NAN), Err("beta2"))
    add(op, "eps_nan", mk(base, eps=NAN), Err("eps"))
    add(op, "eps_neg", mk(base, eps=-1e-8), Err("eps"))
    add(op, "eps_inf", mk(base, eps=INF), Err("eps"))
    add(op, "lr_nan", mk(base, lr=NAN), Err("lr"))
    add(op, "lr_inf", mk(base, lr=INF), Err("lr"))
    add(op, "lr_neg", mk(base, lr=-1e-3), Err("lr"))
    add(op, "wd_nan", mk(base, wd=NAN), Err("wd"))
    add(op, "wd_neg", mk(base, wd=-0.01), Err("wd"))
    add(op, "step_0", mk(base, step=0), Err("step"))
    add(op, "step_bool", mk(base, step=True), Err("step"))
    add(op, "step_float", mk(base, step=3.0), Err("step"))
    add(op, "p_int", mk(base, p=lambda: torch.ones(3, 8, dtype=I32)), Err("p"))
    add(op, "p_list", mk(base, p=[[0.0] * 8] * 3), Err("p"))
    add(op, "p_non_contiguous", mk(base, p=lambda: rnd(8, 3).t()), Err("p"))
    add(op, "grad_shape", mk(base, grad=lambda: rnd(3, 7)), Err("grad"))
    add(op, "grad_int", mk(base, grad=lambda: torch.ones(3, 8, dtype=I64)), Err("grad"))
    add(op, "grad_python_float", mk(base, grad=0.5), Err("grad"))
    add(op, "exp_avg_fp16", mk(base, exp_avg=lambda: rnd(3, 8, dtype=F16)), Err("exp_avg"))
    add(op, "exp_avg_bf16_fp32_p", mk(base, exp_avg=lambda: rnd(3, 8, dtype=BF16)), Err("exp_avg"))
    add(op, "bf16_p_and_moments", mk(base, p=lambda: rnd(3, 8, dtype=BF16),
                                     exp_avg=lambda: rnd(3, 8, seed=2, scale=0.1, dtype=BF16),
                                     exp_avg_sq=lambda: (rnd(3, 8, seed=3).abs() * 0.01).to(BF16)),
        Ref(atol=1e-2, rtol=1e-2))
    add(op, "exp_avg_shape", mk(base, exp_avg=lambda: rnd(24)), Err("exp_avg"))
    add(op, "exp_avg_non_contiguous", mk(base, exp_avg=lambda: rnd(8, 3).t()), Err("exp_avg"))
    add(op, "exp_avg_sq_numpy", mk(base, exp_avg_sq=lambda: np.zeros((3, 8), np.float32)), Err("exp_avg_sq"))
    add(op, "numel_0", mk(base, p=lambda: rnd(0, 8), grad=lambda: rnd(0, 8), exp_avg=lambda: rnd(0, 8),
                          exp_avg_sq=lambda: rnd(0, 8)))
    add(op, "grad_nan", mk(base, grad=lambda: put(rnd(3, 8, seed=1), (1, 1), NAN)))
    add(op, "grad_inf", mk(base, grad=lambda: put(rnd(3, 8, seed=1), (2, 6), INF)))
    add(op, "p_nan", mk(base, p=lambda: put(rnd(3, 8), (0, 3), NAN)))
    add(op, "exp_avg_sq_meta", mk(base, exp_avg_sq=lambda: meta(rnd(3, 8))), Err("exp_avg_sq"))
    add(op, "grad_meta", mk(base, grad=lambda: meta(rnd(3, 8))), Err("grad"))
    add(op, "impl_bogus", base, Err("impl"), run=bogus_impl(kernels.adamw_step_))


for _fn in (_rms_cases, _mix_cases, _rope_cases, _rope_qk_cases, _mlp_cases, _gemm_cases, _ce_cases, _lce_cases,
            _attn_cases, _paged_cases, _append_cases, _gram_cases, _polar_cases, _muon_cases):
    _fn()


@pytest.mark.parametrize("case, impl", _params())
def test_bad_input(case: Case, impl: str):
    expect = case.expectation(impl)
    if isinstance(expect, Err):
        _check_err(case, impl, expect)
    else:
        _check_ref(case, impl, expect)


def test_case_ids_unique():
    ids = [f"{c.op}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert {c.op for c in CASES} == set(OPS)
    public = {n for n in kernels.__all__
              if not n.endswith("_ref") and n not in ("resolve_impl", "POLAR_EXPRESS_COEFFS", "IMPLS", "tuned_configs",
                                                      "PagedPlan")}  # a plan of paged_attention, its own test
    assert public <= set(OPS), public - set(OPS)
