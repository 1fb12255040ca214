"""The InstructGPT ranking loss against an explicit loop over the C(K, 2) pairs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.reward import ranking_loss


def explicit_pairs_loss(groups: list[torch.Tensor], margin: float = 0.0) -> torch.Tensor:
    """Mean over prompts of the mean over that prompt's pairs (w above l) of -log sigmoid(r_w - r_l - m)."""
    per_prompt = []
    for scores in groups:  # best first
        pairs = list(itertools.combinations(range(len(scores)), 2))
        per_prompt.append(sum(-F.logsigmoid(scores[w] - scores[l] - margin) for w, l in pairs) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


def flat(groups):
    scores = torch.cat(groups)
    prompt_index = torch.cat([torch.full((len(g),), i) for i, g in enumerate(groups)])
    rank = torch.cat([torch.arange(len(g)) for g in groups])
    return scores, prompt_index, rank


def test_worked_by_hand_k2():
    # one pair: r_w - r_l = 1 - 0 = 1; -log sigmoid(1) = log(1 + e^-1) = 0.31326
    loss, accuracy = ranking_loss(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert accuracy.item() == 1.0


def test_worked_by_hand_k3_with_one_misordered_pair():
    # scores best-first [2, 0, 1]: pairs (2-0)=2, (2-1)=1, (0-1)=-1 -> 2 of 3 ordered right
    # loss = mean(log(1+e^-2), log(1+e^-1), log(1+e^1)) = (0.12693 + 0.31326 + 1.31326) / 3
    loss, accuracy = ranking_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_matches_explicit_pairs_with_mixed_k(margin):
    torch.manual_seed(0)
    groups = [torch.randn(k, dtype=torch.float64) for k in (2, 4, 9, 5)]
    scores, prompt_index, rank = flat(groups)
    scores.requires_grad_(True)
    loss, _ = ranking_loss(scores, prompt_index, rank, margin)
    ref_scores = scores.detach().clone().requires_grad_(True)
    ref_groups = list(torch.split(ref_scores, [len(g) for g in groups]))
    reference = explicit_pairs_loss(ref_groups, margin)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(scores.grad.double(), ref_scores.grad, atol=1e-6, rtol=1e-5)


def test_each_prompt_weighs_the_same_whatever_its_k():
    # a K=9 prompt (36 pairs) and a K=2 prompt (1 pair) each count 1/2, not 36/37 and 1/37
    groups = [torch.zeros(9), torch.tensor([0.0, 5.0])]
    loss, _ = ranking_loss(*flat(groups))
    k9 = math.log(2.0)  # every pair has diff 0
    k2 = math.log(1 + math.exp(5.0))
    assert loss.item() == pytest.approx((k9 + k2) / 2, rel=1e-5)
