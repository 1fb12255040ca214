"""Real prompts for `ppo_step.py --model DIR`: a local model's own tokenizer and chat template over
real prompt text, cut to one fixed shape so both providers (ours and the TRL peer) time the same work.

Every row is exactly `length` token ids and ends where a real prompt ends: the prompts are rendered
(as a user turn through the tokenizer's chat template when it has one, else as plain text), their ids
are joined into one stream, and row i is the `length` ids that end with prompt i (a short prompt is
preceded by the end of the one before it). The prompts are the instruction task's RL prompts
(`rlhf.tasks.instructions`) unless a prompts file is given. The rows go to a JSON file that both
workers read, so neither tokenises again.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.data import load_records
from rlhf.errors import ConfigError
from rlhf.tasks.instructions import InstructionTaskConfig, make_records


def real_texts(prompts_path: str | None, n_pretrain: int) -> tuple[list[str], list[str]]:
    """(prompt texts, pretraining texts): from `prompts_path` ({"prompt"} records) or the instruction task;
    the pretraining texts (PPO-ptx rows, ours only) are the task's plain statements either way."""
    records = make_records(InstructionTaskConfig(n_sft=1, n_rm_prompts=1, n_pretrain_texts=n_pretrain))
    prompts = ([r["prompt"] for r in load_records(prompts_path, "prompts")] if prompts_path
               else [r["prompt"] for r in records["prompts"]])
    return prompts, [r["text"] for r in records["pretrain"]]


def render(tokenizer, prompt: str) -> list[int]:
    """The ids the model sees for `prompt`: its chat template's user turn + generation prompt, if any."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def fixed_length_rows(prompts_ids: list[list[int]], length: int, n: int) -> list[list[int]]:
    """`n` rows of exactly `length` ids, row i ending where prompt i (cycling) ends (see the module doc)."""
    if not prompts_ids:
        raise ConfigError("no prompts to benchmark with")
    stream, ends = [], []  # ends: where each prompt ends in the stream, once a full row fits before it
    while len(ends) < n:
        for ids in prompts_ids:
            stream.extend(ids)
            if len(stream) >= length:
                ends.append(len(stream))
    return [stream[end - length:end] for end in ends[:n]]


def write_prompt_rows(model_dir: Path, prompts_path: str | None, length: int, n: int, out: Path,
                      n_pretrain: int = 64) -> dict:
    """Write the rows to `out` (JSON list of id lists); -> {"prompt_ids": str(out), "ptx_texts": [...],
    "prompts_source", "mean_prompt_tokens"} for the workers' settings."""
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a local Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts, pretrain = real_texts(prompts_path, n_pretrain)
    prompts_ids = [render(tokenizer, p) for p in prompts]
    out.write_text(json.dumps(fixed_length_rows(prompts_ids, length, n)))
    return {"prompt_ids": str(out), "ptx_texts": pretrain,
            "prompts_source": prompts_path or "rlhf.tasks.instructions (RL prompts)",
            "mean_prompt_tokens": sum(map(len, prompts_ids)) / len(prompts_ids),
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def model_summary(model_dir: Path) -> dict:
    """What config.json says about the model's shape (for the result record)."""
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "torch_dtype", "dtype")
    return {key: config[key] for key in keys if key in config}
