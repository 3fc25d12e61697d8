"""The objectives of learning from feedback: policy gradient on verifiable rewards, and direct preference
optimization (DPO). Pure functions of token log-probabilities; scripts.chat_rl and scripts.chat_pref drive them.

Log-probabilities come from the model's fused linear + softcap cross-entropy (`GPT.forward(idx, targets,
loss_reduction="none")` returns -log p(target) per position, 0 where the target is -1) without materializing
the (B, T, V) logits, in forward and in backward.

Policy gradient (REINFORCE with a group baseline): for a prompt, G completions are sampled; completion i gets
reward r_i and advantage A_i = r_i - mean(r) (divided by std(r) + eps when normalized). The loss is

    L = -sum_{i, t in sampled(i)} A_i * log p(y_it | y_i<t) / (number of sampled tokens)

so dL/d log p(y_it) = -A_i / N on every sampled token and 0 on prompt, padding and forced tool-output tokens
(the engine wrote those, the policy did not choose them).

DPO (Rafailov et al. 2023): for a prompt x, a chosen answer y_w and a rejected y_l, with sequence
log-probabilities of the policy pi and of a frozen reference policy ref,

    h = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))),   L = -log sigmoid(h)

dL/dh = -sigmoid(-h). The implicit reward of an answer is beta * (log pi - log ref); the pair is ranked right
when the chosen one's is larger (h > 0); the reward margin is h.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | ids[b, :t + 1]) (B, T) fp32 from the fused CE path; 0 where targets is -1."""
    return -model(ids, targets, loss_reduction="none").float()


def completion_batch(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[bool]]], pad: int,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets) (B, T) int64 for rows of (prompt, completion, forced): ids = (prompt + completion)[:-1]
    right-padded with `pad`, targets the next token where that token is a sampled completion token, else -1
    (prompt, forced tool output, padding). T is the longest row's length - 1."""
    seqs = [list(p) + list(c) for p, c, _ in rows]
    T = max(len(s) for s in seqs) - 1
    if T < 1:
        raise ValueError("every row is a single token: nothing to predict")
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, ((prompt, completion, forced), seq) in enumerate(zip(rows, seqs)):
        if len(forced) != len(completion):
            raise ValueError(f"row {b}: {len(forced)} forced flags for {len(completion)} completion tokens")
        ids[b, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        for j, (tok, f) in enumerate(zip(completion, forced)):
            t = len(prompt) + j - 1  # the position that predicts completion token j
            if not f and 0 <= t < T:
                targets[b, t] = tok
    return ids.to(device), targets.to(device)


def group_advantages(rewards: torch.Tensor, normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards (..., G) of G completions of one prompt -> reward minus the group's mean, over its (population)
    std + eps when `normalize` (a group whose rewards are all equal gets advantages 0 either way)."""
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if normalize:
        adv = adv / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return adv


def policy_gradient_loss(logp: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """-sum(A_b * logp[b, t]) over the sampled tokens (targets >= 0) / num_tokens (default: their count here;
    pass the count of the whole step when a step spans several micro-batches). logp, targets (B, T),
    advantages (B,). A batch without sampled tokens gives 0."""
    mask = (targets >= 0).to(logp.dtype)
    if num_tokens is None:
        num_tokens = mask.sum()
    total = -(logp * mask * advantages.to(logp.dtype)[:, None]).sum()
    return total / torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device).clamp_min(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, per-pair margin h (P,), detached) from sequence log-probabilities (P,) each."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(h).mean(), h.detach()


def pairs_from_scores(scores: Sequence[float], adjacent: bool = False) -> list[tuple[int, int]]:
    """(better, worse) answer indices from one score per answer (higher is better; equal scores make no pair):
    every such pair, or with `adjacent` only those of neighbouring score levels (each answer against every answer
    of the next lower level)."""
    levels = sorted(set(scores), reverse=True)
    pairs = []
    for i, si in enumerate(scores):
        for j, sj in enumerate(scores):
            if si > sj and (not adjacent or levels.index(sj) == levels.index(si) + 1):
                pairs.append((i, j))
    return pairs
