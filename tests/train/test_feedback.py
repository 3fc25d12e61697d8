"""train.feedback: the policy-gradient loss and its mask, group advantages, the DPO loss and gradient, pairs."""

import math

import pytest
import torch
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.train import feedback


def test_completion_batch_targets_only_sampled_tokens():
    # prompt [1, 2], completion [5, 6, 7, 8] where 6 and 7 were forced by the engine (a tool output)
    rows = [([1, 2], [5, 6, 7, 8], [False, True, True, False]), ([3], [9], [False])]
    ids, targets = feedback.completion_batch(rows, pad=0)
    assert ids.tolist() == [[1, 2, 5, 6, 7], [3, 0, 0, 0, 0]]
    assert targets.tolist() == [[-1, 5, -1, -1, 8], [9, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="forced flags"):
        feedback.completion_batch([([1], [2, 3], [False])], pad=0)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert feedback.group_advantages(r).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]
    norm = feedback.group_advantages(r, normalize=True)
    assert norm[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5) and norm[1].tolist() == [0.0] * 4


def test_policy_gradient_loss_and_its_gradient_on_a_hand_case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]], requires_grad=True)
    targets = torch.tensor([[7, -1, 3], [-1, -1, 2]])
    adv = torch.tensor([2.0, -1.0])
    loss = feedback.policy_gradient_loss(logp, targets, adv)
    # -(2 * (-1 - 0.5) + (-1) * (-1)) / 3 sampled tokens
    assert loss.item() == pytest.approx(-(2 * -1.5 + 1.0) / 3)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, 0, -2 / 3, 0, 0, 1 / 3])
    assert feedback.policy_gradient_loss(logp, torch.full((2, 3), -1), adv).item() == 0.0


def test_forced_tool_tokens_carry_no_gradient_through_the_model():
    """The loss of a completion whose only non-prompt tokens are forced has no gradient at all; a sampled token
    changes that. The log-probabilities are the fused CE path's and equal log_softmax of the logits."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16))
    forced_only = [([1, 2], [5, 6], [True, True])]
    ids, targets = feedback.completion_batch(forced_only, pad=0)
    loss = feedback.policy_gradient_loss(feedback.token_logprobs(model, ids, targets), targets, torch.tensor([1.0]))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    rows = [([1, 2], [5, 6, 7], [True, True, False])]
    ids, targets = feedback.completion_batch(rows, pad=0)
    logp = feedback.token_logprobs(model, ids, targets)
    direct = torch.log_softmax(model(ids), dim=-1)[0, 3, 7]
    assert logp[0, 3].item() == pytest.approx(direct.item(), abs=1e-5) and logp[0, :3].tolist() == [0.0] * 3
    feedback.policy_gradient_loss(logp, targets, torch.tensor([1.0])).backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_dpo_loss_and_gradient_equal_the_formula():
    pc = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0, -4.0], dtype=torch.float64, requires_grad=True)
    rc, rr, beta = torch.tensor([-2.5, -1.5], dtype=torch.float64), torch.tensor([-2.5, -3.0]), 0.5
    loss, h = feedback.dpo_loss(pc, pr, rc, rr.double(), beta)
    # pair 0: h = 0.5 * ((-3 + 2.5) - (-2 + 2.5)) = -0.5; pair 1: h = 0.5 * ((-1 + 1.5) - (-4 + 3)) = 0.75
    assert h.tolist() == pytest.approx([-0.5, 0.75])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert loss.item() == pytest.approx((-math.log(sig(-0.5)) - math.log(sig(0.75))) / 2)
    loss.backward()
    # dL/dpc_i = -beta * sigmoid(-h_i) / P, dL/dpr_i = +beta * sigmoid(-h_i) / P
    assert pc.grad.tolist() == pytest.approx([-beta * sig(0.5) / 2, -beta * sig(-0.75) / 2])
    assert pr.grad.tolist() == pytest.approx([beta * sig(0.5) / 2, beta * sig(-0.75) / 2])


def test_pairs_from_scores():
    assert feedback.pairs_from_scores([3, 1, 2]) == [(0, 1), (0, 2), (2, 1)]
    assert feedback.pairs_from_scores([3, 1, 2], adjacent=True) == [(0, 2), (2, 1)]
    assert feedback.pairs_from_scores([1, 0, 1]) == [(0, 1), (2, 1)]
    assert feedback.pairs_from_scores([1, 1]) == []
