"""Padding token-id lists into batches, and the labels for next-token prediction.

Training batches are right-padded: real tokens start at position 0, so positions line up across rows.
Generation batches are left-padded: every prompt ends at the last column, so the tokens the model
generates are appended in the same column for every row.

Labels are shifted here, once, so no stage shifts logits: `shift_labels` puts the token at t + 1 in
`labels[:, t]`, which is what the logits at position t predict. The stages pass logits [B, S, V] and
labels [B, S] straight to `rlhf_kernels.token_logprobs` (flattened to [N, V] and [N]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the label of a position without loss; torch's cross_entropy and our kernels skip it


def pad_right(
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    answer_masks: Sequence[Sequence[bool]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad sequences for training.

    Returns input_ids long [B, S], attention_mask bool [B, S] (True on real tokens) and answer_mask
    bool [B, S] (True where the loss counts; with `answer_masks=None`, every real token, as pretraining
    text needs). S is the longest sequence.
    """
    _check_batch(input_ids, pad_id)
    if answer_masks is not None and len(answer_masks) != len(input_ids):
        raise ValueError(f"got {len(answer_masks)} answer masks for {len(input_ids)} sequences")
    batch_size, max_len = len(input_ids), max(len(ids) for ids in input_ids)
    padded_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)  # [B, S]
    answer_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)  # [B, S]
    for row, ids in enumerate(input_ids):
        length = len(ids)
        padded_ids[row, :length] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :length] = True
        if answer_masks is None:
            answer_mask[row, :length] = True
        else:
            if len(answer_masks[row]) != length:
                raise ValueError(f"row {row}: answer mask has {len(answer_masks[row])} entries for {length} tokens")
            answer_mask[row, :length] = torch.as_tensor(answer_masks[row], dtype=torch.bool)
    return {"input_ids": padded_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}


def pad_left(input_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation: input_ids long [B, P], attention_mask bool [B, P] (True on real tokens)."""
    _check_batch(input_ids, pad_id)
    batch_size, max_len = len(input_ids), max(len(ids) for ids in input_ids)
    padded_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.bool)  # [B, P]
    for row, ids in enumerate(input_ids):
        start = max_len - len(ids)
        padded_ids[row, start:] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, start:] = True
    return {"input_ids": padded_ids, "attention_mask": attention_mask}


def shift_labels(input_ids: torch.Tensor, answer_mask: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels [B, S]: labels[:, t] = input_ids[:, t + 1] where answer_mask[:, t + 1], else ignore_index.

    The last column has no next token and is always ignore_index. Padding has answer_mask False, so it
    never gets a label.
    """
    if input_ids.shape != answer_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and answer_mask {tuple(answer_mask.shape)} differ in shape"
        )
    labels = torch.full_like(input_ids, ignore_index)  # [B, S]
    labels[:, :-1] = torch.where(answer_mask[:, 1:], input_ids[:, 1:], ignore_index)  # [B, S - 1]
    return labels


def collate_rankings(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the K answers of each ranking (from `tokenize_rankings`) into one flat batch.

    Rankings may have different K; the rows are all answers of all rankings in order, M = sum of K.
    Returns input_ids long [M, S], attention_mask bool [M, S], answer_mask bool [M, S] (True from the
    answer's first token to its EOS), prompt_index long [M] (which ranking of the batch the row belongs
    to) and rank long [M] (0 = best). A pair (i, j) with equal prompt_index and rank[i] < rank[j] is
    one comparison the reward model should win for row i.
    """
    sequences, answer_masks, prompt_index, rank = [], [], [], []
    for example_index, example in enumerate(examples):
        for answer_rank, (ids, answer_start) in enumerate(zip(example["input_ids"], example["answer_start"])):
            sequences.append(ids)
            answer_masks.append([position >= answer_start for position in range(len(ids))])
            prompt_index.append(example_index)
            rank.append(answer_rank)
    batch = pad_right(sequences, pad_id, answer_masks)
    batch["prompt_index"] = torch.tensor(prompt_index, dtype=torch.long)  # [M]
    batch["rank"] = torch.tensor(rank, dtype=torch.long)  # [M]
    return batch


def _check_batch(input_ids: Sequence[Sequence[int]], pad_id: int | None) -> None:
    if not input_ids:
        raise ValueError("cannot pad an empty batch")
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer a pad token (its EOS will do: masks come from lengths)")
