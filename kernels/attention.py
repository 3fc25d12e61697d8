"""Causal attention with an optional sliding window and grouped-query heads.

Queries are the last Tq of Tk positions: query i sits at absolute position p = Tk - Tq + i and sees key j
iff j <= p and p - j <= window (window None: no limit; window 0: only itself). Every query therefore
sees at least one key. Query head h reads key/value head h // (H / Hkv).
FLOPs (forward): 4 x B x H x D x (number of visible (query, key) pairs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._dispatch import check_same_device, check_tensor, resolve_impl

_TRITON_AVAILABLE = False


def attention_mask(tq: int, tk: int, window: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i (at position Tk - Tq + i) may attend to key j."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) <= window
    return mask


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch attention through SDPA. q (B, Tq, H, D); k, v (B, Tk, Hkv, D). Returns (B, Tq, H, D)."""
    tq, tk, h, hkv = q.size(1), k.size(1), q.size(2), k.size(2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    if h != hkv:
        kt = kt.repeat_interleave(h // hkv, dim=1)
        vt = vt.repeat_interleave(h // hkv, dim=1)
    if not causal:
        y = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    elif tq == tk and (window is None or window >= tk - 1):
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        mask = attention_mask(tq, tk, window, device=q.device)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return y.transpose(1, 2)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention, causal with an optional sliding window, GQA-aware.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with H % Hkv == 0 and Tq <= Tk when causal (the queries are
    the last Tq positions, as in cached decoding). All three share one floating dtype and device.
    window: None (unlimited) or an int >= 0, only with causal=True. scale: None means 1/sqrt(D).
    Returns (B, Tq, H, D) in q's dtype. Differentiable.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(
            f"q (B, Tq, H, D) and k/v (B, Tk, Hkv, D) must agree on B and D, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    h, hkv = q.size(2), k.size(2)
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the number of kv heads ({hkv})")
    if causal and q.size(1) > k.size(1):
        raise ValueError(
            f"causal attention needs Tq <= Tk (queries are the last Tq positions), got Tq={q.size(1)}, Tk={k.size(1)}"
        )
    if window is not None:
        if type(window) is not int or window < 0:
            raise ValueError(f"window must be None or an int >= 0, got {window!r}")
        if not causal:
            raise ValueError("a sliding window requires causal=True")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    resolve_impl(impl, q, k, v, available=_TRITON_AVAILABLE)
    return flash_attention_ref(q, k, v, causal, window, scale)
