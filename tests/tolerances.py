"""Every numerical tolerance the tests compare with, one table, each bound with its reason.

    torch.testing.assert_close(got, want, **tol("norm", torch.float32))
    torch.testing.assert_close(g, w, **tol("attention_grad", dtype, scale=max(w.abs().max().item(), 1.0)))
    assert rel_err(got, want) < normwise("gram", torch.float32)  # rel_err from tests.helpers

A bound is (rtol, atol): elementwise |got - want| <= atol * scale + rtol * |want|. `scale` is the size an absolute
error is judged against: 1 by default (an absolute atol), max |want| where a family says its atol is relative to
the compared quantity's scale, 0 for a purely relative check.

Units: float32 eps 2^-23 = 1.2e-7; bfloat16 step 2^-7 = 7.8e-3 relative, float16 step 2^-10 = 9.8e-4 (a step is
the spacing at 1; rounding to nearest loses up to half of one, and the CPU interpreter casts fp32 -> bf16 toward
zero, which loses up to a whole step); float64 eps 2.2e-16. "Seen" figures are the worst observed on CPU (the
interpreter and the reference paths) when the table was written: each bound keeps a margin over them, and a test
that moves close to its bound has changed its numerics.
"""

from dataclasses import dataclass

import torch

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

BF16_STEP = 2.0**-7  # spacing of bfloat16 at 1: two roundings of one fp32 value land at most this far apart

EXACT = {"rtol": 0.0, "atol": 0.0}  # the same computation twice, or a property that holds bit for bit


@dataclass(frozen=True)
class Bound:
    rtol: float
    atol: float
    why: str


FLOAT64 = Bound(1e-12, 1e-12, "a float64 op against its formula restated in float64 (loops, explicit sums): only "
                "rounding, 2.2e-16 per operation, in another order. The deepest chain, five Polar-Express iterations "
                "with coefficients up to 22, stays under 5e-15; 1e-12 is 200x that and still 5e4x below a float32 "
                "rounding slipping into a float64 path.")

TOLERANCES: dict[str, dict[torch.dtype, Bound]] = {
    # ---- RMSNorm, and the mixed residual h = a*x + b*x0, y = RMSNorm(h): outputs against float64 math ----
    "norm": {
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "fp32 math, |y| ~ 1: mean(x^2) over C <= 2048 terms, then rsqrt; seen 1.8e-7 "
                   "(1.5 ulp), 1e-5 is ~80 ulps."),
        bf16: Bound(2e-2, 2e-2, "y rounded once to bf16 (up to a whole step, 7.8e-3, in the interpreter); against "
                    "the bf16 reference, which rounds a*x, b*x0 and h before normalizing, seen 9.8e-3."),
        f16: Bound(2e-3, 2e-3, "x rounded to fp16 (step 9.8e-4) against the fp32 reference on unrounded x, plus the "
                   "output's rounding: two steps, seen 4.6e-4."),
    },
    "norm_vs_ref": {  # the bf16 kernel against the bf16 reference, both rounding the same fp32 y once
        bf16: Bound(1e-2, 1e-2, "one step apart at most (2^-7 = 7.8e-3 relative: the interpreter truncates, torch "
                    "rounds to nearest); seen 4.9e-3."),
    },
    "norm_grad": {  # dx, dx0 (and, for the three-layer chain, its outputs): absolute, or relative to max |grad|
        f64: FLOAT64,
        f32: Bound(1e-4, 1e-4, "the backward adds a second row reduction, mean(dy * y), subtracts it from dy "
                   "(cancellation) and divides by rms(x): 10x the forward's bound; seen 8e-7 (three chained layers)."),
        bf16: Bound(3e-2, 3e-2, "dx returned in bf16 (one step, 7.8e-3) on a bf16 forward; seen 3.6e-3 (RMSNorm) "
                    "and 1.4e-2 of max |grad| (mixed norm against the bf16 reference, which rounds h in between)."),
    },
    "norm_scalar_grad": {  # da, db of the mixed norm, atol relative to sum |dh * x| (the size of what they sum)
        f32: Bound(0.0, 1e-6, "a sum over all N x C elements of dh * x, accumulated in fp32 from per-row partials: "
                   "~eps * sqrt(N) of the summed magnitudes; seen 1.6e-8."),
    },
    # ---- RoPE and the fused RoPE + QK-norm (+ scale): outputs against float64 math on the same rounded inputs ----
    "rope": {
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "a*cos + b*sin in fp32 (a few ulps), then QK-norm as 'norm' and the scale; seen "
                   "2e-7. Also apply_rope's gradient: rope is linear in x, its backward is the transposed rotation."),
        bf16: Bound(3e-2, 3e-2, "bf16 in and out; the reference rounds the rotated q/k to bf16 before the norm, "
                    "whose output is then rounded again: two roundings, the first amplified by 1/rms; seen 2.1e-2."),
    },
    "rope_grad": {  # absolute, or relative to max |grad| for rope_qk_norm
        f64: FLOAT64,
        f32: Bound(1e-4, 1e-4, "the norm's backward (see 'norm_grad') behind the rotation; seen 2.8e-6."),
        bf16: Bound(6e-2, 6e-2, "bf16 gradients through two bf16 roundings of the forward; seen 0.33 of the bound."),
    },
    # ---- attention: outputs absolute, gradients relative to max(|grad|, 1) (window 0 makes dq, dk exactly 0) ----
    "attention": {
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "scores over D <= 16, a softmax over <= 33 keys and P @ V in fp32: |y| ~ 1, seen "
                   "4.8e-7 (the paged reference: 3.6e-7)."),
        bf16: Bound(3e-2, 3e-2, "the oracle sees the same bf16 inputs; P rounded to bf16 for P @ V and y rounded "
                    "once (up to a step each); seen 4.9e-3."),
    },
    "attention_grad": {
        f64: FLOAT64,
        f32: Bound(1e-4, 1e-4, "the backward recomputes P and forms dS = P * (dP - rowsum(dO * O)), a cancellation, "
                   "then two more products; seen 6.5e-7."),
        bf16: Bound(5e-2, 5e-2, "dq, dk, dv rounded to bf16, dS formed from bf16-rounded P and dP; seen 2.1e-2."),
    },
    "attention_kernel": {  # the flash and paged kernels on long rows; compiled on CUDA where TRITON_INTERPRET=0
        f32: Bound(2e-5, 2e-5, "up to 300 keys in tiles (or KV splits), each rescaling the running sum and output "
                   "by exp2(m_old - m_new), one more rounding per tile; on a GPU exp2 is the approximate ex2 "
                   "instruction. Twice 'attention'; seen 4e-6 in the interpreter."),
        bf16: Bound(2e-2, 2e-2, "GPU only, atol relative to max(|y|, 1): bf16 q, k, v, P rounded to bf16 for P @ V, "
                    "y rounded once."),
        f16: Bound(2e-3, 2e-3, "fp16 pages against the fp32 reference on the same fp16 values: P and y rounded to "
                   "fp16 (step 9.8e-4): two steps; seen 2.4e-4."),
    },
    "attention_kernel_grad": {  # relative to max(|grad|, 1)
        f32: Bound(1e-4, 1e-4, "as 'attention_grad'; seen 1.9e-6 in the interpreter."),
        bf16: Bound(2e-2, 2e-2, "GPU only: bf16 gradients from bf16 dS and P tiles."),
    },
    # ---- softcapped cross-entropy: losses absolute, gradients relative to max |grad| ----
    "cross_entropy": {
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "logsumexp(z) - z[t] in fp32 over V <= 5001 logits (up to 1e4 before the cap), "
                   "mean or sum over a few rows: tens of ulps of a loss ~ 10; seen 3.2e-7."),
        bf16: Bound(1e-5, 1e-5, "the oracle is fed the same bf16-rounded logits, and the loss is computed and "
                    "returned in fp32: as accurate as fp32."),
    },
    "cross_entropy_grad": {
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "softmax(z) - onehot(t), times the upstream gradient (and 1/count), in fp32: a few "
                   "ulps of max |grad|; seen 0.02 of the bound."),
        bf16: Bound(1e-2, 1e-2, "the gradient is returned in the logits' dtype: one bf16 rounding, at most a step "
                    "(7.8e-3); seen 0.37 of the bound."),
    },
    "linear_cross_entropy": {  # fused with the lm_head: the logits are x @ W^T, computed in chunks
        f32: Bound(1e-5, 1e-5, "logits from an fp32 GEMM over C <= 384, then as 'cross_entropy'; seen 2.3e-6 with "
                   "logits up to 1e4."),
        bf16: Bound(2e-2, 2e-2, "bf16 x, W rounded to bf16 (by the op and the oracle): room for bf16 logits (a "
                    "step of 7.8e-3 on logits of a few units); the fp32-accumulated logits seen here give 4e-5."),
    },
    "linear_cross_entropy_grad": {  # relative to max |grad|
        f32: Bound(1e-4, 1e-4, "dx = dZ @ W and dW = dZ^T @ x: two more fp32 GEMMs (over V, over N) after the "
                   "softmax; seen 0.18 of the bound with logits up to 1e4."),
    },
    "linear_cross_entropy_chunked": {  # the chunked reference against its unchunked expression, same inputs
        f64: FLOAT64,
        f32: Bound(1e-6, 1e-5, "the same per-row fp32 math on row slices of the same GEMM (a BLAS blocks a slice "
                   "differently: a few ulps per loss ~ 5); seen 1.9e-6 on a sum of 40 losses (~200)."),
        bf16: Bound(1e-6, 1e-5, "bf16 logits of the same bf16 GEMM, losses in fp32: as fp32; seen 0."),
    },
    "linear_cross_entropy_chunked_grad": {  # relative to max |grad|
        f64: FLOAT64,
        f32: Bound(1e-5, 1e-5, "grad_W is a sum over chunks in fp32 instead of one GEMM over N: rounding in another "
                   "order, a few ulps per term; seen 3.5e-7."),
        bf16: Bound(1e-2, 1e-2, "the unchunked grad_W is one bf16 GEMM rounded once; the chunked one rounds each "
                    "chunk's bf16 product and sums in fp32: under a bf16 step (7.8e-3), seen 6.1e-3; grad_x (per "
                    "row) exact."),
    },
    # ---- the ReLU^2 MLP (two GEMMs) against float64 math; atol relative to max |want| ----
    "matmul": {
        f64: FLOAT64,
        f32: Bound(1e-4, 1e-4, "two fp32 GEMMs over K up to 1664 and 1536 around ReLU^2 (which doubles relative "
                   "errors): ~sqrt(K) ulps of max |y|; seen 4.2e-7."),
        bf16: Bound(5e-2, 5e-2, "bf16 operands (weights cast from fp32 masters), fp32 accumulation, the hidden "
                    "activation and the output rounded to bf16 (the interpreter truncates): seen 4.8e-3."),
        f16: Bound(1e-2, 1e-2, "as bf16 with fp16's 9.8e-4 step: seen 4e-4."),
    },
    # ---- one computation against another in the same precision ----
    "same_math": {  # atol relative to the result's scale where a test passes one
        f32: Bound(1e-5, 1e-5, "a kernel against the fp32 reference, or one matrix alone against the same matrix "
                   "in a stack: the same fp32 products summed in another order; seen 3.2e-7 (0 where the "
                   "interpreter sums as torch does)."),
    },
    "any_op": {
        f32: Bound(1e-4, 1e-4, "every public op, kernel against reference on tiny fp32 inputs: the loosest fp32 "
                   "output bound of the ops ('matmul'); seen 9e-7."),
    },
    "float64_few_flops": {
        f64: Bound(1e-14, 1e-14, "a handful of float64 operations on O(1) values (h = a*x + b*x0, a scale of 3): "
                   "a few ulps of 2.2e-16; seen exact."),
    },
    # ---- Polar Express (five iterations of X <- aX + b (X X^T) X + c (X X^T)^2 X), |X| <= ~1.2, absolute ----
    "polar_express": {
        f64: FLOAT64,
        f32: Bound(5e-5, 5e-5, "coefficients up to 22 amplify fp32 rounding at every iteration; seen 4.3e-6 (and "
                   "7.7e-7 between the wide and tall orientations)."),
        bf16: Bound(1e-1, 1e-1, "every product rounded to bf16 over five iterations: errors up to 7e-2 seen; the "
                    "bf16 path's real check is its spectrum (test_singular_values_near_one)."),
    },
    # ---- optimizer steps (Muon, NorMuon, AdamW, fused against the reference); atol x the compared state's size ----
    "optimizer_step": {
        f32: Bound(1e-6, 1e-7, "elementwise fp32 updates (momentum lerps, decoupled decay, the AdamW step): a few "
                   "ulps relative; atol = 1e-7 x scale for entries a lerp cancels towards 0, scale the typical size "
                   "of the state (1 for parameters, 1e-2 for moments of 1e-2 gradients, 1e-4 for their squares); "
                   "seen 0.57 of the bound (AdamW's first moment)."),
        bf16: Bound(BF16_STEP, 0.0, "bf16 parameter storage: the kernel's and torch's stores of one fp32 update are "
                    "at most one step apart (the interpreter rounds toward zero, torch to nearest); seen a full step."),
    },
    "optimizer_normalized": {
        f32: Bound(1e-5, 1e-6, "through a normalization: Muon's row equilibration (row norms), NorMuon's 1/sqrt(buf2) "
                   "per row, AdamW's m / (sqrt(v) + eps), the same steps on gradients summed in another order: a "
                   "row reduction and a division, 1e-5 relative; atol = 1e-6 x scale (0: purely relative, for norms "
                   "and second moments)."),
        bf16: Bound(BF16_STEP, 1e-6, "X returned in bf16: one step apart at most (interpreter truncation against "
                    "torch's rounding to nearest); seen a full step."),
    },
    "optimizer_polar": {
        f32: Bound(1e-4, 1e-9, "NorMuon's second moment of the Polar-Express output, X itself ~1e-5 relative after "
                   "five fp32 iterations (see 'polar_express'): 1e-4; atol = 1e-9 x scale (buf2 ~ 1e-2 or 1e-3)."),
    },
    # ---- a tiny model end to end (impl='triton' under the interpreter against impl='torch'), fp32 ----
    "model_loss": {
        f32: Bound(1e-5, 0.0, "each op within its own fp32 bound, errors averaged over the tokens of a loss ~ 5, "
                   "over up to three optimizer steps: 1e-5 relative; seen 1e-7."),
    },
    "model_grad": {
        f32: Bound(1e-4, 1e-6, "every parameter's gradient: the 1e-4 gradient bounds of the ops it chains; atol "
                   "1e-6 for gradients near 0; seen 0.04 of the bound."),
    },
    "model_logits": {
        f32: Bound(1e-4, 1e-4, "logits of a 2-layer model fed through the paged KV cache in chunks against one full "
                   "forward: the same math batched differently; seen 2.8e-6."),
    },
}

# Normwise relative errors, ||got - want||_F / ||want||_F, for the matrix-function kernels.
NORMWISE: dict[str, dict[torch.dtype, tuple[float, str]]] = {
    "gram": {  # X X^T and b A + c A A (upper tiles, mirrored)
        f32: (1e-5, "fp32 products, fp32 accumulation over n <= 64 terms: ~1e-7."),
        bf16: (2e-2, "16-bit inputs, fp32 accumulation, output rounded to bf16: a few times its step 7.8e-3."),
        f16: (2e-3, "as bf16 with fp16's step 9.8e-4."),
    },
    "polar_express": {
        f32: (1e-4, "fp32 through five iterations whose coefficients reach 22: ~3e-6 seen."),
        bf16: (8e-2, "16-bit storage between the products; the first iteration (b = -22, c = 16) amplifies "
                     "rounding: this path and the eager reference both land near 5%."),
        f16: (1e-2, "as bf16, near 0.3% with fp16's finer step."),
    },
    "polar_express_few_steps": {  # steps=0 (the normalization alone) or 2
        f32: (1e-5, "no or two iterations: the accuracy of the Gram products themselves."),
    },
}


def tol(family: str, dtype: torch.dtype, *, scale: float = 1.0) -> dict[str, float]:
    """assert_close keywords for `family` at `dtype`: {"rtol": rtol, "atol": atol * scale}."""
    bound = _lookup(TOLERANCES, family, dtype)
    return {"rtol": bound.rtol, "atol": bound.atol * float(scale)}


def normwise(family: str, dtype: torch.dtype) -> float:
    """The bound on ||got - want||_F / ||want||_F for `family` at `dtype`."""
    return _lookup(NORMWISE, family, dtype)[0]


def _lookup(table, family, dtype):
    try:
        return table[family][dtype]
    except KeyError:
        rows = {name: sorted(str(d).removeprefix("torch.") for d in by_dtype) for name, by_dtype in table.items()}
        raise KeyError(f"no tolerance for ({family!r}, {dtype}); the table has {rows}") from None
