"""The GPT of the nanochat recipe: one dial (depth), no biases, fp32 master weights.

Reads top to bottom: config, helpers, attention, MLP, block, GPT. The parameter names and
shapes are the checkpoint contract (SPEC §2); the math is SPEC §3. Ops go through the public
functions of `kernels` with the model's `impl`, resolved once when the model is built
(`build_model(impl="auto" | "torch" | "triton")`): "triton" runs every op's Triton kernel, "torch"
the PyTorch references.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tritonchat import kernels

HEAD_DIM = 128
VE_GATE_CHANNELS = 12  # leading channels of the attention input that drive the value-embedding gate
SMEAR_CHANNELS = 24  # leading channels of the embedding that drive the smear gate
SOFTCAP = 15.0
ROPE_BASE = 100_000


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.n_embd != self.n_head * HEAD_DIM:
            raise ValueError(f"n_embd ({self.n_embd}) must equal n_head * {HEAD_DIM} ({self.n_head * HEAD_DIM})")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        self.window_pattern = self.window_pattern.upper()

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> GPTConfig:
        """n_embd = depth*64 rounded up to a multiple of 128; heads of 128; everything else default."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        n_embd = -(-depth * 64 // HEAD_DIM) * HEAD_DIM
        n_head = n_embd // HEAD_DIM
        kw = dict(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head)
        kw.update(overrides)
        return cls(**kw)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    def to_dict(self) -> dict:
        return asdict(self)


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer attention window: L = sequence_len, S = ceil(T/4/128)*128; last layer always L."""
    T = config.sequence_len
    short = min(T, -(-T // (4 * 128)) * 128)
    pattern = config.window_pattern
    sizes = [T if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = T
    return sizes


def has_value_embed(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers carry a value embedding, the last one always."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    return kernels.rms_norm(x, impl=impl)


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the activation dtype in forward."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        C = config.n_embd
        self.c_q = Linear(C, self.n_head * HEAD_DIM)
        self.c_k = Linear(C, self.n_kv_head * HEAD_DIM)
        self.c_v = Linear(C, self.n_kv_head * HEAD_DIM)
        self.c_proj = Linear(C, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embed(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window: int, impl: str, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, HEAD_DIM)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, HEAD_DIM)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, HEAD_DIM)  # (B, T, Hkv, D)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, HEAD_DIM)
        q, k = kernels.rope_qk_norm(q, k, cos, sin, scale=1.2, impl=impl)
        if cache is None:
            y = kernels.flash_attention(q, k, v, causal=True, window=window, impl=impl)  # (B, T, H, D)
        else:  # append this chunk's k, v to the cache's pages, then attend over each whole sequence
            y = cache.attend(self.layer_idx, q, k, v, window)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        return kernels.relu2_mlp(x, self.c_fc.weight, self.c_proj.weight, impl=impl)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, x_normed, ve, cos, sin, window: int, impl: str, cache=None) -> torch.Tensor:
        """x: the residual stream entering the block; x_normed = norm(x), made by the fused residual entry."""
        x = x + self.attn(x_normed, ve, cos, sin, window, impl, cache)
        return x + self.mlp(norm(x, impl), impl)


class GPT(nn.Module):
    """Build on the meta device, then `to_empty(device=...)` and `init_weights()` (see `build_model`)."""

    def __init__(self, config: GPTConfig, impl: str = "torch") -> None:
        """impl: "torch" or "triton", already resolved for the device (`build_model` resolves "auto")."""
        super().__init__()
        if impl not in ("torch", "triton"):
            raise ValueError(f"GPT takes impl='torch' or 'triton' (build_model resolves 'auto'), got {impl!r}")
        self.config, self.impl = config, impl
        self.check_ids = True  # validate token ids and targets in forward (see _check_idx)
        self.recompute = False  # training: keep only each block's input, recompute the rest in backward
        self.activation_dtype: torch.dtype | None = None  # None: the embedding tables' dtype
        self.compile_ops = False  # the reference path's loss chunks under torch.compile (see compile_reference)
        self._compiled_hidden = None  # torch.compile(self._hidden), set by compile_reference
        self.flat_decode = True  # cached steps on the PyTorch path through _cached_layers (False: the blocks)
        L, C, Vp = config.n_layer, config.n_embd, config.padded_vocab_size
        kv_dim = config.n_kv_head * HEAD_DIM
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(Vp, C), h=nn.ModuleList(Block(config, i) for i in range(L)))
        )
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(Vp, kv_dim) for i in range(L) if has_value_embed(i, L)}
        )
        self.lm_head = Linear(C, Vp)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.windows = window_sizes(config)
        # Rotary tables for 10x the training length (enough for long generations); not saved.
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_seq_len, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of angle t * base^(-2j/D), shape (1, seq_len, 1, D/2), fp32."""
        j = torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROPE_BASE ** (j / HEAD_DIM))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        angle = torch.outer(t, inv_freq)
        return angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, compute_dtype: torch.dtype | None = None) -> None:
        """SPEC §4 initialization; embeddings are stored in the compute dtype (bf16 on GPU)."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3) / math.sqrt(C)
        self.transformer.wte.weight.normal_(0.0, 0.8)
        self.lm_head.weight.normal_(0.0, 0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                lin.weight.uniform_(-s, s)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02)
        for emb in self.value_embeds.values():
            emb.weight.uniform_(-s, s)
        self.smear_gate.weight.uniform_(0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        i = torch.arange(L, dtype=torch.float32)
        self.resid_lambdas.copy_(1.15 - 0.10 * i / max(L - 1, 1))
        self.x0_lambdas.copy_(0.20 - 0.15 * i / max(L - 1, 1))
        cos, sin = self._rotary_tables(self.rotary_seq_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        if compute_dtype is not None:
            self.set_compute_dtype(compute_dtype)

    def set_compute_dtype(self, dtype: torch.dtype, embedding_dtype: torch.dtype | None = None) -> None:
        """Activations in `dtype`; the embedding tables stored in `embedding_dtype` (default: `dtype`, SPEC §3) and
        cast to `dtype` on lookup. Linear weights stay fp32 masters."""
        emb = dtype if embedding_dtype is None else embedding_dtype
        self.transformer.wte.to(dtype=emb)
        self.value_embeds.to(dtype=emb)
        self.activation_dtype = None if emb == dtype else dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activation dtype."""
        return self.activation_dtype or self.transformer.wte.weight.dtype

    # ---- accounting -------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts by group; `scaling` = transformer.h + lm_head (what the recipe scales with)."""
        h = sum(p.numel() for p in self.transformer.h.parameters())
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "transformer_h": h,
            "lm_head": self.lm_head.weight.numel(),
            "scalars": sum(p.numel() for n, p in self.named_parameters() if "lambda" in n or n.startswith("smear")),
        }
        counts["scaling"] = h + counts["lm_head"]
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def flops_per_token(self) -> int:
        """6 * (weights of every Linear, lm_head included) + sum over layers of 12 * H * D * min(window, T).

        Counted from the modules' declared shapes, so swapping a Linear's implementation keeps the count."""
        linear = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_head * HEAD_DIM * min(w, T) for w in self.windows)
        return 6 * linear + attn

    # ---- forward ----------------------------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor, token_range: tuple[int, int] | None = None) -> None:
        """token_range: the ids' (min, max) when the caller has them on the host (a cache step), else read here."""
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(idx.shape)}")
        if idx.size(1) > self.rotary_seq_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds the rotary cache ({self.rotary_seq_len})")
        # The range check reads the ids on the host: free on CPU, one sync on CUDA, skipped under torch.compile
        # and when the caller vouches for its ids (`check_ids=False`, e.g. the trainer's own tokenizer output).
        if idx.numel() and self.check_ids and not torch.compiler.is_compiling():
            lo, hi = token_range or (int(idx.min()), int(idx.max()))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size})")

    def compile_reference(self, body: bool = True) -> None:
        """Run training and evaluation forwards (no cache) through torch.compile: the body up to the final norm
        (when `body`; dynamic=False, so each (batch, length, grad mode) compiles once, on first use) and the
        chunks of the lm_head + cross-entropy reference. The cached forwards of inference stay eager. For the
        reference path (impl="torch"), where it is faster than eager (a CPU, see bench/cpu.py)."""
        self.compile_ops = True
        self._compiled_hidden = torch.compile(self._hidden, dynamic=False) if body else None

    def _layer(self, i: int, x, x0, idx, cos, sin, cache) -> torch.Tensor:
        """Layer i: the fused residual entry (x = resid_lambdas[i]*x + x0_lambdas[i]*x0 and its norm in one pass),
        the value embedding, the block."""
        impl = self.impl
        x, x_normed = kernels.mix_rms_norm(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], impl=impl)
        ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
        return self.transformer.h[i](x, x_normed, ve, cos, sin, self.windows[i], impl, cache)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean", cache=None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> loss (mean scalar, or (B, T) with loss_reduction="none") when targets
        are given, else fp32 softcapped logits (B, T, vocab_size).

        cache: None for whole sequences from position 0 (training, evaluation). For cached inference, one step
        of a KV cache (engine.kv_cache.PagedBatch): idx holds each sequence's new tokens, padded on the right;
        the cache gives their absolute `positions` (B, T) and `prev_tokens` (B,) (the token before each chunk,
        -1 at a sequence start), and its `attend` appends each layer's k, v and attends over the cached sequence.
        last_only (with a cache, no targets): the logits of each sequence's last real token only, (B, vocab_size),
        without the lm_head over the rest of a prefill chunk.
        """
        self._check_idx(idx, getattr(cache, "token_range", None))
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        hidden = self._compiled_hidden if cache is None and self._compiled_hidden is not None else self._hidden
        x = hidden(idx, cache)
        V = self.config.vocab_size
        if last_only:
            if cache is None or targets is not None:
                raise ValueError("last_only needs a cache and no targets")
            x = cache.last_rows(x)
        if targets is not None:
            return kernels.linear_softcap_cross_entropy(
                x, self.lm_head.weight, targets, softcap=SOFTCAP, ignore_index=-1,
                reduction=loss_reduction, vocab_size=V, impl=self.impl, check_targets=self.check_ids,
                compile_chunks=self.compile_ops and cache is None,
            )
        if cache is not None and self.impl == "torch" and not torch.is_grad_enabled():
            linear = getattr(cache, "linear", None)  # the cache's prepacked weight (engine.kv_cache), where it has one
            logits = (self.lm_head(x) if linear is None else linear(x, self.lm_head.weight))[..., :V].float()
            return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)  # in place: nothing is kept for a backward
        logits = self.lm_head(x)[..., :V].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def _hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """The final normed hidden states (B, T, C) of checked token ids (see forward)."""
        B, T = idx.shape
        impl = self.impl
        if cache is None:
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:  # every token's rotary angles at its absolute position: (B, T, 1, D/2)
            at = cache.positions.view(-1)
            cos = self.cos[0].index_select(0, at).view(B, T, 1, -1)
            sin = self.sin[0].index_select(0, at).view(B, T, 1, -1)
        act = self.compute_dtype
        x = norm(self.transformer.wte(idx).to(act), impl)  # (B, T, C) in the compute dtype
        if cache is not None:  # smear across the chunk boundary: the previous token comes from the cache
            if cache.all_have_prev:
                x_first = norm(self.transformer.wte(cache.prev_tokens[:, None]).to(act), impl)
            else:
                has_prev = (cache.prev_tokens >= 0)[:, None, None]
                x_first = norm(self.transformer.wte(cache.prev_tokens.clamp_min(0)[:, None]).to(act), impl) * has_prev
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + gate * (x_first if T == 1 else torch.cat([x_first, x[:, :-1]], dim=1))
        elif T > 1:  # smear: mix the previous token's embedding in, gated by the current one
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, x_mid = x, None
        if cache is not None and impl == "torch" and self.flat_decode:
            return self._cached_layers(x, x0, idx, cos, sin, cache)
        for i in range(self.config.n_layer):
            if self.recompute and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._layer, i, x, x0, idx, cos, sin, None, use_reentrant=False)
            else:
                x = self._layer(i, x, x0, idx, cos, sin, cache)
            if i == self.config.n_layer // 2:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        return norm(x, impl)

    def _cached_layers(self, x, x0, idx, cos, sin, cache) -> torch.Tensor:
        """The layers and the final norm of a cached step on the PyTorch path, written out flat: the references of
        the ops `_layer` and the blocks call, in the same order, without the per-call Python of the modules and
        the public functions' input checks (the model and its cache built these inputs; a decode step is a few
        hundred tiny ops on a CPU, where that Python is a large share of the time). tests/engine/test_engine.py
        checks it against the blocks."""
        dt, C, n_mid = x.dtype, self.config.n_embd, self.config.n_layer // 2
        lin = _cast_linear
        x_mid = None
        for i, blk in enumerate(self.transformer.h):
            a, mlp = blk.attn, blk.mlp
            x = self.resid_lambdas[i].to(dt) * x + self.x0_lambdas[i].to(dt) * x0
            xn = F.rms_norm(x, (C,))
            B, T = xn.shape[:2]
            q = lin(xn, a.c_q.weight).view(B, T, a.n_head, HEAD_DIM)
            k = lin(xn, a.c_k.weight).view(B, T, a.n_kv_head, HEAD_DIM)
            v = lin(xn, a.c_v.weight).view(B, T, a.n_kv_head, HEAD_DIM)
            if a.ve_gate is not None:
                ve = F.embedding(idx, self.value_embeds[str(i)].weight).to(dt).view(B, T, a.n_kv_head, HEAD_DIM)
                v = v + 3 * torch.sigmoid(lin(xn[..., :VE_GATE_CHANNELS], a.ve_gate.weight)).unsqueeze(-1) * ve
            qk = kernels.rms_norm_ref(kernels.apply_rope_ref(torch.cat([q, k], dim=2), cos, sin)) * 1.2
            y = cache.attend(i, qk[:, :, : a.n_head], qk[:, :, a.n_head:], v, self.windows[i])
            x = x + lin(y.reshape(B, T, -1), a.c_proj.weight)
            h = F.relu(lin(F.rms_norm(x, (C,)), mlp.c_fc.weight)).square()
            x = x + lin(h, mlp.c_proj.weight)
            if i == n_mid:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda.to(dt) * x_mid
        return F.rms_norm(x, (C,))


def _cast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def build_model(config: GPTConfig, device="cpu", impl: str = "torch", compute_dtype: torch.dtype | None = None,
                init: bool = True, embedding_dtype: torch.dtype | None = None) -> GPT:
    """Build on the meta device (no allocation), materialize on `device`, initialize.

    impl: "auto" (Triton kernels where they run on `device`, see `kernels.resolve_impl`), "torch" or "triton";
    resolved here, once. compute_dtype (the activations) defaults to bf16 on CUDA and fp32 elsewhere;
    embedding_dtype (the storage of wte and value_embeds) to compute_dtype."""
    device = torch.device(device)
    impl = kernels.resolve_impl(impl, device)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = GPT(config, impl=impl)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        cos, sin = model._rotary_tables(model.rotary_seq_len, device=device)
        model.cos.copy_(cos)
        model.sin.copy_(sin)
    model.set_compute_dtype(compute_dtype, embedding_dtype)
    return model
