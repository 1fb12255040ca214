"""The data layer: record files in, padded batches with answer masks out.

    records = load_records("data/sft.jsonl", "sft")            # records.py: read + check each record
    train = split_for("data/sft.jsonl").select(records, "train")  # split.py: one user split for all stages
    examples, report = tokenize_sft(train, tokenizer, max_length=512)  # tokenize.py: ids + answer_mask
    batch = pad_right([e["input_ids"] for e in examples[:8]], tokenizer.pad_token_id,
                      [e["answer_mask"] for e in examples[:8]])   # collate.py: tensors [B, S]
    labels = shift_labels(batch["input_ids"], batch["answer_mask"])  # [B, S], -100 where no loss

This package knows nothing of the stages; it imports only `rlhf.errors`.
"""

from rlhf.data.collate import IGNORE_INDEX, collate_rankings, pad_left, pad_right, shift_labels
from rlhf.data.records import KINDS, RecordList, load_records
from rlhf.data.parts import load_parts
from rlhf.data.split import PARTS, SPLIT_FILE, UserSplit, split_for
from rlhf.data.tokenize import (
    DEFAULT_MIN_PROMPT_TOKENS,
    TruncationReport,
    resolve_chat_template,
    tokenize_pretrain,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_sft,
)

__all__ = [
    "DEFAULT_MIN_PROMPT_TOKENS",
    "IGNORE_INDEX",
    "PARTS",
    "SPLIT_FILE",
    "KINDS",
    "RecordList",
    "TruncationReport",
    "UserSplit",
    "collate_rankings",
    "load_parts",
    "load_records",
    "pad_left",
    "pad_right",
    "resolve_chat_template",
    "shift_labels",
    "split_for",
    "tokenize_pretrain",
    "tokenize_prompts",
    "tokenize_rankings",
    "tokenize_sft",
]
