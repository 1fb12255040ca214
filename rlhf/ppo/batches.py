"""Where each PPO iteration's prompts and each PPO-ptx pretraining batch come from.

Both are pure functions of (seed, position), so a resumed run draws exactly the batches an
uninterrupted run would have drawn, with nothing to save but the position.
"""

from __future__ import annotations

import torch

from rlhf.data import pad_left, pad_right, shift_labels, tokenize_pretrain, tokenize_prompts
from rlhf.data.order import shuffled_positions
from rlhf.errors import DataError


class PromptBatches:
    """RL prompts, tokenised once, served as left-padded batches (for generation) by iteration."""

    def __init__(self, records: list[dict], tokenizer, batch_size: int, max_prompt_length: int, seed: int,
                 device: torch.device, use_chat_template: bool | str = "auto"):
        self.examples, self.report = tokenize_prompts(records, tokenizer, max_prompt_length,
                                                      use_chat_template=use_chat_template)
        if not self.examples:
            raise DataError("no RL prompts left after tokenisation")
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.pad_id = tokenizer.pad_token_id

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = shuffled_positions(len(self.examples), self.seed, iteration * self.batch_size, self.batch_size)
        padded = pad_left([self.examples[i]["input_ids"] for i in rows], self.pad_id)
        return padded["input_ids"].to(self.device), padded["attention_mask"].to(self.device)  # [B, P]


class PretrainBatches:
    """Pretraining chunks for the PPO-ptx term, `batch_size` per call, in a resumable order."""

    def __init__(self, records: list[dict], tokenizer, batch_size: int, max_length: int, seed: int,
                 device: torch.device):
        self.examples, self.report = tokenize_pretrain(records, tokenizer, max_length)
        self.examples = [e for e in self.examples if len(e["input_ids"]) > 1]  # one token predicts nothing
        if not self.examples:
            raise DataError("the pretraining set has no text left after tokenisation")
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.pad_id = tokenizer.pad_token_id
        self.position = 0  # saved in checkpoints

    def next(self) -> dict[str, torch.Tensor]:
        rows = shuffled_positions(len(self.examples), self.seed + 1, self.position, self.batch_size)
        self.position += self.batch_size
        padded = pad_right([self.examples[i]["input_ids"] for i in rows], self.pad_id)
        labels = shift_labels(padded["input_ids"], padded["answer_mask"])  # [b, S]
        return {"input_ids": padded["input_ids"].to(self.device),
                "attention_mask": padded["attention_mask"].to(self.device), "labels": labels.to(self.device)}
