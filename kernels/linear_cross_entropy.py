"""The lm_head projection fused with softcapped cross-entropy, chunked over tokens: the N x V logits are
never held, only one chunk of R rows at a time (``linear_softcap_cross_entropy``). The row kernel and the
loss semantics are kernels/cross_entropy.py's.

For each chunk x_c (R, C) of the rows of x, with W = weight[:V] in x's dtype (V = vocab_size):
    logits_c = x_c @ W^T                (R, V), x's dtype, cuBLAS, into one buffer reused by every chunk
    CE kernel: loss per row; logits_c is overwritten by dloss/dlogits_c (fp32 math, see cross_entropy.py)
    grad_x_c = dlogits_c @ W            (R, C), x's dtype
    grad_W  += dlogits_c^T @ x_c        (V, C), accumulated in fp32 over the chunks
Rows of weight beyond V are never read and get a zero gradient.
FLOPs: 2*N*V*C for the logits, and 2*N*V*C each for grad_x and grad_W when gradients are wanted.
Bytes beyond the matmuls: the CE kernel's 3*N*V*s (s = bytes per element of x) and, per chunk, the fp32
grad_W accumulation (read+write 8*V*C, plus an fp32 (V, C) product for half-precision x on CUDA).

Gradients, by reduction:
  "mean"/"sum": with autograd on, the forward computes grad_x and grad_W along with the loss (each row's
      gradient is scaled by 1/count, count = non-ignored targets of the whole batch, or by 1); backward
      multiplies them by the upstream scalar.
  "none": the forward computes losses only; backward recomputes each chunk's logits and runs the kernel
      with the upstream gradient of each row as its scale (one extra matmul, arbitrary upstream grads).
  No autograd (torch.no_grad, or no input requiring grad): losses only, no gradient work.
Memory beyond inputs and gradients: one (R, V) chunk in x's dtype, W in x's dtype when weight has another
dtype (the fp32 master weight under bf16 x), the fp32 (Vp, C) grad_W accumulator (plus one fp32 (V, C)
product at a time for half-precision x on CUDA), 4 bytes of loss per row; nothing else grows with N.

The reference (``linear_softcap_cross_entropy_ref``, also what impl="torch" and CPUs run) is chunked the same
way in plain PyTorch, with smaller chunks (2^23 logits: R = 256 rows at V = 32768): per chunk, logits = x_c @ W^T
then ``softcap_cross_entropy_ref`` per row; backward recomputes each chunk under autograd and backpropagates the
chunk's upstream gradients, accumulating grad_W in fp32. Peak memory beyond inputs and gradients is a few
(R, V) temporaries, never N x V: at V = 32768 the unchunked form holds 0.8 GiB of fp32 logits per 2048 tokens,
and autograd keeps several such copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tritonchat.kernels._dispatch import check_same_device, check_tensor, dtype_error, use_kernel
from tritonchat.kernels._dispatch import compiled as compiled_fn
from tritonchat.kernels.cross_entropy import (
    ce_rows,
    check_ce_args,
    check_target_values,
    mean_scale,
    reduce_losses,
    softcap_cross_entropy_ref,
)

__all__ = ["linear_softcap_cross_entropy", "linear_softcap_cross_entropy_ref"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # x's dtypes the chunked path takes
_CHUNK_LOGITS = 1 << 27  # logits elements per chunk: 256 MiB in bf16 (R = 4096 rows at V = 32768)
_REF_CHUNK_LOGITS = 1 << 23  # the reference's chunk: 32 MiB per fp32 (R, V) temporary (R = 256 at V = 32768)


def chunk_rows(n: int, vocab: int, logits: int = _CHUNK_LOGITS) -> int:
    """Rows per chunk for N tokens and V classes, a chunk holding about `logits` (2^27) logits.

    R = floor(2^27 / V) rounded down to a multiple of 128 (at least 256), so a chunk of logits holds about
    2^27 elements whatever N is; each chunk's matmuls stay large (R x V x C, e.g. 4096 x 32768 x 1536) and
    grad_W is accumulated only ceil(N / R) times. The rows are then balanced across the ceil(N / R) chunks
    (rounded up to a multiple of 128, never above R) so that the last chunk is not a sliver. N <= R: one chunk.
    """
    cap = max(256, logits // vocab // 128 * 128)
    if n <= cap:
        return max(n, 1)
    per_chunk = -(-n // -(-n // cap))  # ceil(N / number of chunks)
    return min(cap, -(-per_chunk // 128) * 128)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, the product rounded once to fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # cuBLAS: half inputs, fp32 accumulate and output
    else:  # no fp32-output half matmul on CPU: the chunk's product is rounded to a's dtype first
        acc.add_(torch.mm(a, b))


def _chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    vocab: int,
    scale: torch.Tensor | None = None,
    row_scale: bool = False,
    need_x: bool = False,
    need_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Losses (N,) fp32; grad_x (N, C) in x's dtype if need_x; grad_W (Vp, C) fp32 if need_w.

    targets: (N,) contiguous. scale: None for losses only, else the fp32 gradient scale (one value, or (N,)
    per row when row_scale).
    """
    c = x.size(-1)
    x2 = x.reshape(x.shape[:-1].numel(), c).contiguous()  # reshape(-1, C) fails for C = 0
    w = weight[:vocab].to(x.dtype).contiguous()  # (V, C); a copy only when the dtypes differ
    n = x2.size(0)
    grads = scale is not None
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x2) if grads and need_x else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads and need_w else None
    rows = chunk_rows(n, vocab)
    buf = torch.empty((min(rows, n), vocab), dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        xc, lg = x2[start:end], buf[: end - start]
        torch.mm(xc, w.t(), out=lg)
        ce_rows(lg, targets[start:end], softcap, ignore_index, grad=lg if grads else None,
                 scale=scale[start:end] if row_scale else scale, row_scale=row_scale, out=losses[start:end])
        if gx is not None:
            torch.mm(lg, w, out=gx[start:end])
        if gw is not None:
            _add_product_fp32(gw[:vocab], lg.t(), xc)
    return losses, gx, gw


def _ref_chunk(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, softcap: float | None,
               ignore_index: int) -> torch.Tensor:
    """Per-row losses (R,) of one chunk: x (R, C) and w (V, C) in one dtype, t (R,)."""
    return softcap_cross_entropy_ref(F.linear(x, w), t, softcap, ignore_index, "none")


def _fused_chunk(logits: torch.Tensor, t: torch.Tensor, softcap: float | None, ignore_index: int,
                 scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's per-row losses (R,) and, when `scale` is given, dloss/dlogits (R, V) in logits' dtype.

    The softcapped cross-entropy and its analytic gradient, z = c tanh(l / c): loss = lse(z) - z[t] and
    dl = scale (softmax(z) - onehot(t)) (1 - (z / c)^2), zero on ignored rows (and their logits never reach it).
    Eager this is about ten passes over the (R, V) chunk; under torch.compile (CPU) one fused loop nest reads
    the logits twice (the row max and sum, then the gradient) and writes the gradient once."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = t != ignore_index
    tt = torch.where(valid, t, 0).long()[:, None]
    u = torch.tanh(z / softcap) if softcap else None
    if u is not None:
        z = softcap * u
    lse = torch.logsumexp(z, dim=-1)
    losses = torch.where(valid, lse - z.gather(1, tt)[:, 0], 0.0)
    if scale is None:
        return losses, None
    p = torch.exp(z - lse[:, None])
    p = p - (torch.arange(z.size(1), device=z.device)[None, :] == tt).to(p.dtype)
    if u is not None:
        p = p * (1 - u * u)
    w = torch.where(valid, scale.to(p.dtype).expand(valid.shape), 0.0)
    g = torch.where(valid[:, None], p * w[:, None], 0.0)
    return losses, g.to(logits.dtype)


def _fused_loss_and_grads(x, w, t, softcap, ignore_index, rows, scale, need_x, need_w, compile_chunks):
    """Losses (N,) and, with `scale` (fp32, one value or (N,) per row), grad_x (N, C) and grad_W (V, C) of the
    reference, chunk by chunk, from each chunk's analytic logit gradient: three matmuls per chunk (logits, grad_x,
    grad_W), no recomputation in backward."""
    chunk = compiled_fn(_fused_chunk) if compile_chunks else _fused_chunk
    n = x.size(0)
    losses = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    grads = scale is not None
    gx = torch.empty_like(x) if grads and need_x else None
    gw = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) \
        if grads and need_w else None
    per_row = grads and scale.numel() > 1
    for s in range(0, n, rows):
        xc = x[s:s + rows]
        sc = (scale[s:s + rows] if per_row else scale) if grads else None
        losses[s:s + rows], g = chunk(F.linear(xc, w), t[s:s + rows], softcap, ignore_index, sc)
        if gx is not None:
            torch.mm(g, w, out=gx[s:s + rows])
        if gw is not None:
            if g.dtype == gw.dtype:  # accumulated in place: no (V, C) temporary per chunk
                gw.addmm_(g.t(), xc)
            else:  # 16-bit chunks into the fp32 sum
                gw.add_(g.t() @ xc)
    return losses, gx, gw


class _FusedRefCE(torch.autograd.Function):
    """The reference's "mean"/"sum" loss with autograd: the forward computes the gradients along with the loss
    (one matmul fewer per chunk than recomputing them in backward); backward scales them by the upstream
    gradient."""

    @staticmethod
    def forward(ctx, x, w, t, softcap, ignore_index, rows, reduction, compile_chunks):
        need_x, need_w = ctx.needs_input_grad[:2]
        count, scale = mean_scale(t, ignore_index, reduction)
        scale = scale.to(torch.promote_types(x.dtype, torch.float32))
        if reduction == "mean":  # 1 / count in the math's dtype (float64 for float64 x)
            scale = count.to(scale.dtype).reciprocal().reshape(1)
        losses, gx, gw = _fused_loss_and_grads(x, w, t, softcap, ignore_index, rows, scale, need_x, need_w,
                                               compile_chunks)
        ctx.w_dtype = w.dtype
        ctx.save_for_backward(gx, gw)
        return reduce_losses(losses, count, t.shape, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        gx, gw = ctx.saved_tensors
        gx = None if gx is None else gx * dloss.to(gx.dtype)
        gw = None if gw is None else (gw * dloss).to(ctx.w_dtype)
        return gx, gw, None, None, None, None, None, None


class _ChunkedRefCE(torch.autograd.Function):
    """Per-row losses of x (N, C) @ w (V, C)^T, `rows` rows at a time; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, x, w, t, softcap, ignore_index, rows):
        ctx.save_for_backward(x, w, t)
        ctx.meta = (softcap, ignore_index, rows)
        losses = torch.empty(x.size(0), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for s in range(0, x.size(0), rows):
            losses[s:s + rows] = _ref_chunk(x[s:s + rows], w, t[s:s + rows], softcap, ignore_index)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlosses):
        x, w, t = ctx.saved_tensors
        softcap, ignore_index, rows = ctx.meta
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if need_x else None
        # grad_W summed over the chunks in fp32 (float64 stays float64), rounded to w's dtype once at the end
        acc = torch.promote_types(w.dtype, torch.float32)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        for s in range(0, x.size(0), rows):
            xc = x[s:s + rows].detach().requires_grad_(need_x)
            wc = w.detach().requires_grad_(need_w)
            with torch.enable_grad():
                losses = _ref_chunk(xc, wc, t[s:s + rows], softcap, ignore_index)
            wanted = [v for v, need in ((xc, need_x), (wc, need_w)) if need]
            grads = list(torch.autograd.grad(losses, wanted, dlosses[s:s + rows]))
            if need_x:
                gx[s:s + rows] = grads.pop(0)
            if need_w:
                gw += grads.pop(0)
        return gx, None if gw is None else gw.to(w.dtype), None, None, None, None


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, vocab):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.meta = (x.shape, weight.dtype, softcap, ignore_index, reduction, vocab, need_x, need_w)
        t = targets.reshape(-1).contiguous()
        if reduction == "none":
            ctx.save_for_backward(x, weight, t)
            return _chunked(x, weight, t, softcap, ignore_index, vocab)[0].view(targets.shape)
        count, scale = mean_scale(t, ignore_index, reduction)
        losses, gx, gw = _chunked(x, weight, t, softcap, ignore_index, vocab, scale, need_x=need_x, need_w=need_w)
        ctx.save_for_backward(gx, gw)
        return reduce_losses(losses, count, targets.shape, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        x_shape, w_dtype, softcap, ignore_index, reduction, vocab, need_x, need_w = ctx.meta
        if reduction == "none":
            x, weight, t = ctx.saved_tensors
            row = dloss.reshape(-1).float().contiguous()
            _, gx, gw = _chunked(x, weight, t, softcap, ignore_index, vocab, row, True, need_x, need_w)
        else:
            gx, gw = ctx.saved_tensors
            gx = None if gx is None else gx * dloss
            gw = None if gw is None else gw * dloss
        gx = None if gx is None else gx.view(x_shape)
        gw = None if gw is None else gw.to(w_dtype)
        return gx, gw, None, None, None, None, None


def linear_softcap_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    vocab_size: int | None = None,
    *,
    impl: str = "auto",
    check_targets: bool = True,
    compile_chunks: bool = False,
) -> torch.Tensor:
    """The lm_head projection fused with softcapped cross-entropy.

    x: (..., C) floating (bf16 on GPU; the kernel path takes fp32/bf16/fp16, float64 runs the reference).
    weight: (Vp, C), cast to x's dtype (fp32 master allowed). targets: (...) integer. vocab_size: keep only
    the first vocab_size logits (rows of weight beyond it are padding, never reach the loss and get a zero
    gradient); None keeps all Vp. Other arguments as in ``softcap_cross_entropy``. Returns fp32 (float64 for
    float64 x). Differentiable in x and weight. The kernel path never holds more than one chunk of logits
    (see kernels/linear_cross_entropy.py) and, without autograd, computes no gradient. compile_chunks: where the
    reference runs, compile its per-chunk math (see ``linear_softcap_cross_entropy_ref``).
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if weight.size(1) != x.size(-1):
        raise ValueError(f"weight must have shape (V, C) with C = x.size(-1) = {x.size(-1)}, got {tuple(weight.shape)}")
    if vocab_size is not None and not (type(vocab_size) is int and 1 <= vocab_size <= weight.size(0)):
        raise ValueError(f"vocab_size must be None or an int in [1, {weight.size(0)}], got {vocab_size!r}")
    vocab = weight.size(0) if vocab_size is None else vocab_size
    check_ce_args(torch.Size((*x.shape[:-1], vocab)), vocab, targets, softcap, ignore_index, reduction,
                  "weight (rows)" if vocab_size is None else "vocab_size")
    check_same_device(x=x, weight=weight, targets=targets)
    check_target_values(targets, vocab, ignore_index, check_targets)
    if not use_kernel(impl, x, weight, targets, unsupported=dtype_error("x", x, _KERNEL_DTYPES)):
        return linear_softcap_cross_entropy_ref(x, weight, targets, softcap, ignore_index, reduction, vocab_size,
                                                compile_chunks=compile_chunks)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearSoftcapCE.apply(x, weight, targets, softcap, ignore_index, reduction, vocab)
    t = targets.reshape(-1).contiguous()
    count, _ = mean_scale(t, ignore_index, reduction)
    return reduce_losses(_chunked(x, weight, t, softcap, ignore_index, vocab)[0], count, targets.shape, reduction)


def linear_softcap_cross_entropy_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    compile_chunks: bool = False,
) -> torch.Tensor:
    """Plain-PyTorch lm_head + softcapped cross-entropy. x (..., C); weight (Vp, C); targets (...).

    The rows are processed `chunk_size` at a time (None: about 2^23 logits per chunk, see ``chunk_rows``), so no
    N x V tensor is ever held: a "mean"/"sum" loss under autograd computes each chunk's analytic logit gradient in
    forward (three matmuls per chunk), "none" recomputes each chunk in backward; without autograd only the losses.
    chunk_size=0: the plain unchunked expression (full logits; what torch.compile baselines take). All give the
    same losses and, up to the order of the grad_W sum over chunks, the same gradients. compile_chunks: run each
    chunk's elementwise math (softcap, log-softmax, gradient) through torch.compile (one fused pass on a CPU).
    """
    if chunk_size is not None and not (type(chunk_size) is int and chunk_size >= 0):
        raise ValueError(f"chunk_size must be None or an int >= 0, got {chunk_size!r}")
    w = weight if vocab_size is None else weight[:vocab_size]  # padding rows are never read
    w = w.to(x.dtype)
    if chunk_size == 0:
        return softcap_cross_entropy_ref(F.linear(x, w), targets, softcap, ignore_index, reduction)
    c = x.size(-1)
    x2 = x.reshape(x.shape[:-1].numel(), c)  # reshape(-1, C) fails for C = 0
    t = targets.reshape(-1)
    rows = max(1, chunk_size or chunk_rows(x2.size(0), w.size(0), _REF_CHUNK_LOGITS))
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if reduction != "none" and grad:
        return _FusedRefCE.apply(x2, w, t, softcap, ignore_index, rows, reduction, compile_chunks)
    if not grad:
        losses = _fused_loss_and_grads(x2, w, t, softcap, ignore_index, rows, None, False, False, compile_chunks)[0]
    else:
        losses = _ChunkedRefCE.apply(x2, w, t, softcap, ignore_index, rows)
    if reduction == "none":
        return losses.reshape(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (t != ignore_index).sum().clamp(min=1)
