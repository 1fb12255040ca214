"""What an unknown config key probably meant: one of our names (given in full, dotted), or the
name a TRL / Hugging Face `TrainingArguments` user brings (`learning_rate` is `optim.lr` here)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Mapping

# TRL / HF name -> (our candidates, first one the config has wins; a note, or "" )
# No candidates: the setting does not exist here, and the note says what happens instead.
FOREIGN_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "learning_rate": (("optim.lr",), ""),
    "num_train_epochs": (("epochs",), ""),
    "max_steps": (("iterations", "epochs"), "runs are counted in epochs, or PPO iterations, not optimiser steps"),
    "total_episodes": (("iterations",), "iterations x rollout.batch_size episodes"),
    "per_device_train_batch_size": (("micro_batch_size",), "rows per forward; batch_size is per optimiser step"),
    "per_device_eval_batch_size": (("micro_batch_size", "batch_size"), ""),
    "gradient_accumulation_steps": (("batch_size",), "accumulation = batch_size / micro_batch_size"),
    "num_mini_batches": (("mini_batch_size",), "mini-batches per epoch = rollout.batch_size / mini_batch_size"),
    "output_dir": (("out_dir",), "or --out"),
    "model_name_or_path": (("model.path", "model_path"), "a local directory, or --model"),
    "dataset_name": (("data.path", "data.dir"), "a local file, or --data"),
    "train_file": (("data.path", "data.sft"), ""),
    "warmup_ratio": (("optim.warmup_steps",), "warm-up is given in optimiser steps"),
    "adam_epsilon": (("optim.adam_eps",), ""),
    "logging_steps": (("log_every",), ""),
    "save_steps": (("checkpoint_every",), ""),
    "eval_steps": (("eval_every",), ""),
    "save_total_limit": (("keep_last",), ""),
    "resume_from_checkpoint": (("resume",), "a checkpoint path, or auto"),
    "bf16": (("precision",), "precision=bf16"),
    "fp16": (("precision",), "precision=fp16"),
    "max_length": (("data.max_length", "data.max_prompt_length"), ""),
    "max_seq_length": (("data.max_length", "data.max_prompt_length"), ""),
    "max_prompt_length": (("data.max_prompt_length",), ""),
    "response_length": (("rollout.max_new_tokens", "max_new_tokens"), ""),
    "max_new_tokens": (("rollout.max_new_tokens",), ""),
    "kl_coef": (("kl.coef",), ""),
    "init_kl_coef": (("kl.coef",), ""),
    "kl_estimator": (("kl.estimator",), ""),
    "cliprange": (("clip_eps",), ""),
    "cliprange_value": (("value_clip_eps",), ""),
    "num_ppo_epochs": (("ppo_epochs",), ""),
    "missing_eos_penalty": (("rollout.no_eos_score",), "a fixed score for answers that never stop"),
    "center_rewards_coefficient": (("center_coef",), ""),
    "load_in_4bit": (("model.quantization",), "model.quantization=nf4"),
    "lora_target_modules": (("model.target_modules",), ""),
    "report_to": ((), "metrics go to <out>/metrics.jsonl, a PNG plot and TensorBoard events (when "
                      "tensorboard is installed); there is no wandb/hub reporting"),
    "push_to_hub": ((), "runs stay local; the adapters under <out> are plain peft directories"),
    "lr_scheduler_type": ((), "the schedule is linear warm-up then cosine decay to optim.min_lr_ratio of the "
                              "peak (1.0: constant)"),
}


def dotted_names(cls: type, prefix: str = "") -> list[str]:
    """Every field of dataclass `cls`, groups and leaves, dotted (`optim`, `optim.lr`, ...)."""
    names = []
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        names.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            names.extend(dotted_names(tp, prefix + name + "."))
    return names


def typed_key(where: str, value: object) -> str:
    """The dotted key as the user wrote it: `optimizer: {lr: 1}` was `optimizer.lr`."""
    while isinstance(value, Mapping) and len(value) == 1:
        (key, value), = value.items()
        where = f"{where}.{key}"
    return where


def unknown_key_hint(typed: str, key: str, root: type, local_names: list[str], prefix: str) -> str:
    """The end of 'unknown config key ...': what `typed` (dotted, from the root config; `key` is its
    part among `local_names`, the fields of the group `prefix`) probably meant."""
    ours = dotted_names(root)
    last = typed.rsplit(".", 1)[-1]
    if last in FOREIGN_NAMES:
        candidates, note = FOREIGN_NAMES[last]
        if not candidates:
            return f": not supported here: {note}"
        match = next((c for c in candidates if c in ours), None)
        if match is not None:
            return f": TRL / Hugging Face's '{last}' is '{match}' here" + (f" ({note})" if note else "")
    same_leaf = [name for name in ours if name.rsplit(".", 1)[-1] == last and name != typed]
    if same_leaf:
        return f"; did you mean '{same_leaf[0]}'?"
    group = typed.rsplit(".", 1)[0] if "." in typed else ""
    local = difflib.get_close_matches(key, local_names, n=1, cutoff=0.6)
    if local:  # a typo inside the right group; a mistyped group keeps the rest of the key when it fits
        rest = typed[len(prefix) + len(key):]
        close = [prefix + local[0] + rest if prefix + local[0] + rest in ours else prefix + local[0]]
    else:  # a key from another group
        elsewhere = [n for n in ours if (n.rsplit(".", 1)[0] if "." in n else "") != group
                     and not typed.startswith(n + ".")]
        close = difflib.get_close_matches(typed, elsewhere, n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(local_names))}"
