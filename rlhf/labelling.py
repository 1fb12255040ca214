"""Ranking data the InstructGPT way: K answers sampled from the SFT policy, ranked by a labeller.

InstructGPT's labellers ranked K = 4..9 outputs of the SFT model for each RM prompt; here a
programmatic labeller (the toy world's gold judge) scores each answer and the ranking follows the
scores. Identical samples are merged (a ranking cannot hold the same answer twice). Answers the judge
scores equally are a tie the labeller cannot order: ranking them by sampling order would train the RM
on coin flips as if they were preferences, so only the first sampled answer of each score is kept
(every tied pair is dropped; both counts are logged and returned). A prompt left with fewer than 2
answers is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from rlhf.data import load_records, pad_left, tokenize_prompts
from rlhf.models import ModelConfig, RoleModel
from rlhf.ppo.rollout import sample
from rlhf.progress import progress
from rlhf.stage_dirs import adapter_dir

log = logging.getLogger("rlhf.labelling")


@torch.no_grad()
def sample_rankings(model_cfg: ModelConfig, sft_dir: str | os.PathLike, prompts_path: str | os.PathLike,
                    out_path: str | os.PathLike, score: Callable[[str, str], float], k: int = 4,
                    max_new_tokens: int = 16, temperature: float = 1.0, max_prompt_length: int = 48,
                    batch_size: int = 64, seed: int = 0, device: torch.device | None = None,
                    use_chat_template: bool | str = "auto") -> dict[str, int]:
    """Write `{"prompt", "responses": [best..worst], "user_id"}` records to `out_path` (atomically)."""
    records = load_records(prompts_path, "prompts")
    model = RoleModel(model_cfg, device=device)
    model.add_role("policy", adapter_dir=adapter_dir(sft_dir, "policy"))
    tokenizer = model.tokenizer
    examples, _ = tokenize_prompts(records, tokenizer, max_prompt_length, use_chat_template=use_chat_template)
    torch.manual_seed(seed)
    rankings, skipped, tied_answers, tied_pairs = [], 0, 0, 0
    for start in progress(range(0, len(examples), batch_size), desc="label", unit="batch"):
        rows = examples[start:start + batch_size]
        padded = pad_left([e["input_ids"] for e in rows for _ in range(k)], tokenizer.pad_token_id)  # [b*K, P]
        rollout = sample(model, padded["input_ids"].to(model.device), padded["attention_mask"].to(model.device),
                         max_new_tokens, temperature, 1.0)
        texts = [tokenizer.decode(a[m], skip_special_tokens=True).strip()
                 for a, m in zip(rollout.answers, rollout.answer_mask)]
        for i, example in enumerate(rows):
            answers = list(dict.fromkeys(t for t in texts[i * k:(i + 1) * k] if t))  # distinct, in order
            by_score: dict[float, list[str]] = {}
            for answer in answers:
                by_score.setdefault(score(example["prompt"], answer), []).append(answer)
            tied_answers += sum(len(group) - 1 for group in by_score.values())
            tied_pairs += sum(len(group) * (len(group) - 1) // 2 for group in by_score.values())
            if len(by_score) < 2:
                skipped += 1
                continue
            best_first = sorted(by_score, reverse=True)
            rankings.append({"prompt": example["prompt"], "responses": [by_score[s][0] for s in best_first],
                             "user_id": example["user_id"]})
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rankings), encoding="utf-8")
    os.replace(tmp, out_path)
    log.info("labelled %d prompts with %d sampled answers each; dropped %d answers tied with an earlier one "
             "(%d tied pairs); skipped %d prompts with fewer than 2 distinct scores",
             len(rankings), k, tied_answers, tied_pairs, skipped)
    return {"rankings": len(rankings), "skipped_fewer_than_2_distinct": skipped, "tied_answers_dropped": tied_answers,
            "tied_pairs_dropped": tied_pairs}
