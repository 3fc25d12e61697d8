"""Fused ops, one file each: a public function (Triton on CUDA when a kernel exists) and its ``*_ref``."""

from tritonchat.kernels._dispatch import IMPLS, resolve_impl
from tritonchat.kernels._launch import tuned_configs
from tritonchat.kernels.attention import flash_attention, flash_attention_ref
from tritonchat.kernels.cross_entropy import softcap_cross_entropy, softcap_cross_entropy_ref
from tritonchat.kernels.gram import gram, gram_ref, sym_update, sym_update_ref
from tritonchat.kernels.linear_cross_entropy import linear_softcap_cross_entropy, linear_softcap_cross_entropy_ref
from tritonchat.kernels.mlp import relu2_mlp, relu2_mlp_ref
from tritonchat.kernels.muon import (
    adamw_step_,
    adamw_step_ref,
    muon_post,
    muon_post_ref,
    muon_pre,
    muon_pre_ref,
    muon_step_,
    muon_step_ref,
)
from tritonchat.kernels.paged_attention import (
    PagedPlan,
    paged_attention,
    paged_attention_ref,
    paged_kv_append,
    paged_kv_append_ref,
)
from tritonchat.kernels.polar_express import POLAR_EXPRESS_COEFFS, polar_express, polar_express_ref
from tritonchat.kernels.rms_norm import mix_rms_norm, mix_rms_norm_ref, rms_norm, rms_norm_ref
from tritonchat.kernels.rope import apply_rope, apply_rope_ref, rope_qk_norm, rope_qk_norm_ref

__all__ = [
    "IMPLS",
    "PagedPlan",
    "adamw_step_",
    "adamw_step_ref",
    "gram",
    "gram_ref",
    "muon_post",
    "muon_post_ref",
    "muon_pre",
    "muon_pre_ref",
    "muon_step_",
    "muon_step_ref",
    "sym_update",
    "sym_update_ref",
    "POLAR_EXPRESS_COEFFS",
    "apply_rope",
    "apply_rope_ref",
    "flash_attention",
    "flash_attention_ref",
    "linear_softcap_cross_entropy",
    "linear_softcap_cross_entropy_ref",
    "mix_rms_norm",
    "mix_rms_norm_ref",
    "paged_attention",
    "paged_attention_ref",
    "paged_kv_append",
    "paged_kv_append_ref",
    "polar_express",
    "polar_express_ref",
    "relu2_mlp",
    "relu2_mlp_ref",
    "resolve_impl",
    "rms_norm",
    "rms_norm_ref",
    "rope_qk_norm",
    "rope_qk_norm_ref",
    "softcap_cross_entropy",
    "softcap_cross_entropy_ref",
    "tuned_configs",
]
