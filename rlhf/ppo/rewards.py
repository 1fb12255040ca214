"""Per-token rewards for PPO: the KL penalty on every answer token, the RM score on the last one.

    reward_t = -beta * kl_t                       for every answer token t
    reward_T += rm_score                          at the last real answer token

(InstructGPT eq. 2; the per-token form of Ziegler et al. 2019, openai/lm-human-preferences
`train_policy.py` `compute_rewards`.) kl_t is the estimator of `rlhf_kernels.kl_penalty`:
k1 = logp - ref_logp by default.
"""

from __future__ import annotations

import torch

from rlhf.models import last_true_index
from rlhf_kernels import kl_penalty, whiten


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a [B, T] mask, 0 for an empty row (an empty answer: its score
    lands nowhere, `shape_rewards` masks it). `rlhf.models.last_true_index` does the arithmetic; it
    refuses empty rows (an RM sequence with no real token is a bug), so an empty row is read as its
    first token here."""
    empty = ~mask.any(dim=1, keepdim=True)  # [B, 1]
    first = torch.zeros_like(mask)
    first[:, 0] = True  # [B, T]
    return last_true_index(mask | (empty & first))  # [B]


def score_penalties(rm_scores: torch.Tensor, ended_with_eos: torch.Tensor, no_eos_score: float | None,
                    clip: float | None) -> torch.Tensor:
    """An answer cut off at the length limit gets `no_eos_score` instead of its RM score (if set);
    `clip` bounds the scores so one outlier cannot dominate an update."""
    scores = rm_scores.float()  # [B]
    if no_eos_score is not None:
        scores = torch.where(ended_with_eos, scores, torch.full_like(scores, no_eos_score))
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def shape_rewards(rm_scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  answer_mask: torch.Tensor, kl_coef: float, estimator: str = "k1",
                  whiten_rewards: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rewards [B, T], kl [B, T]), both 0 outside `answer_mask`."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator) * answer_mask  # [B, T]
    rewards = -kl_coef * kl  # [B, T]
    last = last_token_index(answer_mask)  # [B]
    has_answer = answer_mask.any(dim=1)  # [B]
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += torch.where(has_answer, rm_scores.to(rewards.dtype), torch.zeros_like(rm_scores))
    if whiten_rewards:
        rewards = whiten(rewards, answer_mask, shift_mean=False)
    return rewards, kl
