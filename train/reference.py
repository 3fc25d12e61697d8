"""Resuming a run the reference trainer wrote: its optimizer shards and its meta, in our optimizer's layout.

Both optimizers group the parameters the same way and in the same order (lm_head, wte, value_embeds, the resid
and x0 lambdas, the smear group, then one Muon group per matrix shape in sorted order, the matrices in module
order: `train.optim.build_param_groups`), so parameter index i of a reference `optim_{step}_rank{r}.pt` is our
parameter index i. What differs is where the state lives:

    AdamW  both keep `step`, `exp_avg`, `exp_avg_sq` per parameter. With W ranks the reference keeps a parameter
           of 1024 elements or more as rows [r*n/W, (r+1)*n/W) on rank r, a smaller one whole on every rank.
    Muon   the reference keeps one state per *group*, on its first parameter: `momentum_buffer` (c, m, n) and
           `second_momentum_buffer` (c, m, 1) if m >= n else (c, 1, n), for the c = ceil(K/W) matrices rank r
           owns, matrices r*c .. r*c + c - 1 of the group's K. We keep both per matrix, (m, n) and (m, 1)/(1, n).

`assemble` joins the W reference shards into one whole state per parameter; `for_rank` cuts that into what one
of our ranks holds under our own sharding (`MuonAdamW._sharded`, `MuonAdamW._muon_layout`), for any number of
ranks. `is_reference_optimizer_state` tells the two layouts apart.
"""

from __future__ import annotations

import math

import torch

REFERENCE_SHARD_MIN_NUMEL = 1024  # the reference's AdamW: smaller parameters are all-reduced and kept whole


def _muon_first_indices(opt) -> dict[int, tuple[int, int]]:
    """{index of a Muon group's first parameter: (index of its last + 1, group position)} in our numbering."""
    out, i = {}, 0
    for gi, group in enumerate(opt.param_groups):
        n = len(group["params"])
        if group["kind"] == "muon" and n:
            out[i] = (i + n, gi)
        i += n
    return out


def is_reference_optimizer_state(state_dict: dict, opt) -> bool:
    """True when `state_dict` keeps Muon state per group, stacked on the group's first parameter (the reference's
    layout), False for ours (per matrix). An empty state (no step taken yet) reads as ours."""
    state = state_dict.get("state", {})
    for first, _ in _muon_first_indices(opt).items():
        buf = state.get(first, {}).get("momentum_buffer")
        if buf is not None:
            return buf.dim() == 3
    return False


def _check_groups(shard: dict, opt, where: str) -> None:
    ours = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in shard.get("param_groups", [])]
    if ours != theirs:
        raise ValueError(f"{where}: the reference optimizer has parameter groups of sizes {theirs}, this model's "
                         f"are {ours}: not the same model or parameter grouping")


def assemble(shards: list[dict], opt, params: list[torch.Tensor]) -> dict[int, dict]:
    """The whole state of every parameter index from the reference's rank shards (rank order). `params` are the
    model parameters in optimizer order (their shapes say how the shards were cut)."""
    W = len(shards)
    if W == 0:
        raise ValueError("no reference optimizer shards")
    for r, shard in enumerate(shards):
        _check_groups(shard, opt, f"optimizer shard of rank {r}")
    muon = _muon_first_indices(opt)
    in_muon = {j for first, (end, _) in muon.items() for j in range(first, end)}
    full: dict[int, dict] = {}
    for i, p in enumerate(params):
        if i in in_muon:
            continue
        parts = [shard["state"].get(i) for shard in shards]
        if all(s is None for s in parts):
            continue
        if any(s is None for s in parts):
            raise ValueError(f"reference optimizer: parameter {i} has state on some ranks only")
        sharded = W > 1 and p.numel() >= REFERENCE_SHARD_MIN_NUMEL
        entry = {"step": parts[0]["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = torch.cat([s[key] for s in parts], dim=0) if sharded else parts[0][key]
            if entry[key].shape != p.shape:
                raise ValueError(f"reference optimizer: parameter {i} {key} assembles to {tuple(entry[key].shape)}, "
                                 f"the parameter is {tuple(p.shape)}")
        full[i] = entry
    for first, (end, _) in muon.items():
        K = end - first
        c = math.ceil(K / W)
        parts = [shard["state"].get(first) for shard in shards]
        if all(s is None for s in parts):
            continue
        for r, s in enumerate(parts):
            if s is None or s["momentum_buffer"].shape[0] != c:
                raise ValueError(f"reference optimizer: Muon group at parameter {first} of rank {r} does not hold "
                                 f"{c} stacked matrices")
        for k in range(K):
            r, j = divmod(k, c)
            full[first + k] = {"momentum_buffer": parts[r]["momentum_buffer"][j].clone(),
                               "second_momentum_buffer": parts[r]["second_momentum_buffer"][j].clone()}
    return full


def for_rank(full: dict[int, dict], opt, params: list[torch.Tensor]) -> dict:
    """Our optimizer's state_dict for this rank (opt.rank of opt.world_size) from whole per-parameter states; the
    param_groups are this optimizer's own (the loop sets lr, momentum and weight decay every step)."""
    W, rank = opt.world_size, opt.rank
    muon = _muon_first_indices(opt)
    owned_muon: set[int] = set()
    offset = 0
    for first, (end, _) in sorted(muon.items()):
        K = end - first
        _, spans = opt._muon_layout(K, offset) if W > 1 else (K, [(0, K)])
        offset += K
        lo, hi = spans[rank]
        owned_muon.update(range(first + lo, first + hi))
    in_muon = {j for first, (end, _) in muon.items() for j in range(first, end)}
    state: dict[int, dict] = {}
    for i, entry in full.items():
        if i in in_muon:
            if i in owned_muon:
                state[i] = {k: v.float().clone() for k, v in entry.items()}
            continue
        p = params[i]
        out = {"step": entry["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            v = entry[key].float()
            if W > 1 and opt._sharded(p):
                rows = p.shape[0] // W
                v = v[rank * rows:(rank + 1) * rows]
            out[key] = v.clone()
        state[i] = out
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def convert_optimizer(shards: list[dict], opt) -> dict:
    """The reference's rank shards -> this rank's state_dict for `opt` (any number of ranks on either side)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return for_rank(assemble(shards, opt, params), opt, params)


def loop_state_from_reference(meta: dict) -> dict:
    """Our meta["loop_state"] fields from the reference's (smooth_train_loss, total_training_time)."""
    saved = meta.get("loop_state") or {}
    out = {}
    if "smooth_train_loss" in saved:
        out["smooth_loss"] = saved["smooth_train_loss"]
    if "total_training_time" in saved:
        out["total_time"] = saved["total_training_time"]
    return out
