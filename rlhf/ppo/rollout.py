"""Step 1 and 2 of a PPO iteration: sample answers from the policy, then score them.

A rollout batch holds, for B prompts (left-padded to P tokens) and their sampled answers (right-padded
to T tokens):

    sequences      [B, S]  prompt then answer, S = P + T
    attention_mask [B, S]  True on real prompt tokens and on answer tokens up to and including EOS
    answer_mask    [B, T]  True on the answer tokens that count (up to and including the first EOS)
    ended_with_eos [B]     False for answers cut off at `max_new_tokens`

Scoring runs every role over the same sequences with no gradient: policy log-probs (at the sampling
temperature, so the KL estimate is not biased: MISSION "log-probs recomputed with the same
temperature"), reference log-probs, per-token values, and the RM score of the last real token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf_kernels import fused_linear_token_logprobs


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] bool
    answer_mask: torch.Tensor  # [B, T] bool
    ended_with_eos: torch.Tensor  # [B] bool
    prompt_len: int  # P
    logprobs: torch.Tensor | None = None  # [B, T] fp32, policy at sampling time
    ref_logprobs: torch.Tensor | None = None  # [B, T] fp32
    values: torch.Tensor | None = None  # [B, T] fp32
    rm_scores: torch.Tensor | None = None  # [B] fp32, before penalties
    advantages: torch.Tensor | None = None  # [B, T] fp32
    returns: torch.Tensor | None = None  # [B, T] fp32

    @property
    def answers(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]  # [B, T]

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows `index` of every per-sample tensor (a mini-batch)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return Rollout(**picked)


def answer_mask_from(answers: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] sampled tokens -> (mask up to and including the first EOS [B, T], ended_with_eos [B]).

    The sampler pads finished rows with pad_id. The mask ignores token identity before the first EOS (a
    sampled pad token counts like any other): that is what the sampler attended to.
    """
    is_eos = answers == eos_id  # [B, T]
    # number of EOS strictly before each position: 0 means the answer has not stopped yet
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # [B, T]
    mask = eos_before == 0  # [B, T]
    return mask, is_eos.any(dim=1)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, top_p: float, role: str = "policy") -> Rollout:
    """Sample one answer per left-padded prompt with the KV cache; returns an unscored Rollout."""
    tokenizer = model.tokenizer
    sequences = model.sample(role, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p)  # [B, P + T']
    prompt_len = prompt_ids.shape[1]
    answers = sequences[:, prompt_len:]  # [B, T], T >= 1: the sampler draws a first token for every row
    answer_mask, ended = answer_mask_from(answers, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_mask.bool(), answer_mask], dim=1)  # [B, S]
    return Rollout(sequences=sequences, attention_mask=attention_mask, answer_mask=answer_mask,
                   ended_with_eos=ended, prompt_len=prompt_len)


def answer_slice(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """[B, S, ...] -> [B, T, ...]: positions P-1 .. S-2, the ones that predict (or value) each answer token."""
    P, T = rollout.prompt_len, rollout.answer_mask.shape[1]
    return per_position[:, P - 1:P + T - 1]


def answer_hidden(model, role: str, rollout: Rollout) -> torch.Tensor:
    """Hidden states that predict each answer token. -> [B, T, H]"""
    return answer_slice(model.hidden_states(role, rollout.sequences, rollout.attention_mask), rollout)


def answer_labels(rollout: Rollout, ignore_index: int = -100) -> torch.Tensor:
    return torch.where(rollout.answer_mask, rollout.answers, torch.full_like(rollout.answers, ignore_index))


def answer_logprobs(model, role: str, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log pi_role(answer token | everything before it) at `temperature`, 0 off the answer mask. -> [B, T] fp32"""
    hidden = answer_hidden(model, role, rollout)  # [B, T, H]
    logprobs = fused_linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head_weight,
                                           answer_labels(rollout).reshape(-1), bias=model.lm_head_bias,
                                           temperature=temperature, **model.logit_transform)  # [B*T]
    return logprobs.view_as(rollout.answer_mask)


@torch.no_grad()
def score(model, rollout: Rollout, temperature: float, micro_batch_size: int) -> Rollout:
    """Fill in log-probs (policy, reference), values and RM scores, micro-batch by micro-batch."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "rm_scores": []}
    B = rollout.sequences.shape[0]
    for start in range(0, B, micro_batch_size):
        chunk = rollout.select(torch.arange(start, min(start + micro_batch_size, B)))
        parts["logprobs"].append(answer_logprobs(model, "policy", chunk, temperature))  # [b, T]
        parts["ref_logprobs"].append(answer_logprobs(model, "reference", chunk, temperature))  # [b, T]
        values = model.values("value", chunk.sequences, chunk.attention_mask)  # [b, S]
        parts["values"].append(answer_slice(values, chunk).float() * chunk.answer_mask)  # [b, T]
        parts["rm_scores"].append(model.reward_scores("reward", chunk.sequences, chunk.attention_mask).float())
    for name, tensors in parts.items():
        setattr(rollout, name, torch.cat(tensors))
    return rollout
