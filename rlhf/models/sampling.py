"""Ancestral sampling with the KV cache: the rollout's decode loop.

`transformers.generate` is general (beam search, a dozen logits processors, stopping criteria,
streaming, assisted decoding) and pays for it on every decoded token: on the tiny benchmark model it
takes about 12% longer than this loop to draw the same tokens. A rollout needs much less: one prefill
forward, then one forward per new token, each drawing from softmax(logits / temperature), optionally
nucleus-truncated. This loop does only that, with the same draws as `generate(do_sample=True)` (one
`torch.multinomial` over the same probabilities per step, so the same seed gives the same tokens) and
the same output layout: prompt then answer, finished rows padded with `pad_id` after their EOS, cut
at the step where the last row finished.
"""

from __future__ import annotations

import inspect

import torch


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (always at least the most
    likely one); the rest get -inf. [B, V] -> [B, V]. Same rule as transformers' TopPLogitsWarper."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)  # [B, V] ascending
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove_sorted = cumulative <= (1.0 - top_p)  # the low tail whose total mass is at most 1 - top_p
    remove_sorted[:, -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(1, sorted_ids, remove_sorted)  # back to vocabulary order
    return scores.masked_fill(remove, float("-inf"))


def _forward_argument_names(causal_lm) -> tuple[str, str | None]:
    """(KV-cache argument, keep-only-the-last-logits argument) of this transformers version's forward:
    `cache` / `logits_to_keep` in 5.x, `past_key_values` / `num_logits_to_keep` in early 4.x."""
    parameters = inspect.signature(causal_lm.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    keep_name = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
    return cache_name, keep_name


@torch.no_grad()
def sample_with_cache(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                      eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                      min_new_tokens: int = 0, stop_check_every: int | None = None) -> torch.Tensor:
    """Sample up to `max_new_tokens` after left-padded prompts ([B, P] ids and 0/1 mask). -> [B, P + T]

    `causal_lm` is any transformers causal LM (with whatever adapter is active); it must be in eval
    mode. EOS cannot be drawn before `min_new_tokens` tokens (benchmarks use it to fix the length).
    `stop_check_every`: decode steps between checks that every row has finished (default 1 on CPU,
    8 on a GPU, where each check is a host sync).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    batch_size, prompt_len = input_ids.shape
    device = input_ids.device
    # the whole attention mask and answer buffer up front: no per-step concatenation
    mask = torch.ones(batch_size, prompt_len + max_new_tokens, dtype=torch.long, device=device)  # [B, P + T]
    mask[:, :prompt_len] = attention_mask
    answers = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, T]
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)  # [B]
    # positions count real tokens only, so a left-padded prompt is positioned like the unpadded one
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, P]
    # on a GPU each check is a host sync that stalls the queue of kernels: check every few steps and
    # trim the extra columns afterwards (they hold pad in every row, as generate would not have made them)
    check_every = stop_check_every or (1 if device.type == "cpu" else 8)
    cache_name, keep_name = _forward_argument_names(causal_lm)
    keep_last = {keep_name: 1} if keep_name else {}  # the prefill needs only the last position's logits
    output = causal_lm(input_ids=input_ids, attention_mask=mask[:, :prompt_len], position_ids=positions,
                       use_cache=True, **keep_last)
    cache = output[cache_name]
    next_position = positions[:, -1:] + 1  # [B, 1]
    steps = 0
    for step in range(max_new_tokens):
        scores = output["logits"][:, -1].to(torch.float32, copy=True)  # [B, V], ours to edit
        if step < min_new_tokens:
            scores[:, eos_id] = float("-inf")
        if temperature != 1.0:
            scores = scores / temperature
        scores = top_p_filter(scores, top_p)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # [B]
        tokens = torch.where(unfinished, tokens, pad_id)  # finished rows only pad
        answers[:, step] = tokens
        unfinished &= tokens != eos_id
        steps = step + 1
        if steps == max_new_tokens or (steps % check_every == 0 and not bool(unfinished.any())):
            break
        output = causal_lm(input_ids=tokens[:, None], attention_mask=mask[:, :prompt_len + steps],
                           position_ids=next_position, use_cache=True, **{cache_name: cache})
        cache = output[cache_name]
        next_position = next_position + 1
    answers = answers[:, :steps]
    # the step at which the last row finished (its EOS), as generate would have stopped there
    still_running = torch.cumsum((answers == eos_id).int(), dim=1) == 0  # [B, steps] True before the EOS
    needed = int(still_running.any(dim=0).sum()) + 1 if bool((answers == eos_id).any(dim=1).all()) else steps
    return torch.cat([input_ids, answers[:, :min(needed, steps)]], dim=1)  # [B, P + T']


def check_left_padded(attention_mask: torch.Tensor, what: str) -> None:
    """Sampling appends after the last column: every prompt must end there (left padding)."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(f"{what} needs left-padded prompts: some rows end in padding")
